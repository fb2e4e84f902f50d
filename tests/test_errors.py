"""Every bad input raises a ValueError or TypeError that names the argument and both values."""

from __future__ import annotations

import re

import numpy as np
import pytest

import sparseconv as sc
from sparseconv.engines import ENGINE_NAMES

W2 = np.ones((4, 3, 3, 3))
GOOD = dict(input_shape=(3, 8, 8))

CONSTRUCTION_ERRORS = [
    ("weight-2-axes", dict(weight=np.ones((3, 3))), ValueError, r"weight must have shape .*got shape \(3, 3\)"),
    ("weight-6-axes", dict(weight=np.ones((1,) * 6)), ValueError, r"3 to 5 axes"),
    ("weight-zero-axis", dict(weight=np.ones((0, 3, 3, 3))), ValueError, r"positive sizes.*\(0, 3, 3, 3\)"),
    ("input-shape-ndim", dict(input_shape=(3, 8)), ValueError, r"input_shape must be \(C, \*spatial\) with 2 spatial.*got \(3, 8\)"),
    ("input-shape-type", dict(input_shape="3x8x8"), TypeError, r"input_shape must be a sequence of ints"),
    ("input-shape-float", dict(input_shape=(3, 8.0, 8)), TypeError, r"input_shape must be a sequence of ints"),
    ("input-shape-zero", dict(input_shape=(3, 0, 8)), ValueError, r"input_shape must be positive.*\(3, 0, 8\)"),
    ("channels-mismatch", dict(input_shape=(5, 8, 8)), ValueError, r"weight.shape\[1\] must be C // groups = 5 // 1 = 5.*\(4, 3, 3, 3\)"),
    ("groups-not-dividing-C", dict(weight=np.ones((4, 1, 3, 3)), groups=2), ValueError, r"groups=2 must divide the input channels C=3"),
    ("groups-not-dividing-F", dict(weight=np.ones((3, 1, 3, 3)), input_shape=(2, 8, 8), groups=2), ValueError, r"groups=2 must divide the output channels F=3"),
    ("groups-zero", dict(groups=0), ValueError, r"groups must be a positive int; got 0"),
    ("groups-float", dict(groups=1.0), ValueError, r"groups must be a positive int; got 1.0"),
    ("kernel-too-large", dict(input_shape=(3, 2, 8)), ValueError, r"kernel extent 3 .*padded input 2.*output size would be 0 < 1"),
    ("dilated-kernel-too-large", dict(dilation=4), ValueError, r"kernel extent 9 \(kernel 3, dilation 4\).*padded input 8"),
    ("stride-zero", dict(stride=0), ValueError, r"stride must be >= 1 in every dimension; got 0"),
    ("stride-negative", dict(stride=(1, -2)), ValueError, r"stride must be >= 1.*\(1, -2\)"),
    ("stride-wrong-length", dict(stride=(1, 2, 3)), ValueError, r"stride must be an int or a sequence of 2 ints.*3 entries"),
    ("stride-float", dict(stride=1.5), TypeError, r"stride must be an int"),
    ("stride-bool", dict(stride=True), TypeError, r"stride must be an int"),
    ("dilation-zero", dict(dilation=0), ValueError, r"dilation must be >= 1"),
    ("padding-negative", dict(padding=-1), ValueError, r"padding must be non-negative; got -1"),
    ("padding-negative-pair", dict(padding=((0, -1), 0)), ValueError, r"padding must be non-negative"),
    ("padding-unknown-string", dict(padding="half"), ValueError, r"padding must be one of \('valid', 'same', 'full'\).*'half'"),
    ("padding-wrong-length", dict(padding=(1, 1, 1)), ValueError, r"padding must have 2 entries.*\(1, 1, 1\)"),
    ("padding-bad-entry", dict(padding=((1, 2, 3), 0)), TypeError, r"each padding entry must be an int or a \(low, high\) pair"),
    ("padding-float", dict(padding=1.0), TypeError, r"padding must be an int, a string or a sequence; got 1.0"),
    ("same-with-stride", dict(padding="same", stride=2), ValueError, r"padding='same' requires stride 1.*\(2, 2\)"),
    ("padding-mode-unknown", dict(padding_mode="mirror"), ValueError, r"padding_mode must be one of .*'mirror'"),
    ("reflect-too-much", dict(padding=3, padding_mode="reflect", input_shape=(3, 3, 8)), ValueError, r"reflect.*padding < input size.*size 3 and padding \(3, 3\)"),
    ("circular-too-much", dict(padding=(1, 9), padding_mode="circular"), ValueError, r"circular.*padding <= input size.*size 8 and padding \(9, 9\)"),
    ("flip-not-bool", dict(flip="yes"), TypeError, r"flip must be a bool; got 'yes'"),
    ("weight-complex", dict(weight=np.ones((4, 3, 3, 3), complex)), TypeError, r"weight must have dtype float32 or float64.*complex128"),
    ("weight-float16", dict(weight=np.ones((4, 3, 3, 3), np.float16)), TypeError, r"got dtype float16"),
    ("weight-strings", dict(weight=np.full((4, 3, 3, 3), "a")), TypeError, r"weight must have dtype"),
    ("bias-shape", dict(bias=np.ones(3)), ValueError, r"bias must have shape \(4,\); got \(3,\)"),
    ("bias-dtype", dict(bias=np.ones(4, np.float32)), TypeError, r"bias has dtype float32 but the operator computes in float64"),
    ("mask-shape", dict(weight_mask=np.ones((4, 3), bool)), ValueError, r"weight_mask must be a bool array of shape \(4, 3, 3, 3\)"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", [c[1:] for c in CONSTRUCTION_ERRORS],
                         ids=[c[0] for c in CONSTRUCTION_ERRORS])
def test_construction_errors(kwargs, exc, pattern):
    args = dict(weight=W2, **GOOD)
    args.update(kwargs)
    weight = args.pop("weight")
    input_shape = args.pop("input_shape")
    with pytest.raises(exc, match=pattern):
        sc.ConvOperator(weight, input_shape, **args)


@pytest.fixture
def op():
    return sc.ConvOperator(W2, (3, 8, 8), padding=1)


BATCH_ERRORS = [
    ("forward-unbatched", "forward", (np.ones((3, 8, 8)),), ValueError, r"x must have shape \(N, 3, 8, 8\); got \(3, 8, 8\).*x\[None\]"),
    ("forward-wrong-channels", "forward", (np.ones((2, 4, 8, 8)),), ValueError, r"x must have shape \(N, 3, 8, 8\); got \(2, 4, 8, 8\)"),
    ("forward-complex", "forward", (np.ones((1, 3, 8, 8), complex),), TypeError, r"x has dtype complex128"),
    ("forward-float32", "forward", (np.ones((1, 3, 8, 8), np.float32),), TypeError, r"x has dtype float32 but the operator computes in float64"),
    ("backward-wrong-shape", "backward_input", (np.ones((2, 4, 7, 8)),), ValueError, r"dy must have shape \(N, 4, 8, 8\); got \(2, 4, 7, 8\)"),
    ("weight-grad-batch-mismatch", "weight_grad", (np.ones((2, 3, 8, 8)), np.ones((3, 4, 8, 8))), ValueError, r"same number of samples; got 2 \(x\) and 3 \(dy\)"),
    ("bias-grad-shape", "bias_grad", (np.ones((1, 4, 8)),), ValueError, r"dy must have shape"),
    ("set-weight-shape", "set_weight", (np.ones((4, 3, 3, 2)),), ValueError, r"weight must have shape \(4, 3, 3, 3\); got \(4, 3, 3, 2\)"),
    ("set-weight-dtype", "set_weight", (np.ones((4, 3, 3, 3), np.float32),), TypeError, r"weight has dtype float32"),
]


@pytest.mark.parametrize("method,args,exc,pattern", [c[1:] for c in BATCH_ERRORS], ids=[c[0] for c in BATCH_ERRORS])
def test_call_errors(op, method, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        getattr(op, method)(*args)


@pytest.mark.parametrize("call", [
    pytest.param(lambda op, kw: op.forward(np.ones((1, 3, 8, 8)), **kw), id="forward"),
    pytest.param(lambda op, kw: op.backward_input(np.ones((1, 4, 8, 8)), **kw), id="backward_input"),
    pytest.param(lambda op, kw: op.weight_grad(np.ones((1, 3, 8, 8)), np.ones((1, 4, 8, 8)), **kw), id="weight_grad"),
    pytest.param(lambda op, kw: op.as_linear_operator(**kw), id="as_linear_operator"),
    pytest.param(lambda op, kw: sc.ConvOperator(W2, (3, 8, 8), **kw), id="constructor"),
])
def test_unknown_engine(op, call):
    names = re.escape(str(("auto",) + ENGINE_NAMES))
    with pytest.raises(ValueError, match=rf"engine must be one of {names}; got 'gemm'"):
        call(op, {"engine": "gemm"})


@pytest.mark.parametrize("call", [
    pytest.param(lambda op: op.forward(np.ones((1, 3, 8, 8)), method="csr"), id="forward"),
    pytest.param(lambda op: op.weight_grad(np.ones((1, 3, 8, 8)), np.ones((1, 4, 8, 8)), method="csr"),
                 id="weight_grad"),
    pytest.param(lambda op: sc.ConvOperator(W2, (3, 8, 8), method="csr"), id="constructor"),
])
def test_the_first_releases_method_keyword_is_gone(op, call):
    # One vocabulary (issue 10): engines are named by engine= only.
    with pytest.raises(TypeError, match="unexpected keyword argument 'method'"):
        call(op)


def test_unknown_product_name(op):
    with pytest.raises(ValueError, match=r"product must be one of \('forward', 'adjoint', 'weight_grad'\); got 'both'"):
        op.engine("both")


def test_unknown_layout(op):
    with pytest.raises(ValueError, match=r"layout must be one of \('batch_first', 'columns'\); got 'nchw'"):
        op.weight_grad(np.ones((1, 3, 8, 8)), np.ones((1, 4, 8, 8)), layout="nchw")


def test_environment_engine_is_checked(monkeypatch):
    monkeypatch.setenv("SPARSECONV_ENGINE", "fast")
    with pytest.raises(ValueError, match=r"SPARSECONV_ENGINE must be one of .*got 'fast'"):
        sc.ConvOperator(W2, (3, 8, 8))
