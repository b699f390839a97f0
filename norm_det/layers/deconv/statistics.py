"""The statistics: their schedule, block sizes, second moments and covariance, and the running
averages a layer keeps of them.

Part of :mod:`norm_det.layers.deconv` (its docstring has the algorithm).
"""

from __future__ import annotations

import math
import warnings

import torch

from norm_det.layers.checks import check_integer, check_one_of
from norm_det.layers.distributed import all_reduce_mean_moments, get_world_size
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


def resolve_block(block: int, channels: int, layer: str, *, stacklevel: int = 3) -> int:
    """The block size actually used: at most ``channels``, and dividing it.

    A block that does not divide the channels falls back to ``gcd(block, channels)`` with one
    warning (per layer), ``stacklevel`` frames up (this function is 1; the default points at the
    code that built the layer calling it), however many helpers lie between.
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
            stacklevel=stacklevel,
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


def _batch_covariance(
    mean: torch.Tensor, outer: torch.Tensor, eps: float, sync: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, Cov)`` with ``Cov = E[x x^T] - mu mu^T + eps I``, from a batch's ``mean``
    ``(mats, F)`` and ``E[x x^T]`` ``(mats, F, F)``; with ``sync`` both moments are first
    averaged over the default process group (differentiably, each process weighted equally)."""
    if sync and get_world_size() > 1:
        # Upper triangles only: E[x x^T] is symmetric (half the bytes, the same numbers).
        mean, outer = all_reduce_mean_moments(mean, outer)
    cov = torch.baddbmm(outer, mean[:, :, None], mean[:, None, :], alpha=-1)
    cov.diagonal(dim1=-2, dim2=-1).add_(eps)
    return mean, cov


class _RunningStatistics:
    """How an ND layer estimates its statistics, and the running averages it keeps of them.

    Buffers: ``running_mean`` ``(mats, F)``, ``running_deconv`` ``(mats, F, F)`` (``D``, averaged
    where it is computed, :meth:`_DeconvMixin._whiten`) and ``num_batches_tracked`` (the freeze
    schedule's step counter: the number of training forwards with a non-empty input, saved in
    the state dict so that a resumed run keeps the schedule).
    """

    eps: float

    def _init_estimation(
        self, momentum: float, freeze: bool, freeze_iter: int, freeze_schedule: str, sync: bool
    ) -> None:
        layer = type(self).__name__
        check_integer(layer, "freeze_iter", freeze_iter, 1)
        check_one_of(layer, "freeze_schedule", freeze_schedule, FREEZE_SCHEDULES)
        self.momentum = momentum
        self.freeze = freeze
        self.freeze_iter = freeze_iter
        self.freeze_schedule = freeze_schedule
        self.sync = sync

    def _register_running_statistics(self, features: int, mats: int, device, dtype) -> None:
        """The buffers for ``mats`` matrices of ``features`` features: ``mu = 0``, ``D = I``."""
        self.features = features
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(mats, features, **factory))
        eye = torch.eye(features, **factory).expand(mats, features, features)
        self.register_buffer("running_deconv", eye.clone())
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def _computes_statistics(self, samples: int) -> bool:
        """Whether this forward estimates fresh statistics (advances the freeze schedule)."""
        if not self.training or samples == 0:
            return False
        self.num_batches_tracked.add_(1)
        if not self.freeze:
            return True
        # Counted as the releases count: the first training forward is step 1.
        step = int(self.num_batches_tracked)
        return computes_statistics_at(step, self.freeze_iter, self.freeze_schedule)

    def _covariance(
        self, mean: torch.Tensor, outer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, Cov)`` from a batch's ``mean`` ``(mats, F)`` and ``E[x x^T]``
        ``(mats, F, F)``, averaged over processes when syncing; updates the running mean."""
        mean, cov = _batch_covariance(mean, outer, self.eps, self.sync)
        # One reduction: any NaN or Inf (or an overflow) makes the sum non-finite.
        if not bool(torch.isfinite(cov.sum())):
            raise FloatingPointError(
                f"{self._describe()}: the covariance of the layer's input is not finite "
                "(NaN or Inf reached this layer); lower the learning rate or check the data"
            )
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
        return mean, cov

    def _statistics(
        self, mean: torch.Tensor | None, cov: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mu, D)`` for :meth:`whitened_weight`: ``D`` None where a batch's ``cov`` gives it;
        the running statistics by default, copied when a graph is recorded: it keeps them for
        the backward, and a later forward of this layer in the same step (a head shared by the
        FPN levels, with fresh statistics on that call) updates them in place."""
        deconv = self.running_deconv if cov is None else None
        if mean is None:
            mean = self.running_mean
            if torch.is_grad_enabled():
                mean = mean.clone()
                deconv = None if deconv is None else deconv.clone()
        return mean, deconv
