"""Helpers shared by the tests: rounding bounds in float64, and comparing a model before and after
a conversion."""

from __future__ import annotations

import torch
from torch import nn

# Float64's unit roundoff: tests compare in float64 against bounds in units of it, so that no
# conclusion rests on one processor's float32 summation order (SIMD width, threads, oneDNN).
U64 = 2.0**-53


def two_conv_bound(
    weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, weight_roundings: float = 0
) -> float:
    """Largest difference between two float64 evaluations of ``conv(x, weight) + bias``.

    Each output sums ``n`` = fan-in + 1 terms, none larger than ``max|w| max|x|`` or ``max|b|``; in
    any order a sum errs by at most ``n u`` times the sum of its terms' magnitudes (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §3.1), so two evaluations differ by at most
    ``2 n u`` times ``n`` (max term). ``weight_roundings``: by how many ``u``, relatively, the two
    sides' weights may differ (0 when both use the same weight).

    Args:
        weight: ``(C_out, C_in/groups, kh, kw)``; bias: ``(C_out,)`` or None; x: the input.

    Returns:
        The bound, a Python float.
    """
    n = weight[0].numel() + 1
    largest = weight.detach().abs().max() * x.abs().max()
    if bias is not None:
        largest = torch.maximum(largest, bias.detach().abs().max())
    return (2 * n + weight_roundings) * U64 * n * largest.item()


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like layer (BN, torchvision's or detectron2's FrozenBN) non-trivial
    statistics and affine parameters, so that folding them is really exercised; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not all(
                isinstance(getattr(module, name, None), torch.Tensor)
                for name in ("weight", "bias", "running_mean", "running_var")
            ):
                continue
            c = module.running_mean.numel()
            module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if isinstance(getattr(module, "num_batches_tracked", None), torch.Tensor):
                module.num_batches_tracked.fill_(1000)
    return model.eval()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((output - reference).abs().max() / reference.abs().max()).item()
