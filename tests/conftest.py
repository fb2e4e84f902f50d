"""Shared test set-up: headless matplotlib, and no figure left open between tests."""

from __future__ import annotations

import os

import pytest

# Tests never open windows. Set through the environment (before pyplot is first imported)
# rather than matplotlib.use, which is what the plotting code must never call.
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def close_figures():
    """Close every pyplot figure a test opened (the plot functions leave figures open)."""
    yield
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.close("all")


@pytest.fixture
def uncompiled_policy(monkeypatch):
    """The engine policy as on a machine without numba (the scipy/numpy rule), for tests of
    that rule and of choices derived from it; operators built inside the test see it."""
    from sparseconv.engines import policy

    monkeypatch.setattr(policy, "_compiled_available", lambda: False)
