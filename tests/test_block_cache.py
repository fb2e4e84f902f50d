"""The reuse of aligned blocks (``aligned_empty``'s buffer cache) and ``nonzero_outside``.

:func:`~sparseconv.engines.base.aligned_empty` hands out the byte buffer of a released block of
the same size again, deciding "released" by the finalizer of the block's owner. The one property that matters is
that a block, or anything viewing it (transposes, reshapes, slices, memoryviews, arrays built
on its buffer, containers holding any of those), is never handed out a second time while it
is alive. Checked here two ways over long random sequences of allocations, single-threaded
and from several threads at once: ``np.shares_memory`` of every new block against every live
holder, and a distinct fill pattern per block read back at the end (an overlap would have
overwritten one). Also: a released buffer *is* reused (same data pointer), alignment, the
capacity (``release_blocks(limit)``, ``SPARSECONV_BLOCK_CACHE``), and that the cache's byte
count matches the buffers it can still hand out.

:func:`~sparseconv.engines.base.nonzero_outside` is compared with a set difference of flat indices.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparseconv.engines import base
from sparseconv.engines.base import ALIGNMENT, CACHE_MIN_BYTES, aligned_empty, nonzero_outside, release_blocks

# Byte sizes of cached blocks: several equal ones, so that buffers are reused often.
SIZES = [CACHE_MIN_BYTES, CACHE_MIN_BYTES + 64, 3 * CACHE_MIN_BYTES // 2, 2 * CACHE_MIN_BYTES]
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Every test starts with an empty cache of the default capacity and leaves one behind."""
    monkeypatch.delenv("SPARSECONV_BLOCK_CACHE", raising=False)
    release_blocks()
    yield
    release_blocks()


def cached_buffers():
    """The released buffers the cache keeps (its own bookkeeping, read for the invariant checks)."""
    with base._block_cache._lock:
        return [raw for bucket in base._block_cache._free.values() for raw, _ in bucket]


def assert_accounting(limit=None):
    """The cache's byte count is that of the released buffers it keeps, and within its capacity."""
    held = sum(raw.nbytes for raw in cached_buffers())
    assert base._block_cache.nbytes == held, f"nbytes {base._block_cache.nbytes} but buffers of {held} bytes held"
    if limit is not None:
        assert base._block_cache.nbytes <= limit


def _block(nbytes, dtype=np.float64):
    itemsize = np.dtype(dtype).itemsize
    return aligned_empty((nbytes // itemsize,), dtype)


def _check_block(a, shape, dtype):
    assert a.shape == shape and a.dtype == np.dtype(dtype)
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % ALIGNMENT == 0


# How a caller may keep a block alive without keeping the name it was returned under.
HOLDERS = {
    "block": lambda a: a,
    "transpose": lambda a: a.reshape(-1, 4).T,
    "reshape": lambda a: a.reshape(2, -1),
    "slice": lambda a: a[5:-3],
    "strided": lambda a: a[::7],
    "uint8-view": lambda a: a.view(np.uint8),
    "memoryview": lambda a: memoryview(a),
    "asarray-of-memoryview": lambda a: np.asarray(memoryview(a[1:])),
    "frombuffer": lambda a: np.frombuffer(a, dtype=np.uint8),
    "as_strided": lambda a: np.lib.stride_tricks.as_strided(a, shape=(3,), strides=(a.itemsize,)),
    "in-list": lambda a: [a[2:]],
    "in-dict": lambda a: {"view": a.reshape(4, -1)[1:]},
    "in-nested": lambda a: ({"x": [a.T]},),
    "base-buffer": lambda a: a.base,
    "ctypes-pointer": lambda a: a.ctypes.data_as(np.ctypeslib.ctypes.c_void_p),
}


def _arrays_in(holder):
    """The arrays a holder keeps (to check for shared memory)."""
    if isinstance(holder, np.ndarray):
        return [holder]
    if isinstance(holder, (memoryview, base._BlockOwner)):
        return [np.asarray(holder)]
    if isinstance(holder, dict):
        return [a for v in holder.values() for a in _arrays_in(v)]
    if isinstance(holder, (list, tuple)):
        return [a for v in holder for a in _arrays_in(v)]
    return [holder._arr]  # a ctypes pointer from data_as keeps its array here


def _raw(a):
    """The byte buffer under a block: its owner's (a cached block) or its base array."""
    return a.base.raw if isinstance(a.base, base._BlockOwner) else (a if a.base is None else a.base)


def _fill(a, tag):
    """Fill the block's whole byte buffer (alignment padding included) with one byte value."""
    _raw(a).view(np.uint8)[...] = tag % 251


def _check_fill(x, tag, what=""):
    """Every byte ``x`` sees is still the pattern block ``tag`` was filled with."""
    v = np.ascontiguousarray(x).view(np.uint8)
    if v.size:
        assert v.min() == v.max() == tag % 251, f"{what}: block {tag} was overwritten"


def _check_holder(holder, tag, what=""):
    for x in _arrays_in(holder):
        _check_fill(x, tag, what)


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_block_held_through_a_view_is_not_reused(holder):
    a = _block(SIZES[2])
    _fill(a, 7)
    pointer = a.ctypes.data
    kept = HOLDERS[holder](a)
    del a
    # Many allocations of the same size (and others), each dropped at once: had the held
    # buffer been taken as free, one of them would start at its pointer.
    for i in range(20):
        b = _block(SIZES[2])
        assert b.ctypes.data != pointer
        assert not any(np.shares_memory(b, x) for x in _arrays_in(kept))
        _fill(b, 8)
        del b
        c = _block(SIZES[i % len(SIZES)], np.float32)
        assert not any(np.shares_memory(c, x) for x in _arrays_in(kept))
        _fill(c, 9)
        del c
    _check_holder(kept, 7, holder)
    assert_accounting()
    # Dropped at last, the buffer is handed out again.
    del kept
    assert _block(SIZES[2]).ctypes.data == pointer


def test_released_block_is_reused():
    a = _block(SIZES[1])
    pointer = a.ctypes.data
    del a
    b = _block(SIZES[1])
    assert b.ctypes.data == pointer
    # Through a view kept for a while, then dropped.
    view = b.reshape(-1, 2).T
    del b
    c = _block(SIZES[1])
    assert c.ctypes.data != pointer
    del view
    d = _block(SIZES[1])
    assert d.ctypes.data == pointer
    assert_accounting()


@pytest.mark.parametrize("shapes", [
    [((CACHE_MIN_BYTES // 8,), np.float64), ((CACHE_MIN_BYTES // 4,), np.float32),
     ((16, CACHE_MIN_BYTES // 16), np.uint8), ((CACHE_MIN_BYTES // 16, 2), np.float64)],
], ids=["same-bytes-other-dtypes"])
def test_reuse_across_shapes_and_dtypes_of_one_size(shapes):
    first = aligned_empty(*shapes[0])
    pointer = first.ctypes.data
    del first
    for shape, dtype in shapes[1:]:
        a = aligned_empty(shape, dtype)
        _check_block(a, shape, dtype)
        assert a.ctypes.data == pointer, (shape, dtype)
        del a


def test_small_blocks_are_not_cached():
    before = base._block_cache.nbytes
    small = [aligned_empty((CACHE_MIN_BYTES - ALIGNMENT - 8,), np.uint8) for _ in range(10)]
    assert base._block_cache.nbytes == before
    assert all(a.ctypes.data % ALIGNMENT == 0 for a in small)
    assert len({a.ctypes.data for a in small}) == len(small)


def _random_holder(a, rng):
    return HOLDERS[rng.choice(sorted(HOLDERS))](a)


def _churn(n_steps, seed, limit=None):
    """Random allocations, holders and drops; every new block checked against every live one."""
    rng = random.Random(seed)
    live = []  # (tag, holder): only the holder keeps the block alive
    reused = 0
    seen = set()
    for step in range(n_steps):
        nbytes = rng.choice(SIZES)
        dtype = rng.choice([np.float32, np.float64, np.uint8])
        a = _block(nbytes, dtype)
        assert a.ctypes.data % ALIGNMENT == 0
        reused += a.ctypes.data in seen
        seen.add(a.ctypes.data)
        for tag, holder in live:
            assert not any(np.shares_memory(a, x) for x in _arrays_in(holder)), \
                f"step {step}: the new block overlaps live block {tag}"
        _fill(a, step)
        if rng.random() < 0.6:
            live.append((step, _random_holder(a, rng)))
        del a
        while live and rng.random() < 0.35:
            live.pop(rng.randrange(len(live)))
        if limit is not None:
            assert base._block_cache.nbytes <= limit
    for tag, holder in live:
        _check_holder(holder, tag, f"block {tag}")
    return reused, live


def test_live_blocks_never_overlap():
    reused, live = _churn(400, seed=1)
    # The test means something only if buffers were in fact reused.
    assert reused > 50, reused
    del live
    assert_accounting()


@pytest.mark.parametrize("limit", [0, CACHE_MIN_BYTES + ALIGNMENT, 3 * CACHE_MIN_BYTES, 1 << 20],
                         ids=["off", "one-block", "3x64KiB", "1MiB"])
def test_capacity_is_respected(limit):
    release_blocks(limit)
    reused, live = _churn(250, seed=2, limit=limit)
    if limit == 0:
        assert base._block_cache.nbytes == 0 and not cached_buffers()
    del live
    assert base._block_cache.nbytes <= limit


def test_blocks_beyond_capacity_are_valid_arrays():
    limit = 2 * (SIZES[3] + ALIGNMENT)
    release_blocks(limit)
    blocks = [_block(SIZES[3]) for _ in range(6)]
    assert base._block_cache.nbytes <= limit
    for i, b in enumerate(blocks):
        _check_block(b, (SIZES[3] // 8,), np.float64)
        b[...] = i
    for i, b in enumerate(blocks):
        assert np.all(b == i)
    assert all(not np.shares_memory(x, y) for i, x in enumerate(blocks) for y in blocks[i + 1:])


def test_release_blocks_keeps_live_blocks_valid():
    a = _block(SIZES[0])
    a[...] = 3.0
    pointer = a.ctypes.data
    release_blocks()
    assert base._block_cache.nbytes == 0
    b = _block(SIZES[0])
    assert b.ctypes.data != pointer and not np.shares_memory(a, b)
    b[...] = 4.0
    assert np.all(a == 3.0)


def test_release_blocks_zero_disables_caching():
    release_blocks(0)
    blocks = [_block(s) for s in SIZES for _ in range(3)]
    assert base._block_cache.nbytes == 0 and not cached_buffers()
    del blocks
    _block(SIZES[0])
    assert base._block_cache.nbytes == 0


@pytest.mark.parametrize("limit", [1 << 20, np.int64(1 << 20), np.uint32(1 << 20)], ids=["int", "int64", "uint32"])
def test_release_blocks_sets_capacity(limit):
    release_blocks(limit)
    assert base._block_cache.limit() == 1 << 20


@pytest.mark.parametrize("limit", [-1, True, False, np.True_, 1.5, 2.0, "1MiB", np.float64(4096), [1]],
                         ids=["negative", "True", "False", "np.True_", "float", "whole-float", "str",
                              "np.float64", "list"])
def test_release_blocks_rejects(limit):
    release_blocks(1 << 20)
    with pytest.raises((ValueError, TypeError), match="limit"):
        release_blocks(limit)
    # Refused: the capacity is what it was.
    assert base._block_cache.limit() == 1 << 20


@pytest.mark.parametrize("value, limit", [("1MiB", 1 << 20), ("2MB", 2_000_000), ("131072", 131072),
                                          ("64 KiB", 65536)], ids=["1MiB", "2MB", "bytes", "64-KiB"])
def test_environment_capacity(monkeypatch, value, limit):
    monkeypatch.setenv("SPARSECONV_BLOCK_CACHE", value)
    release_blocks()  # None: read the environment at the next use
    blocks = [_block(SIZES[3]) for _ in range(40)]
    assert base._block_cache.limit() == limit
    assert base._block_cache.nbytes <= limit
    del blocks


@pytest.mark.parametrize("value", ["lots", "-5", "1.5.2MB"], ids=["word", "negative", "garbled"])
def test_environment_capacity_invalid(monkeypatch, value):
    monkeypatch.setenv("SPARSECONV_BLOCK_CACHE", value)
    release_blocks()
    with pytest.raises(ValueError, match="SPARSECONV_BLOCK_CACHE"):
        _block(SIZES[0])


_SUBPROCESS = textwrap.dedent("""
    import numpy as np
    from sparseconv.engines import base
    blocks = [base.aligned_empty((1 << 14,), np.float64) for _ in range(64)]
    del blocks[::2]
    blocks += [base.aligned_empty((1 << 14,), np.float64) for _ in range(8)]
    del blocks
    print(base._block_cache.limit(), base._block_cache.nbytes)
""")


def _run_with_env(value):
    env = dict(os.environ, SPARSECONV_BLOCK_CACHE=value)
    return subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, timeout=120)


def test_environment_capacity_in_a_fresh_process():
    done = _run_with_env("1MiB")
    assert done.returncode == 0, done.stderr
    limit, nbytes = map(int, done.stdout.split())
    assert limit == 1 << 20
    assert 0 < nbytes <= 1 << 20


def test_environment_zero_turns_caching_off():
    done = _run_with_env("0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0"]


# ---------------------------------------------------------------------- threads
def test_threads_never_share_live_blocks():
    n_threads, steps = 6, 150
    errors, live_all, lock = [], [], threading.Lock()
    barrier = threading.Barrier(n_threads)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)

    def work(t):
        try:
            rng = random.Random(100 + t)
            mine = []
            barrier.wait()
            for step in range(steps):
                a = _block(rng.choice(SIZES), rng.choice([np.float32, np.uint8]))
                tag = t * 10_000 + step
                _fill(a, tag)
                if rng.random() < 0.5:
                    mine.append((tag, _random_holder(a, rng)))
                del a
                while mine and rng.random() < 0.3:
                    mine.pop(rng.randrange(len(mine)))
                for tag_, holder in mine:
                    _check_holder(holder, tag_, f"thread {t}")
            barrier.wait()
            with lock:
                live_all.extend(mine)
            barrier.wait()
        except Exception as err:  # reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]
    arrays = [(tag, x) for tag, holder in live_all for x in _arrays_in(holder)]
    for i, (tag, x) in enumerate(arrays):
        _check_fill(x, tag, "after the threads")
        for tag2, y in arrays[i + 1:]:
            if tag2 != tag:
                assert not np.shares_memory(x, y), f"live blocks {tag} and {tag2} overlap"
    del arrays, live_all
    assert_accounting()


# ---------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("free_first", [True, False], ids=["free-size-first", "in-use-size-first"])
def test_accounting_when_released_buffers_are_dropped(free_first):
    # Two sizes, S1 (a, in use) and S2 (b, released), created in either order; the capacity
    # holds one buffer of each. Releasing a second S1 block (c) must drop b's buffer to stay
    # within it, and the cache then counts exactly the buffers it keeps, c's among them.
    r1 = SIZES[0] + ALIGNMENT
    r2 = r1 + ALIGNMENT
    release_blocks(r1 + r2)
    if free_first:
        b = _block(SIZES[0] + ALIGNMENT)
        a = _block(SIZES[0])
    else:
        a = _block(SIZES[0])
        b = _block(SIZES[0] + ALIGNMENT)
    assert_accounting(r1 + r2)
    del b
    c = _block(SIZES[0])
    assert not np.shares_memory(a, c)
    c_raw = c.base.raw
    assert_accounting(r1 + r2)
    del a, c
    assert_accounting(r1 + r2)
    assert any(raw is c_raw for raw in cached_buffers())


# ---------------------------------------------------------------------- nonzero_outside
def nonzero_outside_ref(values, kept):
    """Whether an entry at a flat index not in ``kept`` is non-zero (NaN is; -0.0 is not)."""
    flat = np.asarray(values).ravel()
    outside = np.setdiff1d(np.arange(flat.size), np.asarray(kept, dtype=np.intp))
    return bool(np.any(flat[outside] != 0))


def _values(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 5).astype(dtype)


CASES = {
    "all-kept": lambda v: (v, np.arange(v.size)),
    "empty-kept-nonzero": lambda v: (v, np.array([], dtype=np.intp)),
    "empty-kept-zeros": lambda v: (np.zeros_like(v), np.array([], dtype=np.intp)),
    "zeros-outside": lambda v: _zero_outside(v, [1, 4, 6], 0.0),
    "negative-zero-outside": lambda v: _zero_outside(v, [0, 3], -0.0),
    "nan-outside": lambda v: _set_outside(_zero_outside(v, [2, 5], 0.0), np.nan),
    "inf-outside": lambda v: _set_outside(_zero_outside(v, [2, 5], 0.0), np.inf),
    "-inf-outside": lambda v: _set_outside(_zero_outside(v, [2, 5], 0.0), -np.inf),
    "tiny-outside": lambda v: _set_outside(_zero_outside(v, [2, 5], 0.0), 1e-45),
    "nan-inside": lambda v: _set_inside(_zero_outside(v, [2, 5], 0.0), np.nan),
    "zeros-inside-too": lambda v: _set_inside(_zero_outside(v, [2, 5], 0.0), 0.0),
    "unsorted-kept": lambda v: (_zero_outside(v, [7, 1, 4], 0.0)[0], np.array([7, 1, 4])),
    "last-outside": lambda v: _set_last(_zero_outside(v, [0, 1], 0.0)),
}


def _zero_outside(v, kept, zero):
    v = v.copy()
    flat = v.reshape(-1)
    outside = np.setdiff1d(np.arange(v.size), kept)
    flat[outside] = zero
    return v, np.array(kept, dtype=np.intp)


def _set_outside(case, value):
    v, kept = case
    v.reshape(-1)[np.setdiff1d(np.arange(v.size), kept)[-1]] = value
    return v, kept


def _set_inside(case, value):
    v, kept = case
    v.reshape(-1)[kept[0]] = value
    return v, kept


def _set_last(case):
    v, kept = case
    v.reshape(-1)[-1] = 1
    return v, kept


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(CASES))
def test_nonzero_outside(case, dtype, layout):
    v, kept = CASES[case](_values(dtype, (3, 4), 50))
    if layout == "F":
        v = np.asfortranarray(v)
    elif layout == "strided":
        v = np.repeat(v, 2, axis=1)[:, ::2]
    expected = nonzero_outside_ref(v, kept)
    assert nonzero_outside(v, kept) == expected


@pytest.mark.parametrize("case", ["negative-zero-outside", "nan-outside", "zeros-outside", "all-kept"])
def test_nonzero_outside_expectations(case):
    # The reference itself, on the cases whose answer is known by construction.
    v, kept = CASES[case](_values(np.float64, (3, 4), 51))
    assert nonzero_outside_ref(v, kept) == (case == "nan-outside")
    assert nonzero_outside(v, kept) == (case == "nan-outside")


def test_nonzero_outside_empty_values():
    assert not nonzero_outside(np.zeros((0, 3)), np.array([], dtype=np.intp))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.bool_], ids=lambda d: np.dtype(d).name)
def test_nonzero_outside_other_dtypes(dtype):
    v = np.array([[0, 1, 0], [1, 0, 0]], dtype=dtype)
    assert not nonzero_outside(v, np.array([1, 3]))
    assert nonzero_outside(v, np.array([1]))


@given(data=st.data())
@SETTINGS
def test_nonzero_outside_fuzz(data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6), label="shape")
    # Mostly zeros (of either sign), so that both answers come up.
    elements = st.one_of(st.just(0.0), st.just(-0.0),
                         st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=True, allow_infinity=True))
    v = data.draw(hnp.arrays(dtype, shape, elements=elements), label="values")
    size = int(np.prod(shape))
    kept = data.draw(st.lists(st.integers(0, max(size - 1, 0)), unique=True, max_size=size), label="kept")
    kept = np.array(kept if size else [], dtype=np.intp)
    assert nonzero_outside(v, kept) == nonzero_outside_ref(v, kept)


@pytest.mark.parametrize("value", ["0MiB", "0 B", "0.0GB", "00"], ids=["0MiB", "0-B", "0.0GB", "00"])
def test_environment_zero_in_any_unit_turns_caching_off(monkeypatch, value):
    monkeypatch.setenv("SPARSECONV_BLOCK_CACHE", value)
    release_blocks()
    blocks = [_block(SIZES[0]) for _ in range(3)]
    del blocks
    assert base._block_cache.limit() == 0 and base._block_cache.nbytes == 0


def test_release_blocks_racing_allocations():
    """The capacity is read under the cache's lock: resetting it from another thread while
    blocks are allocated and released never breaks an allocation."""
    errors, stop = [], threading.Event()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def allocate():
        try:
            while not stop.is_set():
                a = _block(SIZES[1])
                a[...] = 1.0
                del a
        except Exception as err:  # reported by the main thread
            errors.append(err)

    workers = [threading.Thread(target=allocate) for _ in range(2)]
    try:
        for w in workers:
            w.start()
        for _ in range(3000):
            release_blocks()
    finally:
        stop.set()
        for w in workers:
            w.join()
        sys.setswitchinterval(old)
    assert not errors, errors[0]
