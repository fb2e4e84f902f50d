"""Issue 5's speed targets, each measured in one run, with pass/fail.

Run ``python benchmarks/bench_speed.py`` (``--quick`` for fewer repeats and a 2-epoch
training comparison). It prints one line per target and writes every number to
``benchmarks/results/speed.json``. Ratios compare measurements taken in the same run, in
the same process, with the same thread count for every library:
``threadpoolctl`` limits BLAS, :func:`sparseconv.parallel.threads` limits sparseconv's
pool and ``torch.set_num_threads`` limits PyTorch. Times are the minimum over repeats
(the least disturbed run), and the two sides of every ratio are timed in alternating rounds
so that both see the same machine load. The run starts by measuring how many cores are
really free (two independent single-threaded jobs at once against one): on a shared machine
the thread speed-ups cannot exceed that number.

Layers, data, the im2col method, the timing loop and the thread limits are
:mod:`sparseconv.bench`'s; every operator call goes through ``sparseconv.bench.methods._operator``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import sparseconv as sc
from sparseconv import parallel
from sparseconv.bench import Layer, make_case, measure, measure_interleaved, resolve_budget, suite_layers, thread_limits
from sparseconv.bench.methods import PREPARERS, Settings, _operator
from sparseconv.bench.timing import time_once, traced_call
from sparseconv.geometry import conv_geometry
from sparseconv.models import C3_TABLE, lenet5
from sparseconv.nn import SGD, CrossEntropyLoss
from sparseconv.pattern import build_pattern

try:
    import torch
    import torch.nn.functional as tf
except ImportError:  # the PyTorch targets are then reported as not measured
    torch = None

__all__ = ["main"]

CORES = parallel.available_cores()
RESULTS = Path(__file__).resolve().parent / "results" / "speed.json"

# The layers of sparseconv.bench's lenet and cifar suites.
LENET = suite_layers("lenet")
CIFAR = suite_layers("cifar")


# ---------------------------------------------------------------------- measuring
def timed(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.05) -> dict:
    """Warm up, then time ``repeats`` rounds of enough calls to last ``min_seconds`` (the harness's loop)."""
    result = measure(fn, repeats=repeats, max_seconds=1e9, min_repeat_seconds=min_seconds)
    return {"min_s": result["min_s"], "median_s": result["median_s"]}


def paired(a: Callable[[], Any], b: Callable[[], Any], repeats: int, *, a_threads: int = CORES,
           b_threads: int = CORES, min_seconds: float = 0.05) -> tuple[float, float]:
    """Minimum times of ``a`` and ``b``, measured in alternating rounds so that both see the
    same machine load; each under :func:`~sparseconv.bench.thread_limits` of its thread count."""
    contexts = {"a": lambda: thread_limits(a_threads), "b": lambda: thread_limits(b_threads)}
    result = measure_interleaved({"a": a, "b": b}, repeats=repeats, max_seconds=1e9, min_repeat_seconds=min_seconds,
                                 contexts=contexts)
    return result["a"]["min_s"], result["b"]["min_s"]


def parallel_capacity(repeats: int) -> float:
    """How many cores this process really gets: ``CORES * t(one job) / t(CORES jobs at once)``
    for a GIL-free single-threaded job (scipy's CSR kernel, no BLAS); below ``CORES`` the
    machine is shared."""
    case = make(CIFAR[7], "float32")
    op, x = case["op"], case["x"]
    from concurrent.futures import ThreadPoolExecutor

    def job() -> None:
        _operator.forward(op, x, "csr", threads=1)

    with ThreadPoolExecutor(CORES) as pool:
        def many() -> None:
            for fut in [pool.submit(job) for _ in range(CORES)]:
                fut.result()

        one, all_cores = paired(job, many, repeats, a_threads=1, b_threads=1)
    return CORES * one / all_cores


# Cores found free by parallel_capacity() at the start of the run (set by main()).
CAPACITY = float(CORES)
THREAD_COUNTS = sorted({1, CORES})


def judged(values: dict[int, float]) -> tuple[float, int]:
    """The value a library-against-library target is judged on, and its thread count: all
    cores when the machine gave this run (nearly) all of them, else one thread -- on a shared
    machine multi-threaded pools (BLAS, OpenMP, ours) stall behind the other load, and a
    ratio of two stalled runs says nothing about either library."""
    n = CORES if CAPACITY >= 0.9 * CORES else 1
    return values[n], n


def target(number: int, name: str, value: float, goal: str, passed: bool, **details: Any) -> dict:
    mark = "PASS" if passed else "FAIL"
    print(f"[{mark}] target {number}: {name}: {value:.3g} (target {goal})", flush=True)
    return {"target": number, "name": name, "value": value, "goal": goal, "pass": bool(passed), **details}


# ---------------------------------------------------------------------- cases
def make(layer: Layer, dtype: str) -> dict:
    """A layer's data (:func:`sparseconv.bench.make_case`, no reference) and its operator (defaults)."""
    case = make_case(layer, dtype, reference=False)
    op, _ = _operator.build(case, resolve_budget(None))
    return dict(name=layer.name, n=layer.batch, c=layer.in_channels, f=layer.out_channels, k=layer.kernel,
                x=case.x, w=case.w, dy=case.dy, op=op, case=case, nnz=_operator.matrix_facts(op)["nnz"])


def sparse_passes(case: dict) -> dict[str, Callable[[], Any]]:
    """The operator's passes with its default engines."""
    return _operator.passes(case["op"], case["case"])


def im2col_passes(case: dict) -> dict[str, Callable[[], Any]]:
    """The harness's im2col method (:func:`sparseconv.reference.im2col`, one GEMM per pass)."""
    return PREPARERS["im2col"](case["case"], Settings()).passes


# ---------------------------------------------------------------------- targets
def target_threads(repeats: int) -> dict:
    """Target 1: speed-up of each pass from 1 thread to every core, layers with nnz >= 1e5."""
    rows = []
    for layer in LENET + CIFAR:
        case = make(layer, "float32")
        if case["nnz"] < 100_000:
            continue
        row = {"layer": case["name"], "nnz": case["nnz"]}
        for pass_name, fn in sparse_passes(case).items():
            t1, tn = paired(fn, fn, repeats, a_threads=1, b_threads=CORES)
            row[pass_name] = {"t1_s": t1, f"t{CORES}_s": tn, "speedup": t1 / tn}
        rows.append(row)
        print(f"    {row['layer']:<22} nnz {row['nnz']:>9,}  speed-up fwd {row['forward']['speedup']:.2f}  "
              f"adj {row['adjoint']['speedup']:.2f}  dw {row['weight_grad']['speedup']:.2f}", flush=True)
    speedups = [r[p]["speedup"] for r in rows for p in ("forward", "adjoint", "weight_grad")]
    return target(1, f"smallest speed-up 1 -> {CORES} threads over {len(rows)} layers x 3 passes",
                  min(speedups), ">= 1.8", min(speedups) >= 1.8, median=float(np.median(speedups)), layers=rows)


def target_float32() -> dict:
    """Target 2: a float32 LeNet-5 step keeps every array float32."""
    net = lenet5(dtype=np.float32, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    opt = SGD(net.parameters(), 0.01, momentum=0.9, weight_decay=1e-3)
    loss = CrossEntropyLoss()
    seen = set()
    h = x
    for layer in net:
        h = layer.forward(h)
        seen.add(str(h.dtype))
    loss(h, labels)
    g = loss.backward()
    seen.add(str(g.dtype))
    for layer in reversed(net.layers):
        g = layer.backward(g)
        seen.add(str(g.dtype))
    opt.step()
    seen.update(str(a.dtype) for p in net.parameters() for a in (p.data, p.grad))
    seen.update(str(v.dtype) for v in opt._velocity)
    seen.update(str(layer.op.matrix.dtype) for layer in net if isinstance(getattr(layer, "op", None), sc.ConvOperator))
    ok = seen == {"float32"}
    return target(2, "dtypes seen in a float32 LeNet-5 forward/backward/SGD step", float(ok), "only float32", ok,
                  dtypes=sorted(seen))


def target_weight_grad(repeats: int) -> dict:
    """Target 3: kernel gradient time over forward time, and its scratch memory.

    Judged on one thread (both sides on the same single core), which does not depend on
    what else runs on the machine; the all-cores ratio is recorded too.
    """
    rows = []
    for layer in [lay for lay in LENET + CIFAR if lay.batch in (32, 64)]:
        case = make(layer, "float32")
        passes = sparse_passes(case)
        fwd1, dw1 = paired(passes["forward"], passes["weight_grad"], repeats, a_threads=1, b_threads=1)
        fwd, dw = paired(passes["forward"], passes["weight_grad"], repeats)
        peak, _, _ = traced_call(passes["weight_grad"])
        rows.append({"layer": case["name"], "ratio_1_thread": dw1 / fwd1, f"ratio_{CORES}_threads": dw / fwd,
                     "forward_s": fwd1, "weight_grad_s": dw1, "scratch_peak_bytes": peak,
                     "nnz_x_batch_bytes": case["nnz"] * case["n"] * case["x"].itemsize})
    worst = max(r["ratio_1_thread"] for r in rows)
    bounded = all(r["scratch_peak_bytes"] <= 64 << 20 for r in rows)
    return target(3, "largest weight-gradient / forward time, 1 thread (lenet N64 + cifar N32, float32)", worst,
                  "<= 1.5, scratch <= 64 MiB", worst <= 1.5 and bounded, scratch_bounded_64MiB=bounded,
                  worst_all_cores=max(r[f"ratio_{CORES}_threads"] for r in rows), layers=rows)


def _lenet_build_ms() -> list[float]:
    code = ("import time, sparseconv.models as m\n"
            "t0 = time.perf_counter(); m.lenet5(); print((time.perf_counter() - t0) * 1e3)\n")
    return [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(5)]


def target_construction(repeats: int) -> list[dict]:
    """Target 4: pattern throughput, set_weight against a copy, LeNet-5 build."""
    out = []
    rates = []
    for c, f, s in ((16, 16, 32), (64, 64, 28)):
        geom = conv_geometry((f, c, 3, 3), (c, s, s), padding=1)
        nnz = build_pattern(geom).nnz
        t = timed(lambda: build_pattern(geom), max(3, repeats // 2), min_seconds=0)["min_s"]
        rates.append({"layer": f"{c}->{f} {s}x{s} k3", "nnz": nnz, "seconds": t, "nnz_per_s": nnz / t})
    best = min(r["nnz_per_s"] for r in rates)
    out.append(target(4, "pattern construction, non-zeros per second (slowest layer)", best, ">= 1e8",
                      best >= 1e8, layers=rates))
    ratios = []
    for layer in CIFAR[5:]:
        case = make(layer, "float32")
        # The operator with its explicit matrix (engine "csr"): set_weight writes the value
        # array value_array() returns, in place (an "auto" operator of these layers has no
        # matrix until it is read, and its set_weight then only copies the weight).
        op, _ = _operator.build(case["case"], resolve_budget(None), "csr")
        w = case["w"]
        tw, tc = paired(lambda: _operator.set_weight(op, w), lambda: _operator.value_array(op).copy(), repeats)
        ratios.append({"layer": case["name"], "set_weight_s": tw, "copy_s": tc, "ratio": tw / tc})
    worst = max(r["ratio"] for r in ratios)
    out.append(target(4, "set_weight / copy of the value array (largest, cifar N32)", worst, "<= 2", worst <= 2,
                      layers=ratios))
    builds = _lenet_build_ms()
    out.append(target(4, "lenet5() build in a fresh process, ms (median of 5)", float(np.median(builds)), "<= 50",
                      float(np.median(builds)) <= 50, runs_ms=builds))
    return out


def target_gemm_efficiency(repeats: int) -> dict:
    """Target 5: sparse forward GFLOP/s over the layer's dense GEMM GFLOP/s (cifar N32)."""
    rows = []
    for layer in CIFAR[5:]:
        case = make(layer, "float32")
        op = case["op"]
        n, f = case["n"], case["f"]
        o2 = layer.out_size ** 2
        kdim = case["c"] * case["k"] ** 2
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n * o2, kdim)).astype(np.float32)
        b = rng.standard_normal((kdim, f)).astype(np.float32)
        row = {"layer": case["name"]}
        for t in THREAD_COUNTS:
            ts, tg = paired(lambda: _operator.forward(op, case["x"]), lambda: a @ b, repeats, a_threads=t,
                            b_threads=t)
            sparse_gf = 2 * case["nnz"] * n / ts / 1e9
            dense_gf = 2 * a.shape[0] * kdim * f / tg / 1e9
            row[t] = {"sparse_gflops": sparse_gf, "gemm_gflops": dense_gf, "fraction": sparse_gf / dense_gf}
        rows.append(row)
    medians = {t: float(np.median([r[t]["fraction"] for r in rows])) for t in THREAD_COUNTS}
    value, t = judged(medians)
    return target(5, f"sparse forward GFLOP/s / dense GEMM GFLOP/s (cifar N32 median, {t} thread(s))", value,
                  ">= 0.40", value >= 0.4, medians=medians, layers=rows)


def target_im2col(repeats: int) -> dict:
    """Target 6: (fwd + dx + dw) sparse over im2col, float32, lenet + cifar median."""
    rows = []
    for layer in LENET + CIFAR:
        case = make(layer, "float32")
        sparse, im2col = sparse_passes(case), im2col_passes(case)
        row = {"layer": case["name"]}
        for t in THREAD_COUNTS:
            pairs = [paired(sparse[p], im2col[p], repeats, a_threads=t, b_threads=t) for p in sparse]
            ts, ti = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            row[t] = {"sparse_s": ts, "im2col_s": ti, "ratio": ts / ti}
        rows.append(row)
    medians = {t: float(np.median([r[t]["ratio"] for r in rows])) for t in THREAD_COUNTS}
    value, t = judged(medians)
    return target(6, f"sparse / im2col, fwd+adj+dw (lenet + cifar median, float32, {t} thread(s))", value, "<= 1.0",
                  value <= 1.0, medians=medians, layers=rows)


class _TorchLeNet:
    """LeNet-5 in PyTorch with the same layers and initial values as :func:`lenet5`."""

    def __init__(self, net):
        def tensor(a):
            return torch.tensor(np.array(a), requires_grad=True)

        p = [q.data for q in net.parameters()]
        (self.c1w, self.c1b, self.s2beta, self.s2b, self.c3w, self.c3b, self.s4beta, self.s4b, self.c5w, self.c5b,
         self.f6w, self.f6b, self.ow, self.ob) = (tensor(a) for a in p)
        self.c3mask = torch.tensor(np.broadcast_to(C3_TABLE.T[:, :, None, None], self.c3w.shape).astype(np.float32))
        self.params = [self.c1w, self.c1b, self.s2beta, self.s2b, self.c3w, self.c3b, self.s4beta, self.s4b,
                       self.c5w, self.c5b, self.f6w, self.f6b, self.ow, self.ob]

    @staticmethod
    def _sub(x, beta, b):
        return tf.avg_pool2d(x, 2) * 4 * beta[:, None, None] + b[:, None, None]

    def __call__(self, x):
        h = torch.tanh(tf.conv2d(x, self.c1w, self.c1b))
        h = torch.tanh(self._sub(h, self.s2beta, self.s2b))
        h = torch.tanh(tf.conv2d(h, self.c3w * self.c3mask, self.c3b))
        h = torch.tanh(self._sub(h, self.s4beta, self.s4b))
        h = torch.tanh(tf.conv2d(h, self.c5w, self.c5b)).flatten(1)
        h = torch.tanh(h @ self.f6w.T + self.f6b)
        return h @ self.ow.T + self.ob


def target_torch(repeats: int) -> list[dict]:
    """Target 7: LeNet-5 training step at batch 64, and pruned forwards, against PyTorch."""
    if torch is None:
        return [target(7, "PyTorch comparisons", float("nan"), "torch installed", False, note="torch missing")]
    out = []
    net = lenet5(dtype=np.float32, seed=0)
    tnet = _TorchLeNet(net)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    opt = SGD(net.parameters(), 1e-4, momentum=0.9, weight_decay=2e-3)
    loss = CrossEntropyLoss()
    topt = torch.optim.SGD(tnet.params, lr=1e-4, momentum=0.9, weight_decay=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)

    def sparse_step():
        opt.zero_grad()
        loss(net.forward(x), labels)
        net.backward(loss.backward())
        opt.step()

    def torch_step():
        topt.zero_grad()
        tf.cross_entropy(tnet(xt), yt).backward()
        topt.step()

    steps = {t: paired(sparse_step, torch_step, repeats, a_threads=t, b_threads=t) for t in THREAD_COUNTS}
    value, t = judged({t: ts / tt for t, (ts, tt) in steps.items()})
    out.append(target(7, f"LeNet-5 training step, batch 64 float32: sparse / torch ({t} thread(s))", value, "<= 1.5",
                      value <= 1.5, seconds={t: {"sparse_s": ts, "torch_s": tt} for t, (ts, tt) in steps.items()}))
    for prune, goal in ((0.9, 1.0), (0.95, 2.0)):
        case = make(Layer("pruned", 16, 32, 32, 16, 3, padding=1, prune=prune), "float32")
        xt = torch.from_numpy(case["x"])
        wt = torch.from_numpy(case["w"])
        with torch.no_grad():
            fwd = {t: paired(sparse_passes(case)["forward"], lambda: tf.conv2d(xt, wt, padding=1), repeats,
                             a_threads=t, b_threads=t) for t in THREAD_COUNTS}
        value, t = judged({t: ttc / tsp for t, (tsp, ttc) in fwd.items()})
        out.append(target(7, f"pruned {round(prune * 100)}% forward: torch / sparse ({t} thread(s))", value,
                          f">= {goal:g}", value >= goal, nnz=case["nnz"],
                          seconds={t: {"sparse_s": a, "torch_s": b} for t, (a, b) in fwd.items()}))
    return out


def _torch_train(net, data, epochs: int, batch_size: int = 16, lr: float = 0.02, shift: int = 1,
                 seed: int = 0) -> float:
    """The protocol of :func:`sparseconv.train.train` (defaults) in PyTorch; returns test accuracy."""
    from sparseconv.data import batches

    tnet = _TorchLeNet(net)
    opt = torch.optim.SGD(tnet.params, lr=lr, momentum=0.9, weight_decay=2e-3)
    rng = np.random.default_rng(seed)
    n = len(data.y_train)
    total = epochs * -(-n // batch_size)
    step = 0
    acc = 0.0
    for _ in range(epochs):
        for xb, yb in batches(data.x_train, data.y_train, batch_size, rng=rng):
            xb = np.roll(xb, tuple(rng.integers(-shift, shift + 1, size=2)), axis=(2, 3))
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / total))
            step += 1
            opt.zero_grad()
            scores = tnet(torch.from_numpy(xb))
            value = tf.cross_entropy(scores, torch.from_numpy(yb))
            value.backward()
            opt.step()
        with torch.no_grad():
            pred = tnet(torch.from_numpy(data.x_test)).argmax(1).numpy()
        acc = float(np.mean(pred == data.y_test))
    return acc


def target_training(epochs: int) -> dict:
    """Target 8: end-to-end training, sparse (``train`` defaults) against the same in PyTorch."""
    from sparseconv.data import load_digits
    from sparseconv.train import train

    if torch is None:
        return target(8, "end-to-end training", float("nan"), "torch installed", False, note="torch missing")
    data = load_digits(dtype=np.float32, seed=0)
    runs = {}
    for t in THREAD_COUNTS:
        with thread_limits(t):
            history, ts = time_once(lambda: train(lenet5(dtype=np.float32, seed=0), data, epochs=epochs,
                                                  progress=False, log=None))
            acc, tt = time_once(lambda: _torch_train(lenet5(dtype=np.float32, seed=0), data, epochs))
        runs[t] = {"sparse_s": ts, "torch_s": tt, "sparse_test_accuracy": history.test_accuracy[-1],
                   "torch_test_accuracy": acc}
    value, t = judged({t: r["sparse_s"] / r["torch_s"] for t, r in runs.items()})
    return target(8, f"training {epochs} epochs (train defaults): sparse / torch wall-clock ({t} thread(s))", value,
                  "<= 2", value <= 2, runs=runs)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats and 2 training epochs")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--targets", type=lambda text: [int(t) for t in text.split(",")],
                        default=list(range(1, 9)), help="comma-separated target numbers (default: all, 1-8)")
    args = parser.parse_args(argv)
    if not set(args.targets) <= set(range(1, 9)):
        parser.error(f"--targets takes numbers from 1 to 8; got {args.targets}")
    repeats = 3 if args.quick else 7
    global CAPACITY
    load_before = os.getloadavg()
    capacity = CAPACITY = parallel_capacity(repeats)
    print(f"sparseconv speed targets on {CORES} cores (numpy {np.__version__}, "
          f"torch {torch.__version__ if torch else 'missing'}); load average {load_before[0]:.2f}; "
          f"cores actually available to parallel work: {capacity:.2f}", flush=True)
    runners: dict[int, Callable[[], Any]] = {
        1: lambda: target_threads(repeats), 2: target_float32, 3: lambda: target_weight_grad(repeats),
        4: lambda: target_construction(repeats), 5: lambda: target_gemm_efficiency(repeats),
        6: lambda: target_im2col(repeats), 7: lambda: target_torch(repeats),
        8: lambda: target_training(2 if args.quick else 10)}
    results = []
    for number in args.targets:
        found = runners[number]()
        results.extend(found if isinstance(found, list) else [found])
    report = {"cores": CORES, "parallel_capacity": capacity, "repeats": repeats, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "numpy": np.__version__,
              "torch": torch.__version__ if torch else None, "targets": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{sum(r['pass'] for r in results)}/{len(results)} targets pass; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
