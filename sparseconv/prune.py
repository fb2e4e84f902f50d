"""Magnitude pruning of a network's convolutions, kept in the sparse matrices.

A pruned convolution weight is left out of the layer's matrix altogether: the layer is rebuilt
with a ``weight_mask`` (True: kept), so its matrix stores only the kept taps, its products skip
the others and its kernel gradient is zero there (an optimiser then keeps them at zero; this
is how a pruned network is fine-tuned with its mask fixed).

- :func:`magnitude_masks` chooses what to keep: the largest weights by magnitude, over the
  whole network (``scope="global"``) or layer by layer (``"layer"``), element by element or
  by whole filters or input channels (``structure``).
- :func:`apply_masks` returns a copy of the network with those masks in its layers.
- :func:`prune` does both; :func:`mask_summary` counts what is kept and stored.

Sparsity is the fraction of the pruned layers' kernel weights that are absent, counting
weights already masked (a connection table such as LeNet-5's C3, an earlier pruning) as
absent, so masks only grow and ``prune(prune(net, 0.5)[0], 0.9)`` is 90% sparse. Biases and
dense ``Linear`` layers are not pruned.
"""

from __future__ import annotations

import copy
from numbers import Real
from typing import Iterator

import numpy as np

from .nn import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, Module, Sequential

__all__ = ["PRUNABLE", "SCOPES", "STRUCTURES", "magnitude_masks", "apply_masks", "prune", "mask_summary"]

#: Layer types :func:`prune` can mask (they take a ``weight_mask``). Convolutions and transposed
#: convolutions leave masked taps out of their matrices.
PRUNABLE: tuple[type, ...] = (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d)
#: ``scope`` values: one threshold for every pruned layer, or the sparsity in each layer.
SCOPES = ("global", "layer")
#: ``structure`` values: single weights, whole output filters (weight axis 0) or whole input
#: channels (weight axis 1).
STRUCTURES = ("element", "filter", "channel")


def _prunable_layers(network: Module, prefix: str = "") -> Iterator[tuple[str, Module]]:
    """``(weight name, layer)`` for each prunable layer, names as in ``network.state_dict()``."""
    if isinstance(network, Sequential):
        for i, layer in enumerate(network):
            yield from _prunable_layers(layer, f"{prefix}{i}.")
    elif isinstance(network, PRUNABLE):
        yield prefix + "weight", network


def _existing(layer: Module) -> np.ndarray:
    mask = layer.weight_mask
    return np.ones(layer.params["weight"].data.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def _check_sparsity(sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0 <= float(sparsity) <= 1:
        raise ValueError(f"sparsity must be a number in [0, 1]; got {sparsity!r}")
    return float(sparsity)


def _prune_smallest(scores: np.ndarray, existing: np.ndarray, n_absent: int) -> np.ndarray:
    """Kept mask: ``existing`` minus its smallest scores, until ``n_absent`` entries are absent.

    Ties are broken by position (a stable sort), so the result is deterministic.
    """
    keep = existing.copy()
    more = n_absent - int(np.count_nonzero(~existing))
    if more > 0:
        flat_keep = keep.reshape(-1)
        candidates = np.flatnonzero(flat_keep)
        order = np.argsort(scores.reshape(-1)[candidates], kind="stable")
        flat_keep[candidates[order[:more]]] = False
    return keep


def _structured(weight: np.ndarray, existing: np.ndarray, sparsity: float, axis: int) -> np.ndarray:
    """Drop the ``round(sparsity * units)`` units (slices along ``axis``) of smallest L2 norm."""
    w = np.where(existing, weight, 0).astype(np.float64)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    norms = np.sqrt(np.einsum("ij,ij->i", moved, moved))
    n_drop = int(round(sparsity * w.shape[axis]))
    drop = np.argsort(norms, kind="stable")[:n_drop]
    keep = existing.copy()
    index = [slice(None)] * w.ndim
    index[axis] = drop
    keep[tuple(index)] = False
    return keep


def magnitude_masks(network: Module, sparsity: float, *, scope: str = "global",
                    structure: str = "element") -> dict[str, np.ndarray]:
    """Which convolution weights to keep to reach ``sparsity``, by magnitude.

    Parameters
    ----------
    network : Module
        A layer or :class:`~sparseconv.nn.Sequential`; its :data:`PRUNABLE` layers are pruned.
    sparsity : float in [0, 1]
        Fraction of the pruned layers' kernel weights to be absent (already masked weights
        count as absent; nothing is un-pruned). 1 prunes everything.
    scope : {"global", "layer"}, default "global"
        ``"global"``: the smallest ``|w|`` over all pruned layers go first, so layers end up
        with different sparsities. ``"layer"``: every layer reaches ``sparsity`` on its own.
    structure : {"element", "filter", "channel"}, default "element"
        ``"filter"`` / ``"channel"`` drop whole output filters / input channels (weight axis
        0 / 1) of smallest L2 norm, ``round(sparsity * count)`` of them per layer (needs
        ``scope="layer"``); the weights they hold add to the masks already there.

    Returns
    -------
    dict of str to ndarray of bool
        Per pruned weight, by parameter name (``"4.weight"``), the kept mask of the weight's
        shape. Ties in magnitude are broken by position.

    Raises
    ------
    ValueError
        For a sparsity outside [0, 1], an unknown scope or structure, a structured global
        pruning, or a network with no prunable layer.
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}; got {structure!r}")
    if structure != "element" and scope != "layer":
        raise ValueError(f"structure={structure!r} prunes whole filters or channels layer by layer: "
                         "pass scope='layer'")
    layers = list(_prunable_layers(network))
    if not layers:
        raise ValueError(f"network has no layer to prune: pruning masks {', '.join(c.__name__ for c in PRUNABLE)} "
                         f"layers; got {network!r}")
    if structure != "element":
        axis = 0 if structure == "filter" else 1
        return {name: _structured(layer.params["weight"].data, _existing(layer), sparsity, axis)
                for name, layer in layers}
    if scope == "layer":
        return {name: _prune_smallest(np.abs(layer.params["weight"].data), _existing(layer),
                                      int(round(sparsity * layer.params["weight"].data.size)))
                for name, layer in layers}
    weights = [layer.params["weight"].data for _, layer in layers]
    flat_scores = np.concatenate([np.abs(w).astype(np.float64).ravel() for w in weights])
    flat_existing = np.concatenate([_existing(layer).ravel() for _, layer in layers])
    keep = _prune_smallest(flat_scores, flat_existing, int(round(sparsity * flat_scores.size)))
    out, start = {}, 0
    for (name, _), w in zip(layers, weights):
        out[name] = keep[start:start + w.size].reshape(w.shape)
        start += w.size
    return out


def _masked_copy(layer: Module, keep: np.ndarray) -> Module:
    """A copy of a convolution layer with ``weight_mask=keep``, rebuilt for the shape it had."""
    new = copy.deepcopy(layer)
    new.set_weight_mask(keep)
    if layer.op is not None:
        new.build(tuple(layer.op.input_shape))
    return new


def _rebuild(network: Module, masks: dict[str, np.ndarray], prefix: str, used: set) -> Module:
    if isinstance(network, Sequential):
        return Sequential(*(_rebuild(layer, masks, f"{prefix}{i}.", used) for i, layer in enumerate(network)),
                          layout=network.layout)
    name = prefix + "weight"
    if isinstance(network, PRUNABLE) and name in masks:
        used.add(name)
        return _masked_copy(network, masks[name])
    return copy.deepcopy(network)


def apply_masks(network: Module, masks: dict[str, np.ndarray]) -> Module:
    """A copy of ``network`` whose named convolution layers keep only the ``masks``' True weights.

    Parameters
    ----------
    network : Module
        A layer or :class:`~sparseconv.nn.Sequential`; left unchanged.
    masks : dict of str to ndarray of bool
        By weight name (``"4.weight"``, as :func:`magnitude_masks` returns), the kept mask of
        the weight's shape. A mask may only drop weights: it must be False wherever the layer
        already has no weight.

    Returns
    -------
    Module
        The copy; each masked layer's operator is rebuilt with the mask (for the input shape
        it had been built for), so its matrix stores only the kept taps, and the dropped
        weights are set to zero. Other layers are plain copies.

    Raises
    ------
    ValueError
        For a name that is not a prunable weight of ``network``, a mask of the wrong shape or
        dtype, or one that keeps a weight the layer does not have; nothing is changed.
    """
    if not isinstance(network, Module):
        raise TypeError(f"network must be a sparseconv Module; got {type(network).__name__}")
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict of weight name to bool array; got {type(masks).__name__}")
    layers = dict(_prunable_layers(network))
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(f"masks names {name!r}, which is not a prunable weight of the network; "
                             f"prunable weights: {sorted(layers)}")
        mask = np.asarray(mask)
        shape = layers[name].params["weight"].data.shape
        if mask.dtype != bool or mask.shape != shape:
            raise ValueError(f"mask {name!r} must be a bool array of shape {shape}; got {mask.dtype} array of "
                             f"shape {mask.shape}")
        if np.any(mask & ~_existing(layers[name])):
            raise ValueError(f"mask {name!r} keeps weights that the layer does not have (masked by its connection "
                             "table or an earlier pruning); a mask can only drop weights")
    used: set = set()
    out = _rebuild(network, {k: np.asarray(v) for k, v in masks.items()}, "", used)
    assert used == set(masks)
    return out


def prune(network: Module, sparsity: float, *, scope: str = "global",
          structure: str = "element") -> tuple[Module, dict[str, np.ndarray]]:
    """Magnitude-prune ``network``'s convolutions to ``sparsity``: :func:`magnitude_masks` then :func:`apply_masks`.

    Parameters
    ----------
    network : Module
        Left unchanged.
    sparsity : float in [0, 1]
    scope : {"global", "layer"}, default "global"
    structure : {"element", "filter", "channel"}, default "element"
        See :func:`magnitude_masks`.

    Returns
    -------
    pruned : Module
        A copy whose convolution matrices store only the kept taps.
    masks : dict of str to ndarray of bool
        The kept masks by weight name.

    Examples
    --------
    >>> import numpy as np
    >>> from sparseconv.models import lenet5
    >>> from sparseconv.prune import mask_summary, prune
    >>> pruned, masks = prune(lenet5(), 0.9)
    >>> summary = mask_summary(pruned)
    >>> round(1 - summary["kept"] / summary["weights"], 3)
    0.9
    """
    masks = magnitude_masks(network, sparsity, scope=scope, structure=structure)
    return apply_masks(network, masks), masks


def mask_summary(network: Module) -> dict:
    """What the prunable layers keep and store.

    Parameters
    ----------
    network : Module

    Returns
    -------
    dict
        ``weights`` (kernel weights of the prunable layers, masked ones included), ``kept``
        (weights present), ``entries`` (stored entries of their sparse matrices, for the
        input shapes they are built for; unbuilt layers count 0) and ``layers``: per weight
        name a dict with the same three counts.
    """
    layers = {}
    for name, layer in _prunable_layers(network):
        op = getattr(layer, "op", None)
        layers[name] = dict(weights=int(layer.params["weight"].data.size),
                            kept=int(np.count_nonzero(_existing(layer))),
                            entries=0 if op is None else int(op.nnz))
    totals = {key: sum(v[key] for v in layers.values()) for key in ("weights", "kept", "entries")}
    return {**totals, "layers": layers}
