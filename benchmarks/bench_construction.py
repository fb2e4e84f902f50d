"""Construction benchmark: pattern build throughput, peak memory and ``set_weight`` cost.

For each layer it measures, in one run:

- construction throughput: non-zeros per second of ``ConvOperator(..., engine="csr")``
  (median of repeats). Since issue 10 an operator builds only what its engines need, and
  ``"auto"`` would build only the factored engine's tap tables for these layers; the
  ``engine="csr"`` operator builds the explicit matrix (the pattern, its tying map and the
  values) in its constructor, which is what is timed here;
- peak memory during construction relative to the finished matrix (values, column indices,
  row pointers and tying map), traced with ``tracemalloc`` (numpy reports its buffers there);
- ``set_weight`` time (of the ``engine="csr"`` operator, which writes the matrix's values)
  relative to one forward product at batch 64 of the default (``"auto"``) operator, and
  relative to a plain copy of the matrix's value array (the memory-bound floor of a gather).

Run ``python benchmarks/bench_construction.py [--out results/construction.json]``. Targets
(issue 2, 2 cores): >= 50 M non-zeros/s, peak <= 3x the matrix, set_weight <= 25% of a forward.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import scipy

from sparseconv.bench import Layer, make_case, measure, resolve_budget
from sparseconv.bench.methods import _operator
from sparseconv.bench.timing import traced_call

__all__ = ["LAYERS", "measure_layer", "main"]

# (name, out channels, in channels, image size, kernel, padding)
LAYERS = [
    ("16->32 3x3 @ 32x32", 32, 16, 32, 3, 1),
    ("64->64 3x3 @ 56x56", 64, 64, 56, 3, 1),
]


def _median_time(fn, repeats: int) -> float:
    """Median of ``repeats`` single calls after one warm-up (the harness's timing loop)."""
    return measure(fn, repeats=repeats, max_seconds=1e9, min_repeat_seconds=0.0)["median_s"]


def measure_layer(name: str, f: int, c: int, size: int, k: int, pad: int, *, batch: int = 64,
                  repeats: int = 3, dtype: str = "float64") -> dict:
    """Measure one layer; returns a JSON-ready dict."""
    case = make_case(Layer(name, batch, c, f, size, k, padding=pad), dtype, reference=False)
    budget = resolve_budget(None)
    # engine "csr": the constructor builds the explicit matrix (and no factored tables).
    build_s = _median_time(lambda: _operator.build(case, budget, "csr"), repeats)
    peak, _, (op, final) = traced_call(lambda: _operator.build(case, budget, "csr"))
    w2 = np.random.default_rng(1).standard_normal(case.w.shape).astype(dtype)
    set_weight_s = _median_time(lambda: _operator.set_weight(op, w2), repeats)
    copy_s = _median_time(lambda: _operator.value_array(op).copy(), repeats)
    # The forward a layer runs: the default ("auto") operator's, not the CSR kernel's.
    default, _ = _operator.build(case, budget)
    forward_s = _median_time(lambda: _operator.forward(default, case.x), repeats)
    nnz = _operator.matrix_facts(op)["nnz"]
    return {
        "layer": name, "dtype": dtype, "nnz": nnz, "matrix_bytes": final, "batch": batch,
        "build_s": build_s, "nnz_per_s": nnz / build_s, "peak_bytes": peak, "peak_over_matrix": peak / final,
        "set_weight_s": set_weight_s, "forward_s": forward_s, "set_weight_over_forward": set_weight_s / forward_s,
        "value_copy_s": copy_s, "set_weight_over_copy": set_weight_s / copy_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/construction.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    rows = [measure_layer(*layer, repeats=args.repeats, dtype=args.dtype) for layer in LAYERS]
    header = f"{'layer':<22}{'nnz':>13}{'Mnnz/s':>9}{'peak/matrix':>13}{'set_w/fwd':>11}{'set_w/copy':>12}"
    print(header)
    for r in rows:
        print(f"{r['layer']:<22}{r['nnz']:>13,}{r['nnz_per_s'] / 1e6:>9.0f}{r['peak_over_matrix']:>13.2f}"
              f"{r['set_weight_over_forward']:>11.3f}{r['set_weight_over_copy']:>12.2f}")
    result = {"benchmark": "construction", "numpy": np.__version__, "scipy": scipy.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
