"""Reports of a suite's results: ratios and summaries, a plain-text table, Markdown, the JSON file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .methods import DEFAULT_MEMORY_BUDGET, METHODS
from .methods._base import format_bytes
from .plots import plot
from .suites import PASSES

__all__ = ["NOISY_SPREAD", "BASELINES", "add_ratios", "summarise", "format_table", "format_markdown", "write_outputs"]

# A pass whose median is this many times its minimum was disturbed by other work while it ran;
# the summary counts such measurements so that an unreliable configuration says so.
NOISY_SPREAD = 1.5
# Every timed row is divided by these methods' times on the same layer, dtype and threads
# (PyLops only runs on single-channel image layers: its ratios are None elsewhere).
BASELINES = ("im2col", "torch", "pylops")


def _timed_passes(row: dict) -> list[str]:
    """The passes a timed row has (the layer's passes)."""
    return [p for p in PASSES if p in row["timing"]]


def _median(timing: dict, name: str) -> Optional[float]:
    return timing[name]["median_s"] if name in timing else None


def add_ratios(rows: list[dict]) -> None:
    """Ratio of every timed row to each of :data:`BASELINES` on the same layer, dtype and threads.

    ``ratio_to_X`` divides medians, ``ratio_to_X_min`` minima (the less noise-sensitive one).

    Parameters
    ----------
    rows : list of dict
        Result rows, updated in place.
    """
    by_key = {(r["layer"], r["dtype"], r["threads"], r["method"]): r for r in rows}
    for r in rows:
        if r["status"] != "ok":
            continue
        for other in BASELINES:
            base = by_key.get((r["layer"], r["dtype"], r["threads"], other))
            ok = base is not None and base["status"] == "ok"
            for name in (*_timed_passes(r), "total"):
                mine = r["timing"][name]
                r["timing"][name][f"ratio_to_{other}"] = (
                    mine["median_s"] / base["timing"][name]["median_s"] if ok else None)
                r["timing"][name][f"ratio_to_{other}_min"] = (
                    mine["min_s"] / base["timing"][name]["min_s"] if ok else None)


def _geomean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def summarise(rows: list[dict], dtypes: Sequence[str], threads: Sequence[int]) -> dict:
    """Per (dtype, threads): sparse's ratios to each of :data:`BASELINES`, per layer and as geometric means.

    Parameters
    ----------
    rows : list of dict
        Result rows after :func:`add_ratios`.
    dtypes : sequence of str
    threads : sequence of int

    Returns
    -------
    dict
        ``{"configs": [...]}``, one entry per (dtype, threads).
    """
    configs = []
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    keys = [f"sparse_over_{other}{suffix}" for other in BASELINES for suffix in ("", "_min")]
    for dt in dtypes:
        for t in threads:
            per_layer = []
            for name in layers:
                group = {r["method"]: r for r in rows if r["layer"] == name and r["dtype"] == dt
                         and r["threads"] == t}
                timed = {m: r["timing"]["total"]["median_s"] for m, r in group.items() if r["status"] == "ok"}
                sparse = group.get("sparse")
                timing = sparse["timing"] if sparse and sparse["status"] == "ok" else None
                entry = {"layer": name, "total_s": timed, "fastest": min(timed, key=timed.get) if timed else None}
                for other in BASELINES:
                    for suffix in ("", "_min"):
                        entry[f"sparse_over_{other}{suffix}"] = (
                            timing["total"][f"ratio_to_{other}{suffix}"] if timing else None)
                    entry[f"sparse_over_{other}_by_pass"] = (
                        {p: timing[p][f"ratio_to_{other}"] for p in PASSES if p in timing} if timing else None)
                per_layer.append(entry)
            spreads = [r["timing"][p]["spread"] for r in rows if r["dtype"] == dt and r["threads"] == t
                       and r["status"] == "ok" for p in _timed_passes(r)]
            config: dict[str, Any] = {"dtype": dt, "threads": t, "layers": per_layer,
                                      "noisy_measurements": sum(v > NOISY_SPREAD for v in spreads),
                                      "measurements": len(spreads)}
            for key in keys:
                config[f"geomean_{key}"] = _geomean([e[key] for e in per_layer])
            for other in BASELINES:
                values = [e[f"sparse_over_{other}"] for e in per_layer if e[f"sparse_over_{other}"] is not None]
                config[f"sparse_faster_than_{other}"] = sum(v < 1 for v in values)
                config[f"compared_with_{other}"] = len(values)
                by_pass = [b for b in (e[f"sparse_over_{other}_by_pass"] for e in per_layer)
                           if b and None not in b.values()]
                config[f"geomean_sparse_over_{other}_by_pass"] = {
                    p: _geomean([b[p] for b in by_pass if p in b]) for p in PASSES}
            configs.append(config)
    return {"configs": configs}


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(result: dict) -> str:
    """The suite's results as a plain-text table, one block per (dtype, threads)."""
    lines = []
    head = (f"{'layer':<28}{'method':<9}{'fwd ms':>10}{'adj ms':>10}{'dw ms':>10}{'total ms':>10}"
            f"{'GFLOP/s':>9}{'/im2col':>9}{'buffer':>11}  status")
    for config in result["summary"]["configs"]:
        dt, t = config["dtype"], config["threads"]
        lines += ["", f"== {result['suite']}  {dt}  threads={t}", head]
        for r in result["results"]:
            if r["dtype"] != dt or r["threads"] != t:
                continue
            if r["status"] == "ok":
                tm = r["timing"]
                lines.append(
                    f"{r['layer'][:27]:<28}{r['method']:<9}{_ms(_median(tm, 'forward')):>10}"
                    f"{_ms(_median(tm, 'adjoint')):>10}{_ms(_median(tm, 'weight_grad')):>10}"
                    f"{_ms(tm['total']['median_s']):>10}{tm['total']['gflops']:>9.2f}"
                    f"{_ratio(tm['total']['ratio_to_im2col']):>9}{format_bytes(r['buffer_bytes']):>11}  verified")
            else:
                reason = r["reason"] if len(r["reason"]) < 90 else r["reason"][:87] + "..."
                lines.append(f"{r['layer'][:27]:<28}{r['method']:<9}  {r['status']}: {reason}")
        g = config
        lines.append(f"-- geometric mean of sparse/im2col (all passes): {_ratio(g['geomean_sparse_over_im2col'])}"
                     f" ({g['sparse_faster_than_im2col']}/{g['compared_with_im2col']} layers faster); "
                     f"sparse/torch: {_ratio(g['geomean_sparse_over_torch'])}"
                     f" ({g['sparse_faster_than_torch']}/{g['compared_with_torch']} faster); "
                     f"noisy measurements: {g['noisy_measurements']}/{g['measurements']}")
    return "\n".join(lines)


def _load_text(load: Optional[list[float]]) -> str:
    return "unknown" if load is None else " / ".join(f"{v:.1f}" for v in load) + " (1 / 5 / 15 min)"


def _command(result: dict) -> str:
    """The command line that reruns a suite with the same settings."""
    st = result["settings"]
    parts = ["python -m sparseconv bench", f"--suite {result['suite']}", f"--dtype {','.join(st['dtypes'])}",
             f"--threads {','.join(map(str, st['threads']))}", f"--repeats {st['repeats']}"]
    if set(st["methods"]) != set(METHODS):
        parts.append(f"--methods {','.join(st['methods'])}")
    if st["memory_budget"] != DEFAULT_MEMORY_BUDGET:
        parts.append(f"--memory-budget {st['memory_budget']}")
    if result["files"].get("json"):
        parts.append(f"--out {Path(result['files']['json']).parent}")
    return " ".join(parts)


def format_markdown(result: dict) -> str:
    """A Markdown summary: settings, key ratios, a table per configuration, skips and failures."""
    env = result["environment"]
    settings = result["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None)
    missing = [k for k, v in env["versions"].items() if v is None]
    out = [
        f"# sparseconv benchmark: `{result['suite']}`", "",
        f"Generated {result['created']} in {result['wall_s']:.0f} s; regenerate with", "",
        f"    {_command(result)}", "",
        f"- CPU: {env['cpu']} ({env['cpus_available']} of {env['cpu_count']} cores available), {env['platform']}",
        f"- Versions: {versions}" + (f"; not installed: {', '.join(missing)}" if missing else ""),
        f"- dtypes {', '.join(settings['dtypes'])}; threads {', '.join(map(str, settings['threads']))}; "
        f"{settings['repeats']} repeats (median reported); memory budget {format_bytes(settings['memory_budget'])}",
        f"- Threading: {env['scipy_threading']}.",
        "- Every result was checked against a float64 reference before it was timed (relative "
        "tolerance " + ", ".join(f"{k} {v:.0e}" for k, v in settings["tolerances"].items()) + ").",
        "- Noise: the machine is shared (load average "
        f"{_load_text(env['load_average'])} at the start, {_load_text(result['load_average_end'])} at the end, "
        f"on {env['cpu_count']} cores). Repeats of all methods are interleaved so that load hits them "
        "alike, but differences under about 20% are not meaningful, and runs with as many threads as "
        "cores suffer most (spinning BLAS / OpenMP threads are descheduled by other work).",
        "", "## Key ratios", "",
        "Time of sparse divided by time of the other method for all passes of a layer (fwd + adj + dw; "
        "fwd + adj through the LinearOperator for image layers), geometric mean over the "
        "layers (< 1: sparse is faster); \"median\" divides median times, \"min\" minimum times (less "
        "sensitive to other processes). Per pass: fwd / adj / dw, medians. Noisy: measurements whose "
        f"median exceeds {NOISY_SPREAD}x their minimum (disturbed while running); a configuration with "
        "many of them is not to be trusted.", "",
        "| dtype | threads | sparse/im2col median | min | faster on | per pass | sparse/torch median | min "
        "| faster on | per pass | noisy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["summary"]["configs"]:
        cells = []
        for other in ("im2col", "torch"):
            by_pass = c[f"geomean_sparse_over_{other}_by_pass"]
            cells += [_ratio(c[f"geomean_sparse_over_{other}"]), _ratio(c[f"geomean_sparse_over_{other}_min"]),
                      f"{c[f'sparse_faster_than_{other}']}/{c[f'compared_with_{other}']}",
                      " / ".join(_ratio(by_pass.get(p)) for p in PASSES)]
        cells.append(f"{c['noisy_measurements']}/{c['measurements']}")
        out.append(f"| {c['dtype']} | {c['threads']} | " + " | ".join(cells) + " |")
    methods = settings["methods"]
    for c in result["summary"]["configs"]:
        out += ["", f"## {c['dtype']}, {c['threads']} thread(s): total ms (ratio to im2col)", "",
                "| layer | " + " | ".join(methods) + " | fastest |", "|---" * (len(methods) + 2) + "|"]
        for entry in c["layers"]:
            cells = []
            for m in methods:
                row = next(r for r in result["results"] if r["layer"] == entry["layer"] and r["method"] == m
                           and r["dtype"] == c["dtype"] and r["threads"] == c["threads"])
                if row["status"] == "ok":
                    total = row["timing"]["total"]
                    cells.append(f"{_ms(total['median_s'])} ({_ratio(total['ratio_to_im2col'])})")
                else:
                    cells.append(row["status"])
            out.append(f"| {entry['layer']} | " + " | ".join(cells) + f" | {entry['fastest'] or '-'} |")
    pylops = [(c, e) for c in result["summary"]["configs"] for e in c["layers"] if e["sparse_over_pylops"] is not None]
    if pylops:
        out += ["", "## Against PyLops (one vector at a time through the LinearOperator)", "",
                "Per pass: sparse time / PyLops `Convolve2D(method=\"fft\")` time (< 1: sparse is faster), and "
                "sparse's adjoint time / its forward time.", "",
                "| dtype | threads | layer | forward | adjoint | sparse adjoint / forward |",
                "|---|---|---|---|---|---|"]
        for c, e in pylops:
            row = next(r for r in result["results"] if r["layer"] == e["layer"] and r["method"] == "sparse"
                       and r["dtype"] == c["dtype"] and r["threads"] == c["threads"])
            own = row["timing"]["adjoint"]["median_s"] / row["timing"]["forward"]["median_s"]
            by_pass = e["sparse_over_pylops_by_pass"]
            out.append(f"| {c['dtype']} | {c['threads']} | {e['layer']} | {_ratio(by_pass.get('forward'))} | "
                       f"{_ratio(by_pass.get('adjoint'))} | {_ratio(own)} |")
    out += ["", "## Where sparse wins and loses", ""]
    for c in result["summary"]["configs"]:
        rated = [(e["sparse_over_im2col"], e["layer"]) for e in c["layers"] if e["sparse_over_im2col"] is not None]
        if not rated:
            continue
        best, worst = min(rated), max(rated)
        wins = [layer for v, layer in rated if v < 1]
        out.append(f"- {c['dtype']}, {c['threads']} thread(s): sparse beats im2col on {len(wins)} of {len(rated)} "
                   f"layers; best {best[0]:.2f}x ({best[1]}), worst {worst[0]:.2f}x ({worst[1]}).")
    skipped = [r for r in result["results"] if r["status"] != "ok"]
    out += ["", "## Skipped and failed", ""]
    if not skipped:
        out.append("None: every method ran and was verified on every layer.")
    for reason in dict.fromkeys((r["method"], r["status"], r["reason"]) for r in skipped):
        layers = sorted({r["layer"] for r in skipped if (r["method"], r["status"], r["reason"]) == reason})
        out.append(f"- **{reason[0]}** {reason[1]} on {', '.join(layers)}: {reason[2]}")
    if result["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    plots = result["files"].get("plots", [])
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def write_outputs(result: dict, out_dir: Path, *, plots: bool, verbose: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["suite"]
    files = result["files"]
    files["json"] = str(out_dir / f"{name}.json")
    files["markdown"] = str(out_dir / f"{name}.md")
    files["plots"] = []
    if plots:
        try:
            files["plots"] = plot(result, out_dir)
        except ImportError as err:
            files["plots_skipped"] = f"plots skipped: matplotlib is not installed ({err})"
            result["notes"].append(files["plots_skipped"])
            if verbose:
                print(f"note: {files['plots_skipped']}", file=sys.stderr)
    else:
        files["plots_skipped"] = "plots skipped: disabled (--no-plots)"
    Path(files["markdown"]).write_text(format_markdown(result), encoding="utf-8")
    Path(files["json"]).write_text(json.dumps(result, indent=1, allow_nan=False), encoding="utf-8")
    if verbose:
        print(f"wrote {files['json']}, {files['markdown']}" + "".join(f", {p}" for p in files["plots"]))
