"""Transposed convolution against a scatter-add loop written here, PyTorch, the forward
convolution's matrix, the dot test and central differences."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

import sparseconv as sc
from sparseconv.testing import assert_allclose, dottest, gradcheck
from sparseconv.geometry import conv_transpose_output_size
from sparseconv.transpose import ConvTransposeOperator, conv_transpose_matrix


@dataclass(frozen=True)
class Case:
    in_size: tuple
    kernel: tuple
    c_in: int = 2
    c_out: int = 3
    n: int = 2
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1
    groups: int = 1
    dtype: str = "float64"

    @property
    def id(self) -> str:
        def t(v):
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return (f"d{len(self.in_size)}-N{self.n}-Cin{self.c_in}-Cout{self.c_out}-{t(self.in_size)}-k{t(self.kernel)}"
                f"-s{t(self.stride)}-p{t(self.padding)}-op{t(self.output_padding)}-d{t(self.dilation)}-g{self.groups}"
                f"-{self.dtype[5:]}")

    @property
    def opts(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    dilation=self.dilation, groups=self.groups)

    def arrays(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((self.c_in, self.c_out // self.groups, *self.kernel)).astype(self.dtype)
        b = rng.standard_normal(self.c_out).astype(self.dtype)
        x = rng.standard_normal((self.n, self.c_in, *self.in_size)).astype(self.dtype)
        return w, b, x

    def operator(self, w, b=None) -> ConvTransposeOperator:
        return ConvTransposeOperator(w, (self.c_in, *self.in_size), bias=b, **self.opts)


def _grid() -> list[Case]:
    shapes = {1: ((5,), (3,)), 2: ((4, 3), (3, 2)), 3: ((3, 2, 3), (2, 3, 2))}
    cases = []
    for ndim, (size, kernel) in shapes.items():
        combos = itertools.product((1, 2, 3), (0, 1), (1, 2), ((1, 2, 3), (2, 4, 2)))
        for i, (stride, padding, dilation, (groups, c_in, c_out)) in enumerate(combos):
            if ndim == 3 and i % 3:
                continue
            # The largest output_padding PyTorch allows, or none.
            extra = max(stride, dilation) - 1 if i % 2 == 0 else 0
            case = Case(size, kernel, c_in=c_in, c_out=c_out, stride=stride, padding=padding, output_padding=extra,
                        dilation=dilation, groups=groups, n=1 + i % 2, dtype="float32" if i % 5 == 0 else "float64")
            if all(conv_transpose_output_size(s, k, stride, padding, padding, dilation, extra) >= 1
                   for s, k in zip(size, kernel)):
                cases.append(case)
    return cases


GRID = _grid()
# output_padding >= stride (allowed when dilation > stride): the forward convolution has one
# more output position than the transposed layer has inputs.
WIDE_OUTPUT_PADDING = [Case((5,), (3,), stride=1, dilation=2, output_padding=1),
                       Case((4, 3), (2, 3), stride=(1, 2), dilation=(3, 1), output_padding=(2, 1), padding=1),
                       Case((3, 2, 3), (2, 2, 2), c_in=4, c_out=2, groups=2, stride=2, dilation=3, output_padding=2)]
F64 = [c for c in GRID if c.dtype == "float64"] + WIDE_OUTPUT_PADDING


def conv_transpose_loop(x, w, b, *, stride, padding, output_padding, dilation, groups):
    """Scatter every input value through the kernel into the output, one term at a time."""
    ndim = x.ndim - 2
    s, p, e, d = (np.broadcast_to(v, (ndim,)) for v in (stride, padding, output_padding, dilation))
    n, c_in, *in_size = x.shape
    cout_g, kernel = w.shape[1], w.shape[2:]
    out = [(i - 1) * si - 2 * pi + di * (k - 1) + ei + 1 for i, k, si, pi, di, ei in zip(in_size, kernel, s, p, d, e)]
    y = np.zeros((n, cout_g * groups, *out))
    cin_g = c_in // groups
    for sample, ci, *pos in itertools.product(range(n), range(c_in), *map(range, in_size)):
        g = ci // cin_g
        for co, *tap in itertools.product(range(cout_g), *map(range, kernel)):
            q = [j * si - pi + t * di for j, t, si, pi, di in zip(pos, tap, s, p, d)]
            if all(0 <= qi < o for qi, o in zip(q, out)):
                y[(sample, g * cout_g + co, *q)] += w[(ci, co, *tap)] * x[(sample, ci, *pos)]
    return y + (0 if b is None else b.reshape((-1,) + (1,) * ndim))


@pytest.mark.parametrize("case", GRID + WIDE_OUTPUT_PADDING, ids=lambda c: c.id)
def test_forward_matches_scatter_loop(case):
    w, b, x = case.arrays()
    op = case.operator(w, b)
    want = conv_transpose_loop(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **case.opts)
    y = op.forward(x)
    assert y.shape == (x.shape[0], *op.out_shape) == want.shape
    assert y.dtype == np.dtype(case.dtype)
    assert_allclose(y, want, dtype=case.dtype)
    assert_allclose(op.matrix @ x.reshape(x.shape[0], -1).T, (want - b.reshape((-1,) + (1,) * len(case.in_size)))
                    .reshape(x.shape[0], -1).T, dtype=case.dtype)


@pytest.mark.parametrize("case", [c for c in GRID if c.output_padding < c.stride], ids=lambda c: c.id)
def test_matrix_is_the_transposed_forward_convolution(case):
    w, _, _ = case.arrays()
    op = case.operator(w)
    fwd = sc.conv_matrix(w, op.out_shape, stride=case.stride, padding=case.padding, dilation=case.dilation,
                         groups=case.groups)
    got = conv_transpose_matrix(w, (case.c_in, *case.in_size), **case.opts)
    assert got.shape == fwd.T.shape
    assert (got != fwd.T).nnz == 0


@pytest.mark.parametrize("case", F64, ids=lambda c: c.id)
def test_adjoint_and_gradients(case):
    w, b, x = case.arrays()
    op = case.operator(w, b)
    dottest(op)
    dy = np.random.default_rng(1).standard_normal((x.shape[0], *op.out_shape))
    gradcheck(lambda z: float(np.sum(dy * op.forward(z))), x, op.backward_input(dy))
    gradcheck(lambda v: float(np.sum(dy * case.operator(v, b).forward(x))), w, op.weight_grad(x, dy))
    gradcheck(lambda v: float(np.sum(dy * case.operator(w, v).forward(x))), b, op.bias_grad(dy))


def test_set_weight_keeps_the_matrix_in_sync():
    for case in WIDE_OUTPUT_PADDING[1:]:
        w, _, x = case.arrays()
        op = case.operator(w)
        w2 = case.arrays(seed=9)[0]
        op.set_weight(w2)
        fresh = case.operator(w2)
        assert (op.matrix != fresh.matrix).nnz == 0
        assert_allclose(op.forward(x), fresh.forward(x))


def test_float32_matches_float64():
    case = Case((6, 5), (3, 3), c_in=4, c_out=4, groups=2, stride=2, padding=1, output_padding=1)
    w, b, x = case.arrays()
    y32 = case.operator(w.astype(np.float32), b.astype(np.float32)).forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    assert_allclose(y32, case.operator(w, b).forward(x))


# ---------------------------------------------------------------------- PyTorch
TORCH_CASES = [c for c in F64 if isinstance(c.stride, int) and c.groups <= 2][::2] + WIDE_OUTPUT_PADDING


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)
def test_matches_torch(case):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed; the comparison with "
                                "torch.nn.functional.conv_transpose{1,2,3}d needs it (pip install torch)")
    fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
          3: torch.nn.functional.conv_transpose3d}[len(case.in_size)]
    w, b, x = case.arrays()
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = fn(tx, tw, tb, **case.opts)
    op = case.operator(w, b)
    assert_allclose(op.forward(x), ty.detach().numpy())
    dy = np.random.default_rng(2).standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    assert_allclose(op.backward_input(dy), tx.grad.numpy())
    assert_allclose(op.weight_grad(x, dy), tw.grad.numpy())
    assert_allclose(op.bias_grad(dy), tb.grad.numpy())


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, exc, words", [
    pytest.param(dict(stride=2, output_padding=2), ValueError, ["output_padding", "max(stride, dilation)",
                                                               "output_padding=2, stride=2, dilation=1"],
                 id="output-padding-too-large"),
    pytest.param(dict(output_padding=-1), ValueError, ["output_padding", ">= 0"], id="output-padding-negative"),
    pytest.param(dict(padding="same"), ValueError, ["padding", "'same'"], id="padding-string"),
    pytest.param(dict(padding=3), ValueError, ["crops the whole output", "output size 0 < 1"], id="padding-crops-all"),
    pytest.param(dict(groups=3), ValueError, ["groups=3", "C_in = weight.shape[0] = 4"], id="groups"),
    pytest.param(dict(input_shape=(3, 4, 4)), ValueError, ["input_shape[0]", "weight.shape[0] = 4"], id="c-in"),
    pytest.param(dict(input_shape=(4, 4)), ValueError, ["input_shape", "3 positive ints"], id="ndim"),
    pytest.param(dict(weight=np.ones((4, 2))), ValueError, ["weight", "(4, 2)"], id="weight-axes"),
    pytest.param(dict(stride=(1, 2, 3)), ValueError, ["stride", "2 ints"], id="stride-length"),
])
def test_bad_input(kwargs, exc, words):
    args = dict(weight=np.ones((4, 2, 3, 3)), input_shape=(4, 4, 4))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        ConvTransposeOperator(args.pop("weight"), args.pop("input_shape"), **args)
    for word in words:
        assert word in str(info.value)


def test_bad_batches():
    op = ConvTransposeOperator(np.ones((2, 3, 3)), (2, 5), stride=2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2, 5\)"):
        op.forward(np.ones((1, 3, 5)))
    with pytest.raises(ValueError, match=r"dy must have shape \(N, 3, 11\)"):
        op.bias_grad(np.ones((1, 3, 10)))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        op.set_bias(np.ones(2))
    with pytest.raises(ValueError, match=r"weight must have shape \(2, 3, 3\)"):
        op.set_weight(np.ones((3, 2, 3)))


# ---------------------------------------------------------------------- weight_mask (pruning)
MASK_CASES = F64[::4] + WIDE_OUTPUT_PADDING


def _dense_loop_matrix(case, w):
    """The transposed convolution's matrix, column by column, from the scatter loop on unit inputs."""
    n_in = case.c_in * int(np.prod(case.in_size))
    basis = np.eye(n_in).reshape((n_in, case.c_in, *case.in_size))
    return conv_transpose_loop(basis, w, None, **case.opts).reshape(n_in, -1).T


@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0], ids=["pruned-all", "pruned-half", "pruned-none"])
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: c.id)
def test_weight_mask_leaves_masked_taps_out(case, keep):
    w, _, x = case.arrays()
    mask = np.random.default_rng(7).random(w.shape) < keep
    wm = np.where(mask, w, 0)
    op = ConvTransposeOperator(wm, (case.c_in, *case.in_size), weight_mask=mask, **case.opts)
    # Entries from the mask: the loop's matrix with 1 at every kept tap (each entry is one tap).
    count = np.count_nonzero(_dense_loop_matrix(case, mask.astype(np.float64)))
    assert op.nnz == op.matrix.nnz == count
    np.testing.assert_array_equal(op.weight_mask, mask)
    dense = _dense_loop_matrix(case, wm)
    assert_allclose(op.matrix.toarray(), dense)
    n = x.shape[0]
    assert_allclose(op.forward(x).reshape(n, -1), (dense @ x.reshape(n, -1).T).T)
    dy = np.random.default_rng(1).standard_normal((n, *op.out_shape))
    assert_allclose(op.backward_input(dy).reshape(n, -1), (dense.T @ dy.reshape(n, -1).T).T)
    # The kernel gradient from the loop's matrix of each unit weight: <dy, M(e_i) x>.
    want = np.zeros(w.shape)
    for i in zip(*np.nonzero(mask)):
        e = np.zeros(w.shape)
        e[i] = 1.0
        want[i] = np.sum(dy * conv_transpose_loop(x, e, None, **case.opts))
    got = op.weight_grad(x, dy)
    assert np.all(got[~mask] == 0)
    assert_allclose(got, want)
    # The unmasked operator holding zeros at the masked taps computes the same products.
    full = case.operator(wm)
    assert_allclose(op.forward(x), full.forward(x))
    assert_allclose(op.backward_input(dy), full.backward_input(dy))
    assert_allclose(got[mask], full.weight_grad(x, dy)[mask])
    if keep:
        dottest(op)


def test_weight_mask_refuses_nonzero_masked_weights():
    case = MASK_CASES[0]
    w, _, _ = case.arrays()
    mask = np.random.default_rng(7).random(w.shape) < 0.5
    with pytest.raises(ValueError, match="non-zero values where weight_mask is False"):
        ConvTransposeOperator(w, (case.c_in, *case.in_size), weight_mask=mask, **case.opts)
    op = ConvTransposeOperator(np.where(mask, w, 0), (case.c_in, *case.in_size), weight_mask=mask, **case.opts)
    before = op.matrix.toarray()
    with pytest.raises(ValueError, match="non-zero values where weight_mask is False"):
        op.set_weight(w)
    np.testing.assert_array_equal(op.matrix.toarray(), before)
