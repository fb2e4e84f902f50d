"""PNG plots of a suite's results (matplotlib, without pyplot: no backend or global state touched).

One figure per (dtype, threads), chosen by the suite's layers:

- **crossover** plots where layers of one shape differ only in pruning (the ``pruned``
  suite): time against the fraction of zero weights, one panel per shape, the sparse
  operator's engines against PyTorch and im2col -- one figure for all passes together and
  one per pass;
- **sweep** lines where layers vary one quantity (the ``scaling`` suite), one panel each;
- otherwise **bars** of every method's time relative to im2col, per layer.

Figures are 900 x 600 pixels (100 dpi) or taller for long bar lists; log axes carry labels at
their major ticks only, so the labels never overprint.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["DPI", "plot"]

DPI = 100
_SIZE = (9.0, 6.0)  # inches: 900 x 600 pixels at DPI
# Methods drawn against the sparse engines in the crossover plot.
_BASELINES = ("torch", "im2col")


def _log_axis(axis, ticks=None, labels=None) -> None:
    """Labels at major ticks only -- the given ones, else 1, 2, 5 per decade -- and unlabelled
    minor ticks, so no label overprints another."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    if ticks is not None:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_ticklabels(labels)
        axis.set_minor_locator(FixedLocator([]))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


_PASS_LABELS = {"forward": "fwd", "adjoint": "adj", "weight_grad": "dw"}


def _times(rows: list[dict], key: str = "total") -> dict[tuple[str, str], float]:
    """Median seconds of ``key`` (a pass, or "total") per (layer, method) that ran."""
    return {(r["layer"], r["method"]): r["timing"][key]["median_s"] for r in rows
            if r["status"] == "ok" and key in r["timing"]}


def _engine_methods(result: dict) -> list[str]:
    """Methods that ran the sparse operator (they record the engines of their products)."""
    found = {r["method"] for r in result["results"] if r["status"] == "ok" and "engines" in (r["info"] or {})}
    return [m for m in result["settings"]["methods"] if m in found]


def _pruning_bases(layers: dict[str, dict]) -> dict[str, list[str]]:
    """Layer names grouped by shape (id without the pruning), for shapes swept over two or more sparsities."""
    groups: dict[str, list[str]] = {}
    for name, layer in layers.items():
        key = tuple(sorted((k, v) for k, v in layer.items()
                           if k not in ("name", "prune", "id", "macs", "passes", "sweep")))
        groups.setdefault(repr(key), []).append(name)
    return {names[0]: sorted(names, key=lambda n: layers[n]["prune"]) for names in groups.values()
            if len({layers[n]["prune"] for n in names}) > 1}


def _shape_label(layer: dict) -> str:
    k, size = layer["kernel"], layer["size"]
    return (f"{layer['in_channels']}->{layer['out_channels']} {k}x{k} on {size}x{size}, N={layer['batch']}"
            + (f", stride {layer['stride']}" if layer["stride"] != 1 else ""))


def _crossover(result: dict, dt: str, t: int, totals: dict, layers: dict[str, dict], what: str = "total"):
    from matplotlib.figure import Figure

    bases = _pruning_bases(layers)
    engines = _engine_methods(result)
    methods = engines + [m for m in _BASELINES if m in result["settings"]["methods"]]
    n_panels = len(bases) + 1  # the last panel holds the legend and what is held fixed
    cols = 2 if n_panels > 1 else 1
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(_SIZE[0], max(_SIZE[1], 3.0 * rows)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    handles = {}
    for ax, members in zip(axes, bases.values()):
        for m in methods:
            pts = [(100 * (1 - layers[n]["prune"]), totals[(n, m)] * 1e3) for n in members if (n, m) in totals]
            if pts:
                style = dict(linestyle="--", marker="s") if m in _BASELINES else dict(linestyle="-", marker="o")
                (line,) = ax.plot(*zip(*pts), label=m, **style)
                handles.setdefault(m, line)
        kept = [100 * (1 - layers[n]["prune"]) for n in members]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()  # sparser to the right
        _log_axis(ax.xaxis, kept, [f"{round(100 - v)}" for v in kept])
        _log_axis(ax.yaxis)
        passes = ("+".join(_PASS_LABELS[p] for p in layers[members[0]]["passes"]) if what == "total"
                  else _PASS_LABELS[what])
        ax.set(xlabel="weights zero (%)", ylabel=f"{passes} time (ms)")
        ax.set_title(f"{_shape_label(layers[members[0]])}\n{dt}, {t} thread(s)", fontsize="medium")
        ax.grid(True, which="major", alpha=0.3)
    legend_ax = axes[len(bases)]
    legend_ax.axis("off")
    legend_ax.legend(list(handles.values()), list(handles), loc="upper left", fontsize="small", ncols=2,
                     title="solid: sparse engines; dashed: dense")
    prune_by = sorted({layers[n]["prune_by"] for members in bases.values() for n in members})
    legend_ax.text(0.0, 0.0, f"Held fixed: {dt}, {t} thread(s), median of repeats.\n"
                             f"Pruning: {' / '.join(prune_by)}; pruned weights are left out\n"
                             "of the sparse matrix (weight_mask); torch and im2col\n"
                             "multiply the zeros.", transform=legend_ax.transAxes, fontsize="small", va="bottom")
    for ax in axes[len(bases) + 1:]:
        ax.axis("off")
    shown = "all passes" if what == "total" else f"the {what} pass"
    fig.suptitle(f"{result['suite']}: where sparse overtakes dense, {shown} ({dt}, {t} thread(s))")
    return fig


def _sweeps(result: dict, dt: str, t: int, totals: dict, layers: dict[str, dict], sweeps: list[str]):
    from matplotlib.figure import Figure

    cols = 2 if len(sweeps) > 1 else 1
    rows = math.ceil(len(sweeps) / cols)
    fig = Figure(figsize=(_SIZE[0], max(_SIZE[1], 3.0 * rows)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, sweep in zip(axes, sweeps):
        members = [name for name, layer in layers.items() if layer["sweep"] and layer["sweep"][0] == sweep]
        ax.set_title(f"{sweep} varied ({dt}, {t} thread(s))", fontsize="medium")
        for m in result["settings"]["methods"]:
            pts = [(layers[name]["sweep"][1], totals[(name, m)] * 1e3) for name in members if (name, m) in totals]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        values = [layers[name]["sweep"][1] for name in members]
        ax.set(xscale="log", yscale="log", xlabel=sweep, ylabel="fwd+adj+dw time (ms)")
        _log_axis(ax.xaxis, values, [str(v) for v in values])
        _log_axis(ax.yaxis)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(sweeps):]:
        ax.axis("off")
    axes[0].legend(fontsize="x-small", ncols=2)
    fig.suptitle(f"{result['suite']}: where the curves cross ({dt}, {t} thread(s); other quantities at the "
                 f"base layer's)")
    return fig


def _bars(result: dict, dt: str, t: int, totals: dict, layers: dict[str, dict]):
    from matplotlib.figure import Figure

    names = list(layers)
    methods = result["settings"]["methods"]
    height = 0.8 / len(methods)
    fig = Figure(figsize=(_SIZE[0], max(_SIZE[1], 0.1 * len(names) * len(methods) + 1.5)), layout="constrained")
    ax = fig.subplots()
    for i, m in enumerate(methods):
        ratios = [totals.get((name, m), np.nan) / totals[(name, "im2col")] if (name, "im2col") in totals
                  else np.nan for name in names]
        ax.barh(np.arange(len(names)) + i * height, ratios, height=height, label=m)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names, fontsize="small")
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="time of all passes / im2col's (< 1: faster than im2col)",
           title=f"{result['suite']} ({dt}, {t} thread(s))")
    _log_axis(ax.xaxis)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot(result: dict, out_dir: Path) -> list[str]:
    """Draw one PNG per (dtype, threads) of a suite's results.

    Parameters
    ----------
    result : dict
        As returned by :func:`sparseconv.bench.run_suite`.
    out_dir : Path
        Existing directory the PNGs are written to.

    Returns
    -------
    list of str
        Paths written: ``<suite>_crossover_<dtype>_t<threads>.png`` for pruning sweeps (plus
        ``<suite>_crossover_<pass>_<dtype>_t<threads>.png`` per pass) and scaling sweeps,
        ``<suite>_<dtype>_t<threads>.png`` otherwise.

    Raises
    ------
    ImportError
        When matplotlib is not installed.
    """
    paths = []
    layers = {layer["name"]: layer for layer in result["layers"]}
    sweeps = list(dict.fromkeys(tuple(layer["sweep"])[0] for layer in layers.values() if layer["sweep"]))
    crossover = bool(_pruning_bases(layers))
    for config in result["summary"]["configs"]:
        dt, t = config["dtype"], config["threads"]
        rows = [r for r in result["results"] if r["dtype"] == dt and r["threads"] == t]
        figures = {}
        if crossover:
            figures["_crossover"] = _crossover(result, dt, t, _times(rows), layers)
            # One per pass too: issue 11's targets are per pass.
            for name in dict.fromkeys(p for layer in layers.values() for p in layer["passes"]):
                figures[f"_crossover_{name}"] = _crossover(result, dt, t, _times(rows, name), layers, name)
        elif sweeps:
            figures["_crossover"] = _sweeps(result, dt, t, _times(rows), layers, sweeps)
        else:
            figures[""] = _bars(result, dt, t, _times(rows), layers)
        for tag, fig in figures.items():
            path = out_dir / f"{result['suite']}{tag}_{dt}_t{t}.png"
            fig.savefig(path, dpi=DPI)
            paths.append(str(path))
    return paths
