"""Network-level speed of pruned sparse networks against PyTorch's dense ones (issue 11's targets).

Three measurements, both sides timed in the same process with the same thread count
(:func:`sparseconv.bench.thread_limits`: sparseconv's pool, BLAS through threadpoolctl and
``torch.set_num_threads``), float32, by default in alternating rounds (a burst of load lands on
both sides alike) or, with ``--blocked``, each side in a block of its own repeats. Alternating
rounds also make each side run right after the other, while the other's thread pools (OpenMP
workers, OpenBLAS workers) still busy-wait on the same two cores; that slows both, and PyTorch's
small training step most (6.5 ms alone, 11.7 ms median interleaved here), so the blocked
ratios are the conservative ones:

(a) **training step** of LeNet-5 (batch 64) with 90% of every convolution's weights pruned by
    magnitude (``set_weight_mask``), forward + cross-entropy + backward + SGD step, against the
    same step of a dense PyTorch LeNet-5 built by hand with ``torch.nn`` (same layers: 5x5
    convolutions, trainable 2x2 sub-sampling, tanh, two linear layers) holding the same
    weights;
(b) **inference** of a CNN of three 64->64 3x3 convolutions (padding 1, ReLU) on 32x32 inputs,
    N = 32, 90% of each kernel pruned by magnitude, NCHW in and NCHW out, against the dense
    PyTorch model under ``torch.no_grad()``;
(c) the same CNN unpruned: the column layout must not slow dense layers down.

**Allocator.** Both sides allocate their activations afresh at every step. glibc serves such
blocks with fresh pages once it has trimmed its heap, and every fresh page is zeroed and
faulted in on first touch (about 1.5 us each on this VM): PyTorch's LeNet-5 step took
1500-1600 page faults, 7.9-9.8 ms instead of 6.8-7.1 ms without them. sparseconv reuses its
blocks (:func:`sparseconv.engines.base.aligned_empty`) and takes none. ``--malloc no-trim``
(glibc only, :func:`sparseconv.bench.malloc_no_trim`) makes glibc keep freed memory for reuse
before anything runs, so that neither side faults: the fair comparison of the arithmetic; the
default measures what a user's process gets.

Each sparse network runs in the ``"columns"`` layout (batch-innermost from input to output,
one transpose at the input; the output is the ``(N, C, H, W)`` view of the last column
block) and, for comparison, in ``"batch_first"``. Inference is also timed with the output
copied into a C-contiguous ``(N, C, H, W)`` array, the memory layout PyTorch returns
(``sparse_columns_contiguous``). The engines are whatever the operators' policy picks
(``"auto"``); the engine of every product of every sparse layer is reported. The outputs of
the sparse and the PyTorch model are compared before timing. Results:
``benchmarks/results/network.json``; ratios are PyTorch time / sparse time (above 1: sparse is
faster). Run ``python benchmarks/bench_network.py`` (``--quick`` for fewer repeats).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

import sparseconv as sc
from sparseconv.bench import malloc_no_trim, measure_each, thread_limits
from sparseconv.engines.numba import transpose_c
from sparseconv.models import lenet5
from sparseconv.nn import SGD, Conv2d, CrossEntropyLoss, OperatorLayer, ReLU, Sequential
from sparseconv.testing import assert_allclose

try:
    import torch
    import torch.nn as tnn
except ImportError:  # pragma: no cover - the comparison needs PyTorch
    torch = None

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results" / "network.json"
SPARSITY = 0.9
# Set by --blocked: time each callable in a block of its own repeats instead of in turn.
BLOCKED = False


def prune_by_magnitude(net: Sequential, sparsity: float) -> None:
    """Keep the largest ``1 - sparsity`` of each convolution's weights (by magnitude), mask the rest."""
    for layer in net.modules():
        if isinstance(layer, Conv2d):
            w = np.abs(layer.weight.data)
            keep = max(1, int(round(w.size * (1 - sparsity))))
            threshold = np.partition(w.ravel(), w.size - keep)[w.size - keep]
            layer.set_weight_mask(w >= threshold)


def engines(net: Sequential) -> list[dict[str, Any]]:
    """The engine of every product of every sparse layer, as the policy chose it."""
    rows = []
    for name, layer in net.named_modules():
        if isinstance(layer, OperatorLayer) and layer.op is not None and hasattr(layer.op, "engine"):
            products = ("forward", "adjoint", "weight_grad") if isinstance(layer, Conv2d) else ("forward", "adjoint")
            rows.append({"layer": name, "type": repr(layer),
                         **{p: layer.op.engine(p) for p in products},
                         "weights_kept": None if layer.params.get("weight") is None
                         else round(layer.params["weight"].size / layer.params["weight"].data.size, 4)})
    return rows


# ---------------------------------------------------------------------- PyTorch twins
class _TorchSubsampling(tnn.Module if torch is not None else object):
    """LeNet-5's trainable sub-sampling: ``beta * (sum of each 2x2 window) + b`` per map."""

    def __init__(self, beta: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.beta = tnn.Parameter(torch.from_numpy(beta.copy()))
        self.bias = tnn.Parameter(torch.from_numpy(bias.copy()))

    def forward(self, x):
        down = torch.nn.functional.avg_pool2d(x, 2) * 4
        return down * self.beta[:, None, None] + self.bias[:, None, None]


def _torch_conv(layer) -> "tnn.Conv2d":
    m = tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.options["padding"],
                   bias=layer.bias is not None)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.array(layer.weight.data)))
        if layer.bias is not None:
            m.bias.copy_(torch.from_numpy(np.array(layer.bias.data)))
    return m


def _torch_linear(layer) -> "tnn.Linear":
    m = tnn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.array(layer.weight.data)))
        m.bias.copy_(torch.from_numpy(np.array(layer.bias.data)))
    return m


def torch_lenet(net: Sequential) -> "tnn.Sequential":
    """A dense PyTorch LeNet-5 holding ``net``'s weights (C3's missing connections as zeros)."""
    c1, s2, c3, s4, c5, f6, out = (net[i] for i in (0, 2, 4, 6, 8, 11, 13))
    return tnn.Sequential(
        _torch_conv(c1), tnn.Tanh(), _TorchSubsampling(s2.params["beta"].data, s2.params["bias"].data), tnn.Tanh(),
        _torch_conv(c3), tnn.Tanh(), _TorchSubsampling(s4.params["beta"].data, s4.params["bias"].data), tnn.Tanh(),
        _torch_conv(c5), tnn.Tanh(), tnn.Flatten(), _torch_linear(f6), tnn.Tanh(), _torch_linear(out))


def cnn(seed: int = 0) -> Sequential:
    """Three 64->64 3x3 convolutions (padding 1), each followed by ReLU, float32."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(3):
        layers += [Conv2d(64, 64, 3, padding=1, dtype=np.float32, rng=rng), ReLU()]
    return Sequential(*layers)


def torch_cnn(net: Sequential) -> "tnn.Sequential":
    return tnn.Sequential(*[_torch_conv(layer) if isinstance(layer, Conv2d) else tnn.ReLU() for layer in net])


# ---------------------------------------------------------------------- the measurements
def _summary(timing: dict) -> dict:
    times = timing["times_s"]
    return {"median_ms": 1e3 * timing["median_s"], "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "repeats": timing["repeats"], "calls_per_repeat": timing["number"]}


def _compare(fns: dict[str, Callable[[], Any]], repeats: int, max_seconds: float) -> dict[str, dict]:
    """Every callable timed, interleaved (repeats in turn) or, with ``--blocked``, one after the other."""
    timings = measure_each(fns, blocked=BLOCKED, repeats=repeats, max_seconds=max_seconds)
    return {k: _summary(v) for k, v in timings.items()}


def _ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """PyTorch time / sparse time, of the medians and of the fastest repeats (least disturbed)."""
    t = results["torch_dense"]
    return {f"torch/{k}": {"median": t["median_ms"] / v["median_ms"], "best": t["min_ms"] / v["min_ms"]}
            for k, v in results.items() if k != "torch_dense"}


def training_step(repeats: int, max_seconds: float) -> dict:
    """(a) a 90%-pruned LeNet-5 training step against PyTorch's dense one, batch 64."""
    net = lenet5(dtype=np.float32, seed=0)
    prune_by_magnitude(net, SPARSITY)
    net.forward(np.zeros((1, 1, 32, 32), np.float32))  # builds every operator
    first = copy.deepcopy(net)
    net.layout, first.layout = "columns", "batch_first"
    tnet = torch_lenet(net)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 1, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    with torch.no_grad():
        assert_allclose(net.forward(x), tnet(xt).numpy(), dtype=np.float32)

    def step_fn(model: Sequential) -> Callable[[], float]:
        opt, loss = SGD(model.parameters(), 1e-3, momentum=0.9), CrossEntropyLoss()

        def step() -> float:
            opt.zero_grad()
            value = loss(model.forward(x), labels)
            # Parameter gradients only, as PyTorch's step computes none for its input.
            model.backward(loss.backward(), input_grad=False)
            opt.step()
            return value
        return step

    topt, tloss = torch.optim.SGD(tnet.parameters(), lr=1e-3, momentum=0.9), tnn.CrossEntropyLoss()

    def torch_step() -> float:
        topt.zero_grad()
        value = tloss(tnet(xt), yt)
        value.backward()
        topt.step()
        return value.detach().item()

    results = _compare({"sparse_columns": step_fn(net), "sparse_batch_first": step_fn(first),
                        "torch_dense": torch_step}, repeats, max_seconds)
    return {"what": "LeNet-5 training step (forward, cross-entropy, backward, SGD), batch 64, float32, "
                    f"{int(SPARSITY * 100)}% of each convolution's weights pruned by magnitude (torch: dense)",
            "times": results, "ratios": _ratios(results), "engines": engines(net)}


def inference(repeats: int, max_seconds: float, sparsity: float = SPARSITY) -> dict:
    """(b) inference of a pruned 3-layer 64->64 CNN against PyTorch's dense one, N = 32."""
    net = cnn()
    if sparsity:
        prune_by_magnitude(net, sparsity)
    x = np.random.default_rng(2).standard_normal((32, 64, 32, 32)).astype(np.float32)
    net.eval()
    net.forward(x[:1])  # builds every operator
    first = copy.deepcopy(net)
    net.layout, first.layout = "columns", "batch_first"
    tnet = torch_cnn(net).eval()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        assert_allclose(net.forward(x), tnet(xt).numpy(), dtype=np.float32)

    def torch_forward() -> np.ndarray:
        with torch.no_grad():
            return tnet(xt).numpy()

    def contiguous() -> np.ndarray:
        y = net.forward(x)
        return transpose_c(y.reshape(y.shape[0], -1).T).reshape(y.shape)

    assert contiguous().flags.c_contiguous
    results = _compare({"sparse_columns": lambda: net.forward(x), "sparse_columns_contiguous": contiguous,
                        "sparse_batch_first": lambda: first.forward(x), "torch_dense": torch_forward},
                       repeats, max_seconds)
    return {"what": "inference of 3 x (Conv2d 64->64 3x3 pad 1 + ReLU) on 32x32, N=32, float32, NCHW in and "
                    f"out, {int(sparsity * 100)}% of each kernel pruned by magnitude (torch: dense, no_grad)",
            "times": results, "ratios": _ratios(results), "engines": engines(net)}


def _print(name: str, result: dict, target: float) -> None:
    print(f"\n{name}: {result['what']}")
    for key, t in result["times"].items():
        print(f"  {key:<20} median {t['median_ms']:8.2f} ms  (range {t['min_ms']:.2f}-{t['max_ms']:.2f}, "
              f"{t['repeats']} repeats)")
    for key, r in result["ratios"].items():
        print(f"  {key:<34} {r['median']:5.2f}x of medians, {r['best']:5.2f}x of the fastest repeats"
              + (f"   (target >= {target})" if key.startswith("torch/sparse_columns") and target else ""))
    for row in result["engines"]:
        products = ", ".join(f"{p} {row[p]}" for p in ("forward", "adjoint", "weight_grad") if p in row)
        kept = "" if row["weights_kept"] is None else f", {row['weights_kept']:.0%} of weights kept"
        print(f"  layer {row['layer']:>3} {row['type']}: {products}{kept}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="5 repeats, 5 s per measurement")
    parser.add_argument("--blocked", action="store_true",
                        help="time each side in a block of its own repeats, not in turn: the other side's thread "
                             "pools (OpenMP, OpenBLAS) then sit idle instead of busy-waiting on the same cores")
    parser.add_argument("--malloc", choices=("default", "no-trim"), default="default",
                        help="no-trim: glibc keeps freed memory for reuse, so neither side takes page faults")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"default {RESULTS.name}, or network_blocked.json with --blocked (with _notrim before "
                             f".json for --malloc no-trim)")
    args = parser.parse_args(argv)
    if torch is None:
        print("PyTorch is not installed: nothing to compare against (pip install torch)", file=sys.stderr)
        return 1
    if args.malloc == "no-trim":
        malloc_no_trim()
    repeats, max_seconds = (5, 5.0) if args.quick else (args.repeats, args.max_seconds)
    global BLOCKED
    BLOCKED = args.blocked
    with thread_limits(args.threads) as state:
        load_before = os.getloadavg()
        results = {"training": training_step(repeats, max_seconds), "inference": inference(repeats, max_seconds),
                   "inference_dense": inference(repeats, max_seconds, 0.0)}
        load_after = os.getloadavg()
    report = {
        "timing": "blocked" if BLOCKED else "interleaved", "malloc": args.malloc,
        "threads": state["threads"], "torch_threads": state["torch_threads"],
        "sparseconv_threads": state["sparseconv_threads"], "dtype": "float32", "sparsity": SPARSITY,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
        "torch": torch.__version__, "sparseconv": sc.__version__, **results,
    }
    _print("(a) training", results["training"], 1.5)
    _print("(b) inference", results["inference"], 1.5)
    _print("(c) the same CNN unpruned (no-regression check of the column layout on dense layers)",
           results["inference_dense"], 0.0)
    print(f"\nload average before/after: {report['load_average_before']} / {report['load_average_after']} "
          f"on {report['cores']} cores")
    output = args.output or (RESULTS.with_name("network_blocked.json") if BLOCKED else RESULTS)
    if args.output is None and args.malloc == "no-trim":
        output = output.with_name(output.stem + "_notrim.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
