"""Fold every norm and reparametrization of a model into plain layers, for inference."""

from __future__ import annotations

import torch
from torch import nn

from norm_det.surgery.pairs import _is_sibling_pair
from norm_det.surgery.placement import _become
from norm_det.surgery.queries import attached_norm, fold_affine_into, folded_affine, is_conv
from norm_det.surgery.residual import _remove_residual_input_hooks


def _fold_into(conv: nn.Conv2d, norm: nn.Module) -> bool:
    """Fold ``norm``'s eval transform into the plain convolution ``conv``, in place.

    Returns:
        False (``conv`` unchanged) when ``norm``'s transform depends on the sample (GN) or mixes
        channels across the groups of a grouped convolution.
    """
    affine = folded_affine(norm)
    if affine is None or (affine[0].dim() == 2 and conv.groups != 1):
        return False
    weight, bias = fold_affine_into(
        conv.weight, None if conv.bias is None else conv.bias, *(t.detach() for t in affine)
    )
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)
    return True


def _fused_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as the model's plain class, its own norm folded in where the math allows."""
    fused = conv.fuse() if hasattr(conv, "fuse") else conv
    norm = attached_norm(fused)
    if norm is not None and _fold_into(fused, norm):
        fused.norm = None
    _fuse_children(fused)  # what it still applies: a sample-dependent norm, the activation
    return fused


def _fuse_children(parent: nn.Module) -> None:
    children = [child for _, child in parent.named_children()]
    index = 0
    while index < len(children):
        child = children[index]
        if is_conv(child):
            _become(child, _fused_conv(child))
            following = children[index + 1] if index + 1 < len(children) else None
            if _is_sibling_pair(child, following) and _fold_into(child, following):
                _become(following, nn.Identity())
                index += 1
        elif hasattr(child, "fuse") and not any(True for _ in child.children()):
            _become(child, child.fuse())
        else:
            _fuse_children(child)
        index += 1


@torch.no_grad()
def fuse(model: nn.Module) -> nn.Module:
    """Fold every norm and reparametrization of ``model`` into plain layers, for inference.

    The model is put in eval mode; conv+norm pairs whose norm has a fixed eval transform
    (BN, FrozenBN, IterNorm) become one convolution, also where the convolution holds the norm
    itself (detectron2's ``Conv2d``: its ``norm`` becomes None); reparametrized layers (WS, PWS,
    ND, CZM) become the plain layer they compute, in the model's own convolution class;
    sample-dependent norms (GN) become torch's own class. Outputs in eval mode are unchanged up
    to rounding, and no norm_det class or hook is left (the fused ND++ convolution keeps the
    standardization of its input, a picklable pre-hook of norm_det's own, which it needs).

    Returns:
        The fused model (a new module only when ``model`` itself is a single layer).
    """
    model.eval()
    if is_conv(model):
        return _fused_conv(model).eval()
    if hasattr(model, "fuse") and not any(True for _ in model.children()):
        return model.fuse().eval()
    _fuse_children(model)
    _remove_residual_input_hooks(model)
    # Layers' fuse() may build modules in training mode (a FrozenBN's BatchNorm2d included).
    return model.eval()
