"""Property-based tests of the public API: random valid *and* invalid arguments (issue 14).

Every property drives a public entry point (operators, layers, ``Sequential``, losses, ``SGD``,
checkpoints, ``to_mlp``, ``from_torch``, spectral functions) with arguments drawn by hypothesis,
some of them deliberately invalid, and asserts one of two outcomes:

- the call succeeds and its result matches an independent reference (the direct loops of
  :mod:`sparseconv.reference`, ``torch.nn.functional``, :func:`numpy.linalg.svd`, or a formula
  written out here), with no NaN or inf from finite input; or
- the call is refused with a ``ValueError``/``TypeError`` whose message names the argument at
  fault, and the object it was called on is unchanged.

Any other exception type fails the property as it is. An invalid argument that is accepted
fails it too. Runs are derandomised (the same examples on every run) and sized to take about a
minute in all.
"""

from __future__ import annotations

import copy
import os
import tempfile
import zipfile
from typing import Callable, Iterable

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from scipy.sparse.linalg import aslinearoperator

import sparseconv as sc
from sparseconv import nn, reference
from sparseconv.geometry import PADDING_MODES
from sparseconv.testing import assert_allclose

torch = pytest.importorskip("torch", reason="the pooling, transposed-convolution and from_torch properties compare "
                                            "against torch.nn.functional (pip install torch)")
F = torch.nn.functional

# No shrinking phase: a failing example is reported as drawn, which keeps a run with failures
# within the minute as well.
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(SETTINGS, max_examples=40)

DTYPES = [np.float32, np.float64]
# What an argument error may name when no single argument was drawn invalid but the combination is
# (a kernel larger than the padded input, groups not dividing the channels, ...).
GEOMETRY_NAMES = ("kernel", "input", "padding", "stride", "dilation", "groups", "output", "weight", "channels",
                  "size")


def refused(call: Callable[[], object], names: Iterable[str]) -> tuple[bool, object]:
    """``(True, None)`` if ``call`` raised a ValueError/TypeError naming one of ``names``,
    ``(False, result)`` if it returned. Any other exception propagates and fails the property."""
    names = tuple(names)
    try:
        return False, call()
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert any(n in message for n in names), (
            f"{type(exc).__name__} does not name the argument at fault (one of {names}): {message}")
        return True, None


def assert_refused(call: Callable[[], object], names: Iterable[str], what: str) -> None:
    was_refused, _ = refused(call, names)
    assert was_refused, f"accepted {what}"


def finite(*arrays: np.ndarray) -> None:
    for a in arrays:
        assert np.all(np.isfinite(a)), "non-finite output from finite input"


def torch_tensor(a: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


# ---------------------------------------------------------------------- invalid values
INVALID_INT = st.sampled_from([0, -1, True, 1.5, "2", None])
INVALID_PADDING = st.sampled_from([-1, "bogus", 1.5, None, (-1, 0)])
INVALID_MODE = st.sampled_from(["bogus", None, 3, "Zeros"])


@st.composite
def conv_cases(draw, max_ndim: int = 2) -> dict:
    """Convolution arguments; ``bad`` holds the names of the arguments drawn invalid."""
    ndim = draw(st.integers(1, max_ndim))
    groups = draw(st.sampled_from([1, 2]))
    case = dict(
        ndim=ndim, c=groups * draw(st.integers(1, 2)), f=groups * draw(st.integers(1, 2)),
        kernel=tuple(draw(st.integers(1, 3)) for _ in range(ndim)),
        size=tuple(draw(st.integers(1, 7)) for _ in range(ndim)),
        n=draw(st.integers(0, 2)), dtype=draw(st.sampled_from(DTYPES)),
        opts=dict(stride=draw(st.integers(1, 3)), padding=draw(st.sampled_from([0, 1, 2, "same", "valid"])),
                  dilation=draw(st.integers(1, 2)), groups=groups,
                  padding_mode=draw(st.sampled_from(PADDING_MODES)), flip=draw(st.booleans())),
        bad=set())
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(["stride", "padding", "dilation", "groups", "padding_mode"]))
        case["opts"][name] = draw({"stride": INVALID_INT, "padding": INVALID_PADDING, "dilation": INVALID_INT,
                                   "groups": st.sampled_from([0, -2, True, 1.5, "1"]),
                                   "padding_mode": INVALID_MODE}[name])
        case["bad"].add(name)
    return case


def conv_weight(case: dict, seed: int = 0) -> np.ndarray:
    g = case["opts"]["groups"] if isinstance(case["opts"]["groups"], int) and case["opts"]["groups"] > 0 else 1
    rng = np.random.default_rng(seed)
    return rng.standard_normal((case["f"], max(case["c"] // g, 1), *case["kernel"])).astype(case["dtype"])


# ---------------------------------------------------------------------- operators
@SETTINGS
@given(conv_cases())
def test_conv_operator_matches_direct_loops_or_refuses(case):
    w = conv_weight(case)
    input_shape = (case["c"], *case["size"])
    names = tuple(case["bad"]) or GEOMETRY_NAMES
    was_refused, op = refused(lambda: sc.ConvOperator(w, input_shape, **case["opts"]), names)
    if was_refused:
        return
    assert not case["bad"], f"ConvOperator accepted invalid {case['bad']}: {case['opts']}"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((case["n"], *input_shape)).astype(case["dtype"])
    y = op.forward(x)
    assert y.shape == (case["n"], *op.out_shape) and y.dtype == case["dtype"]
    dy = rng.standard_normal(y.shape).astype(case["dtype"])
    dx, dw = op.backward_input(dy), op.weight_grad(x, dy)
    assert dx.shape == x.shape and dw.shape == w.shape
    finite(y, dx, dw)
    if case["n"]:
        assert_allclose(y, reference.conv_direct(x, w, **case["opts"]))
        want_dx, want_dw, _ = reference.conv_direct_backward(x, w, dy, **case["opts"])
        assert_allclose(dx, want_dx)
        assert_allclose(dw, want_dw)
    else:
        assert not dw.any()
    assert_allclose(sc.conv_matrix(w, input_shape, **case["opts"]).toarray(),
                    reference.dense_matrix(w, input_shape, **case["opts"]))


@SETTINGS
@given(conv_cases(max_ndim=1), st.sampled_from(["shape", "complex", "string", "mask"]))
def test_conv_operator_refused_set_weight_changes_nothing(case, kind):
    case["bad"].clear()
    case["opts"].update(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros")
    w = conv_weight(case)
    size = (case["c"], max(case["size"][0], 3))
    mask = np.ones(w.shape, dtype=bool)
    mask[..., 0] = False
    w[~mask] = 0
    op = sc.ConvOperator(w, size, weight_mask=mask, **case["opts"])
    x = np.random.default_rng(2).standard_normal((1, *size)).astype(case["dtype"])
    before = (op.weight.copy(), op.forward(x))
    bad = {"shape": np.ones((w.shape[0] + 1, *w.shape[1:]), dtype=w.dtype), "complex": w.astype(np.complex128),
           "string": w.astype(str), "mask": np.ones_like(w)}[kind]
    assert_refused(lambda: op.set_weight(bad), ["weight"], f"a {kind} weight")
    np.testing.assert_array_equal(op.weight, before[0])
    np.testing.assert_array_equal(op.forward(x), before[1])


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 2), st.tuples(st.integers(1, 5), st.integers(1, 5)),
       st.tuples(st.integers(1, 3), st.integers(1, 3)), st.integers(1, 3), st.integers(0, 2), st.integers(0, 2),
       st.integers(1, 2), st.sampled_from(DTYPES), st.integers(0, 2))
def test_conv_transpose_operator_matches_torch_or_refuses(c_in, f, size, kernel, stride, padding, output_padding,
                                                          dilation, dtype, n):
    w = np.random.default_rng(3).standard_normal((c_in, f, *kernel)).astype(dtype)
    opts = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    was_refused, op = refused(lambda: sc.ConvTransposeOperator(w, (c_in, *size), **opts),
                              GEOMETRY_NAMES + ("output_padding",))
    if was_refused:
        return
    x = np.random.default_rng(4).standard_normal((n, c_in, *size)).astype(dtype)
    y = op.forward(x)
    finite(y)
    want = F.conv_transpose2d(torch_tensor(x), torch_tensor(w), **opts).numpy()
    assert_allclose(y, want, dtype=dtype)
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
    dx = op.backward_input(dy)
    finite(dx)
    tx = torch_tensor(x).requires_grad_()
    F.conv_transpose2d(tx, torch_tensor(w), **opts).backward(torch_tensor(dy))
    assert_allclose(dx, tx.grad.numpy(), dtype=dtype)
    # A dy of the wrong sample shape is refused naming dy (not x).
    wrong = np.ones((max(n, 1), f, *(s + 1 for s in op.out_shape[1:])), dtype=dtype)
    assert_refused(lambda: op.backward_input(wrong), ["dy"], "a dy of the wrong sample shape")


@SETTINGS
@given(st.integers(1, 3), st.tuples(st.integers(1, 7), st.integers(1, 7)), st.integers(1, 3),
       st.one_of(st.none(), st.integers(1, 3), INVALID_INT), st.one_of(st.integers(0, 1), INVALID_PADDING),
       st.sampled_from(DTYPES), st.integers(0, 2), st.sampled_from(["avg", "max"]))
def test_pool_operators_match_torch_or_refuse(c, size, kernel, stride, padding, dtype, n, kind):
    bad = set()
    if stride is not None and not (isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1):
        bad.add("stride")
    if not (isinstance(padding, int) and padding >= 0):
        bad.add("padding")
    make = (lambda: sc.PoolOperator((c, *size), kernel, stride=stride, padding=padding, dtype=dtype)) \
        if kind == "avg" else (lambda: sc.MaxPoolOperator((c, *size), kernel, stride=stride, padding=padding,
                                                          dtype=dtype))
    was_refused, op = refused(make, tuple(bad) or GEOMETRY_NAMES)
    if was_refused:
        return
    assert not bad, f"{kind} pooling accepted invalid {bad}"
    x = np.random.default_rng(6).standard_normal((n, c, *size)).astype(dtype)
    y = op.forward(x)
    finite(y)
    assert_allclose(y, pool_reference(x, kernel, stride or kernel, padding, kind), dtype=dtype)
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
    dx = op.backward_input(dy)
    finite(dx)
    if n and 2 * padding <= kernel:  # torch's own limit on padding
        tx = torch_tensor(x).requires_grad_()
        out = (F.avg_pool2d(tx, kernel, stride, padding, count_include_pad=True) if kind == "avg"
               else F.max_pool2d(tx, kernel, stride, padding))
        out.backward(torch_tensor(dy))
        assert_allclose(dx, tx.grad.numpy(), dtype=dtype)


def pool_reference(x: np.ndarray, kernel: int, stride: int, padding: int, kind: str) -> np.ndarray:
    """Average (zero padding counted) or max (padding never wins) over each window, by numpy."""
    fill = 0.0 if kind == "avg" else -np.inf
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride]
    return windows.mean(axis=(-2, -1)) if kind == "avg" else windows.max(axis=(-2, -1))


# ---------------------------------------------------------------------- layers
@FEW
@given(conv_cases(max_ndim=2))
def test_conv_layers_validate_at_construction_and_match_reference(case):
    layer_type = nn.Conv1d if case["ndim"] == 1 else nn.Conv2d
    opts = {k: v for k, v in case["opts"].items() if k != "flip"}
    names = tuple(case["bad"]) or GEOMETRY_NAMES
    was_refused, layer = refused(lambda: layer_type(case["c"], case["f"], case["kernel"], dtype=case["dtype"],
                                                    rng=0, **opts), names)
    if was_refused:
        return
    # Bad options must be refused here, not at the first forward.
    assert not case["bad"], f"{layer_type.__name__} constructed with invalid {case['bad']}: {opts}"
    x = np.random.default_rng(8).standard_normal((case["n"], case["c"], *case["size"])).astype(case["dtype"])
    was_refused, y = refused(lambda: layer.forward(x), GEOMETRY_NAMES + ("x",))
    if was_refused:
        return
    w, b = layer.weight.data.copy(), layer.bias.data.copy()
    finite(y)
    if case["n"]:
        assert_allclose(y, reference.conv_direct(x, w, b, **opts))
    dy = np.random.default_rng(9).standard_normal(y.shape).astype(case["dtype"])
    if case["n"]:
        grads = (layer.weight.grad.copy(), layer.bias.grad.copy())
        for wrong in (dy[:-1], dy[..., :-1] if dy.shape[-1] > 1 else dy[:, :0], dy.astype(np.complex128)):
            assert_refused(lambda: layer.backward(wrong), ["dy"], f"dy of shape {wrong.shape} {wrong.dtype}")
            np.testing.assert_array_equal(layer.weight.grad, grads[0])
            np.testing.assert_array_equal(layer.bias.grad, grads[1])
    dx = layer.backward(dy)
    finite(dx)
    if case["n"]:
        want_dx, want_dw, _ = reference.conv_direct_backward(x, w, dy, **opts)
        assert_allclose(dx, want_dx)
        assert_allclose(layer.weight.grad, want_dw)


LAYER_FACTORIES = {
    "Linear": (lambda dt: nn.Linear(12, 5, dtype=dt, rng=0), (12,)),
    "Flatten": (lambda dt: nn.Flatten(), (3, 2, 2)),
    "Subsampling2d": (lambda dt: nn.Subsampling2d(3, dtype=dt), (3, 4, 4)),
    "AvgPool2d": (lambda dt: nn.AvgPool2d(2, dtype=dt), (3, 4, 4)),
    "MaxPool2d": (lambda dt: nn.MaxPool2d(2, dtype=dt), (3, 4, 4)),
    "ReLU": (lambda dt: nn.ReLU(), (3, 4)),
    "Tanh": (lambda dt: nn.Tanh(), (3, 4)),
    "Sigmoid": (lambda dt: nn.Sigmoid(), (3, 4)),
}


@SETTINGS
@given(st.sampled_from(sorted(LAYER_FACTORIES)), st.sampled_from(DTYPES), st.integers(1, 3),
       st.sampled_from(["batch", "sample", "ndim", "complex", "list"]))
def test_layer_backward_checks_dy_against_forward(name, dtype, n, wrong):
    make, sample = LAYER_FACTORIES[name]
    layer = make(dtype)
    x = np.random.default_rng(10).standard_normal((n, *sample)).astype(dtype) * 3
    y = layer.forward(x)
    finite(y)
    dy = np.ones_like(y)
    bad = {"batch": np.ones((n + 1, *y.shape[1:]), dtype=dtype),
           "sample": np.ones((n, *y.shape[1:-1], y.shape[-1] + 1), dtype=dtype),
           "ndim": np.ones(y.shape + (1,), dtype=dtype), "complex": dy.astype(np.complex128),
           "list": [[1.0]]}[wrong]
    grads = [p.grad.copy() for p in layer.parameters()]
    assert_refused(lambda: layer.backward(bad), ["dy"], f"{name}.backward with a {wrong} dy")
    for p, g in zip(layer.parameters(), grads):
        np.testing.assert_array_equal(p.grad, g)
    finite(layer.backward(dy))


@SETTINGS
@given(st.sampled_from(DTYPES), st.integers(1, 4), st.integers(2, 5), st.floats(-1e4, 1e4), st.floats(1e-3, 1e3),
       st.sampled_from(["valid", "float", "range", "shape", "negative"]))
def test_losses_match_formulas_or_refuse(dtype, n, k, shift, spread, labels_kind):
    rng = np.random.default_rng(11)
    logits = (shift + spread * rng.standard_normal((n, k))).astype(dtype)
    labels = {"valid": rng.integers(0, k, n), "float": rng.integers(0, k, n).astype(float),
              "range": np.full(n, k), "shape": rng.integers(0, k, n + 1), "negative": np.full(n, -1)}[labels_kind]
    for loss in (nn.CrossEntropyLoss(), nn.MSELoss()):
        was_refused, value = refused(lambda: loss(logits, labels), ["labels"])
        if labels_kind != "valid":
            assert was_refused, f"{loss!r} accepted {labels_kind} labels"
            continue
        grad = loss.backward()
        finite(np.float64(value), grad)
        z = logits.astype(np.float64)
        onehot = np.eye(k)[labels]
        if isinstance(loss, nn.CrossEntropyLoss):
            top = z.max(axis=1, keepdims=True)
            log_p = z - top - np.log(np.exp(z - top).sum(axis=1, keepdims=True))
            want, want_grad = -log_p[np.arange(n), labels].mean(), (np.exp(log_p) - onehot) / n
        else:
            want, want_grad = 0.5 * np.sum((z - onehot) ** 2) / n, (z - onehot) / n
        assert_allclose(np.float64(value), np.float64(want), dtype=dtype, scale=max(abs(want), 1.0))
        # The gradient's natural size is 1/n (softmax - onehot), not its largest entry, which
        # can be a float32-underflowing 1e-83 for a confident prediction.
        assert_allclose(grad, want_grad, dtype=dtype, scale=max(float(np.abs(want_grad).max()), 1.0 / n))


OPTIMISER_VALUES = st.one_of(st.floats(1e-4, 0.9), st.sampled_from([0.0, -0.1, 1.0, 1.5, np.nan, np.inf, -np.inf,
                                                                      "0.1", None, True, [0.1]]))


def _sgd_value_ok(name: str, value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return False
    # PyTorch's rule (torch.optim.SGD): every hyper-parameter finite and >= 0.
    return value >= 0


@SETTINGS
@given(OPTIMISER_VALUES, OPTIMISER_VALUES, OPTIMISER_VALUES, st.sampled_from(DTYPES))
def test_sgd_validates_and_steps_by_the_formula(lr, momentum, weight_decay, dtype):
    net = nn.Sequential(nn.Linear(4, 3, dtype=dtype, rng=0), nn.Tanh(), nn.Linear(3, 2, dtype=dtype, rng=1))
    bad = [n for n, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay))
           if not _sgd_value_ok(n, v)]
    was_refused, opt = refused(lambda: nn.SGD(net.parameters(), lr, momentum=momentum, weight_decay=weight_decay),
                               bad or ["lr"])
    if was_refused:
        assert bad, "SGD refused valid hyper-parameters"
        return
    assert not bad, f"SGD accepted invalid {bad}: lr={lr!r}, momentum={momentum!r}, weight_decay={weight_decay!r}"
    x = np.random.default_rng(12).standard_normal((5, 4)).astype(dtype)
    loss = nn.MSELoss()
    for step in range(2):
        before = [p.data.astype(np.float64) for p in net.parameters()]
        opt.zero_grad()
        loss(net.forward(x), np.zeros((5, 2), dtype=dtype))
        net.backward(loss.backward())
        grads = [p.grad.astype(np.float64) + weight_decay * b for p, b in zip(net.parameters(), before)]
        velocity = grads if step == 0 else [momentum * v + g for v, g in zip(velocity, grads)]
        opt.step()
        for p, b, v in zip(net.parameters(), before, velocity):
            finite(p.data)
            assert p.data.dtype == dtype
            assert_allclose(p.data, b - lr * v, dtype=dtype, scale=max(1.0, float(np.abs(b).max())))


# ---------------------------------------------------------------------- checkpoints
def _small_net(dtype: object, seed: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, dtype=dtype, rng=seed), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 3, dtype=dtype, rng=seed + 1))


CORRUPTIONS = ["truncate", "flip", "string-array", "complex-array", "wrong-shape", "missing", "extra", "npy",
               "empty", "object-array"]


@SETTINGS
@given(st.sampled_from(CORRUPTIONS), st.integers(1, 15), st.sampled_from(DTYPES))
def test_load_of_a_corrupt_checkpoint_is_refused_and_changes_nothing(corruption, sixteenth, dtype):
    saved, target = _small_net(dtype, 0), _small_net(dtype, 10)
    before = target.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "net.npz")
        saved.save(path)
        state = saved.state_dict()
        names = list(state)
        if corruption == "truncate":
            data = open(path, "rb").read()
            open(path, "wb").write(data[:len(data) * sixteenth // 16])
        elif corruption == "flip":
            data = bytearray(open(path, "rb").read())
            data[len(data) * sixteenth // 16] ^= 0xFF
            open(path, "wb").write(bytes(data))
        elif corruption == "empty":
            open(path, "wb").close()
        elif corruption == "npy":
            path = os.path.join(tmp, "net.npy")
            np.save(path, state[names[0]])
        else:
            last = names[-1]
            if corruption == "string-array":
                state[last] = state[last].astype(str)
            elif corruption == "complex-array":
                state[last] = state[last] + 1j
            elif corruption == "wrong-shape":
                state[last] = state[last][:-1]
            elif corruption == "missing":
                del state[last]
            elif corruption == "extra":
                state["9.weight"] = np.ones(2)
            elif corruption == "object-array":
                state[last] = np.array([None] * state[last].size, dtype=object)
            with zipfile.ZipFile(path, "w") as zf:
                for name, value in state.items():
                    with zf.open(name + ".npy", "w") as fh:
                        np.lib.format.write_array(fh, value, allow_pickle=True)
        was_refused, _ = refused(lambda: target.load(path), ["path", "checkpoint", os.path.basename(path)] + names)
    if corruption == "flip" and not was_refused:
        # A flipped byte inside an array's values loads a different but valid checkpoint.
        return
    assert was_refused, f"loaded a checkpoint with {corruption}"
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"{name} changed by a refused load")


@FEW
@given(st.sampled_from(DTYPES), st.integers(0, 3))
def test_save_load_round_trip(dtype, seed):
    saved, target = _small_net(dtype, seed), _small_net(dtype, seed + 20)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "net.npz")
        saved.save(path)
        target.load(path)
    x = np.random.default_rng(13).standard_normal((2, 1, 4, 4)).astype(dtype)
    np.testing.assert_array_equal(target.forward(x), saved.forward(x))


# ---------------------------------------------------------------------- export and bridges
ACTIVATION_TYPES = [nn.ReLU, nn.Tanh, nn.Sigmoid]


@st.composite
def networks(draw) -> tuple[nn.Sequential, tuple[int, ...], object]:
    dtype = draw(st.sampled_from(DTYPES))
    layers = []
    if draw(st.booleans()):
        layers.append(draw(st.sampled_from(ACTIVATION_TYPES))())
    c = draw(st.integers(1, 2))
    f = draw(st.integers(1, 3))
    layers.append(nn.Conv2d(c, f, 3, padding=draw(st.integers(0, 1)), dtype=dtype, rng=0))
    size = 6 if layers[-1].options["padding"] == 1 else 4
    if draw(st.booleans()):
        layers.append(draw(st.sampled_from(ACTIVATION_TYPES))())
    pool = draw(st.sampled_from(["none", "avg", "sub"]))
    if pool == "avg":
        layers.append(nn.AvgPool2d(2, dtype=dtype))
    elif pool == "sub":
        layers.append(nn.Subsampling2d(f, dtype=dtype))
    layers += [nn.Flatten(), nn.Linear(f * (size // (1 if pool == "none" else 2)) ** 2, 3, dtype=dtype, rng=1)]
    if draw(st.booleans()):
        layers.append(draw(st.sampled_from(ACTIVATION_TYPES))())
    return nn.Sequential(*layers), (c, 6, 6), dtype


@SETTINGS
@given(networks(), st.booleans())
def test_to_mlp_matches_the_network_and_keeps_its_dtype(net_case, compose):
    net, input_shape, dtype = net_case
    mlp = sc.to_mlp(net, input_shape, compose=compose)
    x = np.random.default_rng(14).standard_normal((3, *input_shape)).astype(dtype)
    want = net.forward(x).reshape(3, -1)
    got = mlp.forward(x.reshape(3, -1))
    assert got.dtype == dtype, f"to_mlp of a {np.dtype(dtype)} network returns {got.dtype}"
    finite(got)
    assert_allclose(got, want, dtype=dtype)
    assert_refused(lambda: sc.to_mlp(net, (input_shape[0] + 1, 6, 6)), GEOMETRY_NAMES + ("input_shape",),
                   "an input shape with the wrong channel count")


@st.composite
def torch_convs(draw) -> tuple["torch.nn.Module", tuple[int, ...]]:
    groups = draw(st.sampled_from([1, 2]))
    c, f = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "circular", "reflect", "replicate"]))
    size = draw(st.integers(4, 7))
    conv = torch.nn.Conv2d(c, f, draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)),
                           padding=draw(st.integers(0, 1)), dilation=draw(st.integers(1, 2)), groups=groups,
                           bias=draw(st.booleans()), padding_mode=mode)
    return conv, (c, size, size)


def _torch_accepts(module, input_shape: tuple[int, ...]) -> bool:
    """Whether torch runs ``module`` on a sample of ``input_shape`` (float32)."""
    try:
        with torch.no_grad():
            module(torch.zeros((1, *input_shape)))
    except RuntimeError:
        return False
    return True


@SETTINGS
@given(torch_convs(), st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       st.booleans())
def test_from_torch_matches_torch_or_refuses_the_dtype(conv_case, torch_dtype, wrap):
    conv, input_shape = conv_case
    module = (torch.nn.Sequential(conv, torch.nn.ReLU()) if wrap else conv).to(torch_dtype)
    got_module = None
    if torch_dtype in (torch.float16, torch.bfloat16):
        # Half-precision weights convert exactly to float32 (sparseconv computes in float32 or
        # float64): the reference is a float32 copy of the same module.
        half, module, np_dtype = module, copy.deepcopy(module).float(), np.float32
        if _torch_accepts(module, input_shape):
            got_module = sc.from_torch(half, input_shape)
    else:
        np_dtype = np.float32 if torch_dtype == torch.float32 else np.float64
    x = np.random.default_rng(15).standard_normal((2, *input_shape)).astype(np_dtype)
    try:
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
    except RuntimeError:
        # torch refuses the geometry (kernel larger than the padded input): so must sparseconv.
        assert_refused(lambda: sc.from_torch(module, input_shape).forward(x), GEOMETRY_NAMES,
                       "a geometry torch refuses")
        return
    got = (got_module or sc.from_torch(module, input_shape)).forward(x)
    finite(got)
    assert got.dtype == np_dtype
    assert_allclose(got, want, dtype=np_dtype)


# ---------------------------------------------------------------------- spectral
@st.composite
def spectral_operands(draw) -> tuple[object, np.ndarray]:
    """An operand and its dense matrix: random, repeated values (Kronecker), rank deficient,
    zero, tiny or huge; in one of the accepted forms."""
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    m, n = draw(st.integers(2, 14)), draw(st.integers(2, 14))
    kind = draw(st.sampled_from(["random", "kron", "rank", "zero", "sparse"]))
    if kind == "kron":
        copies = draw(st.integers(2, 4))
        a = np.kron(np.eye(copies), rng.standard_normal((m // copies + 1, n // copies + 1)))
    elif kind == "rank":
        a = rng.standard_normal((m, 1)) @ rng.standard_normal((1, n))
    elif kind == "zero":
        a = np.zeros((m, n))
    elif kind == "sparse":
        a = sp.random_array((m, n), density=0.3, rng=rng).toarray()
    else:
        a = rng.standard_normal((m, n))
    a = a * 10.0 ** draw(st.sampled_from([0, -150, 150]))
    form = draw(st.sampled_from(["ndarray", "csr", "coo", "LinearOperator"]))
    operand = {"ndarray": a, "csr": sp.csr_array(a), "coo": sp.coo_array(a), "LinearOperator": aslinearoperator(a)}
    return operand[form], a


@SETTINGS
@given(spectral_operands(), st.one_of(st.integers(1, 14), INVALID_INT),
       st.one_of(st.sampled_from(["largest", "smallest"]), st.sampled_from(["middle", None, 1])),
       st.one_of(st.sampled_from([1e-10, 1e-6]), st.sampled_from([0, 1.5, np.nan, "1e-6"])),
       st.one_of(st.sampled_from(["auto", "dense", "eigsh"]), st.sampled_from(["lapack", None])))
def test_singular_values_match_svd_or_refuse(operand_case, k, which, rtol, method):
    operand, a = operand_case
    p = min(a.shape)
    bad = [name for name, ok in (
        ("k", isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= p),
        ("which", which in ("largest", "smallest")),
        ("rtol", isinstance(rtol, float) and 0 < rtol < 1),
        ("method", method in ("auto", "dense", "eigsh"))) if not ok]
    if not bad and method == "eigsh" and k >= p:
        bad = ["k"]
    was_refused, got = refused(lambda: sc.singular_values(operand, k, which, rtol=rtol, method=method),
                               bad or ["op"])
    if was_refused:
        assert bad, "singular_values refused valid arguments"
        return
    assert not bad, f"singular_values accepted invalid {bad}"
    exact = np.linalg.svd(a, compute_uv=False)
    want = exact[:k] if which == "largest" else exact[p - k:]
    finite(got)
    scale = exact[0] if exact[0] > 0 else 1.0
    tol = 1e-12 if method == "dense" else 1e-8
    assert np.max(np.abs(got - want)) <= tol * scale, f"{got} != {want}"
    norm = sc.spectral_norm(operand, method=method if method != "eigsh" or p > 1 else "dense")
    assert abs(norm - exact[0]) <= 1e-6 * scale


@FEW
@given(st.sampled_from([np.nan, np.inf, -np.inf]), st.sampled_from(["ndarray", "csr", "LinearOperator"]),
       st.sampled_from(["auto", "dense", "eigsh"]))
def test_spectral_functions_refuse_non_finite_operators(bad, form, method):
    a = np.random.default_rng(16).standard_normal((8, 6))
    a[2, 3] = bad
    operand = {"ndarray": a, "csr": sp.csr_array(a), "LinearOperator": aslinearoperator(a)}[form]
    for call in (lambda: sc.singular_values(operand, 2, method=method), lambda: sc.spectral_norm(operand),
                 lambda: sc.composed_norm([operand]), lambda: sc.network_lipschitz_bound([operand])):
        assert_refused(call, ["op", "non-finite"], "a non-finite operator")
