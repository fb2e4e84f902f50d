"""Running a suite: every method set up, verified against the reference, then timed interleaved.

Each result is checked against the float64 reference of :func:`~sparseconv.bench.suites.make_case`
*before* it is timed; a method whose answer is wrong is recorded as failed and not timed, one
that cannot run (optional package missing, memory budget exceeded, too slow) as skipped with
the reason.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .environment import environment_info, load_average
from .methods import (DEFAULT_MAX_DIRECT_MACS, METHODS, MethodSkipped, Prepared, Settings, prepare_method,
                      resolve_budget)
from .report import add_ratios, format_table, summarise, write_outputs
from .suites import PASSES, SUITES, TOLERANCES, Case, make_case, suite_layers
from .timing import DEFAULT_MAX_SECONDS, MIN_REPEAT_SECONDS, measure, measure_interleaved, thread_limits, traced_call

__all__ = ["SCHEMA", "verify", "run_suite"]

# The JSON's schema: version 2 names the passes forward / adjoint / weight_grad (version 1:
# input_grad for the adjoint) and records each operator method's engines under info.engines.
SCHEMA = "sparseconv.bench/2"

PathLike = Union[str, os.PathLike]


def verify(prepared: Prepared, case: Case) -> dict[str, dict]:
    """Run each of the layer's passes once and compare it with the case's float64 reference.

    Parameters
    ----------
    prepared : Prepared
    case : Case

    Returns
    -------
    dict of str to dict
        Per pass: ``ok``, ``max_abs_err``, ``rel_err`` (max abs error / max abs reference),
        ``tol``, ``reference``, ``traced_peak_bytes`` (numpy allocations during the call, or
        None when the method's allocator is not traced) and ``first_call_s``.
    """
    tol = TOLERANCES[case.dtype.name]
    report = {}
    for name in case.layer.passes:
        peak, first_s, out = traced_call(prepared.passes[name], prepared.traced)
        got = np.asarray(prepared.to_numpy(out), dtype=np.float64)
        want = case.expected[name]
        if prepared.flat and got.ndim == 1 and got.size == want.size:
            got = got.reshape(want.shape)
        if got.shape != want.shape:
            report[name] = {"ok": False, "error": f"shape {got.shape}, expected {want.shape}", "tol": tol,
                            "reference": case.reference, "traced_peak_bytes": peak, "first_call_s": first_s}
            continue
        if name == "weight_grad" and case.mask is not None:
            got = got * case.mask
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        rel = err / scale if scale > 0 else err
        report[name] = {"ok": bool(np.isfinite(rel) and rel <= tol), "max_abs_err": err, "rel_err": rel,
                        "tol": tol, "reference": case.reference, "traced_peak_bytes": peak,
                        "first_call_s": first_s}
    return report


def _prepare_row(method: str, case: Case, settings: Settings) -> tuple[dict, Optional[Prepared]]:
    """Set a method up and verify it: its result row, and the prepared method if it may be timed."""
    layer = case.layer
    row: dict[str, Any] = {
        "layer": layer.name, "layer_id": layer.describe(), "method": method, "dtype": case.dtype.name,
        "threads": settings.threads, "status": "skipped", "reason": None, "macs": layer.macs,
        "shapes": {"x": list(layer.x_shape), "w": list(layer.weight_shape), "y": list(layer.y_shape)},
        "buffer_name": None, "buffer_bytes": None, "build_s": None, "refresh_s": None, "verification": None,
        "timing": None, "info": {},
    }
    try:
        prepared = prepare_method(method, case, settings)
    except MethodSkipped as err:
        row["reason"] = str(err)
        return row, None
    row.update(buffer_name=prepared.buffer_name, buffer_bytes=prepared.buffer_bytes, build_s=prepared.build_s,
               info=prepared.info)
    check = verify(prepared, case)
    row["verification"] = check
    failed = [name for name in layer.passes if not check[name]["ok"]]
    if failed:
        row["status"] = "failed"
        row["reason"] = "; ".join(
            f"{name}: " + (check[name].get("error") or
                           f"relative error {check[name]['rel_err']:.2e} > tolerance {check[name]['tol']:.0e}")
            for name in failed) + " (not timed: a fast wrong answer is not a result)"
        return row, None
    if prepared.refresh is not None:
        row["refresh_s"] = measure(prepared.refresh, repeats=min(settings.repeats, 3),
                                   max_seconds=settings.max_seconds)["median_s"]
    return row, prepared


def _run_group(case: Case, methods: Sequence[str], settings: Settings) -> list[dict]:
    """Every method on one case at one thread count: verify each, then time them interleaved."""
    rows, timed = [], {}
    for method in methods:
        row, prepared = _prepare_row(method, case, settings)
        rows.append(row)
        if prepared is not None:
            timed[method] = (row, prepared)
    passes = case.layer.passes
    timings: dict[str, dict] = {method: {} for method in timed}
    for name in passes:
        results = measure_interleaved({m: prepared.passes[name] for m, (_, prepared) in timed.items()},
                                      repeats=settings.repeats, max_seconds=settings.max_seconds)
        for method, result in results.items():
            result["gflops"] = 2 * case.layer.macs / result["median_s"] / 1e9
            result["spread"] = result["median_s"] / result["min_s"]
            timings[method][name] = result
    for method, (row, _) in timed.items():
        timing = timings[method]
        total = sum(timing[name]["median_s"] for name in passes)
        timing["total"] = {"median_s": total, "min_s": sum(timing[name]["min_s"] for name in passes),
                           "gflops": len(passes) * 2 * case.layer.macs / total / 1e9}
        row.update(timing=timing, status="ok")
    return rows


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None, None
    try:
        from tqdm import tqdm
    except ImportError as err:
        return None, f"no progress bar: tqdm is not installed ({err})"
    return tqdm(total=total, desc=desc, unit="config", file=sys.stderr), None


def _check_settings(dtypes: Sequence[str], threads: Sequence[int], repeats: int,
                    methods: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
    dtypes = [np.dtype(d).name if isinstance(d, (type, np.dtype)) else str(d) for d in dtypes]
    for d in dtypes:
        if d not in TOLERANCES:
            raise ValueError(f"dtypes must be among {tuple(TOLERANCES)}; got {d!r}")
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype; got an empty sequence")
    threads = list(threads)
    if not threads or not all(isinstance(t, (int, np.integer)) and t >= 1 for t in threads):
        raise ValueError(f"threads must be a non-empty sequence of positive ints; got {threads!r}")
    if not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be a positive int; got {repeats!r}")
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}; got {methods!r}")
    return dtypes, [int(t) for t in threads], methods


def run_suite(name: str, *, dtypes: Sequence[str] = ("float32", "float64"), threads: Sequence[int] = (1,),
              repeats: int = 5, out_dir: Optional[PathLike] = "results", progress: bool = True,
              methods: Sequence[str] = METHODS, memory_budget: Optional[int] = None,
              max_seconds: float = DEFAULT_MAX_SECONDS, max_direct_macs: int = DEFAULT_MAX_DIRECT_MACS,
              plots: bool = True, verbose: bool = True) -> dict:
    """Run a benchmark suite: verify, time and compare every method on every layer.

    Parameters
    ----------
    name : str
        One of :data:`~sparseconv.bench.suites.SUITES`, or ``"all"`` for every suite except
        ``smoke``, each writing its own files.
    dtypes : sequence of {"float32", "float64"}
    threads : sequence of int
        Thread counts to run at (sparseconv's pool, BLAS / OpenMP, scipy.fft workers, torch).
    repeats : int, default 5
        Timed repeats per pass (fewer for calls slower than ``max_seconds / repeats``).
    out_dir : path or None
        Where ``<suite>.json``, ``<suite>.md`` and the PNG plots go; None writes nothing.
    progress : bool, default True
        A tqdm progress bar over (layer, dtype, threads) when tqdm is installed.
    methods : sequence of str, default all of :data:`~sparseconv.bench.methods.METHODS`
        im2col is always run when another method is (every ratio needs it).
    memory_budget : int, optional
        Bytes one method's main buffer may take; default 1 GiB (at most half the RAM).
    max_seconds : float
        Time budget of one pass's measurement.
    max_direct_macs : int
        The ``direct`` method is skipped beyond this many multiply-adds per pass.
    plots : bool, default True
        Draw PNGs with matplotlib when it is installed.
    verbose : bool, default True
        Print the table and the paths written.

    Returns
    -------
    dict
        ``schema``, ``suite``, ``settings``, ``environment``, ``layers``, ``results`` (one row
        per layer, dtype, threads and method: ``status`` "ok" / "skipped" / "failed" with
        ``reason``, ``verification`` per pass, ``timing`` per pass of the layer and ``total``
        with ``median_s``, ``min_s``, ``gflops``, ``ratio_to_im2col``, ``ratio_to_torch``),
        ``summary``, ``notes`` and ``files``. For ``"all"``:
        ``{"suite": "all", "suites": {name: dict}}``.
    """
    if name == "all":
        return {"suite": "all", "suites": {
            s: run_suite(s, dtypes=dtypes, threads=threads, repeats=repeats, out_dir=out_dir, progress=progress,
                         methods=methods, memory_budget=memory_budget, max_seconds=max_seconds,
                         max_direct_macs=max_direct_macs, plots=plots, verbose=verbose)
            for s in SUITES if s != "smoke"}}
    layers = suite_layers(name)
    dtypes, threads, methods = _check_settings(dtypes, threads, repeats, methods)
    if "im2col" not in methods:
        methods = ["im2col", *methods]
    budget = resolve_budget(memory_budget)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if verbose:
            print(f"note: {text}", file=sys.stderr)

    bar, reason = _progress(len(layers) * len(dtypes) * len(threads), progress, f"bench {name}")
    if reason:
        note(reason)
    rows: list[dict] = []
    thread_configs: dict[str, dict] = {}
    environment = environment_info()  # before the run: its load average is the starting load
    started = time.perf_counter()
    try:
        for layer in layers:
            for dt in dtypes:
                case = make_case(layer, dt)
                for t in threads:
                    if bar is not None:
                        bar.set_postfix_str(f"{layer.name} {dt} t={t}")
                    settings = Settings(threads=t, budget=budget, repeats=repeats, max_seconds=max_seconds,
                                        max_direct_macs=max_direct_macs)
                    with thread_limits(t, use_torch="torch" in methods) as state:
                        thread_configs.setdefault(str(t), state)
                        rows += _run_group(case, methods, settings)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for state in thread_configs.values():
        if state.get("pools_note") and state["pools_note"] not in notes:
            note(state["pools_note"])
    for method in ("torch", "pylops"):
        for text in sorted({r["reason"] for r in rows if r["method"] == method and r["status"] == "skipped"
                            and "not installed" in r["reason"]}):
            note(f"{method} skipped: {text}")
    add_ratios(rows)
    result = {
        "schema": SCHEMA,
        "suite": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - started,
        "load_average_end": load_average(),
        "settings": {"dtypes": dtypes, "threads": threads, "repeats": repeats, "methods": methods,
                     "passes": list(PASSES), "memory_budget": budget, "max_seconds": max_seconds,
                     "max_direct_macs": max_direct_macs, "tolerances": TOLERANCES,
                     "min_repeat_seconds": MIN_REPEAT_SECONDS},
        "environment": environment,
        "thread_configs": thread_configs,
        "layers": [{**asdict(layer), "id": layer.describe(), "passes": list(layer.passes), "macs": layer.macs,
                    "out_size": layer.out_size} for layer in layers],
        "results": rows,
        "summary": summarise(rows, dtypes, threads),
        "notes": notes,
        "files": {},
    }
    if verbose:
        print(format_table(result))
    if out_dir is not None:
        write_outputs(result, Path(out_dir), plots=plots, verbose=verbose)
    return result
