"""Batch-Channel Normalization (BCN).

Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", arXiv 1903.10520 (v2, 2020), the BCN section and its micro-batch algorithm.
For ``x: (B, C, H, W)`` BCN is a batch normalization followed by a channel normalization, each
with its own affine:

    x_dot = gamma_b * (x - mu_c) / sqrt(sigma_c^2 + eps) + beta_b,       per channel c,
    y     = gamma_c * GN(x_dot) + beta_c,                                  GN over groups of C,

``GN`` group normalization without affine (mean and population variance over each sample's
``C/G x H x W`` group, the same ``eps``). The batch stage's statistics come from

- ``estimate=False`` (large batches): the batch's own mean and population variance in training,
  differentiated through, as batch norm; in eval running averages (momentum ``r``; the variance
  averaged unbiased, as torch's batch norm does);
- ``estimate=True`` (micro-batch BCN, the paper's algorithm for one or two images per GPU): the
  *estimated* statistics ``mu_hat, sigma_hat^2`` in training too, never differentiated through
  (the paper: they are not updated by the gradients), each forward first updating them with the
  batch:

      mu_hat      <- mu_hat      + r * (mean_{b,h,w}(x)             - mu_hat),
      sigma_hat^2 <- sigma_hat^2 + r * (mean_{b,h,w}((x - mu_hat)^2) - sigma_hat^2),

  the spread taken about the estimate ``mu_hat``, not the batch mean. This layer centres it on
  the estimate just updated, so that ``r = 1`` gives exactly the batch's statistics (which
  :mod:`norm_det.engine.precise_statistics` relies on); the release's ``EstBN`` centres on the
  estimate before the update (the updated variances differ by ``r^2 (2 - r) (mean - mu_hat)^2``).
  Eval uses the estimates as they are.

The estimates are the ``running_mean`` / ``running_var`` buffers in both modes, updated as
``running = (1 - r) running + r batch`` with ``r = momentum``. ``momentum = 0.1`` is batch
norm's; the release (``BCNorm`` / ``EstBN`` in github.com/joe-siyuan-qiao/Batch-Channel-
Normalization) keeps the rate in a buffer the training script sets. The release's channel stage
has one affine pair per group; here it has one per channel, as the paper's ``gamma_c, beta_c``
(a per-group affine is the special case of equal values within a group). ``groups = 32`` and
``eps = 1e-5`` are the release's.

No fold into the preceding convolution: the channel stage normalizes each sample by its own
statistics. In eval the batch stage is a fixed per-channel affine, so :meth:`~BatchChannelNorm2d.
fuse` gives torch's own ``BatchNorm2d`` (eval statistics) and ``GroupNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.checks import check_feature_maps, check_fraction, check_positive
from norm_det.layers.group_norm import DEFAULT_GROUPS, resolve_groups


class BatchChannelNorm2d(nn.Module):
    """Batch normalization, then group normalization, each with a per-channel affine.

    Args:
        num_channels: ``C`` of the input ``(N, C, H, W)``.
        groups: groups of the channel stage; see :func:`norm_det.layers.group_norm.
            resolve_groups` (the default 32 falls back to a divisor of ``C`` with a warning
            unless ``strict``).
        eps: added to both stages' variances.
        momentum: ``r``, the update rate of the running (estimated) statistics, in ``[0, 1]``.
        estimate: micro-batch BCN: normalize by the estimated statistics in training too.
        strict: the group count was asked for: refuse one that does not divide ``C``.

    Parameters: ``batch_weight``, ``batch_bias`` (``gamma_b``, ``beta_b``) and ``weight``,
    ``bias`` (``gamma_c``, ``beta_c``), all ``(C,)``. Buffers: ``running_mean``,
    ``running_var`` ``(C,)``.

    Shapes: ``(N, C, H, W)`` -> ``(N, C, H, W)``.
    """

    _abbr_ = "bcn"
    _no_weight_decay = ("weight", "bias", "batch_weight", "batch_bias")

    def __init__(
        self,
        num_channels: int,
        *,
        groups: int = DEFAULT_GROUPS,
        eps: float = 1e-5,
        momentum: float = 0.1,
        estimate: bool = False,
        strict: bool = False,
    ) -> None:
        super().__init__()
        check_fraction("BatchChannelNorm2d", "momentum", momentum)
        check_positive("BatchChannelNorm2d", "eps", eps)
        self.num_channels = num_channels
        self.num_groups = resolve_groups(
            num_channels, groups, strict, "BatchChannelNorm2d", ("BCN+WS",)
        )
        self.eps = eps
        self.momentum = momentum
        self.estimate = estimate
        self.batch_weight = nn.Parameter(torch.ones(num_channels))
        self.batch_bias = nn.Parameter(torch.zeros(num_channels))
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    @torch.no_grad()
    def _update_estimates(self, x: torch.Tensor) -> None:
        """The micro-batch update of ``running_mean`` and ``running_var`` from ``x``."""
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        self.running_mean.lerp_(mean.to(self.running_mean), self.momentum)
        # E[(x - m)^2] = Var[x] + (E[x] - m)^2: the spread about the estimate in one pass.
        spread = var.to(self.running_var) + (mean.to(self.running_mean) - self.running_mean) ** 2
        self.running_var.lerp_(spread, self.momentum)

    def _batch_stage(self, x: torch.Tensor) -> torch.Tensor:
        batch_statistics = self.training and not self.estimate and x.numel() > 0
        mean, var = self.running_mean, self.running_var
        if self.training and self.estimate and x.numel() > 0:
            self._update_estimates(x)
            # The graph keeps what it normalized by; the next call (a head shared by the FPN
            # levels) updates the buffers in place before this one's backward.
            mean, var = mean.clone(), var.clone()
        return F.batch_norm(
            x,
            mean,
            var,
            self.batch_weight,
            self.batch_bias,
            training=batch_statistics,
            momentum=self.momentum,
            eps=self.eps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_maps(self, x, self.num_channels)
        return F.group_norm(self._batch_stage(x), self.num_groups, self.weight, self.bias, self.eps)

    def folded_affine(self) -> None:
        """None: the channel stage normalizes each sample by its own statistics, so the layer
        is no affine map to fold into the convolution (see :mod:`norm_det.layers`)."""
        return None

    @torch.no_grad()
    def fuse(self) -> nn.Sequential:
        """The eval computation as torch's ``BatchNorm2d`` (running statistics) and ``GroupNorm``.

        Nothing folds into the preceding convolution: the group stage is per sample.
        """
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        batch = nn.BatchNorm2d(self.num_channels, self.eps, self.momentum, **factory)
        channel = nn.GroupNorm(self.num_groups, self.num_channels, self.eps, **factory)
        batch.weight.copy_(self.batch_weight)
        batch.bias.copy_(self.batch_bias)
        batch.running_mean.copy_(self.running_mean)
        batch.running_var.copy_(self.running_var)
        channel.weight.copy_(self.weight)
        channel.bias.copy_(self.bias)
        return nn.Sequential(batch, channel).eval()

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, "
            f"momentum={self.momentum}, estimate={self.estimate}"
        )


__all__ = ["BatchChannelNorm2d"]
