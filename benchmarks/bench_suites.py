"""asv-style benchmarks of every method on every suite's layers, built on :mod:`sparseconv.bench`.

Each class is one suite; asv (or any runner that follows its conventions) calls ``setup``
with one ``(layer, method, dtype)`` combination and then times ``time_forward``,
``time_adjoint`` and ``time_weight_grad`` (``time_forward`` and ``time_adjoint`` alone for
the image suite, whose layers are timed through the LinearOperator). ``setup`` also runs every pass once and checks
it against the float64 reference, so the timed calls are warm and known to be right; a method
that cannot run (optional package missing, over the memory budget, too slow) raises
``NotImplementedError``, asv's way of skipping a combination. BLAS, OpenMP and torch run on
one thread here, so timings compare across machines.

Run a whole suite with the harness instead (table, JSON, Markdown and plots)::

    python benchmarks/bench_suites.py --suite lenet --threads 1,all
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from sparseconv import bench

__all__ = ["Smoke", "SmokeImage", "LeNet", "Cifar", "ImageNet", "Pruned", "Image", "Grouped", "Scaling", "main"]

DTYPES = ["float32", "float64"]
THREADS = 1


class _LinearOperatorBenchmark:
    """Times the forward and adjoint of one method on one layer of :attr:`suite` (private: asv skips it).

    Parameters (asv ``params``)
    ---------------------------
    layer : str
        A layer name of the suite.
    method : str
        One of :data:`sparseconv.bench.METHODS`.
    dtype : {"float32", "float64"}
    """

    suite = "smoke"
    param_names = ["layer", "method", "dtype"]
    params: list = []
    timeout = 600.0

    def setup(self, layer: str, method: str, dtype: str) -> None:
        layers = {item.name: item for item in bench.suite_layers(self.suite)}
        if layer not in layers:
            raise ValueError(f"layer must be one of {sorted(layers)} for suite {self.suite!r}; got {layer!r}")
        self._limits = contextlib.ExitStack()
        self._limits.enter_context(bench.thread_limits(THREADS))
        self.case = bench.make_case(layers[layer], dtype)
        try:
            self.prepared = bench.prepare_method(method, self.case, bench.Settings(threads=THREADS))
        except bench.MethodSkipped as err:
            self._limits.close()
            raise NotImplementedError(str(err)) from None
        check = bench.verify(self.prepared, self.case)
        wrong = {name: result for name, result in check.items() if not result["ok"]}
        if wrong:
            self._limits.close()
            raise ValueError(f"{method} gives a wrong answer on {layer} ({dtype}): {wrong}")

    def teardown(self, layer: str, method: str, dtype: str) -> None:
        self._limits.close()

    def time_forward(self, layer: str, method: str, dtype: str) -> None:
        self.prepared.passes["forward"]()

    def time_adjoint(self, layer: str, method: str, dtype: str) -> None:
        self.prepared.passes["adjoint"]()

    def track_buffer_bytes(self, layer: str, method: str, dtype: str) -> float:
        """Bytes of the method's main buffer (im2col buffer, sparse or dense matrix, spectra)."""
        return float("nan") if self.prepared.buffer_bytes is None else float(self.prepared.buffer_bytes)

    track_buffer_bytes.unit = "bytes"


class _SuiteBenchmark(_LinearOperatorBenchmark):
    """Times the three passes of one method on one layer of :attr:`suite` (private: asv skips it)."""

    def time_weight_grad(self, layer: str, method: str, dtype: str) -> None:
        self.prepared.passes["weight_grad"]()


def _params(suite: str, interface: str = "batch") -> list:
    """asv parameters: the suite's layers called through ``interface``, every method, both dtypes."""
    layers = [layer.name for layer in bench.suite_layers(suite) if layer.interface == interface]
    return [layers, list(bench.METHODS), DTYPES]


class Smoke(_SuiteBenchmark):
    suite = "smoke"
    params = _params("smoke")


class SmokeImage(_LinearOperatorBenchmark):
    suite = "smoke"
    params = _params("smoke", "linear_operator")


class LeNet(_SuiteBenchmark):
    suite = "lenet"
    params = _params("lenet")


class Cifar(_SuiteBenchmark):
    suite = "cifar"
    params = _params("cifar")


class ImageNet(_SuiteBenchmark):
    suite = "imagenet"
    params = _params("imagenet")


class Pruned(_SuiteBenchmark):
    suite = "pruned"
    params = _params("pruned")


class Image(_LinearOperatorBenchmark):
    suite = "image"
    params = _params("image", "linear_operator")


class Grouped(_SuiteBenchmark):
    suite = "grouped"
    params = _params("grouped")


class Scaling(_SuiteBenchmark):
    suite = "scaling"
    params = _params("scaling")


def main(argv: list[str] | None = None) -> int:
    """Run one suite through the harness; results go to ``benchmarks/results`` by default."""
    parser = argparse.ArgumentParser(description="Run a sparseconv benchmark suite (table, JSON, Markdown, plots).")
    bench.add_arguments(parser)
    parser.set_defaults(out=Path(__file__).resolve().parent / "results")
    return bench.run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
