"""Tests of sparseconv.data: the IDX reader/writer, the MNIST and digits loaders, the split
and the mini-batches. Every IDX file is written here into tmp_path; nothing is downloaded."""

import gzip
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseconv.data import (IDX_TYPE_CODES, LECUN_BACKGROUND, LECUN_FOREGROUND, Dataset,
                             batches, load_digits, load_mnist_idx, read_idx, stratified_split,
                             write_idx)

SHAPES = {"1d": (7,), "3d": (3, 4, 5), "scalar": ()}
MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


# --- IDX format ---------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("code", IDX_TYPE_CODES, ids=[f"0x{c:02X}" for c in IDX_TYPE_CODES])
def test_idx_round_trip(tmp_path, code, shape, compressed):
    array = _sample(IDX_TYPE_CODES[code], shape)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    write_idx(path, array)
    raw = path.read_bytes()
    assert raw[:2] == (b"\x1f\x8b" if compressed else b"\x00\x00")
    header = gzip.decompress(raw)[:4] if compressed else raw[:4]
    assert header == bytes([0, 0, code, len(shape)])
    back = read_idx(path)
    assert back.dtype == array.dtype and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_bytes_follow_the_spec(tmp_path):
    write_idx(tmp_path / "u8", np.array([1, 2, 255], dtype=np.uint8))
    assert (tmp_path / "u8").read_bytes() == bytes.fromhex("00000801 00000003 0102ff")
    write_idx(tmp_path / "i16", np.array([[1, -2]], dtype=np.int16))
    assert (tmp_path / "i16").read_bytes() == bytes.fromhex("00000b02 00000001 00000002 0001fffe")


def test_idx_reads_big_endian_input_arrays(tmp_path):
    array = np.arange(6, dtype=">f8").reshape(2, 3)
    write_idx(tmp_path / "a", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


def test_idx_gzip_is_recognised_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "a.gz", array)
    (tmp_path / "a.gz").rename(tmp_path / "no-suffix")
    np.testing.assert_array_equal(read_idx(tmp_path / "no-suffix"), array)


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.bool_, np.complex64, np.float16])
def test_write_idx_rejects_dtypes_without_type_code(tmp_path, dtype):
    with pytest.raises(TypeError, match=f"got dtype {np.dtype(dtype)}"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=dtype))


GOOD = bytes.fromhex("00000802 00000002 00000003") + bytes(range(6))
CORRUPT = {
    "bad-magic": (b"\x01" + GOOD[1:], "bad magic.*found 01 00"),
    "bad-type-code": (GOOD[:2] + b"\x0a" + GOOD[3:], "unknown type code 0x0A"),
    "truncated-data": (GOOD[:-1], "truncated data.*expects 6 bytes of data but found 5"),
    "trailing-bytes": (GOOD + b"xyz", "3 trailing bytes.*expects 6 bytes of data but found 9"),
    "header-under-4-bytes": (GOOD[:3], "truncated header: expected at least 4 bytes, found 3"),
    "header-missing-dims": (GOOD[:10], "truncated header: 2 dimensions need 12 header bytes, found 10"),
    "negative-dim": (GOOD[:4] + b"\xff" * 4 + GOOD[8:], "negative dimension"),
    "empty": (b"", "truncated header"),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("content, message", CORRUPT.values(), ids=CORRUPT.keys())
def test_read_idx_names_file_and_fault(tmp_path, content, message, compressed):
    path = tmp_path / "broken-file.idx"
    path.write_bytes(gzip.compress(content) if compressed else content)
    with pytest.raises(ValueError, match=f"broken-file.idx: {message}"):
        read_idx(path)


def test_read_idx_broken_gzip_stream(tmp_path):
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(GOOD)[:-6])
    with pytest.raises(ValueError, match="a.gz: broken gzip stream"):
        read_idx(path)


# --- MNIST loader -------------------------------------------------------------------------

def _write_mnist(directory, n_train=20, n_test=10, names=MNIST_NAMES, suffix=""):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              np.arange(n_train, dtype=np.uint8) % 10,
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              (np.arange(n_test, dtype=np.uint8) * 3) % 10]
    for name, array in zip(names, arrays):
        write_idx(directory / (name + suffix), array)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mnist_pads_28_to_32_and_normalises(tmp_path, suffix, dtype):
    images, labels, test_images, test_labels = _write_mnist(tmp_path, suffix=suffix)
    ds = load_mnist_idx(tmp_path, dtype=dtype)
    assert ds.x_train.shape == (20, 1, 32, 32) and ds.x_test.shape == (10, 1, 32, 32)
    assert ds.x_train.dtype == dtype and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, labels)
    np.testing.assert_array_equal(ds.y_test, test_labels)
    for x, source in ((ds.x_train, images), (ds.x_test, test_images)):
        interior = x[:, 0, 2:30, 2:30]
        np.testing.assert_allclose(interior, source / 255 * 1.275 - 0.1, rtol=1e-6, atol=1e-6)
        border = x[:, 0].copy()
        border[:, 2:30, 2:30] = LECUN_BACKGROUND
        np.testing.assert_array_equal(border, np.asarray(LECUN_BACKGROUND, dtype=dtype))
    assert (ds.name, ds.classes) == ("mnist", 10)


def test_mnist_dotted_names_limit_and_other_size(tmp_path):
    dotted = [name.replace("-idx", ".idx") for name in MNIST_NAMES]
    _write_mnist(tmp_path, names=dotted)
    ds = load_mnist_idx(tmp_path, size=20, limit=5)
    assert ds.x_train.shape == (5, 1, 20, 20) and ds.x_test.shape == (5, 1, 20, 20)
    assert ds.x_train.min() >= LECUN_BACKGROUND - 1e-6
    assert ds.x_train.max() <= LECUN_FOREGROUND + 1e-6
    np.testing.assert_array_equal(ds.x_train[:, 0, :2], np.float32(LECUN_BACKGROUND))


def test_mnist_missing_file_lists_what_was_looked_for(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist_idx(tmp_path)
    for name in ("t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz",
                 "t10k-labels.idx1-ubyte", "t10k-labels.idx1-ubyte.gz"):
        assert name in str(info.value)


def test_mnist_count_mismatch(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8))
    with pytest.raises(ValueError, match="20 images but train-labels-idx1-ubyte holds 19 labels"):
        load_mnist_idx(tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0] * 9 + [10], dtype=np.uint8))
    with pytest.raises(ValueError, match="labels must be in 0..9; got values from 0 to 10"):
        load_mnist_idx(tmp_path)


def test_mnist_images_must_be_3d_uint8(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((20, 784), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, H, W\)"):
        load_mnist_idx(tmp_path)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"limit": 0}, ValueError, "limit must be >= 1; got 0"),
    ({"limit": 2.5}, TypeError, "limit must be an int or None"),
    ({"size": 4}, ValueError, "size must be >= 5"),
    ({"dtype": np.int32}, TypeError, "dtype must be float32 or float64"),
    ({"dtype": "no-such-dtype"}, TypeError, "dtype must be float32 or float64"),
], ids=["limit0", "limit-float", "size4", "dtype-int", "dtype-bogus"])
def test_mnist_argument_errors(tmp_path, kwargs, error, message):
    _write_mnist(tmp_path)
    with pytest.raises(error, match=message):
        load_mnist_idx(tmp_path, **kwargs)


# --- stratified split ---------------------------------------------------------------------

def _check_split(y, fraction, train_idx, test_idx):
    assert train_idx.dtype == np.int64 and test_idx.dtype == np.int64
    assert np.intersect1d(train_idx, test_idx).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(len(y)))
    for label in np.unique(y):
        n = np.count_nonzero(y == label)
        assert np.count_nonzero(y[test_idx] == label) == int(np.floor(fraction * n + 0.5))


def test_stratified_split_properties():
    y = np.repeat(np.arange(5), [40, 30, 20, 10, 3])
    np.random.default_rng(0).shuffle(y)
    train_idx, test_idx = stratified_split(y, 0.25, seed=3)
    _check_split(y, 0.25, train_idx, test_idx)
    again = stratified_split(y, 0.25, seed=3)
    np.testing.assert_array_equal(again[1], test_idx)
    other = stratified_split(y, 0.25, seed=4)
    assert not np.array_equal(other[1], test_idx)


@settings(max_examples=60, deadline=None)
@given(y=st.lists(st.integers(-3, 3), min_size=1, max_size=80),
       fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**32))
def test_stratified_split_hypothesis(y, fraction, seed):
    y = np.array(y)
    _check_split(y, fraction, *stratified_split(y, fraction, seed))


@pytest.mark.parametrize("y, fraction, seed, error, message", [
    (np.arange(4), 0.0, 0, ValueError, "test_fraction must be strictly between 0 and 1; got 0.0"),
    (np.arange(4), 1.0, 0, ValueError, "test_fraction must be strictly between 0 and 1; got 1.0"),
    (np.arange(4), "0.5", 0, TypeError, "test_fraction must be a float"),
    (np.arange(4), 0.5, 1.5, TypeError, "seed must be an int; got 1.5"),
    (np.zeros((2, 2)), 0.5, 0, ValueError, r"y must be a non-empty 1-D .* shape \(2, 2\)"),
    (np.zeros(0), 0.5, 0, ValueError, r"y must be a non-empty 1-D .* shape \(0,\)"),
], ids=["fraction0", "fraction1", "fraction-str", "seed-float", "y-2d", "y-empty"])
def test_stratified_split_errors(y, fraction, seed, error, message):
    with pytest.raises(error, match=message):
        stratified_split(y, fraction, seed)


# --- batches ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 50), batch_size=st.integers(1, 60), shuffle=st.booleans(),
       seed=st.integers(0, 100))
def test_batches_visit_every_sample_once(n, batch_size, shuffle, seed):
    x = np.arange(n * 4, dtype=np.float64).reshape(n, 1, 2, 2)
    y = np.arange(n) * 10
    pairs = list(batches(x, y, batch_size, shuffle=shuffle, rng=seed))
    assert len(pairs) == -(-n // batch_size)
    assert all(len(xb) == batch_size for xb, _ in pairs[:-1])
    seen = np.concatenate([yb for _, yb in pairs]) if pairs else np.zeros(0, dtype=int)
    np.testing.assert_array_equal(np.sort(seen), y)
    if not shuffle:
        np.testing.assert_array_equal(seen, y)
    for xb, yb in pairs:
        np.testing.assert_array_equal(xb[:, 0, 0, 0], yb / 10 * 4)


def test_batches_shuffle_is_seeded():
    x, y = np.zeros((30, 1, 1, 1)), np.arange(30)
    first = [yb for _, yb in batches(x, y, 8, rng=5)]
    again = [yb for _, yb in batches(x, y, 8, rng=np.random.default_rng(5))]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), y)
    assert [len(b) for b in first] == [8, 8, 8, 6]


@pytest.mark.parametrize("n_y, batch_size, error, message", [
    (9, 4, ValueError, "len\\(x\\)=10, len\\(y\\)=9"),
    (10, 0, ValueError, "batch_size must be >= 1; got 0"),
    (10, 2.0, TypeError, "batch_size must be an int; got 2.0"),
], ids=["length-mismatch", "batch0", "batch-float"])
def test_batches_errors_are_raised_at_call(n_y, batch_size, error, message):
    with pytest.raises(error, match=message):
        batches(np.zeros((10, 1, 2, 2)), np.zeros(n_y), batch_size)


# --- Dataset ------------------------------------------------------------------------------

def test_dataset_repr_is_one_line_of_sizes():
    x, y = np.zeros((6, 1, 4, 4), np.float32), np.zeros(6, np.int64)
    ds = Dataset(x, y, x[:2], y[:2], name="toy", classes=3)
    assert repr(ds) == ("Dataset(name='toy', classes=3, train=6, test=2, image=1x4x4, "
                        "dtype=float32)")


@pytest.mark.parametrize("field, value, message", [
    ("x_train", np.zeros((6, 4, 4)), r"x_train must have shape \(N, C, H, W\)"),
    ("y_train", np.zeros(6, np.int32), "y_train must be a 1-D int64 array"),
    ("y_test", np.zeros(3, np.int64), "x_test and y_test must hold the same number"),
    ("x_test", np.zeros((2, 1, 5, 5)), "same image shape"),
], ids=["x-3d", "y-int32", "count", "image-shape"])
def test_dataset_validates(field, value, message):
    x, y = np.zeros((6, 1, 4, 4)), np.zeros(6, np.int64)
    fields = dict(x_train=x, y_train=y, x_test=x[:2], y_test=y[:2], name="toy", classes=3)
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        Dataset(**fields)


# --- scikit-learn digits ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="load_digits needs scikit-learn (pip install 'sparseconv[data]')")
    return load_digits()


def test_digits_shapes_dtypes_and_range(digits):
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.shape[1:] == (1, 32, 32) and digits.x_test.shape[1:] == (1, 32, 32)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert (digits.name, digits.classes) == ("digits", 10)
    both = np.concatenate([digits.x_train, digits.x_test])
    assert both.min() == np.float32(LECUN_BACKGROUND)
    assert both.max() == np.float32(LECUN_FOREGROUND)
    np.testing.assert_array_equal(both[:, 0, :2], np.float32(LECUN_BACKGROUND))
    np.testing.assert_array_equal(both[:, 0, :, -2:], np.float32(LECUN_BACKGROUND))
    np.testing.assert_array_equal(np.unique(digits.y_test), np.arange(10))
    assert abs(len(digits.x_test) / 1797 - 0.2) < 0.01


def test_digits_options(digits):
    ds = load_digits(size=12, test_fraction=0.5, seed=1, dtype=np.float64)
    assert ds.x_train.shape[1:] == (1, 12, 12) and ds.x_train.dtype == np.float64
    assert abs(len(ds.x_test) - 1797 / 2) <= 10
    same = load_digits()
    np.testing.assert_array_equal(same.x_test, digits.x_test)
    np.testing.assert_array_equal(same.y_train, digits.y_train)


def test_digits_rejects_other_dtypes(digits):
    with pytest.raises(TypeError, match="dtype must be float32 or float64; got <class 'numpy.int64'>"):
        load_digits(dtype=np.int64)


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'sparseconv\[data\]'.*pip install scikit-learn"):
        load_digits()
