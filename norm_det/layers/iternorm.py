"""Iterative normalization: group-wise whitening by Newton's iteration.

Huang et al., "Iterative Normalization: Beyond Standardization towards Efficient Whitening",
CVPR 2019, section 3 and Algorithm 1. Channels are split into contiguous groups (64 channels
each by default); per group, over the ``m = N*H*W`` positions,

    Sigma = eps I + X_c X_c^T / m,   Sigma_N = Sigma / tr(Sigma),   P_0 = I,
    P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N,   whitening = P_T / sqrt(tr(Sigma)),
    y = gamma * (whitening @ (x - mu)) + beta.

Training uses the batch's ``mu`` and whitening matrix (differentiated through, section 3.2) and
updates running averages of both (eq. 8); eval uses the running ones, so the layer is then a
fixed 1x1 convolution that folds into the convolution before it.

Like the release's ``IterNorm`` (``extension/normailzation/iterative_normalization.py`` of
github.com/huangleiBuaa/IterNorm-pytorch, whose ``dim`` is 4 or 2), the layer takes
``(N, C, H, W)`` feature maps and ``(N, C)`` features (the rows are the samples, ``m = N``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.checks import check_integer, check_one_of
from norm_det.layers.deconv import resolve_block, second_moments
from norm_det.layers.distributed import all_reduce_mean, get_world_size
from norm_det.layers.isqrt import BACKENDS, inverse_sqrt
from norm_det.layers.norm_state import init_norm_state


def group_covariance(
    x: torch.Tensor, groups: int, eps: float, sync: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu (G, c), Sigma (G, c, c))`` of ``x: (N, C, H, W)`` over its ``N*H*W`` positions.

    Per group of ``c = C / G`` contiguous channels, ``Sigma = eps I + X_c X_c^T / m``; with
    ``sync`` the moments are averaged over the default process group (no-op without one).
    """
    n, channels, height, width = x.shape
    data = x.reshape(n, groups, channels // groups, height * width)
    mean, outer = second_moments(data)
    if sync and get_world_size() > 1:
        packed = all_reduce_mean(torch.cat([mean.flatten(), outer.flatten()]))
        mean = packed[: mean.numel()].view_as(mean)
        outer = packed[mean.numel() :].view_as(outer)
    eye = torch.eye(channels // groups, dtype=outer.dtype, device=outer.device)
    return mean, outer - mean[:, :, None] * mean[:, None, :] + eps * eye


class IterNorm(nn.Module):
    """Group-wise whitening of ``(N, C, H, W)`` or ``(N, C)`` activations with ``T`` Newton
    iterations.

    Args:
        num_features: channels ``C``.
        group_channels: channels per whitening group (contiguous); at most ``C``, the gcd with a
            warning when it does not divide ``C``.
        iters: Newton-Schulz iterations ``T``.
        eps: added to the covariance diagonal.
        momentum: of the running mean and running whitening matrix.
        affine: learn the per-channel ``gamma`` (``weight``) and ``beta`` (``bias``).
        sync: average the batch moments over the default process group (no-op without one).
        isqrt_backend: see :func:`norm_det.layers.isqrt.inverse_sqrt`.

    Shapes: ``(N, C, H, W)`` -> ``(N, C, H, W)``; ``(N, C)`` -> ``(N, C)``, computed as the
    ``(N, C, 1, 1)`` input.
    """

    _abbr_ = "iternorm"
    _no_weight_decay = ("weight", "bias")

    def __init__(
        self,
        num_features: int,
        group_channels: int = 64,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        sync: bool = False,
        isqrt_backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_integer("IterNorm", "iters", iters, 1)
        check_one_of("IterNorm", "isqrt_backend", isqrt_backend, BACKENDS)
        factory = {"device": device, "dtype": dtype}
        self.group_channels = resolve_block(group_channels, num_features, "IterNorm")
        self.num_groups = num_features // self.group_channels
        self.iters = iters
        self.sync = sync
        self.isqrt_backend = isqrt_backend
        init_norm_state(self, num_features, eps=eps, momentum=momentum, affine=affine, **factory)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        eye = torch.eye(self.group_channels, **factory)
        self.register_buffer("running_wm", eye.expand(self.num_groups, -1, -1).clone())

    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu (C,), whitening (G, c, c))`` of the batch; updates the running averages."""
        mean, sigma = group_covariance(x, self.num_groups, self.eps, self.sync)
        if not bool(torch.isfinite(sigma.sum())):
            raise FloatingPointError(
                f"IterNorm({self.extra_repr()}): the covariance of the layer's input is not "
                "finite (NaN or Inf reached this layer); lower the learning rate or check the data"
            )
        whitening = inverse_sqrt(sigma, self.iters, "newton_schulz", self.isqrt_backend)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().flatten(), self.momentum)
            self.running_wm.lerp_(whitening.detach(), self.momentum)
        return mean.flatten(), whitening

    def _affine_1x1(
        self, mean: torch.Tensor, whitening: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer as a grouped 1x1 convolution: weight ``(C, c, 1, 1)``, bias ``(C,)``."""
        weight = whitening.reshape(self.num_features, self.group_channels)
        grouped_mean = mean.view(self.num_groups, self.group_channels, 1)
        bias = -torch.matmul(whitening, grouped_mean).flatten()
        if self.affine:
            weight = weight * self.weight[:, None]
            bias = bias * self.weight + self.bias
        return weight[:, :, None, None], bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 4) or x.shape[1] != self.num_features:
            raise ValueError(
                f"IterNorm({self.extra_repr()}): expected (N, {self.num_features}, H, W) or "
                f"(N, {self.num_features}) input; got {tuple(x.shape)}"
            )
        maps = x if x.dim() == 4 else x[:, :, None, None]
        if self.training and x.numel() > 0:
            mean, whitening = self._batch_statistics(maps)
        else:
            mean, whitening = self.running_mean, self.running_wm
        weight, bias = self._affine_1x1(mean, whitening)
        out = F.conv2d(maps, weight, bias, groups=self.num_groups)
        return out if x.dim() == 4 else out.view_as(x)

    @torch.no_grad()
    def folded_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval transform ``y = scale @ x + shift``: ``scale`` ``(C, C)`` block diagonal."""
        weight, bias = self._affine_1x1(self.running_mean, self.running_wm)
        blocks = weight.view(self.num_groups, self.group_channels, self.group_channels)
        return torch.block_diag(*blocks), bias

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The eval transform as a plain grouped 1x1 ``nn.Conv2d`` (a lone IterNorm)."""
        weight, bias = self._affine_1x1(self.running_mean, self.running_wm)
        conv = nn.Conv2d(
            self.num_features, self.num_features, 1, groups=self.num_groups, bias=True
        ).to(weight)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, group_channels={self.group_channels}, iters={self.iters}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, sync={self.sync}"
        )


__all__ = ["IterNorm", "group_covariance"]
