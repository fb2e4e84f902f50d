"""Singular values of lowered layers: sparse (dense SVD and ARPACK) against the FFT closed form.

For circular padding at stride 1 the singular values are known exactly from the kernel's DFT
(Sedghi, Gupta & Long 2019); every method must agree with it to 1e-8 relative. Layers without
a closed form (zero padding, strides, pooling) are checked against the dense SVD, and the
smallest singular values on an ill-conditioned layer show why the Gram eigenvalues are not
returned directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator

import sparseconv as sc
from sparseconv.pooling import MaxPoolOperator, PoolOperator
from sparseconv.spectral import (DENSE_MAX_WORK, composed_norm, fft_singular_values, network_lipschitz_bound,
                                 singular_values, spectral_norm)

# The agreement requirement between the FFT and the sparse methods.
AGREE = 1e-8


def _dense_work(shape: tuple) -> int:
    return min(shape) ** 2 * max(shape)


def _rel(actual: np.ndarray, desired: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(actual) - desired) / np.abs(desired)))


@dataclass(frozen=True)
class Circular:
    c: int
    f: int
    in_size: tuple
    kernel: tuple
    dilation: int = 1
    groups: int = 1

    @property
    def id(self) -> str:
        def t(v):
            return "x".join(map(str, v))
        return f"C{self.c}-F{self.f}-{t(self.in_size)}-k{t(self.kernel)}-d{self.dilation}-g{self.groups}"

    def build(self, seed: int = 0):
        w = np.random.default_rng(seed).standard_normal((self.f, self.c // self.groups, *self.kernel))
        op = sc.ConvOperator(w, (self.c, *self.in_size), padding="same", padding_mode="circular",
                             dilation=self.dilation, groups=self.groups)
        exact = fft_singular_values(w, (self.c, *self.in_size), dilation=self.dilation, groups=self.groups)
        return op, exact


# Small enough for a full dense SVD of every matrix.
SMALL = [
    Circular(4, 4, (12,), (3,)),
    Circular(4, 6, (20,), (5,)),
    Circular(3, 3, (10, 12), (3, 3)),
    Circular(6, 3, (8, 8), (3, 3)),
    Circular(2, 5, (9, 7), (2, 4)),
    Circular(3, 3, (9, 9), (3, 3), dilation=2),
    Circular(4, 4, (8, 8), (3, 3), groups=2),
    Circular(2, 2, (2, 3), (3, 3)),  # kernel wider than the input: taps alias modulo the size
    Circular(2, 2, (4, 5, 6), (3, 3, 3)),
    Circular(2, 3, (3, 4, 5), (2, 3, 2), dilation=2),
]

# Dense work above DENSE_MAX_WORK, so method="auto" takes ARPACK.
LARGE = [
    Circular(8, 8, (24, 24), (3, 3)),
    Circular(6, 3, (24, 20), (3, 3), dilation=2),  # tall: W^T W
    Circular(3, 6, (24, 20), (3, 3)),  # wide: W W^T
    Circular(4, 4, (8, 8, 8), (3, 3, 3)),
    Circular(16, 16, (160,), (7,), groups=4),
]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.id)
def test_fft_matches_every_singular_value_of_the_sparse_matrix(case):
    op, exact = case.build()
    dense = np.linalg.svd(op.to_dense(), compute_uv=False)
    assert exact.shape == (min(op.shape),)
    # Rounding in both is about eps * ||W||, so tiny values are judged against the norm.
    assert np.max(np.abs(dense - exact)) <= AGREE * exact[0]
    assert _rel(singular_values(op, 2), exact[:2]) <= AGREE


@pytest.mark.parametrize("case", LARGE, ids=lambda c: c.id)
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_arpack_matches_fft(case, which):
    op, exact = case.build(seed=1)
    assert _dense_work(op.shape) > DENSE_MAX_WORK
    k = 6
    got = singular_values(op, k, which)
    want = exact[:k] if which == "largest" else exact[-k:]
    assert _rel(got, want) <= AGREE
    if which == "largest":
        assert abs(spectral_norm(op) - exact[0]) <= 1e-6 * exact[0]


def test_repeated_singular_values_are_all_found():
    # Lanczos from one start vector sees one direction per eigenspace; the verification pass
    # must recover the other copies.
    d = np.concatenate([[5.0, 5.0, 5.0, 4.0, 4.0], np.linspace(3.0, 1.0, 2000)])
    diag = sp.diags_array(np.random.default_rng(0).permutation(d)).tocsr()
    assert _rel(singular_values(diag, 5), [5, 5, 5, 4, 4]) <= AGREE
    assert _rel(singular_values(-2 * diag, 4, "smallest"), np.sort(2 * d)[:4][::-1]) <= AGREE


def _ill_conditioned(sigma_min: float):
    """A circular 2-D layer whose frequency-0 matrix has a singular value ``sigma_min``."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 4, 3, 3))
    u, s, vt = np.linalg.svd(w.sum(axis=(2, 3)))
    target = s.copy()
    target[-1] = sigma_min
    w[:, :, 1, 1] += (u * (target - s)) @ vt
    shape = (4, 16, 16)
    return w, sc.ConvOperator(w, shape, padding=1, padding_mode="circular"), fft_singular_values(w, shape)


def test_smallest_does_not_square_the_condition_number():
    w, op, exact = _ill_conditioned(1e-5)
    kappa = exact[0] / exact[-1]
    assert kappa > 1e5
    got = singular_values(op, 3, "smallest")
    assert _rel(got, exact[-3:]) <= AGREE
    # What the Gram matrix alone gives: sqrt of its eigenvalues loses eps * kappa^2 -- the
    # reason the returned values are Rayleigh-Ritz values of W itself.
    gram = (op.matrix.T @ op.matrix).toarray()
    naive = np.sqrt(np.abs(np.linalg.eigvalsh(gram)[0]))
    assert abs(naive - exact[-1]) / exact[-1] > 1e-6


@pytest.mark.parametrize("opts", [
    dict(c=3, f=5, size=(20, 20), stride=2, padding=1),
    dict(c=2, f=2, size=(20, 16), stride=1, padding=0, dilation=2),
    dict(c=4, f=2, size=(18, 18), stride=1, padding=(1, 2), padding_mode="reflect"),
    dict(c=2, f=6, size=(60,), stride=3, padding=2, padding_mode="replicate"),
], ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()).replace(" ", ""))
def test_arpack_matches_dense_without_closed_form(opts):
    opts = dict(opts)
    c, f, size = opts.pop("c"), opts.pop("f"), opts.pop("size")
    w = np.random.default_rng(4).standard_normal((f, c, *(3,) * len(size)))
    op = sc.ConvOperator(w, (c, *size), **opts)
    dense = singular_values(op, min(op.shape), method="dense")
    assert _rel(singular_values(op, 4, method="eigsh"), dense[:4]) <= AGREE
    assert _rel(singular_values(op, 4, "smallest", method="eigsh"), dense[-4:]) <= AGREE
    norm = spectral_norm(op, 1e-6, method="eigsh")
    assert dense[0] * (1 - 1e-6) <= norm <= dense[0] * (1 + 1e-14)


def test_pooling_operators():
    # Non-overlapping 2x2 averages: orthogonal rows of norm 1/2, so every singular value is 1/2.
    pool = PoolOperator((3, 48, 48), 2)
    assert _dense_work(pool.matrix.shape) > DENSE_MAX_WORK
    np.testing.assert_allclose(singular_values(pool, 3), 0.5, rtol=AGREE)
    np.testing.assert_allclose(singular_values(pool, 3, "smallest"), 0.5, rtol=AGREE)
    overlapping = PoolOperator((2, 12, 12), 3, stride=1, padding=1)
    dense = np.linalg.svd(overlapping.matrix.toarray(), compute_uv=False)
    assert _rel(singular_values(overlapping, 2, method="eigsh"), dense[:2]) <= AGREE
    assert abs(spectral_norm(overlapping) - dense[0]) <= 1e-12


def test_accepted_operand_kinds_agree():
    w = np.random.default_rng(5).standard_normal((3, 2, 3, 3))
    op = sc.ConvOperator(w, (2, 9, 9), padding=1)
    want = singular_values(op, 4)
    m = op.matrix
    for operand in (m, sp.csr_matrix(m), m.tocoo(), m.toarray(), op.as_linear_operator(), aslinearoperator(m)):
        assert _rel(singular_values(operand, 4), want) <= 1e-12, type(operand).__name__
    # float32 values are exact in float64, so the float32 operator has the same singular values
    # up to the rounding of its weights.
    op32 = sc.ConvOperator(w.astype(np.float32), (2, 9, 9), padding=1)
    want32 = singular_values(sc.ConvOperator(w.astype(np.float32).astype(np.float64), (2, 9, 9), padding=1), 4)
    assert _rel(singular_values(op32, 4), want32) <= 1e-12
    assert _rel(singular_values(op32.as_linear_operator(), 4, method="eigsh"), want32) <= AGREE


def test_linear_operator_without_matrix_smallest():
    # Large enough (dense work above DENSE_MAX_WORK) for plain Lanczos on c I - G.
    w = np.random.default_rng(6).standard_normal((2, 2, 3))
    op = sc.ConvOperator(w, (2, 650), padding=1)
    assert _dense_work(op.shape) > DENSE_MAX_WORK
    lin = LinearOperator(op.shape, matvec=lambda v: op.matrix @ v, rmatvec=lambda v: op.matrix.T @ v,
                         dtype=np.float64)
    dense = np.linalg.svd(op.to_dense(), compute_uv=False)
    got = singular_values(lin, 3, "smallest", method="eigsh")
    assert np.max(np.abs(got - dense[-3:])) <= AGREE * dense[0]


def test_rank_deficient_and_zero_operators():
    d = np.concatenate([np.zeros(3), np.linspace(1.0, 2.0, 700)])
    diag = sp.diags_array(d).tocsr()
    np.testing.assert_allclose(singular_values(diag, 4, "smallest"), [1.0, 0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(singular_values(sp.csr_array((600, 700)), 3), np.zeros(3))


def test_network_bound_and_composed_norm():
    rng = np.random.default_rng(7)
    conv1 = sc.ConvOperator(rng.standard_normal((3, 1, 3, 3)), (1, 16, 16), padding=1)
    pool = PoolOperator((3, 16, 16), 2)
    conv2 = sc.ConvOperator(rng.standard_normal((4, 3, 3, 3)), (3, 8, 8))
    fc = rng.standard_normal((10, 4 * 6 * 6))
    layers = [conv1, pool, conv2, fc]
    product = fc @ conv2.to_dense() @ pool.matrix.toarray() @ conv1.to_dense()
    exact = np.linalg.norm(product, 2)
    assert abs(composed_norm(layers) - exact) <= 1e-6 * exact
    assert abs(composed_norm(layers, method="eigsh") - exact) <= 1e-6 * exact
    norms = [np.linalg.norm(m, 2) for m in (conv1.to_dense(), pool.matrix.toarray(), conv2.to_dense(), fc)]
    bound = network_lipschitz_bound(layers)
    assert abs(bound - np.prod(norms)) <= 4e-6 * bound
    assert bound > composed_norm(layers)
    assert composed_norm([conv1]) == pytest.approx(norms[0], rel=1e-6)


@pytest.mark.parametrize("call, exc, words", [
    pytest.param(lambda op: singular_values(op, 10), ValueError, ["k=10", "min(m, n) = 9"], id="k-above-max"),
    pytest.param(lambda op: singular_values(op, 0), ValueError, ["k=0"], id="k-zero"),
    pytest.param(lambda op: singular_values(op, 2.0), TypeError, ["k must be an int", "2.0"], id="k-float"),
    pytest.param(lambda op: singular_values(op, 2, "middle"), ValueError, ["which", "'middle'"], id="which"),
    pytest.param(lambda op: singular_values(op, 2, method="lapack"), ValueError, ["method", "'lapack'"],
                 id="method"),
    pytest.param(lambda op: singular_values(op, 9, method="eigsh"), ValueError, ["k < min(m, n) = 9", "k=9"],
                 id="eigsh-k-max"),
    pytest.param(lambda op: spectral_norm(op, rtol=0), ValueError, ["rtol", "0"], id="rtol-zero"),
    pytest.param(lambda op: spectral_norm(op, rtol=2.0), ValueError, ["rtol", "2.0"], id="rtol-above-1"),
    pytest.param(lambda op: singular_values("W"), TypeError, ["op must be", "str"], id="unsupported"),
    pytest.param(lambda op: singular_values(MaxPoolOperator((1, 4, 4), 2)), TypeError, ["selection_matrix"],
                 id="max-pool"),
    pytest.param(lambda op: singular_values(np.ones((2, 2, 2))), ValueError, ["2 axes", "(2, 2, 2)"],
                 id="ndarray-3d"),
    pytest.param(lambda op: singular_values(np.ones((2, 2), dtype=complex)), TypeError, ["real", "complex128"],
                 id="complex"),
    pytest.param(lambda op: composed_norm([op, op]), ValueError, ["ops[1]", "(9, 16)", "ops[0]"],
                 id="chain-shapes"),
    pytest.param(lambda op: composed_norm([]), ValueError, ["at least one"], id="chain-empty"),
    pytest.param(lambda op: network_lipschitz_bound(op), TypeError, ["list", "ConvOperator"], id="ops-not-list"),
    pytest.param(lambda op: network_lipschitz_bound([op, object()]), TypeError, ["ops[1]", "object"],
                 id="ops-item"),
    pytest.param(lambda op: fft_singular_values(np.ones((2, 3, 3, 3)), (2, 5, 5)), ValueError,
                 ["weight.shape[1]"], id="fft-channels"),
])
def test_bad_input(call, exc, words):
    op = sc.ConvOperator(np.ones((1, 1, 2, 2)), (1, 4, 4))  # 9 x 16
    with pytest.raises(exc) as info:
        call(op)
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------------- issue 14 regressions
def _multiplicity_four_operators() -> dict:
    """72 x 72 operators whose singular values come in fours.

    A separable kernel on a 6 x 12 circular grid has ``|A(w1) B(w2)|`` equal at ``(+-w1, +-w2)``;
    ``kron(I_4, R)`` repeats every singular value of ``R`` four times, and with ``R`` of rank 14
    the four copies of its null space (16 zeros) sit next to the repeated values, where the
    shift-invert solves lose them in rounding.
    """
    rng = np.random.default_rng(14)
    kernel = np.outer(rng.standard_normal(3), rng.standard_normal(3))[None, None]
    conv = sc.ConvOperator(kernel, (1, 6, 12), padding="same", padding_mode="circular")
    r = rng.standard_normal((18, 14)) @ rng.standard_normal((14, 18))
    return {"separable-circular-conv": conv, "kron-rank-deficient": sp.csr_array(np.kron(np.eye(4), r))}


@pytest.mark.parametrize("name", ["separable-circular-conv", "kron-rank-deficient"])
@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_singular_values_eigsh_finds_repeated_values(name, which):
    operand = _multiplicity_four_operators()[name]
    dense = operand.to_dense() if hasattr(operand, "to_dense") else operand.toarray()
    exact = np.linalg.svd(dense, compute_uv=False)
    assert operand.shape == (72, 72)
    # The values do come in fours (the point of the test).
    assert np.sum(np.isclose(exact, exact[20], rtol=1e-12)) % 4 == 0
    for k in range(1, 61):
        got = singular_values(operand, k, which, method="eigsh", rtol=1e-10)
        want = exact[:k] if which == "largest" else exact[72 - k:]
        err = np.max(np.abs(got - want)) / exact[0]
        assert err <= AGREE, f"k={k}: error {err:.1e} relative to the largest value"


@pytest.mark.parametrize("k", [5, 13, 30])
def test_singular_values_eigsh_of_a_linear_operator_next_to_a_null_space(k):
    # No matrix to factorise: Lanczos on c I - G, whose wanted eigenvalues sit in a cluster at
    # c (16 zeros of G); an unconfirmed answer is never returned.
    matrix = _multiplicity_four_operators()["kron-rank-deficient"]
    exact = np.linalg.svd(matrix.toarray(), compute_uv=False)
    got = singular_values(aslinearoperator(matrix), k, "smallest", method="eigsh", rtol=1e-10)
    assert np.max(np.abs(got - exact[72 - k:])) <= AGREE * exact[0]


def test_auto_takes_the_dense_svd_when_the_dense_work_is_small(monkeypatch):
    import sparseconv.spectral as spectral

    w = np.random.default_rng(15).standard_normal((26, 48, 3))
    op = sc.ConvOperator(w, (48, 26), padding=1)
    assert op.shape == (676, 1248) and _dense_work(op.shape) <= DENSE_MAX_WORK

    def no_arpack(*args, **kwargs):
        raise AssertionError("method='auto' ran ARPACK on an operator whose dense SVD is cheap")

    monkeypatch.setattr(spectral, "eigsh", no_arpack)
    exact = np.linalg.svd(op.to_dense(), compute_uv=False)
    np.testing.assert_allclose(singular_values(op, 20, "smallest"), exact[-20:], rtol=1e-12, atol=1e-13 * exact[0])
    np.testing.assert_allclose(singular_values(op, 5), exact[:5], rtol=1e-12)


def _zero_operands() -> list:
    shape = (40, 30)
    conv = sc.ConvOperator(np.zeros((2, 2, 3)), (2, 17))
    return [np.zeros(shape), sp.csr_array(shape), sp.csr_array(np.zeros(shape)).tocoo(),
            aslinearoperator(np.zeros(shape)), conv, conv.as_linear_operator("factored")]


@pytest.mark.parametrize("method", ["auto", "dense", "eigsh"])
def test_spectral_norm_of_zero_operator_is_zero(method):
    for operand in _zero_operands():
        assert spectral_norm(operand, method=method) == 0.0, type(operand).__name__
        np.testing.assert_array_equal(singular_values(operand, 3, "smallest", method=method), np.zeros(3))
    zero = sp.csr_array((30, 40))
    assert composed_norm([np.ones((40, 20)), zero], method=method) == 0.0
    assert network_lipschitz_bound([np.ones((4, 4)), zero]) == 0.0


@pytest.mark.parametrize("make", [
    pytest.param(lambda a: a, id="ndarray"),
    pytest.param(sp.csr_array, id="csr"),
    pytest.param(aslinearoperator, id="LinearOperator"),
])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["auto", "dense", "eigsh"])
def test_non_finite_operator_is_refused_with_a_clear_error(make, bad, method):
    a = np.random.default_rng(16).standard_normal((30, 20))
    a[3, 4] = bad
    with pytest.raises(ValueError, match="non-finite"):
        singular_values(make(a), 2, method=method)
    with pytest.raises(ValueError, match="non-finite"):
        spectral_norm(make(a), method=method)


def test_non_finite_conv_weight_is_refused():
    w = np.ones((2, 1, 3))
    w[1, 0, 2] = np.inf
    op = sc.ConvOperator(w, (1, 10))
    with pytest.raises(ValueError, match="non-finite"):
        spectral_norm(op)


@pytest.mark.parametrize("exponent", [-250, -200, 200, 250])
@pytest.mark.parametrize("method", ["dense", "eigsh"])
def test_extreme_magnitudes_scale_exactly(exponent, method):
    # Gram products square magnitudes: 1e-250^2 underflows to 0 and 1e250^2 overflows, so the
    # operator is scaled by a power of two first.
    a = np.random.default_rng(17).standard_normal((50, 30))
    exact = np.linalg.svd(a, compute_uv=False)
    scaled = a * 10.0 ** exponent
    for operand in (scaled, aslinearoperator(scaled)):
        got = singular_values(operand, 3, "smallest", method=method) / 10.0 ** exponent
        assert _rel(got, exact[-3:]) <= AGREE
        got = singular_values(operand, 3, method=method) / 10.0 ** exponent
        assert _rel(got, exact[:3]) <= AGREE


def test_sparse_products_run_on_the_sparseconv_pool(monkeypatch):
    import sparseconv.parallel as parallel

    calls = []
    run_blocks = parallel.run_blocks

    def counting(fn, bounds, n_threads):
        calls.append((len(bounds) - 1, n_threads))
        return run_blocks(fn, bounds, n_threads)

    monkeypatch.setattr(parallel, "run_blocks", counting)
    matrix = sp.random_array((3000, 2000), density=0.05, format="csr", rng=18)
    with parallel.threads(2):
        spectral_norm(matrix, method="eigsh")
    assert calls and max(blocks for blocks, _ in calls) == 2 and {n for _, n in calls} == {2}


def test_operator_with_only_as_linear_operator_is_accepted():
    w = np.random.default_rng(19).standard_normal((3, 2, 3))
    op = sc.ConvOperator(w, (2, 30), padding=1)

    class Wrapped:
        def as_linear_operator(self):
            return op.as_linear_operator("factored")

    exact = np.linalg.svd(op.to_dense(), compute_uv=False)
    assert _rel(singular_values(Wrapped(), 3, method="eigsh"), exact[:3]) <= AGREE
    assert _rel(singular_values(Wrapped(), 3, "smallest", method="eigsh"), exact[-3:]) <= AGREE


@pytest.mark.parametrize("call, exc, words", [
    pytest.param(lambda op: singular_values(op, 2, rtol=float("nan")), ValueError, ["rtol", "nan"], id="rtol-nan"),
    pytest.param(lambda op: singular_values(op, 2, rtol="1e-6"), TypeError, ["rtol", "'1e-6'"], id="rtol-str"),
    pytest.param(lambda op: singular_values(op, 2, rtol=True), TypeError, ["rtol", "True"], id="rtol-bool"),
    pytest.param(lambda op: singular_values(op, 2, None), TypeError, ["which", "None"], id="which-none"),
    pytest.param(lambda op: singular_values(op, 2, np.array(["largest"])), TypeError, ["which"], id="which-array"),
    pytest.param(lambda op: singular_values(op, 2, method=1), TypeError, ["method", "1"], id="method-int"),
    pytest.param(lambda op: singular_values(op, True), TypeError, ["k must be an int", "True"], id="k-bool"),
    pytest.param(lambda op: singular_values(op, -1), ValueError, ["k=-1"], id="k-negative"),
    pytest.param(lambda op: composed_norm([op], method="lapack"), ValueError, ["method", "'lapack'"],
                 id="composed-method"),
    pytest.param(lambda op: network_lipschitz_bound([op], rtol=0), ValueError, ["rtol"], id="bound-rtol"),
    pytest.param(lambda op: singular_values(LinearOperator((3, 2), matvec=lambda v: np.ones(3), dtype=float)),
                 TypeError, ["op must define both products", "rmatvec"], id="no-adjoint"),
    pytest.param(lambda op: singular_values(aslinearoperator(np.ones((2, 2), dtype=complex))), TypeError,
                 ["op must be real", "complex128"], id="complex-linear-operator"),
])
def test_bad_arguments_name_the_argument(call, exc, words):
    op = sc.ConvOperator(np.ones((1, 1, 2, 2)), (1, 4, 4))  # 9 x 16
    with pytest.raises(exc) as info:
        call(op)
    for word in words:
        assert word in str(info.value)


def test_refused_call_leaves_the_operator_unchanged():
    w = np.random.default_rng(20).standard_normal((2, 2, 3))
    op = sc.ConvOperator(w, (2, 12))
    before = (op.weight.copy(), op.matrix.copy())
    for call in (lambda: singular_values(op, 100), lambda: singular_values(op, 2, rtol=-1),
                 lambda: spectral_norm(op, method="bogus")):
        with pytest.raises((TypeError, ValueError)):
            call()
    np.testing.assert_array_equal(op.weight, before[0])
    assert (op.matrix != before[1]).nnz == 0
