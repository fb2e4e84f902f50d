"""Property-based fuzzing of the sparse operator: random valid configurations match im2col,
random (often invalid) ones either raise a clear error or match as well."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv.testing import assert_allclose, dottest

from magnitudes import magnitudes

MODES = ("zeros", "circular", "reflect", "replicate")


@st.composite
def configs(draw, valid_only: bool):
    ndim = draw(st.integers(1, 3))
    lo = 1 if valid_only else -1
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 2))
    f = groups * draw(st.integers(1, 2))
    if not valid_only and draw(st.booleans()):
        c += draw(st.integers(0, 1))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(lo, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(lo, 2)) for _ in range(ndim))
    size = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    padding = draw(st.one_of(
        st.integers(0 if valid_only else -1, 2),
        st.sampled_from(["valid", "full"] + ([] if valid_only else ["same", "bogus"])),
        st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2)) for _ in range(ndim)]),
    ))
    mode = draw(st.sampled_from(MODES + (() if valid_only else ("edge",))))
    return dict(weight_shape=(f, max(c // groups, 1), *kernel), input_shape=(c, *size),
                opts=dict(stride=stride, dilation=dilation, padding=padding, groups=groups,
                          padding_mode=mode, flip=draw(st.booleans())),
                n=draw(st.integers(1, 3)), dtype=draw(st.sampled_from(["float32", "float64"])))


def _check_against_im2col(cfg) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(cfg["weight_shape"]).astype(cfg["dtype"])
    op = sc.ConvOperator(w, cfg["input_shape"], **cfg["opts"])
    x = rng.standard_normal((cfg["n"], *cfg["input_shape"])).astype(cfg["dtype"])
    dy = rng.standard_normal((cfg["n"], *op.out_shape)).astype(cfg["dtype"])
    sy, sdx, sdw = magnitudes(x, w, dy, cfg["opts"])
    dx, dw, _ = ref.conv_im2col_backward(x, w, dy, **cfg["opts"])
    for engine in ("csr", "factored"):
        assert_allclose(op.forward(x, engine=engine), ref.conv_im2col(x, w, **cfg["opts"]), scale=sy)
        assert_allclose(op.backward_input(dy, engine=engine), dx, scale=sdx)
    assert_allclose(op.weight_grad(x, dy), dw, scale=sdw)
    assert_allclose(op.weight_grad(x, dy, engine="csr"), dw, scale=sdw)
    dottest(op)


def _valid(cfg) -> bool:
    try:
        sc.conv_geometry(cfg["weight_shape"], cfg["input_shape"], **cfg["opts"])
    except ValueError:
        return False
    return True


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(configs(valid_only=True).filter(_valid))
def test_random_valid_configurations(cfg):
    _check_against_im2col(cfg)


@settings(max_examples=150, deadline=None)
@given(configs(valid_only=False))
def test_random_configurations_raise_or_agree(cfg):
    try:
        sc.conv_geometry(cfg["weight_shape"], cfg["input_shape"], **cfg["opts"])
    except (ValueError, TypeError) as err:
        # The message must name what was wrong, not just fail.
        assert any(word in str(err) for word in
                   ("stride", "dilation", "padding", "groups", "kernel", "weight", "input_shape"))
        try:
            sc.ConvOperator(np.ones(cfg["weight_shape"]), cfg["input_shape"], **cfg["opts"])
        except type(err):
            return
        raise AssertionError("ConvOperator accepted what conv_geometry rejected")
    _check_against_im2col(cfg)
