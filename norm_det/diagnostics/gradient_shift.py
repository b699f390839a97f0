"""The shift of the average gradient, per convolution (the PWS paper's probes).

Liu et al., "Delving into Variance Transmission and Normalization: Shift of Average Gradient
Makes the Network Collapse" (the PWS paper), Figure 1 and eqs. 14-15. For filter ``o`` of a
layer with ``n = k*k*C_in`` elements, ``E[Y_o] = n E[W_o] E[X]``, so filters whose means drift
apart add ``E^2[X] Var_o[n E[W_o]]`` to the output variance, layer after layer. The means move
only through the gradients' means, ``Delta W = LR * grad W``. Probes, per layer:

- ``Var_o[n E[Delta W_o]]`` (Figure 1b): the shift of the average gradient in one step;
- ``Var_o[n E[W_o]]``: the shift accumulated in the filters (0 at a zero-mean initialisation);
- ``mean_o Var[W_o - Delta W_o] / Var[W_o]`` (Figure 1a): how much a step changes each filter's
  variance (near 1 even when the network collapses, the paper's point).

``Var_o`` is the population variance over the layer's filters; ``E`` and ``Var`` inside a filter
run over its ``n`` elements. PWS (``E[grad W_o] = 0``, eq. 13), BN and GN suppress the shift.
All are computed in float64 (a shift that vanishes in exact arithmetic, as under PWS, then stays
at float64 rounding instead of float32's).
"""

from __future__ import annotations

import torch

__all__ = ["average_gradient_shift", "filter_mean_shift", "filter_variance_change"]


def _filter_means(tensor: torch.Tensor) -> torch.Tensor:
    """``(C_out, ...) -> (C_out,)``: the mean over each filter's elements, float64."""
    return tensor.detach().flatten(1).double().mean(dim=1)


def filter_mean_shift(weight: torch.Tensor) -> torch.Tensor:
    """``Var_o[n E[W_o]]`` of a weight ``(C_out, C_in/groups, k, k)``: float64 scalar."""
    n = weight[0].numel()
    return (n * _filter_means(weight)).var(unbiased=False)


def average_gradient_shift(grad: torch.Tensor, lr: float) -> torch.Tensor:
    """``Var_o[n E[LR * grad W_o]]`` of a gradient ``(C_out, C_in/groups, k, k)``: float64."""
    return filter_mean_shift(lr * grad.detach().double())


def filter_variance_change(weight: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """``mean_o Var[W_o - LR grad W_o] / Var[W_o]`` (``weight`` before the step): float64 scalar.

    Filters with zero variance (constant filters) are left out of the mean.
    """
    weight = weight.detach().flatten(1).double()
    before = weight.var(dim=1, unbiased=False)
    after = (weight - lr * grad.detach().flatten(1).double()).var(dim=1, unbiased=False)
    varying = before > 0
    if not bool(varying.any()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=weight.device)
    return (after[varying] / before[varying]).mean()
