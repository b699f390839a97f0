"""The probes of an optimizer step: the filters and their gradients, before and after it.

- :func:`gradient_shift_scalars`: ``diag_grad_shift/L``, ``diag_filter_mean_shift/L``,
  ``diag_filter_var_change/L`` of the convolutions whose filters the optimizer steps;
- :func:`filter_magnitude_scalars`: ``diag_filter_norm/L`` (mean over filters),
  ``diag_deflated/L`` and ``diag_deflated/all`` (share of deflated filters).

The filters of a convolution are its trainable ``v`` (CZM) or ``weight`` (:func:`probed_weight`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from norm_det.diagnostics.filter_magnitude import deflated_fraction, filter_magnitudes
from norm_det.diagnostics.gradient_shift import (
    average_gradient_shift,
    filter_mean_shift,
    filter_variance_change,
)

__all__ = [
    "filter_magnitude_scalars",
    "filters_before_step",
    "gradient_shift_scalars",
    "learning_rates",
    "probed_weight",
]


def probed_weight(module: nn.Module) -> nn.Parameter | None:
    """The trainable filter tensor of a convolution: CZM's ``v``, else ``weight``; or None."""
    parameter = module._parameters.get("v", module._parameters.get("weight"))
    if parameter is None or not parameter.requires_grad:
        return None
    return parameter


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """``id(parameter)`` -> the LR of its parameter group."""
    lrs = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            lrs[id(parameter)] = float(group["lr"])
    return lrs


@torch.no_grad()
def filters_before_step(
    weight_layers: Iterable[tuple[str, nn.Parameter]], lrs: Mapping[int, float]
) -> dict[str, torch.Tensor]:
    """path -> a copy of the filters the optimizer steps (those ``lrs`` has), before the step."""
    return {path: weight.detach().clone() for path, weight in weight_layers if id(weight) in lrs}


def gradient_shift_scalars(
    weights: Mapping[str, nn.Parameter],
    before: Mapping[str, torch.Tensor],
    lrs: Mapping[int, float],
) -> dict[str, float]:
    """The gradient probes of the filters noted ``before`` the step (path -> filters then),
    where they have a gradient; ``lrs`` from :func:`learning_rates`."""
    scalars = {}
    for path, weight_before in before.items():
        weight = weights.get(path)
        if weight is None or weight.grad is None:
            continue
        lr = lrs[id(weight)]
        scalars[f"diag_grad_shift/{path}"] = float(average_gradient_shift(weight.grad, lr))
        scalars[f"diag_filter_mean_shift/{path}"] = float(filter_mean_shift(weight))
        scalars[f"diag_filter_var_change/{path}"] = float(
            filter_variance_change(weight_before, weight.grad, lr)
        )
    return scalars


def filter_magnitude_scalars(
    weights: Mapping[str, nn.Parameter],
    reference: dict[str, torch.Tensor],
    deflation_ratio: float,
) -> dict[str, float]:
    """Filter magnitudes and the share of deflated filters, below ``deflation_ratio`` of their
    ``reference`` magnitude (path -> magnitudes; a path without one gets today's)."""
    scalars = {}
    deflated = total = 0
    for path, weight in weights.items():
        magnitudes = filter_magnitudes(weight)
        reference_magnitudes = reference.setdefault(path, magnitudes.clone())
        share = deflated_fraction(magnitudes, reference_magnitudes, deflation_ratio)
        scalars[f"diag_filter_norm/{path}"] = float(magnitudes.mean())
        scalars[f"diag_deflated/{path}"] = float(share)
        deflated += float(share) * magnitudes.numel()
        total += magnitudes.numel()
    if total:
        scalars["diag_deflated/all"] = deflated / total
    return scalars
