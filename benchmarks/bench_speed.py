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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_limits

import sparseconv as sc
from sparseconv import parallel
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

# (name, N, C, F, size, kernel, stride, padding, mask) as in sparseconv.bench's suites.
LENET = [(f"{name} N{n}", n, c, f, s, 5, 1, 0, table)
         for n in (1, 64, 256)
         for name, c, f, s, table in (("C1", 1, 6, 32, False), ("C3", 6, 16, 14, False),
                                      ("C3-table", 6, 16, 14, True), ("C5", 16, 120, 5, False))]
CIFAR = [(f"{label} N{n}", n, c, f, s, 3, st, 1, False)
         for n in (1, 32)
         for label, c, f, s, st in (("16->16 32x32", 16, 16, 32, 1), ("16->32 s2 32x32", 16, 32, 32, 2),
                                    ("32->32 16x16", 32, 32, 16, 1), ("32->64 s2 16x16", 32, 64, 16, 2),
                                    ("64->64 8x8", 64, 64, 8, 1))]


# ---------------------------------------------------------------------- measuring
def timed(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.05) -> dict:
    """Warm up, then time ``repeats`` rounds of enough calls to last ``min_seconds``."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_seconds / once))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return {"min_s": float(np.min(times)), "median_s": float(np.median(times))}


def paired(a: Callable[[], Any], b: Callable[[], Any], repeats: int, *, a_threads: int = CORES,
           b_threads: int = CORES, min_seconds: float = 0.05) -> tuple[float, float]:
    """Minimum times of ``a`` and ``b``, measured in alternating rounds so that both see the
    same machine load; each under :func:`limits` of its thread count."""
    calls = []
    for fn, n in ((a, a_threads), (b, b_threads)):
        with limits(n):
            fn()
            t0 = time.perf_counter()
            fn()
            calls.append(max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7))))
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, (fn, n) in enumerate(((a, a_threads), (b, b_threads))):
            with limits(n):
                t0 = time.perf_counter()
                for _ in range(calls[i]):
                    fn()
                best[i] = min(best[i], (time.perf_counter() - t0) / calls[i])
    return best[0], best[1]


def parallel_capacity(repeats: int) -> float:
    """How many cores this process really gets: ``CORES * t(one job) / t(CORES jobs at once)``
    for a GIL-free single-threaded job (scipy's CSR kernel, no BLAS); below ``CORES`` the
    machine is shared."""
    case = make(CIFAR[7], "float32")
    op, x = case["op"], case["x"]
    from concurrent.futures import ThreadPoolExecutor

    def job() -> None:
        op.forward(x, method="csr", threads=1)

    with ThreadPoolExecutor(CORES) as pool:
        def many() -> None:
            for fut in [pool.submit(job) for _ in range(CORES)]:
                fut.result()

        one, all_cores = paired(job, many, repeats, a_threads=1, b_threads=1)
    return CORES * one / all_cores


@contextlib.contextmanager
def limits(n: int) -> Iterator[None]:
    """Every pool (BLAS, sparseconv, torch) on ``n`` threads inside the block."""
    previous = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None:
            torch.set_num_threads(n)
        with threadpool_limits(limits=n), parallel.threads(n):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(previous)


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
def make(layer: tuple, dtype: str, prune: float = 0.0) -> dict:
    name, n, c, f, s, k, st, p, table = layer
    rng = np.random.default_rng(0)
    mask = None
    if table:
        mask = np.broadcast_to(C3_TABLE.T[:, :, None, None], (f, c, k, k)).copy()
    elif prune:
        size = f * c * k * k
        flat = np.ones(size, dtype=bool)
        flat[np.random.default_rng(1).permutation(size)[:round(prune * size)]] = False
        mask = flat.reshape(f, c, k, k)
    w = (rng.standard_normal((f, c, k, k)) / np.sqrt(c * k * k))
    if mask is not None:
        w = w * mask
    w = w.astype(dtype)
    x = rng.standard_normal((n, c, s, s)).astype(dtype)
    op = sc.ConvOperator(w, (c, s, s), stride=st, padding=p, weight_mask=mask)
    dy = rng.standard_normal((n, *op.out_shape)).astype(dtype)
    return dict(name=name, n=n, c=c, f=f, s=s, k=k, stride=st, padding=p, w=w, x=x, dy=dy, op=op, mask=mask)


def sparse_passes(case: dict) -> dict[str, Callable[[], Any]]:
    op, x, dy = case["op"], case["x"], case["dy"]
    return {"forward": lambda: op.forward(x), "input_grad": lambda: op.backward_input(dy),
            "weight_grad": lambda: op.weight_grad(x, dy)}


def im2col_passes(case: dict) -> dict[str, Callable[[], Any]]:
    """numpy + BLAS im2col (one GEMM per pass), the same as ``sparseconv.bench``'s."""
    n, c, f, h, k, s, p = (case[key] for key in ("n", "c", "f", "s", "k", "stride", "padding"))
    x, dy, w = case["x"], case["dy"], case["w"]
    o = case["op"].out_shape[1]
    wmat = w.reshape(f, c * k * k)

    def unroll() -> np.ndarray:
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * o * o, c * k * k)

    def dy_rows() -> np.ndarray:
        return dy.transpose(0, 2, 3, 1).reshape(n * o * o, f)

    def forward() -> np.ndarray:
        return np.ascontiguousarray((unroll() @ wmat.T).reshape(n, o * o, f).transpose(0, 2, 1))

    def input_grad() -> np.ndarray:
        dcols = (dy_rows() @ wmat).reshape(n, o, o, c, k, k)
        dxp = np.zeros((n, c, h + 2 * p, h + 2 * p), dtype=x.dtype)
        span = s * (o - 1) + 1
        for ky in range(k):
            for kx in range(k):
                dxp[:, :, ky:ky + span:s, kx:kx + span:s] += dcols[:, :, :, :, ky, kx].transpose(0, 3, 1, 2)
        return np.ascontiguousarray(dxp[:, :, p:p + h, p:p + h])

    def weight_grad() -> np.ndarray:
        return (dy_rows().T @ unroll()).reshape(w.shape)

    return {"forward": forward, "input_grad": input_grad, "weight_grad": weight_grad}


# ---------------------------------------------------------------------- targets
def target_threads(repeats: int) -> dict:
    """Target 1: speed-up of each pass from 1 thread to every core, layers with nnz >= 1e5."""
    rows = []
    for layer in LENET + CIFAR:
        case = make(layer, "float32")
        if case["op"].nnz < 100_000:
            continue
        row = {"layer": case["name"], "nnz": case["op"].nnz}
        for pass_name, fn in sparse_passes(case).items():
            t1, tn = paired(fn, fn, repeats, a_threads=1, b_threads=CORES)
            row[pass_name] = {"t1_s": t1, f"t{CORES}_s": tn, "speedup": t1 / tn}
        rows.append(row)
        print(f"    {row['layer']:<22} nnz {row['nnz']:>9,}  speed-up fwd {row['forward']['speedup']:.2f}  "
              f"dx {row['input_grad']['speedup']:.2f}  dw {row['weight_grad']['speedup']:.2f}", flush=True)
    speedups = [r[p]["speedup"] for r in rows for p in ("forward", "input_grad", "weight_grad")]
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
    for layer in [lay for lay in LENET + CIFAR if lay[1] in (32, 64)]:
        case = make(layer, "float32")
        passes = sparse_passes(case)
        fwd1, dw1 = paired(passes["forward"], passes["weight_grad"], repeats, a_threads=1, b_threads=1)
        fwd, dw = paired(passes["forward"], passes["weight_grad"], repeats)
        tracemalloc.start()
        passes["weight_grad"]()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        op = case["op"]
        rows.append({"layer": case["name"], "ratio_1_thread": dw1 / fwd1, f"ratio_{CORES}_threads": dw / fwd,
                     "forward_s": fwd1, "weight_grad_s": dw1, "scratch_peak_bytes": peak,
                     "nnz_x_batch_bytes": op.nnz * case["n"] * case["x"].itemsize})
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
        op, w = case["op"], case["w"]
        tw, tc = paired(lambda: op.set_weight(w), lambda: op.matrix.data.copy(), repeats)
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
        o2 = int(np.prod(op.out_shape[1:]))
        kdim = case["c"] * case["k"] ** 2
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n * o2, kdim)).astype(np.float32)
        b = rng.standard_normal((kdim, f)).astype(np.float32)
        row = {"layer": case["name"]}
        for t in THREAD_COUNTS:
            ts, tg = paired(lambda: op.forward(case["x"]), lambda: a @ b, repeats, a_threads=t, b_threads=t)
            sparse_gf = 2 * op.nnz * n / ts / 1e9
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
    return target(6, f"sparse / im2col, fwd+dx+dw (lenet + cifar median, float32, {t} thread(s))", value, "<= 1.0",
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
    base = ("pruned", 16, 32, 32, 16, 3, 1, 1, False)
    for prune, goal in ((0.9, 1.0), (0.95, 2.0)):
        case = make(base, "float32", prune=prune)
        xt = torch.from_numpy(case["x"])
        wt = torch.from_numpy(case["w"])
        with torch.no_grad():
            fwd = {t: paired(lambda: case["op"].forward(case["x"]), lambda: tf.conv2d(xt, wt, padding=1), repeats,
                             a_threads=t, b_threads=t) for t in THREAD_COUNTS}
        value, t = judged({t: ttc / tsp for t, (tsp, ttc) in fwd.items()})
        out.append(target(7, f"pruned {round(prune * 100)}% forward: torch / sparse ({t} thread(s))", value,
                          f">= {goal:g}", value >= goal, nnz=case["op"].nnz,
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
        with limits(t):
            t0 = time.perf_counter()
            history = train(lenet5(dtype=np.float32, seed=0), data, epochs=epochs, progress=False, log=None)
            ts = time.perf_counter() - t0
            t0 = time.perf_counter()
            acc = _torch_train(lenet5(dtype=np.float32, seed=0), data, epochs)
            tt = time.perf_counter() - t0
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
