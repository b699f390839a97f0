"""The statistics' schedule, block sizes and second moments.

Part of :mod:`norm_det.layers.deconv` (its docstring has the algorithm).
"""

from __future__ import annotations

import math
import warnings

import torch

from norm_det.layers.isqrt import symmetric_matmul

FREEZE_SCHEDULES = ("ndpp", "iclr2020")


def computes_statistics_at(step: int, freeze_iter: int, schedule: str = "ndpp") -> bool:
    """Whether training step ``step`` (the first training forward is step 1) estimates fresh
    statistics under ``freeze``, with ``f = freeze_iter``.

    - ``"ndpp"``, the ND++ release (``NormalizedDeconv``: the counter is incremented, then the
      statistics are frozen when ``counter % (10 f) > f``): steps ``s`` with
      ``s mod 10f <= f``, i.e. ``1..f`` and then ``f + 1`` of every ``10 f`` steps. At ``f = 1``:
      steps 1, 10, 11, 20, 21, ...; at ``f = 2``: 1, 2, 20, 21, 22, 40, ...
    - ``"iclr2020"``, the Network Deconvolution code (``FastDeconv``: frozen when
      ``counter > f``, tested before the counter is incremented modulo ``10 f``): steps with
      ``(s - 1) mod 10f <= f``, ``f + 1`` of every ``10 f``. At ``f = 1``: 1, 2, 11, 12, 21, ...;
      at ``f = 2``: 1, 2, 3, 21, 22, 23, ...
    """
    if schedule == "ndpp":
        return step % (10 * freeze_iter) <= freeze_iter
    if schedule == "iclr2020":
        return (step - 1) % (10 * freeze_iter) <= freeze_iter
    raise ValueError(f"freeze_schedule must be one of {FREEZE_SCHEDULES}; got {schedule!r}")


def resolve_block(block: int, channels: int, layer: str) -> int:
    """The block size actually used: at most ``channels``, and dividing it.

    A block that does not divide the channels falls back to ``gcd(block, channels)`` with one
    warning (per layer).
    """
    if block < 1:
        raise ValueError(f"{layer}: block must be >= 1; got {block}")
    if block >= channels:
        return channels
    if channels % block:
        fallback = math.gcd(block, channels)
        warnings.warn(
            f"{layer}: block {block} does not divide the {channels} input channels; "
            f"using gcd(block, channels) = {fallback}",
            stacklevel=3,
        )
        return fallback
    return block


def second_moments(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``E[x x^T]`` of the columns of ``data``.

    Args:
        data: ``(batch, mats, F, S)``: ``mats`` independent matrices whose samples are the
            ``batch * S`` columns.

    Returns:
        ``mean`` ``(mats, F)`` and ``E[x x^T]`` ``(mats, F, F)``.
    """
    count = data.shape[0] * data.shape[-1]
    mean = data.sum(dim=(0, -1)) / count
    return mean, _Gram.apply(data) / count


class _Gram(torch.autograd.Function):
    """``sum_batch data @ data^T``: ``(batch, mats, F, S)`` -> ``(mats, F, F)``.

    Autograd would differentiate the two factors separately (two products); the gradient of a
    Gram matrix is one product, ``(G + G^T) @ data``.
    """

    @staticmethod
    def forward(ctx, data: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(data)
        if data.shape[0] == 1:
            return symmetric_matmul(data[0], data[0].transpose(-1, -2))
        return torch.matmul(data, data.transpose(-1, -2)).sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (data,) = ctx.saved_tensors
        return torch.matmul(grad + grad.transpose(-1, -2), data)
