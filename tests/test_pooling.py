"""Pooling as sparse matrices, checked against direct loops written here and NOTES section 3.

Average/sum pooling: ``pool_matrix`` and ``PoolOperator`` against a loop over windows (1-D, 2-D,
3-D, overlapping windows, padding, non-square), backward = transpose, dot test. Max pooling:
``MaxPoolOperator`` against a loop that scans each window in C order and keeps the first
maximum (the documented tie rule), gradient routing, padding, and the selection matrix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseconv.pooling import MaxPoolOperator, PoolOperator, pool_matrix
from sparseconv.testing import assert_allclose, dottest


# ---------------------------------------------------------------------- direct references
def _pairs(padding, ndim: int) -> tuple[tuple[int, int], ...]:
    """``(low, high)`` per dimension for an int or a per-dimension sequence of ints / pairs."""
    if isinstance(padding, int):
        return ((padding, padding),) * ndim
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _tuple(value, ndim: int) -> tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def _windows(in_size, kernel, stride, pads):
    """Yield ``(out_index, [(tap_index, in_index or None), ...])`` with taps in C order."""
    out_size = [(i + lo + hi - k) // s + 1 for i, k, s, (lo, hi) in zip(in_size, kernel, stride, pads)]
    for o in itertools.product(*map(range, out_size)):
        taps = []
        for t in itertools.product(*map(range, kernel)):
            pos = tuple(oi * s - lo + ti for oi, s, (lo, _), ti in zip(o, stride, pads, t))
            inside = all(0 <= p < i for p, i in zip(pos, in_size))
            taps.append((t, pos if inside else None))
        yield o, taps


def pool_dense_loop(input_shape, kernel, stride, pads, kind):
    """The dense pooling matrix, one entry per in-range tap, built by loops."""
    c, *in_size = input_shape
    windows = list(_windows(in_size, kernel, stride, pads))
    out_size = [max(o[d] for o, _ in windows) + 1 for d in range(len(in_size))]
    n_out, n_in = int(np.prod(out_size)), int(np.prod(in_size))
    value = 1.0 / np.prod(kernel) if kind == "avg" else 1.0
    dense = np.zeros((c * n_out, c * n_in))
    for ch in range(c):
        for o, taps in windows:
            row = ch * n_out + np.ravel_multi_index(o, out_size)
            for _, pos in taps:
                if pos is not None:
                    dense[row, ch * n_in + np.ravel_multi_index(pos, in_size)] += value
    return dense, (c, *out_size)


def pool_forward_loop(x, kernel, stride, pads, kind):
    """Average (zeros of the padding counted) or sum pooling of a batch, by loops over windows."""
    n, c, *in_size = x.shape
    windows = list(_windows(in_size, kernel, stride, pads))
    out_size = [max(o[d] for o, _ in windows) + 1 for d in range(len(in_size))]
    y = np.zeros((n, c, *out_size), dtype=np.float64)
    for o, taps in windows:
        total = sum(x[(slice(None), slice(None), *pos)] for _, pos in taps if pos is not None)
        y[(slice(None), slice(None), *o)] = total / np.prod(kernel) if kind == "avg" else total
    return y


def max_pool_loop(x, kernel, stride, pads):
    """Max pooling by loops: ``(output, winners, dx_for(dy))``; first maximum in C order wins."""
    n, c, *in_size = x.shape
    windows = list(_windows(in_size, kernel, stride, pads))
    out_size = [max(o[d] for o, _ in windows) + 1 for d in range(len(in_size))]
    y = np.zeros((n, c, *out_size), dtype=x.dtype)
    winners = np.zeros((n, c, int(np.prod(out_size))), dtype=np.int64)
    for b, ch in itertools.product(range(n), range(c)):
        for o, taps in windows:
            best = None
            for _, pos in taps:
                if pos is not None and (best is None or x[(b, ch, *pos)] > x[(b, ch, *best)]):
                    best = pos
            y[(b, ch, *o)] = x[(b, ch, *best)]
            winners[b, ch, np.ravel_multi_index(o, out_size)] = np.ravel_multi_index(best, in_size)

    def backward(dy):
        dx = np.zeros(x.shape, dtype=np.float64)
        flat = dx.reshape(n, c, -1)
        for b, ch in itertools.product(range(n), range(c)):
            for o, w in enumerate(winners[b, ch]):
                flat[b, ch, w] += dy.reshape(n, c, -1)[b, ch, o]
        return dx

    return y, winners, backward


# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class PoolCase:
    in_size: tuple
    kernel: object
    stride: object = None
    padding: object = 0
    c: int = 3
    n: int = 2

    @property
    def ndim(self) -> int:
        return len(self.in_size)

    @property
    def kernel_t(self) -> tuple[int, ...]:
        return _tuple(self.kernel, self.ndim)

    @property
    def stride_t(self) -> tuple[int, ...]:
        return self.kernel_t if self.stride is None else _tuple(self.stride, self.ndim)

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        return _pairs(self.padding, self.ndim)

    @property
    def opts(self) -> dict:
        return dict(stride=self.stride, padding=self.padding)

    @property
    def id(self) -> str:
        def t(v):
            return "x".join(map(str, v))
        pad = "x".join(f"{lo}{hi}" for lo, hi in self.pads)
        overlap = "-overlap" if any(s < k for s, k in zip(self.stride_t, self.kernel_t)) else ""
        return (f"d{self.ndim}-N{self.n}-C{self.c}-{t(self.in_size)}-k{t(self.kernel_t)}-s{t(self.stride_t)}"
                f"-p{pad}{overlap}")


CASES = [
    PoolCase((8,), 2),
    PoolCase((9,), 3, stride=2, padding=1),
    PoolCase((7,), 3, stride=1, padding=((2, 0),)),
    PoolCase((4, 4), 2),
    PoolCase((4, 6), (2, 3)),
    PoolCase((5, 7), (2, 3), stride=(1, 2), padding=((1, 0), (0, 1))),
    PoolCase((6, 5), 3, stride=2, padding=1),
    PoolCase((5, 5), 2, stride=1),
    PoolCase((7, 4), (3, 2), stride=(2, 1), padding=(1, 0)),
    PoolCase((4, 5, 3), (2, 2, 1)),
    PoolCase((3, 4, 5), 2, stride=1, padding=1),
    PoolCase((5, 4, 4), (3, 2, 2), stride=(2, 1, 2), padding=((1, 1), 0, (0, 1))),
]
IDS = [c.id for c in CASES]
KINDS = ("avg", "sum")


def _batch(case: PoolCase, seed: int = 0, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((case.n, case.c, *case.in_size)).astype(dtype)


# ---------------------------------------------------------------------- NOTES section 3 (seed 003)
def test_seed003_mean_upsample():
    op = PoolOperator((1, 4, 4), 2, kind="avg")
    delta = np.array([[2.0, 8.0], [4.0, 6.0]])
    up = op.backward_input(delta[None, None])[0, 0]
    np.testing.assert_array_equal(up, [[0.5, 0.5, 2, 2], [0.5, 0.5, 2, 2], [1, 1, 1.5, 1.5], [1, 1, 1.5, 1.5]])
    # the seeds' Kronecker form: kron(delta, ones(2, 2)) / 4
    np.testing.assert_array_equal(up, np.kron(delta, np.ones((2, 2))) / 4)


def test_seed003_max_upsample():
    x = np.zeros((4, 4))
    for r, c in [(0, 0), (1, 3), (2, 1), (3, 2)]:
        x[r, c] = 1.0 + r  # a strict maximum of its 2x2 window
    op = MaxPoolOperator((1, 4, 4), 2)
    op.forward(x[None, None])
    up = op.backward_input(np.array([[2.0, 8.0], [4.0, 6.0]])[None, None])[0, 0]
    np.testing.assert_array_equal(up, [[2, 0, 0, 0], [0, 0, 0, 8], [0, 4, 0, 0], [0, 0, 6, 0]])


# ---------------------------------------------------------------------- avg / sum pooling
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pool_matrix_matches_loop(case: PoolCase, kind: str):
    P = pool_matrix((case.c, *case.in_size), case.kernel, kind=kind, **case.opts)
    dense, _ = pool_dense_loop((case.c, *case.in_size), case.kernel_t, case.stride_t, case.pads, kind)
    assert isinstance(P, sp.csr_array)
    assert P.dtype == np.float64
    assert P.shape == dense.shape
    assert P.nnz == np.count_nonzero(dense)
    assert_allclose(P.toarray(), dense)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pool_forward_backward_match_loop(case: PoolCase, kind: str):
    op = PoolOperator((case.c, *case.in_size), case.kernel, kind=kind, **case.opts)
    x = _batch(case)
    y = op.forward(x)
    assert_allclose(y, pool_forward_loop(x, case.kernel_t, case.stride_t, case.pads, kind))
    assert op.out_shape == y.shape[1:]
    dy = np.random.default_rng(1).standard_normal(y.shape)
    dense, _ = pool_dense_loop((case.c, *case.in_size), case.kernel_t, case.stride_t, case.pads, kind)
    expected = (dense.T @ dy.reshape(case.n, -1).T).T.reshape(x.shape)
    assert_allclose(op.backward_input(dy), expected)
    # backward is the transpose of the operator's own matrix, sample by sample
    assert_allclose(op.backward_input(dy).reshape(case.n, -1), (op.matrix.T @ dy.reshape(case.n, -1).T).T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pool_dottest(case: PoolCase, kind: str):
    op = PoolOperator((case.c, *case.in_size), case.kernel, kind=kind, **case.opts)
    dottest(op)


@st.composite
def geometries(draw):
    """``(in_size, kernel, stride, pads)`` with 1-3 dims, padding below the kernel, at least one output."""
    ndim = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    pads = tuple((draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))) for k in kernel)
    in_size = tuple(draw(st.integers(max(1, k - lo - hi), 6)) for k, (lo, hi) in zip(kernel, pads))
    return in_size, kernel, stride, pads


def _small_integers(in_size) -> np.ndarray:
    """A batch of few distinct values: many ties."""
    return np.random.default_rng(0).integers(-3, 4, (2, 2, *in_size)).astype(np.float64)


@settings(max_examples=40, deadline=None)
@given(geometry=geometries(), kind=st.sampled_from(KINDS))
def test_pool_random_geometry_matches_loop(geometry, kind):
    in_size, kernel, stride, pads = geometry
    op = PoolOperator((2, *in_size), kernel, stride=stride, padding=pads, kind=kind)
    dense, _ = pool_dense_loop((2, *in_size), kernel, stride, pads, kind)
    assert_allclose(op.matrix.toarray(), dense)
    x = _small_integers(in_size)
    assert_allclose(op.forward(x), pool_forward_loop(x, kernel, stride, pads, kind))


@settings(max_examples=40, deadline=None)
@given(geometry=geometries())
def test_max_pool_random_geometry_matches_loop(geometry):
    in_size, kernel, stride, pads = geometry
    op = MaxPoolOperator((2, *in_size), kernel, stride=stride, padding=pads)
    x = _small_integers(in_size)
    y_ref, win_ref, backward_ref = max_pool_loop(x, kernel, stride, pads)
    np.testing.assert_array_equal(op.forward(x), y_ref)
    np.testing.assert_array_equal(op.winners(x), win_ref)
    dy = np.random.default_rng(1).standard_normal(y_ref.shape)
    assert_allclose(op.backward_input(dy), backward_ref(dy))


def test_pool_defaults_stride_to_kernel():
    P = pool_matrix((1, 6, 6), 3)
    assert P.shape == (4, 36)
    assert_allclose(P.sum(axis=1), np.ones(4))


@pytest.mark.parametrize("kind", KINDS)
def test_pool_float32_stays_float32(kind: str):
    op = PoolOperator((2, 6, 4), 2, kind=kind, dtype=np.float32)
    assert op.matrix.dtype == np.float32
    assert pool_matrix((2, 6, 4), 2, kind=kind, dtype=np.float32).dtype == np.float32
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 4)).astype(np.float32)
    y = op.forward(x)
    assert y.dtype == np.float32
    assert op.backward_input(np.ones_like(y)).dtype == np.float32
    assert_allclose(y, pool_forward_loop(x.astype(np.float64), (2, 2), (2, 2), ((0, 0),) * 2, kind))


def test_pool_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        pool_matrix((1, 4, 4), 2, kind="max")


# ---------------------------------------------------------------------- max pooling
def _distinct(case: PoolCase, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """A batch without ties (a shuffled range), so the loop and the operator agree exactly."""
    rng = np.random.default_rng(seed)
    size = case.n * case.c * int(np.prod(case.in_size))
    return (rng.permutation(size) - size / 2).reshape(case.n, case.c, *case.in_size).astype(dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_max_pool_matches_loop(case: PoolCase):
    op = MaxPoolOperator((case.c, *case.in_size), case.kernel, **case.opts)
    x = _distinct(case)
    y_ref, win_ref, backward_ref = max_pool_loop(x, case.kernel_t, case.stride_t, case.pads)
    y = op.forward(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(op.winners(x), win_ref)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    assert_allclose(op.backward_input(dy), backward_ref(dy))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_max_pool_ties_match_loop(case: PoolCase):
    # few distinct values: many ties, resolved by the first maximum in the window's C order
    x = np.random.default_rng(2).integers(0, 3, (case.n, case.c, *case.in_size)).astype(np.float64)
    op = MaxPoolOperator((case.c, *case.in_size), case.kernel, **case.opts)
    y_ref, win_ref, backward_ref = max_pool_loop(x, case.kernel_t, case.stride_t, case.pads)
    np.testing.assert_array_equal(op.forward(x), y_ref)
    np.testing.assert_array_equal(op.winners(x), win_ref)
    dy = np.random.default_rng(3).standard_normal(y_ref.shape)
    assert_allclose(op.backward_input(dy), backward_ref(dy))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_selection_matrix(case: PoolCase):
    op = MaxPoolOperator((case.c, *case.in_size), case.kernel, **case.opts)
    x = _distinct(case, seed=4)
    y = op.forward(x)
    S = op.selection_matrix()
    n_out, n_in = case.c * int(np.prod(op.out_shape[1:])), case.c * int(np.prod(case.in_size))
    assert sp.issparse(S)
    assert S.shape == (case.n * n_out, case.n * n_in)
    dense = S.toarray()
    assert set(np.unique(dense)) <= {0.0, 1.0}
    np.testing.assert_array_equal((dense == 1).sum(axis=1), np.ones(S.shape[0]))
    np.testing.assert_array_equal(S @ x.ravel(), y.ravel())
    dy = np.random.default_rng(5).standard_normal(y.shape)
    assert_allclose(op.backward_input(dy).ravel(), S.T @ dy.ravel())
    # block diagonal: sample n only reads sample n
    for b in range(case.n):
        block = dense[b * n_out:(b + 1) * n_out]
        assert not block[:, :b * n_in].any() and not block[:, (b + 1) * n_in:].any()
    # passing x gives the same matrix as the last forward
    assert (op.selection_matrix(x) != S).nnz == 0


def test_tie_rule_first_in_window_c_order():
    # window 0 (rows 0-1, cols 0-1): maximum 5 at (0, 1) and (1, 0) -> (0, 1) wins (flat 1)
    # window 1 (rows 0-1, cols 2-3): all equal -> its first position (0, 2) wins (flat 2)
    x = np.array([[1.0, 5.0, 7.0, 7.0],
                  [5.0, 2.0, 7.0, 7.0]])[None, None]
    op = MaxPoolOperator((1, 2, 4), 2)
    np.testing.assert_array_equal(op.winners(x), [[[1, 2]]])
    op.forward(x)
    dx = op.backward_input(np.array([[[[10.0, 20.0]]]]))
    np.testing.assert_array_equal(dx[0, 0], [[0, 10, 20, 0], [0, 0, 0, 0]])


def test_tie_rule_3d_scans_depth_first():
    # every value equal: the winner is the window's first position in C order (d, h, w)
    op = MaxPoolOperator((1, 4, 4, 4), 2)
    win = op.winners(np.ones((1, 1, 4, 4, 4)))
    expected = [np.ravel_multi_index((2 * d, 2 * h, 2 * w), (4, 4, 4))
                for d, h, w in itertools.product(range(2), repeat=3)]
    np.testing.assert_array_equal(win[0, 0], expected)


def test_overlapping_windows_add_at_shared_winner():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0  # the centre wins all four 2x2 windows of stride 1
    op = MaxPoolOperator((1, 3, 3), 2, stride=1)
    op.forward(x)
    dy = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    dx = op.backward_input(dy)
    expected = np.zeros((3, 3))
    expected[1, 1] = 10.0
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_padding_is_never_selected():
    # all inputs negative: a zero-padded maximum would win if padding counted
    case = PoolCase((5, 5), 3, stride=2, padding=1)
    x = -1.0 - np.random.default_rng(6).random((2, 3, 5, 5))
    op = MaxPoolOperator((3, 5, 5), 3, stride=2, padding=1)
    y = op.forward(x)
    assert (y < 0).all()
    assert (op.winners(x) < 25).all()
    np.testing.assert_array_equal(y, max_pool_loop(x, case.kernel_t, case.stride_t, case.pads)[0])


def test_padding_is_never_selected_even_against_minus_inf():
    # an input of -inf ties with the padding; the documented rule says padding never wins
    x = np.full((1, 1, 3, 3), -np.inf)
    op = MaxPoolOperator((1, 3, 3), 2, padding=1)
    y = op.forward(x)
    assert np.all(y == -np.inf)
    assert (op.winners(x) < 9).all()


def test_window_entirely_in_padding_is_refused():
    # padding 2 with a 2x2 kernel makes the corner windows pure padding: nothing can win there
    with pytest.raises(ValueError, match="padding"):
        MaxPoolOperator((1, 3, 3), 2, padding=2)


def test_nan_propagates_first_nan_wins():
    x = np.array([[1.0, np.nan], [5.0, np.nan]])[None, None]
    op = MaxPoolOperator((1, 2, 2), 2)
    assert np.isnan(op.forward(x)).all()
    np.testing.assert_array_equal(op.winners(x), [[[1]]])


def test_max_pool_float32_stays_float32():
    case = PoolCase((6, 6), 2, stride=1, padding=1)
    x = _distinct(case, dtype=np.float32)
    op = MaxPoolOperator((case.c, 6, 6), 2, stride=1, padding=1, dtype=np.float32)
    y = op.forward(x)
    assert y.dtype == np.float32
    assert op.selection_matrix().dtype == np.float32
    assert op.backward_input(np.ones_like(y)).dtype == np.float32


def test_max_pool_integer_input_computes_in_operator_dtype():
    # integers are converted to the operator's dtype, as for every other operator
    x = np.arange(16).reshape(1, 1, 4, 4)
    y = MaxPoolOperator((1, 4, 4), 2).forward(x)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y[0, 0], [[5, 7], [13, 15]])


def test_max_pool_errors():
    op = MaxPoolOperator((2, 4, 4), 2)
    with pytest.raises(ValueError, match="forward"):
        op.backward_input(np.ones((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="forward"):
        op.selection_matrix()
    with pytest.raises(ValueError, match=r"\(N, 2, 4, 4\)"):
        op.forward(np.ones((1, 3, 4, 4)))
    op.forward(np.ones((3, 2, 4, 4)))
    with pytest.raises(ValueError, match="batch size"):
        op.backward_input(np.ones((2, 2, 2, 2)))
