"""Small image-classification data sets in the layout LeNet-5 expects, loaded offline.

Two sources, both local: scikit-learn's bundled 8x8 handwritten digits (:func:`load_digits`,
needs the optional extra ``pip install 'sparseconv[data]'``) and MNIST in its original IDX
files from a directory on disk (:func:`load_mnist_idx`). Nothing here touches the network.
The IDX format itself is read and written by :func:`read_idx` / :func:`write_idx`, and
:func:`batches` cuts arrays into mini-batches.

Layout and preprocessing
------------------------
Images come out as ``(N, 1, size, size)`` (NCHW, one channel), labels as ``(N,)`` int64.
Both loaders prepare images the way LeCun et al. (1998) prepared MNIST for LeNet-5:

1. Scale to [0, 1] (0 is background).
2. Fit the digit into a ``(size - 4) x (size - 4)`` field -- bilinear resampling with
   ``scipy.ndimage.zoom(order=1)`` when the source has another size -- and pad 2 pixels of
   background on every side. MNIST's 28x28 digits thus sit in LeNet-5's 32x32 input with a
   2-pixel border, unchanged, so that the outermost convolution windows still see the strokes
   in full; the 8x8 digits are enlarged to 28x28 first.
3. Map the [0, 1] intensities linearly so that background is -0.1 and foreground 1.175:
   ``x * 1.275 - 0.1``. The paper chose these levels so that the input has mean roughly 0 and
   variance roughly 1, which speeds up learning.
"""

from __future__ import annotations

import gzip
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "LECUN_BACKGROUND",
    "LECUN_FOREGROUND",
    "IDX_TYPE_CODES",
    "Dataset",
    "load_digits",
    "stratified_split",
    "read_idx",
    "write_idx",
    "load_mnist_idx",
    "batches",
]

#: Input level of background pixels after normalisation (LeCun et al. 1998).
LECUN_BACKGROUND = -0.1
#: Input level of full-intensity foreground pixels after normalisation (LeCun et al. 1998).
LECUN_FOREGROUND = 1.175

#: IDX type code -> element dtype (the file stores it big-endian).
IDX_TYPE_CODES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(np.int16),
    0x0C: np.dtype(np.int32),
    0x0D: np.dtype(np.float32),
    0x0E: np.dtype(np.float64),
}
_IDX_CODE_OF = {dtype: code for code, dtype in IDX_TYPE_CODES.items()}

# Pixels of background on each side of the digit field (28 + 2 * 2 = 32 for LeNet-5).
_BORDER = 2
_MNIST_STEMS = {
    "train images": ("train-images", "idx3-ubyte"),
    "train labels": ("train-labels", "idx1-ubyte"),
    "test images": ("t10k-images", "idx3-ubyte"),
    "test labels": ("t10k-labels", "idx1-ubyte"),
}
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True, repr=False, eq=False)
class Dataset:
    """A train/test pair of image arrays with integer labels.

    Attributes
    ----------
    x_train : ndarray of shape (N_train, 1, H, W)
        Training images, float32 or float64.
    y_train : ndarray of shape (N_train,), int64
        Training labels in ``0 .. classes - 1``.
    x_test : ndarray of shape (N_test, 1, H, W)
        Test images, same dtype and image shape as ``x_train``.
    y_test : ndarray of shape (N_test,), int64
        Test labels.
    name : str
        Where the data came from, e.g. ``"digits"`` or ``"mnist"``.
    classes : int
        Number of classes.

    Notes
    -----
    Frozen so that a loaded data set cannot be swapped for another by accident; the arrays
    themselves are ordinary (writable) ndarrays. Equality is identity, because element-wise
    array comparison has no single truth value.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if x.ndim != 4:
                raise ValueError(f"x_{split} must have shape (N, C, H, W); got shape {x.shape}")
            if y.ndim != 1 or y.dtype != np.int64:
                raise ValueError(
                    f"y_{split} must be a 1-D int64 array; got shape {y.shape}, dtype {y.dtype}")
            if len(x) != len(y):
                raise ValueError(
                    f"x_{split} and y_{split} must hold the same number of samples; "
                    f"got {len(x)} images and {len(y)} labels")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_train and x_test must have the same image shape; got "
                f"{self.x_train.shape[1:]} and {self.x_test.shape[1:]}")

    def __repr__(self) -> str:
        c, h, w = self.x_train.shape[1:]
        return (f"Dataset(name={self.name!r}, classes={self.classes}, train={len(self.x_train)}, "
                f"test={len(self.x_test)}, image={c}x{h}x{w}, dtype={self.x_train.dtype})")


def _is_int(value: object) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool)


def _check_float_dtype(dtype: object) -> np.dtype:
    message = f"dtype must be float32 or float64; got {dtype!r}"
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(message) from None
    if resolved not in _FLOAT_DTYPES:
        raise TypeError(message)
    return resolved


def _check_size(size: object) -> int:
    if not _is_int(size):
        raise TypeError(f"size must be an int; got {size!r}")
    if size < 2 * _BORDER + 1:
        raise ValueError(
            f"size must be >= {2 * _BORDER + 1} (a {_BORDER}-pixel border on each side of the "
            f"digit); got {size}")
    return int(size)


def _lenet_images(images: np.ndarray, size: int, dtype: np.dtype) -> np.ndarray:
    """Resize, pad and normalise ``(N, H, W)`` images in [0, 1] to ``(N, 1, size, size)``."""
    field = size - 2 * _BORDER
    n, h, w = images.shape
    if (h, w) != (field, field):
        # The factor is computed from the target so zoom rounds to exactly `field` pixels.
        images = ndimage.zoom(images, (1.0, field / h, field / w), order=1)
        assert images.shape == (n, field, field), images.shape
    out = np.pad(images, ((0, 0), (_BORDER, _BORDER), (_BORDER, _BORDER)))
    # In place: for all of MNIST each float64 temporary would be another 0.5 GB.
    out *= LECUN_FOREGROUND - LECUN_BACKGROUND
    out += LECUN_BACKGROUND
    return out.astype(dtype)[:, np.newaxis]


def stratified_split(y: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split that keeps each class's share in both parts.

    Parameters
    ----------
    y : ndarray of shape (N,)
        Class labels (any values :func:`numpy.unique` can sort).
    test_fraction : float
        Share of every class that goes to the test part, strictly between 0 and 1.
    seed : int
        Seed for :func:`numpy.random.default_rng`; the same seed gives the same split.

    Returns
    -------
    train_idx, test_idx : ndarray of shape (N_train,) and (N_test,), int64
        Disjoint, sorted indices into ``y`` that together cover ``0 .. N - 1``.

    Notes
    -----
    Within each class of ``n`` samples, ``floor(test_fraction * n + 0.5)`` samples chosen
    uniformly at random go to the test part (round half up), so a class too small for its
    share to reach half a sample contributes to the training part only.
    """
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"y must be a non-empty 1-D array of labels; got shape {y.shape}")
    if not isinstance(test_fraction, numbers.Real) or isinstance(test_fraction, bool):
        raise TypeError(f"test_fraction must be a float; got {test_fraction!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1; got {test_fraction!r}")
    if not _is_int(seed):
        raise TypeError(f"seed must be an int; got {seed!r}")
    rng = np.random.default_rng(seed)
    test_parts = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_parts.append(members[:int(np.floor(test_fraction * len(members) + 0.5))])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    return np.flatnonzero(~is_test).astype(np.int64), test_idx


def load_digits(*, size: int = 32, test_fraction: float = 0.2, seed: int = 0,
                dtype: np.dtype = np.float32) -> Dataset:
    """scikit-learn's 8x8 handwritten digits, prepared as LeNet-5 input.

    1797 images of the digits 0-9 with intensities 0..16, shipped inside scikit-learn, so
    this works offline. Requires the optional extra: ``pip install 'sparseconv[data]'``.

    Parameters
    ----------
    size : int, default 32
        Output image side. Each 8x8 digit is resized bilinearly to ``size - 4`` pixels and
        framed by a 2-pixel background border (see the module docstring).
    test_fraction : float, default 0.2
        Share of every class held out for testing (:func:`stratified_split`).
    seed : int, default 0
        Seed of the split; the same seed gives the same split.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Dtype of the images.

    Returns
    -------
    Dataset
        ``x_train`` of shape ``(N_train, 1, size, size)`` and ``x_test`` of shape
        ``(N_test, 1, size, size)`` with values in [-0.1, 1.175] (background -0.1);
        int64 labels in 0..9; ``N_train + N_test == 1797``.

    Raises
    ------
    ImportError
        If scikit-learn is not installed.
    """
    dtype = _check_float_dtype(dtype)
    size = _check_size(size)
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits needs scikit-learn, an optional dependency of sparseconv; install it "
            "with: pip install 'sparseconv[data]'  (or: pip install scikit-learn)") from exc
    bunch = sklearn_load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    images = _lenet_images(np.asarray(bunch.images, dtype=np.float64) / 16.0, size, dtype)
    return Dataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                   name="digits", classes=10)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an array from an IDX file, plain or gzip-compressed.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Gzip compression is recognised from the content (bytes ``1f 8b``), so a
        ``.gz`` file needs no special name.

    Returns
    -------
    ndarray
        Shape as stored in the header, dtype from the type code (:data:`IDX_TYPE_CODES`) in
        native byte order.

    Raises
    ------
    ValueError
        If the file is not a well-formed IDX file: the message names the file and the fault
        (truncated header, bad magic, unknown type code, too few or too many data bytes,
        broken gzip stream).

    Notes
    -----
    The format: two zero bytes; a type code byte; a byte with the number of dimensions
    ``ndim``; ``ndim`` big-endian int32 sizes; then the elements, big-endian, in C order.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: broken gzip stream ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated header: expected at least 4 bytes, found {len(raw)}")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad magic: an IDX file starts with bytes 00 00, found {raw[0]:02x} {raw[1]:02x}")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPE_CODES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPE_CODES)
        raise ValueError(f"{path}: unknown type code 0x{code:02X}; expected one of {known}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated header: {ndim} dimensions need {header} header bytes, "
            f"found {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in shape):
        raise ValueError(f"{path}: negative dimension in header; got shape {shape}")
    dtype = IDX_TYPE_CODES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        fault = "truncated data" if found < expected else f"{found - expected} trailing bytes"
        raise ValueError(
            f"{path}: {fault}: shape {shape} of {dtype} expects {expected} bytes of data but "
            f"found {found}")
    stored = np.frombuffer(raw, dtype=dtype.newbyteorder(">"), offset=header)
    return stored.astype(dtype).reshape(shape)


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write an array to an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; an existing file is replaced.
    array : ndarray
        Any shape with at most 255 dimensions; dtype uint8, int8, int16, int32, float32 or
        float64 (:data:`IDX_TYPE_CODES`).

    Raises
    ------
    TypeError
        If the dtype has no IDX type code.
    ValueError
        If ``array`` has more than 255 dimensions.
    """
    array = np.asarray(array)
    code = _IDX_CODE_OF.get(array.dtype.newbyteorder("="))
    if code is None:
        names = ", ".join(str(d) for d in IDX_TYPE_CODES.values())
        raise TypeError(f"array must have dtype {names} to be written as IDX; got dtype {array.dtype}")
    if array.ndim > 255:
        raise ValueError(f"array must have at most 255 dimensions for IDX; got {array.ndim}")
    data = (bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
            + np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).tobytes())
    path = Path(path)
    if path.suffix == ".gz":
        # mtime=0 keeps the output byte-identical from run to run.
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def _find_mnist_file(directory: Path, stem: str, kind: str) -> Path:
    names = [f"{stem}{sep}{kind}{ext}" for sep in ("-", ".") for ext in ("", ".gz")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no MNIST file {stem}-{kind} in {directory}; looked for: {', '.join(names)}")


def _load_mnist_split(images_path: Path, labels_path: Path,
                      limit: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, H, W); got shape "
            f"{images.shape}, dtype {images.dtype}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{labels_path}: expected integer labels of shape (N,); got shape {labels.shape}, "
            f"dtype {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path.name} holds {len(images)} images but {labels_path.name} holds "
            f"{len(labels)} labels; they must match")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(
            f"{labels_path}: labels must be in 0..9; got values from {labels.min()} to {labels.max()}")
    return images[:limit], labels[:limit].astype(np.int64)


def load_mnist_idx(directory: PathLike, *, size: int = 32, dtype: np.dtype = np.float32,
                   limit: Optional[int] = None) -> Dataset:
    """MNIST from its four IDX files in a local directory, prepared as LeNet-5 input.

    Parameters
    ----------
    directory : str or os.PathLike
        Folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each possibly with a
        ``.gz`` suffix or spelled with a dot (``train-images.idx3-ubyte``).
    size : int, default 32
        Output image side. The 28x28 digits are padded with a 2-pixel background border to
        32x32 unchanged; for another size they are first resized bilinearly to ``size - 4``.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        Dtype of the images.
    limit : int, optional
        Keep only the first ``limit`` samples of each split (quick experiments).

    Returns
    -------
    Dataset
        ``x_train`` of shape ``(N_train, 1, size, size)``, ``x_test`` of shape
        ``(N_test, 1, size, size)``, values in [-0.1, 1.175] (background -0.1; pixel value
        ``v`` in 0..255 becomes ``v / 255 * 1.275 - 0.1``); int64 labels in 0..9.

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message lists every name that was tried.
    ValueError
        If a file is not valid IDX, images and labels differ in count, or a label is
        outside 0..9.
    """
    dtype = _check_float_dtype(dtype)
    size = _check_size(size)
    if limit is not None:
        if not _is_int(limit):
            raise TypeError(f"limit must be an int or None; got {limit!r}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
    directory = Path(directory)
    paths = {key: _find_mnist_file(directory, stem, kind)
             for key, (stem, kind) in _MNIST_STEMS.items()}
    arrays = []
    for split in ("train", "test"):
        images, labels = _load_mnist_split(paths[f"{split} images"], paths[f"{split} labels"], limit)
        arrays += [_lenet_images(images / 255.0, size, dtype), labels]
    return Dataset(*arrays, name="mnist", classes=10)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool = True,
            rng: Union[None, int, np.random.Generator] = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches that together hold every sample exactly once.

    Parameters
    ----------
    x : ndarray of shape (N, ...)
        Inputs, e.g. images of shape ``(N, C, H, W)``.
    y : ndarray of shape (N, ...)
        Targets, paired with ``x`` along the first axis.
    batch_size : int
        Samples per batch; the last batch holds the remaining ``N % batch_size`` when that
        is not zero.
    shuffle : bool, default True
        Visit the samples in a random order (a new one per call) instead of in order.
    rng : None, int or numpy.random.Generator, optional
        Source of the order when ``shuffle`` is true; an int seeds a new generator, None
        draws fresh entropy.

    Returns
    -------
    iterator of (ndarray of shape (B, ...), ndarray of shape (B,...))
        ``ceil(N / batch_size)`` pairs ``(xb, yb)`` with ``B <= batch_size``.

    Notes
    -----
    The arguments are checked when ``batches`` is called, not at the first ``next``.
    """
    if len(x) != len(y):
        raise ValueError(
            f"x and y must hold the same number of samples; got len(x)={len(x)}, len(y)={len(y)}")
    if not _is_int(batch_size):
        raise TypeError(f"batch_size must be an int; got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    order = np.random.default_rng(rng).permutation(len(x)) if shuffle else np.arange(len(x))
    starts = range(0, len(x), batch_size)
    return ((x[order[s:s + batch_size]], y[order[s:s + batch_size]]) for s in starts)
