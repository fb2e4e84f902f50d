"""Quick standalone measurement of the compiled engines against PyTorch and PyLops (issue 11).

Run ``PYTHONPATH=. python benchmarks/bench_numba.py`` (``--quick`` for 3 repeats, ``--json
PATH`` to keep every number). Two parts, each ratio measured in one run with the two sides
timed in alternating rounds (:func:`sparseconv.bench.measure_interleaved`) or, with
``--blocked``, each in a block of its own repeats (the other library's thread pools then do not
busy-wait on the same cores), and every library on the same thread count
(:func:`sparseconv.bench.thread_limits`):

1. The 64->64 3x3 32x32 layer (padding 1) at batch 32, float32, with 90 / 95 / 99 % of the
   weights masked out (``weight_mask``): the ``"numba"`` engine's forward, adjoint and kernel
   gradient on column blocks ``(C*H*W, N)`` against ``torch.nn.functional.conv2d`` (dense) and
   its two backward products on NCHW, at 1 and 2 threads; plus the engine's own 1 -> 2 thread
   speed-up.
2. The forward over sparsity 0-90 % against the factored engine and torch (the crossover
   for the engine policy).
3. A 512x512 image with a 7x7 (and 15x15) kernel, true convolution, 'same' zero padding, one
   vector at a time through a ``scipy.sparse.linalg.LinearOperator``: the ``"stencil"``
   engine's forward and adjoint against PyLops' ``Convolve2D(method="fft")``.

Times are medians over repeats with their range; on a shared machine they are provisional.
``--asm`` compiles the kernels in the process and counts their vector FMA instructions by
register width (zmm: 512-bit AVX-512, ymm: 256-bit), as evidence that the explicit vectors
survive to machine code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import numpy as np
from scipy.sparse.linalg import LinearOperator

import sparseconv as sc
from sparseconv.bench import malloc_no_trim, measure_each, thread_limits
from sparseconv.engines.numba import NumbaEngine, available, transpose_c, unavailable_reason
from sparseconv.engines.stencil import StencilEngine

__all__ = ["layer_rows", "crossover_rows", "image_rows", "assembly_counts", "main"]


# Set by --blocked: time each callable in a block of its own repeats instead of in turn.
BLOCKED = False


def _timings(fns: dict, repeats: int) -> dict:
    """Every callable timed in alternating rounds or, with ``--blocked``, one after the other."""
    return measure_each(fns, blocked=BLOCKED, repeats=repeats)


def _summary(timing: dict) -> dict:
    times = timing["times_s"]
    return {"median_ms": 1e3 * timing["median_s"], "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "repeats": timing["repeats"]}


def _pruned_mask(shape: tuple[int, ...], zero_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A mask keeping ``1 - zero_fraction`` of the weights, chosen at random."""
    keep = int(round((1.0 - zero_fraction) * int(np.prod(shape))))
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[rng.choice(mask.size, keep, replace=False)] = True
    return mask.reshape(shape)


def layer_rows(zero_fractions: tuple[float, ...], threads: tuple[int, ...], repeats: int) -> list[dict]:
    """Part 1: per sparsity, thread count and product, engine and torch times and their ratio.

    Parameters
    ----------
    zero_fractions : tuple of float
    threads : tuple of int
    repeats : int

    Returns
    -------
    list of dict
    """
    import torch

    rng = np.random.default_rng(0)
    n, c, f, size = 32, 64, 64, 32
    rows = []
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    dy = rng.standard_normal((n, f, size, size)).astype(np.float32)
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    # The engine's layout: one sample per column, made as a column network makes it (an
    # aligned copy, sparseconv.engines.numba.transpose_c); a misaligned block is copied by
    # the engine first (ALIGN_READS), which costs 0.3-1.2 ms on this layer.
    xc = transpose_c(x.reshape(n, -1))
    dc = transpose_c(dy.reshape(n, -1))
    for zeros in zero_fractions:
        mask = _pruned_mask((f, c, 3, 3), zeros, rng)
        w = np.where(mask, rng.standard_normal(mask.shape), 0).astype(np.float32)
        op = sc.ConvOperator(w, (c, size, size), padding=1, weight_mask=mask)
        engine = NumbaEngine.from_operator(op)
        wt = torch.from_numpy(w)
        per_threads: dict[int, dict[str, dict]] = {}
        for nt in threads:
            with thread_limits(nt), torch.no_grad():
                fns: dict[str, Callable[[], Any]] = {
                    "forward/numba": lambda: engine.matmat(xc, threads=nt),
                    "forward/torch": lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
                    "adjoint/numba": lambda: engine.rmatmat(dc, threads=nt),
                    "adjoint/torch": lambda: torch.nn.grad.conv2d_input(xt.shape, wt, dyt, padding=1),
                    "weight_grad/numba": lambda: engine.weight_grad(xc, dc, threads=nt),
                    "weight_grad/torch": lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, dyt, padding=1),
                }
                timing = _timings(fns, repeats)
            per_threads[nt] = timing
            for product in ("forward", "adjoint", "weight_grad"):
                ours, theirs = timing[f"{product}/numba"], timing[f"{product}/torch"]
                rows.append({"zeros": zeros, "threads": nt, "product": product, "numba": _summary(ours),
                             "torch": _summary(theirs), "torch_over_numba": theirs["median_s"] / ours["median_s"]})
        if 1 in per_threads and 2 in per_threads:
            for product in ("forward", "adjoint", "weight_grad"):
                key = f"{product}/numba"
                rows.append({"zeros": zeros, "product": product, "speedup_1_to_2_threads":
                             per_threads[1][key]["median_s"] / per_threads[2][key]["median_s"]})
    return rows


def crossover_rows(zero_fractions: tuple[float, ...], threads: int, repeats: int) -> list[dict]:
    """Forward of the 64->64 layer at N=32 over sparsity: numba engine, factored engine, torch.

    The factored product (``ConvOperator.forward(method="taps")``, NCHW in and out) and
    torch's dense conv do not get faster with zeros; the crossover is where the numba engine
    meets the faster of the two.

    Parameters
    ----------
    zero_fractions : tuple of float
    threads : int
    repeats : int

    Returns
    -------
    list of dict
    """
    import torch

    rng = np.random.default_rng(2)
    n, c, f, size = 32, 64, 64, 32
    x = rng.standard_normal((n, c, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)
    xc = transpose_c(x.reshape(n, -1))
    rows = []
    for zeros in zero_fractions:
        mask = _pruned_mask((f, c, 3, 3), zeros, rng) if zeros > 0 else np.ones((f, c, 3, 3), dtype=bool)
        w = np.where(mask, rng.standard_normal(mask.shape), 0).astype(np.float32)
        op = sc.ConvOperator(w, (c, size, size), padding=1, weight_mask=mask)
        engine = NumbaEngine.from_operator(op)
        wt = torch.from_numpy(w)
        with thread_limits(threads), torch.no_grad():
            timing = _timings({
                "numba": lambda: engine.matmat(xc, threads=threads),
                "factored": lambda: op.forward(x, engine="factored", threads=threads),
                "torch": lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
            }, repeats=repeats)
        rows.append({"zeros": zeros, "threads": threads, **{k: _summary(v) for k, v in timing.items()},
                     "torch_over_numba": timing["torch"]["median_s"] / timing["numba"]["median_s"],
                     "factored_over_numba": timing["factored"]["median_s"] / timing["numba"]["median_s"]})
    return rows


def image_rows(kernels: tuple[int, ...], threads: tuple[int, ...], repeats: int) -> list[dict]:
    """Part 2: the 512x512 image operator, one vector at a time, against PyLops.

    Parameters
    ----------
    kernels : tuple of int
        Kernel side lengths.
    threads : tuple of int
    repeats : int

    Returns
    -------
    list of dict
    """
    import pylops

    rng = np.random.default_rng(1)
    size = 512
    rows = []
    image = rng.standard_normal(size * size).astype(np.float32)
    for k in kernels:
        kernel = rng.standard_normal((k, k)).astype(np.float32)
        geom = sc.conv_geometry((1, 1, k, k), (1, size, size), padding="same", flip=True)
        engine = StencilEngine(geom, kernel.reshape(1, 1, k, k))
        ref = pylops.signalprocessing.Convolve2D((size, size), h=kernel, offset=(k // 2, k // 2), method="fft",
                                                 dtype="float32")
        for nt in threads:
            with thread_limits(nt):
                ours = LinearOperator((size * size,) * 2, matvec=lambda v: engine.matmat(v, threads=nt),
                                      rmatvec=lambda v: engine.rmatmat(v, threads=nt), dtype=np.float32)
                fns = {"forward/stencil": lambda: ours.matvec(image), "adjoint/stencil": lambda: ours.rmatvec(image),
                       "forward/pylops": lambda: ref.matvec(image), "adjoint/pylops": lambda: ref.rmatvec(image)}
                timing = _timings(fns, repeats)
            # Same operator? PyLops' 'same' convolution with the kernel centred is ours.
            err = float(np.max(np.abs(ours.matvec(image) - ref.matvec(image))))
            for product in ("forward", "adjoint"):
                s, p = timing[f"{product}/stencil"], timing[f"{product}/pylops"]
                rows.append({"kernel": k, "threads": nt, "product": product, "stencil": _summary(s),
                             "pylops": _summary(p), "pylops_over_stencil": p["median_s"] / s["median_s"],
                             "max_abs_difference": err})
            rows.append({"kernel": k, "threads": nt, "product": "adjoint/forward",
                         "ratio": timing["adjoint/stencil"]["median_s"] / timing["forward/stencil"]["median_s"]})
    return rows


def assembly_counts() -> dict[str, dict[str, int]]:
    """Per compiled kernel and dtype, the vector FMA instructions in its machine code by register width.

    The kernels must have been compiled in this process (inspection of cached code is not
    possible), so this runs with ``SPARSECONV_NUMBA_CACHE=0`` set before the first engine use.

    Returns
    -------
    dict
        ``{"kernel/dtype": {"zmm": count, "ymm": count, "xmm": count}}`` counting ``vfmadd``
        instructions.
    """
    from sparseconv.engines import _numba_kernels as kernels

    counts = {}
    for name in ("csr_bands", "csr_grad_segments", "stencil_forward", "stencil_grad"):
        dispatcher = getattr(kernels, name)
        for sig in dispatcher.signatures:
            asm = dispatcher.inspect_asm(sig)
            fma = [line for line in asm.splitlines() if "vfmadd" in line]
            dtype = next((str(t.dtype) for t in sig if hasattr(t, "dtype") and "float" in str(t.dtype)), "?")
            counts[f"{name}/{dtype}"] = {reg: sum(reg in line for line in fma) for reg in ("zmm", "ymm", "xmm")}
    return counts


def _print_rows(rows: list[dict]) -> None:
    for row in rows:
        parts = []
        for key, value in row.items():
            if isinstance(value, dict):
                parts.append(f"{key} {value['median_ms']:.3f} ms [{value['min_ms']:.3f}-{value['max_ms']:.3f}]")
            elif isinstance(value, float):
                parts.append(f"{key}={value:.3g}")
            else:
                parts.append(f"{key}={value}")
        print("  ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--part", choices=("all", "layer", "image", "crossover"), default="all")
    parser.add_argument("--asm", action="store_true",
                        help="compile in this process (no cache) and count vfmadd instructions per register width")
    parser.add_argument("--zeros", default="0.9,0.95,0.99", help="comma-separated fractions of zero weights")
    parser.add_argument("--blocked", action="store_true",
                        help="time each library in a block of its own repeats, not in turn")
    parser.add_argument("--malloc", choices=("default", "no-trim"), default="default",
                        help="no-trim: glibc keeps freed memory for reuse, so no side takes page faults on the "
                             "outputs it allocates afresh (sparseconv.bench.malloc_no_trim)")
    args = parser.parse_args(argv)
    if args.malloc == "no-trim":
        malloc_no_trim()
    if args.asm:
        # Read when the kernels are first imported (by available() below).
        os.environ["SPARSECONV_NUMBA_CACHE"] = "0"
    if not available():
        print(f"numba engines unavailable: {unavailable_reason()}", file=sys.stderr)
        return 1
    repeats = 3 if args.quick else 7
    global BLOCKED
    BLOCKED = args.blocked
    threads = tuple(int(t) for t in args.threads.split(","))
    result: dict[str, Any] = {}
    if args.part in ("all", "layer"):
        print("64->64 3x3 32x32, N=32, float32: numba engine vs torch conv2d (dense)")
        result["layer"] = layer_rows(tuple(float(z) for z in args.zeros.split(",")), threads, repeats)
        _print_rows(result["layer"])
    if args.part in ("all", "crossover"):
        print("64->64 3x3 32x32, N=32, float32, forward over sparsity: numba vs factored (taps) vs torch")
        result["crossover"] = crossover_rows((0.0, 0.5, 0.75, 0.85, 0.9), max(threads), repeats)
        _print_rows(result["crossover"])
    if args.part in ("all", "image"):
        print("512x512 image, 'same' true convolution, one vector: stencil engine vs pylops Convolve2D(fft)")
        result["image"] = image_rows((7, 15), threads, repeats)
        _print_rows(result["image"])
    if args.asm:
        result["assembly"] = assembly_counts()
        print("vfmadd instructions per kernel (register width):")
        for key, value in result["assembly"].items():
            print(f"  {key}: {value}")
    result["settings"] = {"timing": "blocked" if BLOCKED else "interleaved", "malloc": args.malloc}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
