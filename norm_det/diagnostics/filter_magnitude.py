"""Filter magnitudes and the share of deflated filters (the mean-shift-rejection probes).

Ruff, Beck & Bach, "Mean Shift Rejection: Training Deep Neural Networks Without Minibatch
Statistics or Normalization", 2019, sections 2 and 3.4. Under a normalization that makes a
filter's scale irrelevant, weight decay shrinks the filter while its effective learning rate
grows as ``1 / ||W||^2``; some filters enter a runaway *deflation* and stop learning usefully
(about 25 % of a BN ResNet-110's filters on CIFAR-10). CZM's unity magnitude anchoring keeps
``||V_f||`` near 1 instead.

A filter counts as deflated here when its L2 magnitude has fallen below ``ratio`` times a
reference, by default its magnitude at the start of training (the paper gives no threshold).
"""

from __future__ import annotations

import torch

__all__ = ["deflated_fraction", "filter_magnitudes"]


def filter_magnitudes(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output filter, in float64: ``(C_out, ...) -> (C_out,)``."""
    return torch.linalg.vector_norm(weight.detach().flatten(1).double(), dim=1)


def deflated_fraction(
    magnitudes: torch.Tensor, reference: torch.Tensor | float, ratio: float
) -> torch.Tensor:
    """Share of filters with ``magnitude < ratio * reference``: scalar in ``[0, 1]``.

    Args:
        magnitudes: ``(C_out,)``.
        reference: ``(C_out,)`` per filter (e.g. the initial magnitudes) or one number.
        ratio: the deflation threshold, a fraction of the reference.
    """
    if not ratio > 0:
        raise ValueError(f"deflated_fraction: ratio must be > 0; got {ratio}")
    return (magnitudes < ratio * reference).double().mean()
