"""Putting a new layer in an old one's place: its device, dtype, mode, and its identity.

:func:`_become` is how :func:`norm_det.surgery.convert` and :func:`norm_det.surgery.fuse` change
layers in place, so that a model's module paths, checkpoint keys and every reference to a layer
stay valid.
"""

from __future__ import annotations

import torch
from torch import nn


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor
    return None


def _is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` has parameters and none of them is trained."""
    parameters = list(module.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


def _place_like(new: nn.Module, old: nn.Module, frozen: bool | None = None) -> nn.Module:
    """``new`` on ``old``'s device and dtype and in its mode; frozen as ``old`` (or ``frozen``)."""
    reference = _first_tensor(old)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    if frozen is None:
        frozen = _is_frozen(old)
    if frozen:
        new.requires_grad_(False)
    return new.train(old.training)


def _become(old: nn.Module, new: nn.Module) -> None:
    """Turn the module object ``old`` into ``new``: ``new``'s class and state, ``old``'s identity.

    Every reference to ``old`` (its parents, and plain Python lists and attributes such as
    detectron2's ``FPN.lateral_convs`` or ``FastRCNNConvFCHead.fcs``) then reaches the new layer,
    where assigning the parent's attribute would leave those on the old one. ``new`` must not be
    used afterwards.
    """
    if new is not old:
        old.__class__ = type(new)
        old.__dict__ = new.__dict__
