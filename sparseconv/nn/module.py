"""Module, Parameter and Sequential: what every layer and network shares.

A :class:`Module` holds :class:`Parameter` objects (value plus accumulated gradient);
``forward(x)`` computes, ``backward(dy)`` returns ``dJ/dx`` and *adds* the parameter
gradients. Checkpoints are ``.npz`` files of named arrays, read without pickle, validated in
full before anything is written, and written atomically.

Two mechanisms keep gradients exact without comparing arrays on every call:

- **Versions.** A parameter's value is read-only from outside (``p.data`` is a read-only
  view); it changes only through :meth:`Parameter.assign` (or ``p.data = value``), an
  optimiser step or :meth:`Module.load_state_dict`, and each change draws a new number from
  one global counter into :attr:`Parameter.version`. A layer that caches a sparse operator
  refreshes its values exactly when the version it last wrote differs.
- **Per-call state.** ``forward`` pushes what its ``backward`` needs onto the layer's own
  stack and ``backward`` pops it, so one layer instance may appear several times in a network
  (the same ``ReLU`` twice, as in PyTorch): the backward pass, run in reverse order, meets its
  calls in reverse order. A top-level :meth:`Sequential.forward` starts a fresh pass (every
  stack emptied); a layer called on its own keeps only its latest call.
"""

from __future__ import annotations

import errno
import itertools
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from ..engines.base import nonzero_outside

__all__ = ["Parameter", "Module", "Sequential", "LayerInputError", "LAYOUTS"]

#: The layouts a :class:`Sequential` can run in (see its ``layout`` parameter).
LAYOUTS = ("columns", "batch_first")

# One counter for every parameter: a version number is never reused, so an operator synced
# to one parameter can never mistake a replaced parameter for the one it was built from.
_VERSIONS = itertools.count(1)


class LayerInputError(ValueError):
    """A layer of a :class:`Sequential` rejected its input; the message names the layer."""


def _real_number_array(value: object, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf" or arr.dtype.kind == "b":
        raise TypeError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
    return arr


class Parameter:
    """A trainable array and the gradient accumulated for it.

    Parameters
    ----------
    data : ndarray of float32 or float64
        The initial value (copied).
    mask : ndarray of bool, same shape, optional
        Entries that exist (True). Masked entries are held at exactly zero: assignment and
        loading refuse non-zero values there, optimisers never move them, layers give them
        zero gradient, and :attr:`size` does not count them. LeNet-5's C3 connection table and
        a pruned layer's ``weight_mask`` are such masks. Copied and read-only.

    Attributes
    ----------
    grad : ndarray, same shape and dtype as ``data``
        Accumulated gradient (writable; :meth:`zero_grad` clears it).

    Notes
    -----
    ``p.data`` is a read-only view: ``p.data[...] = v`` raises numpy's "assignment destination
    is read-only". Write with ``p.data = v`` or ``p.assign(v)``, which validate the value and
    bump :attr:`version`, so every layer that caches the value in a sparse matrix sees the
    change.
    """

    def __init__(self, data: np.ndarray, mask: Optional[np.ndarray] = None):
        value = np.array(data, copy=True, order="C")
        if value.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"Parameter data must be float32 or float64; got dtype {value.dtype}")
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != bool or m.shape != value.shape:
                raise ValueError(f"mask must be a bool array of the data's shape {value.shape}; got {m.dtype} "
                                 f"array of shape {m.shape}")
            if np.any(value[~m]):
                raise ValueError("Parameter data must be zero where mask is False")
            value[~m] = 0  # -0.0 passes the check; stored as +0.0, as assign stores it
            m = m.copy()
            m.flags.writeable = False
            mask = m
        self._value = value
        self._mask: Optional[np.ndarray] = mask
        self._kept: Optional[np.ndarray] = None
        self.grad = np.zeros_like(value)
        self._version = next(_VERSIONS)

    # ------------------------------------------------------------------ value
    @property
    def data(self) -> np.ndarray:
        """A read-only view of the value; assign with ``p.data = value`` (see :meth:`assign`)."""
        view = self._value.view()
        view.flags.writeable = False
        return view

    @data.setter
    def data(self, value: object) -> None:
        self.assign(value)

    def assign(self, value: object) -> None:
        """Replace the value (same shape and dtype), bumping :attr:`version`.

        Parameters
        ----------
        value : array_like of the parameter's shape
            float of the parameter's own dtype, or integers (converted exactly).

        Raises
        ------
        TypeError
            For complex, boolean, string or object values, or floats of another precision
            (convert explicitly, e.g. ``value.astype(np.float32)``).
        ValueError
            For another shape, or non-zero values where :attr:`mask` is False. Nothing is
            written then.
        """
        arr = _real_number_array(value, "value")
        if arr.shape != self._value.shape:
            raise ValueError(f"value must have the parameter's shape {self._value.shape}; got {arr.shape}")
        if arr.dtype.kind == "f" and arr.dtype != self._value.dtype:
            raise TypeError(f"value has dtype {arr.dtype} but the parameter is {self._value.dtype}; convert it "
                            f"explicitly, e.g. value.astype(np.{self._value.dtype.name})")
        if self._mask is not None and nonzero_outside(arr, self.kept_indices()):
            raise ValueError("value has non-zero entries where the parameter's mask is False (weights that do "
                             "not exist in this layer); zero them first")
        self._value[...] = arr
        if self._mask is not None:
            # -0.0 passes the check above; masked entries are stored as +0.0 (what an update writes).
            self._value[~self._mask] = 0
        self._version = next(_VERSIONS)

    def _update(self, delta: np.ndarray) -> None:
        """``value -= delta`` in place (optimisers), masked entries kept at zero.

        ``delta`` has the value's shape. With a mask only the kept entries are written (a gather
        and a scatter of the kept indices instead of a pass through the inverted boolean mask);
        the masked ones are zero, or are set to zero here if a write through shared memory put
        something there (checked by a count, not a pass over the mask).
        """
        if np.shape(delta) != self._value.shape:
            raise ValueError(f"delta must have the parameter's shape {self._value.shape}; got {np.shape(delta)}")
        if self._mask is None:
            self._value -= delta
        else:
            kept = self.kept_indices()
            flat = self._value.reshape(-1)
            flat[kept] -= np.reshape(delta, -1)[kept]
            if nonzero_outside(flat, kept):
                self._value[~self._mask] = 0
        self._version = next(_VERSIONS)

    def kept_indices(self) -> Optional[np.ndarray]:
        """Flat indices of the entries the mask keeps (found once, read-only), or None without a mask."""
        if self._mask is None:
            return None
        if getattr(self, "_kept", None) is None:
            kept = np.flatnonzero(self._mask)
            kept.flags.writeable = False
            self._kept = kept
        return self._kept

    def touch(self) -> None:
        """Declare the value changed (bump :attr:`version`) after a write through a shared buffer.

        Only for code that shares the parameter's memory with another array library (e.g. a
        torch tensor made with ``torch.from_numpy``) and writes through it; every write
        through :meth:`assign` or an optimiser bumps the version already.
        """
        self._version = next(_VERSIONS)

    @property
    def version(self) -> int:
        """A number that changes (never to a value used before) whenever the value changes."""
        return self._version

    @property
    def mask(self) -> Optional[np.ndarray]:
        """Read-only bool array of existing entries, or None when every entry exists."""
        return self._mask

    def _set_mask(self, mask: Optional[np.ndarray]) -> None:
        """Replace the mask (a layer rebuilding its operators); zeroes newly masked entries."""
        if mask is not None:
            mask = np.array(mask, dtype=bool, copy=True)
            mask.flags.writeable = False
            self._value[~mask] = 0
            self.grad[~mask] = 0
        self._mask = mask
        self._kept = None
        self._version = next(_VERSIONS)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._value.shape

    @property
    def dtype(self) -> np.dtype:
        return self._value.dtype

    @property
    def size(self) -> int:
        """Number of trainable entries (masked entries excluded)."""
        return int(self._value.size if self._mask is None else np.count_nonzero(self._mask))

    def zero_grad(self) -> None:
        """Set the accumulated gradient to zero."""
        self.grad[...] = 0

    def __setstate__(self, state: dict) -> None:
        # Copies and unpickled parameters come back with writable arrays; the mask stays frozen.
        self.__dict__.update(state)
        if self._mask is not None:
            self._mask.flags.writeable = False
        if getattr(self, "_kept", None) is not None:
            self._kept.flags.writeable = False

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, size={self.size})"


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return bool(value)


class Module:
    """Base class of layers and networks.

    Subclasses fill ``self.params`` (an ordered dict name -> :class:`Parameter`), implement
    :meth:`forward`, :meth:`backward` and :meth:`output_shape`, and keep what ``backward``
    needs with :meth:`_save` / :meth:`_restore` (per call, so an instance can be reused in one
    network). Containers list their sub-modules by overriding :meth:`named_children`.

    Attributes
    ----------
    training : bool
        True after construction and :meth:`train`, False after :meth:`eval`. Only layers
        whose behaviour differs (:class:`~sparseconv.nn.Dropout`) read it.
    """

    params: dict[str, Parameter]

    def __init__(self) -> None:
        self.params = {}
        self.training = True
        self._saved: list[Any] = []
        self._pass_open = False

    # ------------------------------------------------------------------ computation
    def forward(self, x: np.ndarray) -> np.ndarray:
        """The layer's output for a batch ``x`` of shape ``(N, *sample)``."""
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """``dJ/dx`` for ``dy = dJ/dy`` of the matching forward call; adds parameter gradients."""
        raise NotImplementedError

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """One sample's output shape for one sample's input shape (no batch axis)."""
        raise NotImplementedError

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """The layer's output for a batch held as columns.

        Parameters
        ----------
        X : ndarray of shape (prod(shape), N)
            Column ``n`` is sample ``n`` flattened in C order, in any memory order (sparse
            layers hand their engine the order it runs fastest on, see :class:`Sequential`).
        shape : tuple of int
            One sample's shape, ``(C, *spatial)`` (what ``x.shape[1:]`` is in batch-first layout).

        Returns
        -------
        Y : ndarray of shape (prod(out_shape), N)
        out_shape : tuple of int
            One output sample's shape.

        Notes
        -----
        This base implementation runs :meth:`forward` on a transposed *view* of ``X`` (no
        copy), so any layer works in a column network; the layers of :mod:`sparseconv.nn`
        override it with column-native computations. Its backward is
        :meth:`backward_columns`.
        """
        n = X.shape[1]
        y = self.forward(X.T.reshape((n, *shape)))
        return y.reshape(n, int(np.prod(y.shape[1:], dtype=np.int64))).T, tuple(y.shape[1:])

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``dJ/dX`` for ``D = dJ/dY`` of the matching :meth:`forward_columns` call, as columns.

        Adds the parameter gradients, as :meth:`backward` does.

        Parameters
        ----------
        D : ndarray of shape (prod(shape), N)
        shape : tuple of int
            One output sample's shape (the ``out_shape`` the forward call returned).

        Returns
        -------
        ndarray of shape (prod(input sample shape), N)
        """
        n = D.shape[1]
        dx = self.backward(D.T.reshape((n, *shape)))
        return dx.reshape(n, int(np.prod(dx.shape[1:], dtype=np.int64))).T

    def parameter_grads(self, dy: np.ndarray) -> None:
        """Add the parameter gradients of the matching :meth:`forward` call, without ``dJ/dx``.

        What :meth:`Sequential.backward` with ``input_grad=False`` calls on the first layer
        that has parameters (as PyTorch skips the gradient of an input that does not require
        one). This base implementation runs :meth:`backward` and drops its result; layers
        whose input gradient is a product of its own (convolutions, ``Linear``, sub-sampling,
        ``ChannelAffine``) skip that product.

        Parameters
        ----------
        dy : ndarray of shape (N, *out_shape)
        """
        self.backward(dy)

    def parameter_grads_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> None:
        """:meth:`parameter_grads` for the matching :meth:`forward_columns` call.

        Parameters
        ----------
        D : ndarray of shape (prod(shape), N)
        shape : tuple of int
            One output sample's shape.
        """
        self.backward_columns(D, shape)

    def native_columns(self) -> bool:
        """Whether :meth:`forward_columns`/:meth:`backward_columns` compute what :meth:`forward`/
        :meth:`backward` compute: False when a subclass overrides ``forward`` or ``backward``
        below the class that defines the column methods (a user's layer derived from a built-in
        one); :class:`Sequential` then runs the column pass through the base
        :meth:`Module.forward_columns`, which calls ``forward`` on a transposed view."""
        for cls in type(self).__mro__:
            names = cls.__dict__
            if "forward_columns" in names or "backward_columns" in names:
                return True
            if "forward" in names or "backward" in names:
                return False
        return True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def _save(self, context: Any, layout: str = "batch_first") -> None:
        """Keep ``context`` for the backward of this call (``layout``: which forward made it).

        Inside a pass (a :meth:`Sequential.forward`) calls stack up; outside one, only the
        latest call is kept, so a layer used on its own for inference holds one context.
        """
        if not self._pass_open:
            self._saved.clear()
        self._saved.append((layout, context))

    def _restore(self, layout: str = "batch_first") -> Any:
        """The context of the most recent forward call not yet consumed by a backward.

        It stays saved until :meth:`_release`: a backward that refuses its ``dy`` leaves the
        layer as it was, so the call can be repeated with the right ``dy``. A context saved by
        the other layout's forward is refused (``backward`` after ``forward_columns``, or
        ``backward_columns`` after ``forward``).
        """
        if not self._saved:
            raise ValueError(f"{self!r}: backward() called before forward() (each forward call allows one "
                             "backward call)")
        saved_layout, context = self._saved[-1]
        if saved_layout != layout:
            names = {"batch_first": ("forward", "backward"), "columns": ("forward_columns", "backward_columns")}
            raise ValueError(f"{self!r}: its last forward call was {names[saved_layout][0]}(); call "
                             f"{names[saved_layout][1]}() for it, not {names[layout][1]}()")
        return context

    def _release(self) -> None:
        """Consume the context :meth:`_restore` returned (a backward that succeeded)."""
        self._saved.pop()

    # ------------------------------------------------------------------ walking
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules with their names (none for a layer)."""
        return iter(())

    def children(self) -> Iterator["Module"]:
        """Direct sub-modules."""
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module and every sub-module, depth first, each once (as PyTorch's).

        Parameters
        ----------
        prefix : str
            Prepended to every name; this module's own name is ``prefix`` (``""`` at the top).
        """
        seen: set[int] = set()

        def walk(module: Module, name: str) -> Iterator[tuple[str, Module]]:
            if id(module) in seen:
                return
            seen.add(id(module))
            yield name, module
            for child_name, child in module.named_children():
                yield from walk(child, f"{name}.{child_name}" if name else child_name)

        yield from walk(self, prefix)

    def modules(self) -> Iterator["Module"]:
        """This module and every sub-module, each once."""
        for _, m in self.named_modules():
            yield m

    def apply(self, fn: Callable[["Module"], object]) -> "Module":
        """Call ``fn`` on every sub-module (children first) and then on this module; returns self."""
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {fn!r}")
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def train(self, mode: bool = True) -> "Module":
        """Set training mode (``mode=True``) or evaluation mode on this module and all sub-modules."""
        mode = _check_bool(mode, "mode")
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        """Evaluation mode, ``train(False)``: dropout becomes the identity."""
        return self.train(False)

    # ------------------------------------------------------------------ parameters
    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its dotted name (``"3.weight"`` in a Sequential), each once.

        A parameter reached twice (a layer used at two positions) is listed under its first
        name only, so an optimiser updates it once per step.
        """
        seen: set[int] = set()
        for name, module in self.named_modules(prefix.rstrip(".")):
            for pname, p in module.params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{name}.{pname}" if name else pname), p

    def parameters(self) -> list[Parameter]:
        """Every trainable parameter, in a fixed order, each once."""
        return [p for _, p in self.named_parameters()]

    def n_params(self) -> int:
        """Trainable entries over all parameters (masked entries excluded)."""
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        """Clear the accumulated gradient of every parameter."""
        for p in self.parameters():
            p.zero_grad()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, by name (``"3.weight"`` in a Sequential)."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Load parameters saved by :meth:`state_dict`: all of them, or none.

        Every array is validated before any parameter is written: the names must match
        exactly, each value must be a real floating array of the parameter's shape, hold only
        finite values that stay finite in the parameter's dtype (a float64 checkpoint loads
        into a float32 network), and be zero where the parameter's mask is False.

        Raises
        ------
        ValueError
            Naming the parameter and the problem; the module is then unchanged.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of name -> array; got {type(state).__name__}")
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this architecture: missing parameters {missing}, "
                             f"unexpected parameters {unexpected}")
        converted = {}
        for name, p in own.items():
            value = state[name]
            if not isinstance(value, np.ndarray):
                raise ValueError(f"checkpoint parameter {name!r} is a {type(value).__name__}, not an array")
            if value.dtype.kind != "f":
                raise ValueError(f"checkpoint parameter {name!r} has dtype {value.dtype}; parameters are real "
                                 "floating arrays")
            if value.shape != p.shape:
                raise ValueError(f"checkpoint does not match this architecture: parameter {name!r} has shape "
                                 f"{p.shape} in the network but {value.shape} in the checkpoint")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"checkpoint parameter {name!r} holds NaN or infinite values")
            with np.errstate(over="ignore"):
                cast = value.astype(p.dtype)
            if not np.all(np.isfinite(cast)):
                raise ValueError(f"checkpoint parameter {name!r} has values beyond the range of {p.dtype}")
            if p.mask is not None and nonzero_outside(cast, p.kept_indices()):
                raise ValueError(f"checkpoint parameter {name!r} has non-zero values where this network's "
                                 "mask (connection table or weight_mask) has none")
            converted[name] = cast
        for name, p in own.items():
            p.assign(converted[name])

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the parameters to ``path`` (.npz, no pickle).

        The file is written to a temporary name in the same directory and renamed over
        ``path``, so an interrupted save leaves the previous checkpoint intact.

        Raises
        ------
        OSError
            (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``...) naming
            ``path`` when it cannot be written; nothing is left behind.
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a checkpoint file", str(path))
        # mkstemp creates the file 0600; keep the old checkpoint's mode, or the usual 0644.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            # mkstemp names its temporary file; the caller knows only the path they gave.
            raise type(err)(err.errno, f"cannot write the checkpoint there ({err.strerror})", str(path)) from None
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **self.state_dict())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Read parameters written by :meth:`save`: all of them, or none.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            Naming ``path``, if it is not a readable ``.npz`` checkpoint (a ``.npy`` file,
            pickled data, a truncated or corrupted archive, any other file) or does not match
            this network (see :meth:`load_state_dict`). The module is then unchanged.
        """
        path = os.fspath(path)
        state = _read_checkpoint(path)
        try:
            self.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Every member of an ``.npz`` checkpoint, read in full (so CRC errors surface here)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a checkpoint (.npz) file")
    # np.load takes anything that is neither a zip archive nor a .npy file for a pickle, and
    # reports an image or a text file as "pickled data": look at the first bytes first.
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise ValueError(f"{path}: not a checkpoint: it holds a single array (.npy); a checkpoint is an .npz "
                         "archive of named parameters written by Module.save")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        what = "an empty file" if not head else f"a file starting with {head!r}"
        raise ValueError(f"{path}: not a checkpoint: it is {what}, not an .npz archive of named parameters "
                         "written by Module.save")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint (.npz archive of named arrays): "
                         f"{type(err).__name__}: {err}") from None
    try:
        with data:
            state = {}
            for key in data.files:
                value = data[key]
                if not isinstance(value, np.ndarray):
                    raise ValueError(f"member {key!r} is not a numpy array")
                state[key] = value
            return state
    except Exception as err:
        # A damaged archive surfaces as whatever the zip, zlib, tokenize or numpy header
        # parser trips over (BadZipFile, EOFError, TokenError, OSError...); to the caller each
        # means the same thing.
        raise ValueError(f"{path}: not a readable checkpoint (.npz archive of named arrays): "
                         f"{type(err).__name__}: {err}") from None


def _unshared(Y: np.ndarray, members: list[Module]) -> np.ndarray:
    """``Y``, copied if it shares memory with a block a fused ``ReLU`` of this pass recorded for
    its backward (a caller editing the output in place must not change the recorded mask);
    ``members`` is empty for a nested call, which leaves it to the outermost one."""
    for m in members:
        for block in getattr(m, "recorded_blocks", lambda: ())():
            if np.may_share_memory(Y, block):
                return np.array(Y, order="K")
    return Y


def _parameter_grads_only(layer: Module, D: np.ndarray, shape: Optional[tuple[int, ...]]) -> None:
    """``layer``'s parameter gradients for ``D`` without its input gradient: its
    ``parameter_grads[_columns]`` when the class that defines it is the one (or below the one)
    that defines the backward, else the backward with its result dropped (a user's subclass
    that overrides ``backward`` keeps it honoured). ``shape`` None: the batch-first layout."""
    if shape is not None and not layer.native_columns():
        Module.backward_columns(layer, D, shape)
        return
    own, backwards = (("parameter_grads", ("backward",)) if shape is None
                      else ("parameter_grads_columns", ("backward_columns", "forward_columns")))
    for cls in type(layer).__mro__:
        if own in cls.__dict__:
            break
        if any(name in cls.__dict__ for name in backwards):
            own = ""
            break
    if shape is None:
        (layer.parameter_grads if own else layer.backward)(D)
    else:
        (layer.parameter_grads_columns if own else layer.backward_columns)(D, shape)


def _first_with_parameters(layers: list[Module]) -> int:
    """Index of the first layer holding parameters (``len(layers)`` if none does)."""
    return next((i for i, layer in enumerate(layers) if layer.parameters()), len(layers))


def _check_layout(layout: object) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    return layout


class Sequential(Module):
    """Layers applied one after the other.

    Parameters
    ----------
    *layers : Module
        The same instance may appear more than once (e.g. one ``ReLU`` after every layer);
        gradients stay exact.
    layout : {"columns", "batch_first"}, default "columns"
        How :meth:`forward` and :meth:`backward` carry the batch between layers (the
        attribute :attr:`layout` can be changed between passes). ``"columns"``: the batch
        ``x`` of shape ``(N, *sample)`` becomes a column block ``(prod(sample), N)``, every
        layer runs on column blocks (:meth:`~Module.forward_columns`), and the result is
        viewed as ``(N, *out)`` at the end; the backward pass likewise. Sparse products then
        multiply ``N``-wide rows with no transposes between layers, and a convolution followed
        by a ``ReLU`` runs as one product whose rows are stored with the bias added and the
        maximum taken (not for the pair that ends the network, whose output the caller
        holds). ``"batch_first"``: every layer's own :meth:`~Module.forward` on
        ``(N, C, *spatial)`` batches. Both give the same results to rounding. Measured with
        ``benchmarks/bench_network.py --blocked`` (2 threads, float32; ranges over sixteen
        runs on a machine whose speed drifted): inference of a 90%-pruned three-layer
        64-channel CNN 11.6-16.2 ms in columns against 16.3-19.9 ms batch-first; a 90%-pruned
        LeNet-5 training step 3.1-4.0 ms in columns against 3.4-4.4 ms batch-first; the
        unpruned CNN alike in both.

    Notes
    -----
    A layer that rejects its input raises :class:`LayerInputError` naming its position and
    type, so a wrongly shaped batch says where it went wrong. Indexing with an int returns a
    layer; with a slice, a new ``Sequential`` sharing the layers (and the layout).

    Inside another ``Sequential`` a ``Sequential`` runs in whatever layout its container
    passes it (its own ``layout`` applies to its own :meth:`forward`).

    Memory order in the column layout: a block is ``(features, N)`` whatever its strides.
    The CSR kernel (and compiled engines) multiply ``N``-wide rows and want it
    C-contiguous; the factored engine computes on the batch-first view ``X.T`` and wants it
    F-contiguous. Each sparse layer hands its engine the order that engine wants, copying
    only when the block is in the other one (a C-order copy is aligned and made by a tiled
    transpose), and element-wise layers keep the order they are given. The batch enters as
    the transposed view of ``x`` and leaves as the ``(N, *out)`` view of the last block: an
    F-ordered array, not C-contiguous (``np.ascontiguousarray`` makes one where needed;
    batch-first networks ending in ``Linear`` return C-contiguous arrays). So it is
    transposed (copied) at most once on the way in, by the first layer that needs C order; a
    layer after one with the other engine pays one more copy; a chain of factored layers
    (dense layers) pays none.
    """

    # Class default, so that a Sequential pickled before the layout existed unpickles as one.
    _layout = "batch_first"

    def __init__(self, *layers: Module, layout: str = "columns"):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Module instances; argument {i} is {type(layer).__name__}")
        self.layers = list(layers)
        self._layout = _check_layout(layout)

    @property
    def layout(self) -> str:
        """``"columns"`` or ``"batch_first"``: how :meth:`forward` runs its layers (assignable)."""
        return self._layout

    @layout.setter
    def layout(self, value: str) -> None:
        self._layout = _check_layout(value)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for i, layer in enumerate(self.layers):
            yield str(i), layer

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self.layers))

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: Union[int, slice]) -> Union[Module, "Sequential"]:
        if isinstance(index, slice):
            return Sequential(*self.layers[index], layout=self._layout)
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            return self.layers[index]
        raise TypeError(f"Sequential indices must be ints or slices; got {type(index).__name__}")

    def append(self, module: Module) -> "Sequential":
        """Add ``module`` at the end; returns self."""
        if not isinstance(module, Module):
            raise TypeError(f"Sequential.append takes a Module; got {type(module).__name__}")
        self.layers.append(module)
        return self

    def _run(self, i: int, layer: Module, call: Callable[[], Any]) -> Any:
        """``call()`` (layer ``i``'s forward), its input errors re-raised naming the layer."""
        try:
            return call()
        except LayerInputError:
            raise
        except (ValueError, TypeError) as err:
            raise LayerInputError(f"layer {i} ({layer!r}) rejected its input: {err}") from err

    def _open_pass(self) -> list[Module]:
        """Start a fresh pass when this is the outermost call: every stack emptied and opened."""
        if self._pass_open:
            return []
        members = list(self.modules())
        for m in members:
            m._saved.clear()
            m._pass_open = True
        return members

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The network's output for a batch ``x`` of shape ``(N, *sample)``, run in :attr:`layout`."""
        members = self._open_pass()
        try:
            if self._layout == "batch_first":
                for i, layer in enumerate(self.layers):
                    x = self._run(i, layer, lambda layer=layer, x=x: layer.forward(x))
                self._save(np.shape(x))
                return _unshared(x, members)
            x = np.asarray(x)
            if x.ndim < 1:
                raise LayerInputError("x must be a batch of shape (N, ...); got a scalar")
            n, shape = x.shape[0], tuple(x.shape[1:])
            # The columns start as the transposed view of x: the first layer whose engine
            # wants C-contiguous blocks makes the one transpose copy, and a network of
            # factored-engine layers (which compute on that very view) makes none.
            X = x.reshape(n, int(np.prod(shape, dtype=np.int64))).T
            Y, outs = self._forward_layers(X, shape)
            self._save((n, shape, outs), "columns")
            # The output is the (N, *out) view of the last block (F-ordered): no copy, unless
            # the block is one a fused ReLU recorded for its backward.
            return _unshared(Y, members).T.reshape((n, *(outs[-1] if outs else shape)))
        finally:
            for m in members:
                m._pass_open = False

    def _forward_layers(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Every layer on column blocks; the output and each layer's output sample shape.

        A convolution followed by a ``ReLU`` runs as one call (``forward_columns_relu``): the
        bias and the maximum are applied as the product's rows are stored, instead of two more
        passes over the activations, and the ReLU records the output for its backward. Same
        bits as the two calls. (The outermost call copies its output if it is such a block,
        so that a caller editing the output in place cannot change the recorded mask.) A layer
        whose class overrides ``forward``/``backward`` below its column methods runs through
        :meth:`Module.forward_columns` (see :meth:`Module.native_columns`).
        """
        outs: list[tuple[int, ...]] = []
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if (nxt is not None and hasattr(layer, "fuses_relu") and layer.native_columns() and layer.fuses_relu()
                    and hasattr(nxt, "fusable") and nxt.native_columns() and nxt.fusable()):
                X, shape = self._run(i, layer, lambda layer=layer, X=X, shape=shape:
                                     layer.forward_columns_relu(X, shape))
                nxt.record_columns(X, shape)
                outs += [tuple(shape), tuple(shape)]
                i += 2
                continue
            forward = layer.forward_columns if layer.native_columns() else partial(Module.forward_columns, layer)
            X, shape = self._run(i, layer, lambda forward=forward, X=X, shape=shape: forward(X, shape))
            outs.append(tuple(shape))
            i += 1
        return X, outs

    def _backward_layers(self, D: np.ndarray, outs: Optional[list[tuple[int, ...]]],
                         input_grad: bool = True) -> Optional[np.ndarray]:
        """Every layer's backward, last first: column backwards with ``outs`` (each layer's
        output sample shape), the layers' own ``backward`` with ``outs`` None (batch-first).
        Without ``input_grad``, down to the first layer with parameters only, which adds its
        parameter gradients (:func:`_parameter_grads_only`); returns None then."""
        stop = 0 if input_grad else _first_with_parameters(self.layers)
        for i in range(len(self.layers) - 1, stop - 1, -1):
            layer, out = self.layers[i], None if outs is None else outs[i]
            if i == stop and not input_grad:
                _parameter_grads_only(layer, D, out)
                return None
            if out is None:
                D = layer.backward(D)
            else:
                D = layer.backward_columns(D, out) if layer.native_columns() else Module.backward_columns(layer, D, out)
        return D if input_grad else None

    def backward(self, dy: np.ndarray, *, input_grad: bool = True) -> Optional[np.ndarray]:
        """``dJ/dx`` for ``dy = dJ/dy`` of the matching :meth:`forward`, in the layout it ran in.

        Parameters
        ----------
        dy : ndarray of shape (N, *out_shape)
        input_grad : bool, default True
            False: only the parameter gradients are wanted (a training step), and the method
            returns None. The layers before the first one with parameters are not run back
            through, and that layer skips its own input gradient where it is a separate product
            (a convolution's adjoint, ``W.T @ D`` of ``Linear``; see
            :meth:`~Module.parameter_grads`): PyTorch likewise computes no gradient for an
            input that does not require one. The parameter gradients are the same bits as with
            ``input_grad=True``. (The skipped layers' saved inputs are dropped at the next
            forward.)

        Returns
        -------
        ndarray of shape (N, *sample), or None when ``input_grad`` is False
        """
        input_grad = _check_bool(input_grad, "input_grad")
        if self._saved and self._saved[-1][0] == "batch_first":
            out = self._restore()
            # Checked here too: the layers that would check it may all be skipped (input_grad=False).
            if out is not None and np.shape(dy) != out:
                raise ValueError(f"Sequential.backward: dy must have the shape of the matching forward's output, "
                                 f"{out}; got {np.shape(dy)}")
            dx = self._backward_layers(dy, None, input_grad)
            self._release()
            return dx
        n, shape, outs = self._restore("columns")
        out = outs[-1] if outs else shape
        dy = np.asarray(dy)
        if dy.shape != (n, *out):
            raise ValueError(f"Sequential.backward: dy must have the shape of the matching forward's output, "
                             f"{(n, *out)}; got {dy.shape}")
        D = self._backward_layers(np.asarray(dy).reshape(n, int(np.prod(out, dtype=np.int64))).T, outs, input_grad)
        self._release()
        return None if D is None else D.T.reshape((n, *shape))

    def parameter_grads(self, dy: np.ndarray) -> None:
        """:meth:`backward` with ``input_grad=False``."""
        self.backward(dy, input_grad=False)

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """Every layer's :meth:`~Module.forward_columns` in turn (whatever :attr:`layout` says)."""
        members = self._open_pass()
        try:
            Y, outs = self._forward_layers(X, tuple(shape))
            self._save((X.shape[1], tuple(shape), outs), "columns")
        finally:
            for m in members:
                m._pass_open = False
        return _unshared(Y, members), (outs[-1] if outs else tuple(shape))

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Every layer's :meth:`~Module.backward_columns`, last layer first."""
        n, first, outs = self._restore("columns")
        D = self._check_columns_grad(D, shape, n, first, outs)
        D = self._backward_layers(D, outs)
        self._release()
        return D

    @staticmethod
    def _check_columns_grad(D: np.ndarray, shape: tuple[int, ...], n: int, first: tuple[int, ...],
                            outs: list[tuple[int, ...]]) -> np.ndarray:
        """``D`` checked against the matching column forward's output block."""
        out = outs[-1] if outs else first
        D = np.asarray(D)
        if tuple(shape) != out or D.shape != (int(np.prod(out)), n):
            raise ValueError(f"Sequential.backward_columns: D must have the shape of the matching forward's "
                             f"output, ({int(np.prod(out))}, {n}) for samples of shape {out}; got {D.shape} "
                             f"for samples of shape {tuple(shape)}")
        return D

    def parameter_grads_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> None:
        """:meth:`backward_columns` without the input gradient (see :meth:`backward`)."""
        n, first, outs = self._restore("columns")
        self._backward_layers(self._check_columns_grad(D, shape, n, first, outs), outs, input_grad=False)
        self._release()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(input_shape)
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except (ValueError, TypeError) as err:
                raise LayerInputError(f"layer {i} ({layer!r}) rejected input shape {shape}: {err}") from err
        return shape

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"
