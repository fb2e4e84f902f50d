"""Module, Parameter and Sequential: what every layer and network shares.

A :class:`Module` holds :class:`Parameter` objects (value plus accumulated gradient) and its
forward cache; ``forward(x)`` computes, ``backward(dy)`` returns ``dJ/dx`` and *adds* the
parameter gradients. Checkpoints are ``.npz`` files of named arrays, read without pickle and
written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

__all__ = ["Parameter", "Module", "Sequential", "LayerInputError"]


class LayerInputError(ValueError):
    """A layer of a :class:`Sequential` rejected its input; the message names the layer."""


class Parameter:
    """A trainable array and the gradient accumulated for it.

    Parameters
    ----------
    data : ndarray
        The value, updated in place by optimisers.
    mask : ndarray of bool, optional
        Entries that exist (True). Masked entries stay zero and are not counted by
        :meth:`size`: LeNet-5's C3 connection table is such a mask.
    """

    def __init__(self, data: np.ndarray, mask: Optional[np.ndarray] = None):
        self.data = data
        self.grad = np.zeros_like(data)
        self.mask = mask

    @property
    def size(self) -> int:
        """Number of trainable entries (masked entries excluded)."""
        return int(self.data.size if self.mask is None else np.count_nonzero(self.mask))

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}, size={self.size})"


class Module:
    """Base class of layers and networks.

    Subclasses set ``self.params`` (an ordered dict name -> :class:`Parameter`) and implement
    :meth:`forward`, :meth:`backward` and :meth:`output_shape`.
    """

    params: dict[str, Parameter]

    def __init__(self) -> None:
        self.params = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """One sample's output shape for one sample's input shape (no batch axis)."""
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, p in self.params.items():
            yield prefix + name, p

    def parameters(self) -> list[Parameter]:
        """Every trainable parameter, in a fixed order."""
        return [p for _, p in self.named_parameters()]

    def n_params(self) -> int:
        """Trainable entries over all parameters (masked entries excluded)."""
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, by name (``"3.weight"`` in a Sequential)."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Load parameters saved by :meth:`state_dict` into this module.

        Raises
        ------
        ValueError
            If a name is missing or unexpected, or a shape differs; the message names the
            parameter. Values are converted to each parameter's dtype.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this architecture: missing parameters {missing}, "
                             f"unexpected parameters {unexpected}")
        for name, p in own.items():
            value = np.asarray(state[name])
            if value.shape != p.data.shape:
                raise ValueError(f"checkpoint does not match this architecture: parameter {name!r} has shape "
                                 f"{p.data.shape} in the network but {value.shape} in the checkpoint")
            if p.mask is not None and np.any(value[~p.mask]):
                raise ValueError(f"checkpoint parameter {name!r} has non-zero values where this network's "
                                 f"connection mask has none")
        for name, p in own.items():
            p.data[...] = state[name]

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the parameters to ``path`` (.npz, no pickle).

        The file is written to a temporary name in the same directory and renamed over
        ``path``, so an interrupted save leaves the previous checkpoint intact.
        """
        path = Path(path)
        # mkstemp creates the file 0600; keep the old checkpoint's mode, or the usual 0644.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
        """Read parameters written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as data:
            self.load_state_dict({k: data[k] for k in data.files})

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sequential(Module):
    """Layers applied one after the other.

    Parameters
    ----------
    *layers : Module

    Notes
    -----
    A layer that rejects its input raises :class:`LayerInputError` naming its position and
    type, so a wrongly shaped batch says where it went wrong.
    """

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Module instances; argument {i} is {type(layer).__name__}")
        self.layers = list(layers)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for i, layer in enumerate(self.layers):
            yield from layer.named_parameters(f"{prefix}{i}.")

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def forward(self, x: np.ndarray) -> np.ndarray:
        for i, layer in enumerate(self.layers):
            try:
                x = layer.forward(x)
            except LayerInputError:
                raise
            except (ValueError, TypeError) as err:
                raise LayerInputError(f"layer {i} ({layer!r}) rejected its input: {err}") from err
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

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
