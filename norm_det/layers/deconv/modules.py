"""The layers: :class:`DeconvConv2d`, :class:`DeconvLinear`, :class:`DeconvConvTranspose2d`.

Every forward is ND++'s Algorithm 1 in the paper's order (the package docstring has the exact
semantics):

1. ``S``: standardize each sample (ND++'s scale invariance; ND has none);
2. ``X``: the data matrix the weight acts on (the sampled im2col patches of a convolution, the
   pooled ``in_features / B`` chunks of a linear layer) and its moments ``mu``, ``E[x x^T]``;
3. ``Cov = E[x x^T] - mu mu^T + eps I``, averaged over processes when ``sync``
   (:meth:`~norm_det.layers.deconv.statistics._RunningStatistics._covariance`);
4. ``D ~ Cov^{-1/2}``, ``W' = W D`` and ``b' = b - sum W' mu`` (:meth:`whitened_weight`);
5. the plain operation with ``W'`` and ``b'`` on ``S x``.

In eval, and in training while ``freeze`` holds the statistics, the running ``mu`` and ``D``
stand in for steps 2-4. The convolution does steps 1-2 in one autograd node and folds ``S``
into step 5 (:mod:`.sampling`, :mod:`.standardized_conv`).

Part of :mod:`norm_det.layers.deconv`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.deconv.sampling import (
    _conv_sampler,
    _GradientHandOff,
    _padded_input,
    _sampled_moments,
    _transposed_conv_data,
)
from norm_det.layers.deconv.standardization import sample_standardization, standardize
from norm_det.layers.deconv.standardized_conv import (
    _standardized_conv_by_parts,
    _StandardizedConv,
)
from norm_det.layers.deconv.statistics import resolve_block
from norm_det.layers.deconv.whitening import _CHUNKED, _DeconvMixin, _init_conv_groups

# The arguments of nn.Conv2d and nn.ConvTranspose2d that a fused layer shares, in their order.
_CONVOLUTION = ("in_channels", "out_channels", "kernel_size", "stride", "padding")


class DeconvConv2d(_DeconvMixin, nn.Conv2d):
    """``nn.Conv2d`` with network deconvolution (ND, or ND++ with scale invariance).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as in ``nn.Conv2d``.
        block: channels ``B`` per whitening group (``F = k*k*B`` features); at most
            ``in_channels``, gcd fallback with a warning. A grouped convolution uses one
            matrix per convolution group instead.
        sampling_stride: patch centres every ``sampling_stride * stride`` pixels (3 at ImageNet
            scale, 5 at COCO scale).
        iters: coupled inverse-Newton iterations ``T``.
        eps: added to the covariance diagonal and to the per-sample standard deviation.
        momentum: of the running mean and running ``D``.
        scale_invariance: ``"none"`` (ND), ``"layernorm"`` (ND++) or ``"l1norm"``.
        freeze: estimate statistics only on some training steps (``freeze_schedule``) and use
            the running ones otherwise.
        freeze_iter: ``f`` of the schedule: statistics on about ``f + 1`` of every ``10 f`` steps.
        freeze_schedule: ``"ndpp"`` (the ND++ release: steps ``s`` with ``s mod 10f <= f``,
            the first training forward being step 1) or ``"iclr2020"`` (the Network
            Deconvolution code: ``(s - 1) mod 10f <= f``); see :func:`computes_statistics_at`.
        sync: average the statistics over the default process group (no-op without one).
        isqrt_backend: ``"auto"``, ``"matrix"`` or ``"spectral"``
            (:func:`norm_det.layers.isqrt.inverse_sqrt`).

    Shapes: ``x`` ``(N, in_channels, H, W)`` -> ``(N, out_channels, H', W')`` as ``nn.Conv2d``.
    """

    _plain_type = nn.Conv2d
    _plain_arguments = (*_CONVOLUTION, "dilation", "groups", "padding_mode")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        block: int = 64,
        sampling_stride: int = 3,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        scale_invariance: str = "none",
        freeze: bool = False,
        freeze_iter: int = 100,
        freeze_schedule: str = "ndpp",
        sync: bool = False,
        isqrt_backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        features, mats = _init_conv_groups(self, block, sampling_stride, "DeconvConv2d")
        self._init_whitening(iters, eps, scale_invariance, isqrt_backend)
        self._init_estimation(momentum, freeze, freeze_iter, freeze_schedule, sync)
        self._register_running_statistics(features, mats, device, dtype)

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def _layer_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self._describe()}: expected (N, C, H, W) input; got {x.shape}")
        standardized_conv = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        handoff = None
        if self._computes_statistics(x.shape[0]):
            # S and X: the moments of the standardized patches, and S's (scale, shift).
            handoff = _GradientHandOff() if standardized_conv else None
            mean, outer, scale, shift = _sampled_moments(self, x, handoff)
            # Cov, D and W' = W D.
            weight, bias = self.whitened_weight(*self._covariance(mean, outer))
        else:
            scale = shift = None
            if self.scale_invariance != "none" and x.shape[0] > 0:
                scale, shift = sample_standardization(x, self.scale_invariance, self.eps)
            weight, bias = self.whitened_weight()
        # conv(S x, W') + b', with S folded into the convolution.
        if standardized_conv and (scale is not None or handoff is not None):
            geometry = (self.stride, self.padding, self.dilation, self.groups)
            return _StandardizedConv.apply(x, weight, bias, scale, shift, *geometry, handoff)
        if scale is None:
            return self._conv_forward(x, weight, bias)
        return _standardized_conv_by_parts(self, x, weight, bias, scale, shift)

    @torch.no_grad()
    def _sampled_data(self, x: torch.Tensor) -> torch.Tensor:
        """The sampled data matrix of ``x`` (unstandardized): ``(mats, F, S)``."""
        padded = _padded_input(self, x)
        x = x if padded is None else padded
        return _conv_sampler(self, x).gather(x, None, None).view(*self.running_mean.shape, -1)


# ---------------------------------------------------------------------------------------------
# Linear.


class DeconvLinear(_DeconvMixin, nn.Linear):
    """``nn.Linear`` with network deconvolution over ``in_features / B`` pooled chunks.

    Args:
        in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
        block: features ``B`` per chunk (512 for classifiers, 256 in detection heads); at most
            ``in_features``, gcd fallback with a warning.
        iters, eps, momentum, scale_invariance, freeze, freeze_iter, freeze_schedule, sync,
            isqrt_backend: as in :class:`DeconvConv2d`; scale invariance standardizes each
            row of the input.

    Shapes: ``(*, in_features)`` -> ``(*, out_features)``; every input row is a sample.
    """

    _plain_type = nn.Linear
    _plain_arguments = ("in_features", "out_features")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        block: int = 512,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        scale_invariance: str = "none",
        freeze: bool = False,
        freeze_iter: int = 100,
        freeze_schedule: str = "ndpp",
        sync: bool = False,
        isqrt_backend: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = resolve_block(block, in_features, "DeconvLinear")
        self._layout = _CHUNKED
        self._init_whitening(iters, eps, scale_invariance, isqrt_backend)
        self._init_estimation(momentum, freeze, freeze_iter, freeze_schedule, sync)
        self._register_running_statistics(self.block, 1, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        rows = standardize(rows, self.scale_invariance, self.eps)
        weight, bias = self._whitened_weight_for(rows)
        return F.linear(rows, weight, bias).view(*x.shape[:-1], self.out_features)

    def _data_matrix(self, rows: torch.Tensor) -> torch.Tensor:
        """``(1, 1, B, S)``: every chunk of ``B`` features of every row is a sample."""
        return rows.reshape(-1, self.block).t()[None, None]


# ---------------------------------------------------------------------------------------------
# Transposed convolution.


class DeconvConvTranspose2d(_DeconvMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with network deconvolution.

    A transposed convolution is a correlation of the input with the flipped kernel (ND++ paper,
    Case 3). Its data matrix here is the im2col of the input with the kernel, dilation and
    "full" padding ``dilation * (k - 1) - padding``, sampled every ``sampling_stride * stride``
    pixels; ``D`` multiplies the equivalent correlation kernel. For ``stride > 1`` the inserted
    zeros are left out of the statistics, as in the authors' code.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device, dtype: as in ``nn.ConvTranspose2d``.
        block, sampling_stride, iters, eps, momentum, scale_invariance, freeze, freeze_iter,
            freeze_schedule, sync, isqrt_backend: as in :class:`DeconvConv2d`.
    """

    _plain_type = nn.ConvTranspose2d
    _plain_arguments = (*_CONVOLUTION, "output_padding", "groups", "dilation")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        block: int = 64,
        sampling_stride: int = 3,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        scale_invariance: str = "none",
        freeze: bool = False,
        freeze_iter: int = 100,
        freeze_schedule: str = "ndpp",
        sync: bool = False,
        isqrt_backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=bias,
            dilation=dilation,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        features, mats = _init_conv_groups(self, block, sampling_stride, "DeconvConvTranspose2d")
        self._init_whitening(iters, eps, scale_invariance, isqrt_backend)
        self._init_estimation(momentum, freeze, freeze_iter, freeze_schedule, sync)
        self._register_running_statistics(features, mats, device, dtype)

    # The weight (C_in, C_out/g, kh, kw) as a correlation kernel (C_out, C_in/g * kh * kw).

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        in_channels, out_per_group, kh, kw = weight.shape
        grouped = weight.reshape(self.groups, in_channels // self.groups, out_per_group, kh, kw)
        kernel = grouped.flip(-1, -2).transpose(1, 2)
        return kernel.reshape(self.groups * out_per_group, -1)

    def _layer_weight(self, kernel: torch.Tensor) -> torch.Tensor:
        in_channels, out_per_group, kh, kw = self.weight.shape
        grouped = kernel.reshape(self.groups, out_per_group, in_channels // self.groups, kh, kw)
        return grouped.transpose(1, 2).flip(-1, -2).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self._describe()}: expected (N, C, H, W) input; got {x.shape}")
        x = standardize(x, self.scale_invariance, self.eps)
        weight, bias = self._whitened_weight_for(x)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    def _data_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return _transposed_conv_data(self, x)


__all__ = ["DeconvConv2d", "DeconvConvTranspose2d", "DeconvLinear"]
