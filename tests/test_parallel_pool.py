"""The one thread pool under concurrent callers, and the shim over scipy's private kernels."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import scipy.sparse as sp

import sparseconv as sc
from sparseconv import _sparsetools, factored, parallel
from sparseconv.testing import assert_allclose


@pytest.fixture
def small_blocks(monkeypatch):
    """Split even small products into many blocks, so every call really uses the pool."""
    monkeypatch.setattr(parallel, "_MIN_BLOCK_WORK", 1)
    monkeypatch.setattr(factored, "_MIN_THREAD_BLOCK", 1)


def _run_concurrently(work, counts):
    errors, barrier = [], threading.Barrier(len(counts))

    def target(n):
        try:
            barrier.wait()
            work(n)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=target, args=(n,)) for n in counts]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return errors


def test_concurrent_callers_with_different_thread_counts(small_blocks):
    """Four threads call products with 1, 2, 3 and 7 threads at once, repeatedly: the pool is
    grown, never replaced, and every result equals the single-threaded one."""
    rng = np.random.default_rng(0)
    a = sp.random_array((600, 400), density=0.05, format="csr", rng=rng)
    x, y = rng.standard_normal((400, 5)), rng.standard_normal((600, 5))
    want_x, want_y = parallel.csr_matmat(a, x, threads=1), parallel.csr_rmatmat(a, y, threads=1)
    op = sc.ConvOperator(rng.standard_normal((16, 16, 3, 3)), (16, 8, 8), padding=1)
    batch = rng.standard_normal((3, 16, 8, 8))
    want_conv = {e: op.forward(batch, engine=e, threads=1) for e in ("csr", "factored")}
    pool = parallel._POOL

    def work(n):
        for i in range(30):
            np.testing.assert_array_equal(parallel.csr_matmat(a, x, threads=n), want_x)
            assert_allclose(parallel.csr_rmatmat(a, y, threads=n), want_y)
            engine = ("csr", "factored")[i % 2]
            np.testing.assert_array_equal(op.forward(batch, engine=engine, threads=n), want_conv[engine])

    assert _run_concurrently(work, [1, 2, 3, 7]) == []
    assert parallel._POOL is pool and pool.size >= 6


def test_nested_blocks_run_on_the_calling_worker(small_blocks):
    """A block that itself runs blocks never waits for the pool it is running on."""
    out = np.zeros((4, 4))

    def inner(row):
        def cell(c0, c1):
            out[row, c0:c1] += 1
        parallel.run_blocks(cell, [0, 1, 2, 3, 4], 4)

    parallel.run_blocks(lambda r0, r1: [inner(r) for r in range(r0, r1)], [0, 1, 2, 3, 4], 4)
    np.testing.assert_array_equal(out, np.ones((4, 4)))


def test_private_kernels_pass_their_self_check():
    assert _sparsetools.available
    assert _sparsetools._self_check((_sparsetools.csr_matvec, _sparsetools.csr_matvecs,
                                     _sparsetools.csc_matvec, _sparsetools.csc_matvecs))


def test_a_kernel_that_disagrees_fails_the_self_check():
    def wrong(*args):
        args[-1][...] = 1.0  # writes something, not the product

    assert not _sparsetools._self_check((wrong, _sparsetools.csr_matvecs, _sparsetools.csc_matvec,
                                         _sparsetools.csc_matvecs))


def test_missing_private_module_falls_back_to_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.sparse._sparsetools", None)  # import now fails
    assert _sparsetools._load() == (None, None, None, None)
