"""Differentiable reductions over the default ``torch.distributed`` process group.

Layers whose statistics are shared across processes (SyncBN, ND/ND++, IterNorm) reduce through
these. With no initialized group, or a group of one, every function is the identity, so the same
model runs unchanged in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def get_world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over all processes (identity without a group)."""
    if get_world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over processes, each process weighted equally."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    return _AllReduceSum.apply(tensor) / world_size


# Whether all_reduce_mean_moments sends upper triangles (the default) or whole matrices, the
# exchange it replaced, kept to measure the two side by side (tools/benchmark_collectives.py).
_UPPER_TRIANGLES = [True]


def send_upper_triangles(enabled: bool) -> None:
    """Choose the moment exchange: upper triangles (True, the default) or whole matrices."""
    _UPPER_TRIANGLES[0] = bool(enabled)


def all_reduce_mean_moments(
    mean: torch.Tensor, outer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable mean over processes of a stack of means and symmetric second moments.

    Args:
        mean: ``(M, F)``; outer: ``(M, F, F)``, symmetric in its last two dimensions (each
            process's ``E[x x^T]``).

    Returns:
        ``(mean, outer)`` averaged over processes, in one all-reduce (one more in backward)
        that carries each matrix's upper triangle only: ``F (F + 1) / 2`` numbers instead of
        ``F^2``, half the traffic at ND++'s ``F = 576``. The result is the full exchange's: the
        mean of symmetric matrices is symmetric, and the gradient reaching an upper element is
        that of both of its copies, which is what the symmetric input's gradient gives.
    """
    if get_world_size() == 1:
        return mean, outer
    if not _UPPER_TRIANGLES[0]:
        packed = all_reduce_mean(torch.cat([mean.flatten(), outer.flatten()]))
        return packed[: mean.numel()].view_as(mean), packed[mean.numel() :].view_as(outer)
    features = outer.shape[-1]
    rows, cols = torch.triu_indices(features, features, device=outer.device)
    upper = outer[:, rows, cols]
    packed = all_reduce_mean(torch.cat([mean.flatten(), upper.flatten()]))
    mean = packed[: mean.numel()].view_as(mean)
    upper = packed[mean.numel() :].view(outer.shape[0], -1)
    full = upper.new_zeros(outer.shape)
    full[:, rows, cols] = upper
    # The strict lower triangle is the transpose of the strict upper one.
    return mean, full + full.triu(1).transpose(-1, -2)
