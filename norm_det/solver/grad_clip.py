"""Gradient clipping, applied by the trainer between the after-backward hooks and the step.

``"value"`` clamps each gradient element to ``[-clip_value, clip_value]``; ``"norm"`` rescales
all gradients together so that their ``norm_type``-norm is at most ``clip_value`` (Pascanu et
al., "On the difficulty of training recurrent neural networks", 2013); ``"agc"`` clips each unit's
gradient to ``clip_value`` times its weight's norm (:mod:`norm_det.solver.agc`), which needs the
model's parameter names and so is built with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from norm_det.solver.agc import AdaptiveGradientClipper

__all__ = ["GradientClipper", "build_gradient_clipper"]

# GradientClipper's; "agc" is AdaptiveGradientClipper's.
_GLOBAL_CLIP_TYPES = ("value", "norm")
CLIP_TYPES = (*_GLOBAL_CLIP_TYPES, "agc")


class GradientClipper:
    """Clip the gradients of the parameters it is called with.

    Args:
        clip_type: ``"value"`` or ``"norm"``.
        clip_value: the element bound, or the largest total norm.
        norm_type: the p of the p-norm for ``"norm"`` (``inf`` allowed).

    Calling it returns the total gradient norm before clipping (``"norm"``) or ``None``.
    """

    def __init__(self, *, clip_type: str, clip_value: float, norm_type: float = 2.0) -> None:
        if clip_type not in _GLOBAL_CLIP_TYPES:
            raise ValueError(
                f"clip_type (SOLVER.CLIP_GRADIENTS.CLIP_TYPE) is {clip_type!r}; "
                f"expected one of {CLIP_TYPES}"
                + (" (build 'agc' with build_gradient_clipper(cfg, model))" * (clip_type == "agc"))
            )
        if clip_value <= 0:
            raise ValueError(
                f"clip_value (SOLVER.CLIP_GRADIENTS.CLIP_VALUE) is {clip_value}; expected > 0"
            )
        self.clip_type = clip_type
        self.clip_value = clip_value
        self.norm_type = norm_type

    def __call__(self, parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
        parameters = [p for p in parameters if p.grad is not None]
        if self.clip_type == "value":
            torch.nn.utils.clip_grad_value_(parameters, self.clip_value)
            return None
        return torch.nn.utils.clip_grad_norm_(parameters, self.clip_value, self.norm_type)


def build_gradient_clipper(
    cfg, model: nn.Module | None = None
) -> Callable[[Iterable[nn.Parameter]], torch.Tensor | None] | None:
    """The clipper ``cfg.SOLVER.CLIP_GRADIENTS`` describes, or ``None`` when it is disabled.

    Args:
        cfg: the config.
        model: the model to be trained; required for ``CLIP_TYPE`` ``"agc"`` (its parameter
            names decide ``AGC_EXCLUDE``), unused otherwise.

    Every clipper is called with the parameters (``model.parameters()``) and returns the total
    gradient norm before clipping, or ``None`` (``"value"``).

    Raises:
        ValueError: a bad option (naming its key), or ``"agc"`` without ``model``.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    if clip.CLIP_TYPE == "agc":
        if model is None:
            raise ValueError(
                "SOLVER.CLIP_GRADIENTS.CLIP_TYPE 'agc' clips by parameter name: build the "
                "clipper with the model, build_gradient_clipper(cfg, model)"
            )
        return AdaptiveGradientClipper(
            model,
            clipping=clip.CLIP_VALUE,
            eps=clip.AGC_EPS,
            exclude=tuple(clip.AGC_EXCLUDE),
        )
    return GradientClipper(
        clip_type=clip.CLIP_TYPE, clip_value=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE
    )
