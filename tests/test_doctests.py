"""The examples in the docstrings of the operator modules run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

MODULES = ["geometry", "conv", "transpose", "pooling", "parallel", "factored", "pattern", "engines",
           "engines.base", "engines.csr", "engines.factored", "engines.policy", "_sparsetools"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"sparseconv.{name}")
    result = doctest.testmod(module, extraglobs={"np": np}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
