"""Benchmark harness: the sparse operator against dense, im2col, direct, FFT, PyTorch and PyLops, in one run.

Every method computes the passes of a 2-D convolution layer -- the forward product ``W @ x``,
the adjoint ``W.T @ dy`` (the input gradient) and the kernel gradient -- on the same data, in
the same process, under the same thread limits. Each result is checked against an independent
float64 reference (:mod:`sparseconv.reference`) *before* it is timed; a method whose answer
is wrong is recorded as failed and not timed, one that cannot run (optional package missing,
memory budget exceeded, too slow) is recorded as skipped with the reason.

Its modules:

:mod:`sparseconv.bench.suites`
    The layers (:class:`Layer`), the suites, and each layer's data and reference results.
:mod:`sparseconv.bench.methods`
    One module per method (``sparse``, ``csr``, ``factored``, ``dense``, ``im2col``,
    ``direct``, ``fft``, ``torch``, ``pylops``); every call into the operator's API is in
    ``methods/_operator.py``.
:mod:`sparseconv.bench.timing`
    The one timing loop (calibrate, interleave, repeat) and the thread limits.
:mod:`sparseconv.bench.environment`, :mod:`sparseconv.bench.report`, :mod:`sparseconv.bench.plots`
    What the run ran on; tables, Markdown and JSON; PNG plots.
:mod:`sparseconv.bench.run`, :mod:`sparseconv.bench.cli`
    A suite end to end; the ``python -m sparseconv bench`` options.

What is measured: the median and minimum over repeats after a warm-up outside the timed region
(fast calls are looped so that one repeat lasts a few milliseconds, as ``timeit`` does); useful
GFLOP/s, ``2 * MACs / median`` with the MACs of the dense convolution; the bytes of each
method's main buffer and the numpy allocations traced by ``tracemalloc`` during one call;
construction time; and for every row the ratio to im2col measured in the same run. BLAS and
OpenMP pools are limited with threadpoolctl, torch with ``torch.set_num_threads``,
``scipy.fft`` with ``workers``; sparseconv's own pool with :func:`sparseconv.parallel.threads`.

Examples
--------
>>> from sparseconv.bench import run_suite
>>> result = run_suite("smoke", dtypes=("float64",), threads=(1,), repeats=2,
...                    out_dir="results", progress=False)  # doctest: +SKIP
"""

from .cli import add_arguments, parse_bytes, parse_dtypes, parse_methods, parse_threads, run_from_args
from .environment import environment_info, malloc_no_trim
from .methods import DEFAULT_MAX_DIRECT_MACS, DEFAULT_MEMORY_BUDGET, METHODS, MethodSkipped, Prepared, Settings
from .methods import prepare_method, resolve_budget
from .report import NOISY_SPREAD, format_markdown, format_table
from .run import SCHEMA, run_suite, verify
from .suites import (LINEAR_OPERATOR_PASSES, PASSES, PRUNED_SPARSITIES, SUITES, TOLERANCES, Case, Layer, layer_mask,
                     make_case, suite_layers)
from .timing import DEFAULT_MAX_SECONDS, measure, measure_each, measure_interleaved, thread_limits, time_once

__all__ = [
    "malloc_no_trim",
    "PASSES",
    "LINEAR_OPERATOR_PASSES",
    "METHODS",
    "SUITES",
    "SCHEMA",
    "TOLERANCES",
    "PRUNED_SPARSITIES",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_MAX_DIRECT_MACS",
    "DEFAULT_MAX_SECONDS",
    "NOISY_SPREAD",
    "Layer",
    "Case",
    "Prepared",
    "Settings",
    "MethodSkipped",
    "suite_layers",
    "layer_mask",
    "make_case",
    "prepare_method",
    "resolve_budget",
    "verify",
    "measure",
    "measure_each",
    "measure_interleaved",
    "time_once",
    "thread_limits",
    "environment_info",
    "run_suite",
    "format_table",
    "format_markdown",
    "parse_threads",
    "parse_dtypes",
    "parse_bytes",
    "parse_methods",
    "add_arguments",
    "run_from_args",
]
