"""What the batch-statistics norms (CBN, MABN, IterNorm) set up and compute alike.

Each keeps BatchNorm2d's names for what BatchNorm2d also has: ``num_features``, ``eps``,
``momentum``, ``affine`` and the per-channel affine parameters ``weight`` (ones) and ``bias``
(zeros), so that a BatchNorm2d checkpoint's affine parameters load into any of them.
"""

from __future__ import annotations

import torch
from torch import nn


def register_affine(module: nn.Module, num_features: int, affine: bool, **factory) -> None:
    """BN's per-channel ``weight`` (ones) and ``bias`` (zeros), or both None."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features, **factory))
        module.bias = nn.Parameter(torch.zeros(num_features, **factory))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def init_norm_state(
    module: nn.Module, num_features: int, *, eps: float, momentum: float, affine: bool, **factory
) -> None:
    """Set BN's hyper-parameters on ``module`` and register its affine parameters.

    The arguments are checked by the caller, which knows their ranges; ``factory``: the
    ``device`` and ``dtype`` of the parameters.
    """
    module.num_features = num_features
    module.eps = eps
    module.momentum = momentum
    module.affine = affine
    register_affine(module, num_features, affine, **factory)


def inverse_std_scale(var: torch.Tensor, eps: float, weight: torch.Tensor | None) -> torch.Tensor:
    """``weight / sqrt(var + eps)`` per channel (``1 / sqrt(var + eps)`` without a weight)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    return scale


__all__ = ["init_norm_state", "inverse_std_scale", "register_affine"]
