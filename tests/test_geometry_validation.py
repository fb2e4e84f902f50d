"""Geometry's validation helpers: options checked without an input shape, memory budgets,
and the messages of the transposed operator's batch checks."""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv import geometry
from sparseconv.geometry import parse_memory_budget, validate_conv_options

W = np.ones((4, 3, 3, 3))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(kernel_size=3, stride=2, padding=1, dilation=2, groups=2, in_channels=4, out_channels=6),
    dict(padding="same", padding_mode="reflect", flip=True),
    dict(padding=((1, 0), 2)),
    dict(stride=2, output_padding=1),
    dict(stride=1, dilation=3, output_padding=2),
], ids=["defaults", "everything", "same-reflect-flip", "pairs", "transposed", "transposed-dilation"])
def test_valid_options_pass(kwargs):
    assert validate_conv_options(2, **kwargs) is None


OPTION_ERRORS = [
    ("ndim", dict(ndim=4), ValueError, r"ndim must be 1, 2 or 3"),
    ("stride-zero", dict(stride=0), ValueError, r"stride must be >= 1 in every dimension; got 0"),
    ("stride-float", dict(stride=1.5), TypeError, r"stride must be an int"),
    ("dilation-length", dict(dilation=(1, 1, 1)), ValueError, r"dilation must be an int or a sequence of 2 ints"),
    ("kernel-zero", dict(kernel_size=(3, 0)), ValueError, r"kernel_size must be >= 1"),
    ("padding-negative", dict(padding=-1), ValueError, r"padding must be non-negative; got -1"),
    ("padding-unknown", dict(padding="half"), ValueError, r"padding must be one of \('valid', 'same', 'full'\)"),
    ("same-stride", dict(padding="same", stride=2), ValueError, r"padding='same' requires stride 1"),
    ("groups-bool", dict(groups=True), ValueError, r"groups must be a positive int; got True"),
    ("groups-zero", dict(groups=0), ValueError, r"groups must be a positive int; got 0"),
    ("groups-divide", dict(groups=2, in_channels=3), ValueError, r"groups=2 must divide in_channels=3"),
    ("mode", dict(padding_mode="bogus"), ValueError, r"padding_mode must be one of .*'bogus'"),
    ("mode-type", dict(padding_mode=None), ValueError, r"padding_mode must be one of .*None"),
    ("flip", dict(flip="yes"), TypeError, r"flip must be a bool; got 'yes'"),
    ("transposed-string-padding", dict(padding="same", output_padding=0), ValueError, r"PyTorch has no string"),
    ("output-padding-too-big", dict(stride=2, output_padding=2), ValueError, r"output_padding must be smaller than max"),
    ("output-padding-negative", dict(output_padding=-1), ValueError, r"output_padding must be >= 0"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", [c[1:] for c in OPTION_ERRORS], ids=[c[0] for c in OPTION_ERRORS])
def test_invalid_options_are_refused_without_an_input_shape(kwargs, exc, pattern):
    kwargs = dict(kwargs)
    ndim = kwargs.pop("ndim", 2)
    with pytest.raises(exc, match=pattern):
        validate_conv_options(ndim, **kwargs)


@pytest.mark.parametrize("kwargs", [c[1] for c in OPTION_ERRORS if "ndim" not in c[1] and "kernel_size" not in c[1]
                                    and "in_channels" not in c[1] and "output_padding" not in c[1]],
                         ids=[c[0] for c in OPTION_ERRORS if "ndim" not in c[1] and "kernel_size" not in c[1]
                              and "in_channels" not in c[1] and "output_padding" not in c[1]])
def test_the_operator_refuses_the_same_options(kwargs):
    """One rule: what validate_conv_options refuses, the geometry refuses too."""
    with pytest.raises((ValueError, TypeError)) as early:
        validate_conv_options(2, **kwargs)
    with pytest.raises(type(early.value)):
        sc.ConvOperator(W, (3, 8, 8), **kwargs)


@pytest.mark.parametrize("value, expected", [
    (4096, 4096), (np.int64(10), 10), (2.0**30, 2**30), ("1GiB", 2**30), ("1 gib", 2**30), ("512MB", 512 * 10**6),
    ("1.5KiB", 1536), ("1e9", 10**9), ("100", 100), ("2TiB", 2 * 2**40), ("7B", 7),
])
def test_parse_memory_budget(value, expected):
    assert parse_memory_budget(value) == expected


@pytest.mark.parametrize("value, exc, pattern", [
    (-5, ValueError, r"memory_budget must be positive.*-5"),
    (0, ValueError, r"must be positive"),
    ("0.1B", ValueError, r"must be positive"),
    ("1GB!", ValueError, r"number of bytes with an optional unit"),
    ("1 parsec", ValueError, r"optional unit"),
    ("", ValueError, r"optional unit"),
    (1.5, ValueError, r"whole, finite number"),
    (float("inf"), ValueError, r"whole, finite number"),
    (True, TypeError, r"memory_budget must be a positive number of bytes"),
    ([1], TypeError, r"got list"),
])
def test_parse_memory_budget_refusals(value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        parse_memory_budget(value)


def test_environment_budget_takes_units(monkeypatch):
    monkeypatch.setenv("SPARSECONV_MEMORY_BUDGET", "2KiB")
    assert geometry.default_memory_budget() == 2048
    monkeypatch.setenv("SPARSECONV_MEMORY_BUDGET", "-1")
    with pytest.raises(ValueError, match="SPARSECONV_MEMORY_BUDGET must be positive"):
        geometry.default_memory_budget()


def test_pool_and_transposed_geometry_live_in_geometry():
    g = geometry.pool_geometry((3, 8, 8), 2)
    assert g.output_shape == (3, 4, 4) and g.groups == 3
    assert sc.PoolOperator((3, 8, 8), 2).geometry == g
    tg = geometry.conv_transpose_geometry((3, 2, 3, 3), (3, 4, 5), stride=2, padding=1, output_padding=1)
    assert tg.out_size == sc.ConvTransposeOperator(np.ones((3, 2, 3, 3)), (3, 4, 5), stride=2, padding=1,
                                                   output_padding=1).out_shape[1:]
    assert tg.out_size == tuple(geometry.conv_transpose_output_size(i, 3, 2, 1, 1, 1, 1) for i in (4, 5))


def test_transposed_batch_messages_name_the_right_argument():
    op = sc.ConvTransposeOperator(np.ones((3, 2, 3, 3)), (3, 4, 4), stride=2)
    with pytest.raises(ValueError, match=r"^dy must have shape \(N, 2, 9, 9\)"):
        op.backward_input(np.ones((1, 2, 8, 9)))
    with pytest.raises(ValueError, match=r"same number of samples; got 2 \(x\) and 3 \(dy\)"):
        op.weight_grad(np.ones((2, 3, 4, 4)), np.ones((3, 2, 9, 9)))
