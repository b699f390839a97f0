"""The layers: :class:`DeconvConv2d`, :class:`DeconvLinear`, :class:`DeconvConvTranspose2d`.

Part of :mod:`norm_det.layers.deconv` (its docstring has the algorithm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.deconv.sampling import (
    _GradientHandOff,
    _GridSampler,
    _PixelSampler,
    _SampledMoments,
)
from norm_det.layers.deconv.standardization import (
    SCALE_INVARIANCES,
    _with_input_standardization,
    sample_standardization,
    standardize,
)
from norm_det.layers.deconv.standardized_conv import _StandardizedConv
from norm_det.layers.deconv.statistics import (
    FREEZE_SCHEDULES,
    computes_statistics_at,
    resolve_block,
    second_moments,
)
from norm_det.layers.deconv.whitening import _CHUNKED, _INTERLEAVED, _PER_GROUP, _DeconvMixin


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
        if sampling_stride < 1:
            raise ValueError(f"DeconvConv2d: sampling_stride must be >= 1; got {sampling_stride}")
        taps = self.kernel_size[0] * self.kernel_size[1]
        if groups > 1:
            self.block, mats, self._layout = in_channels // groups, groups, _PER_GROUP
        else:
            self.block = resolve_block(block, in_channels, "DeconvConv2d")
            mats, self._layout = 1, _INTERLEAVED
        self.sampling_stride = sampling_stride
        self._init_deconv(
            features=taps * self.block,
            mats=mats,
            iters=iters,
            eps=eps,
            momentum=momentum,
            scale_invariance=scale_invariance,
            freeze=freeze,
            freeze_iter=freeze_iter,
            freeze_schedule=freeze_schedule,
            sync=sync,
            isqrt_backend=isqrt_backend,
            device=device,
            dtype=dtype,
        )

    # Data matrix ----------------------------------------------------------------------------

    def _sampler(self, x: torch.Tensor) -> _GridSampler | _PixelSampler:
        """Where the data matrix's samples of ``x`` (or of its padded copy) come from."""
        strides = (self.sampling_stride * self.stride[0], self.sampling_stride * self.stride[1])
        if self.kernel_size == (1, 1):
            return _PixelSampler(strides[0] * strides[1], x)
        left, right, top, bottom = self._reversed_padding_repeated_twice
        padding = (top, bottom, left, right) if self.padding_mode == "zeros" else (0, 0, 0, 0)
        return _GridSampler(self.kernel_size, self.dilation, padding, strides, x.shape[2:])

    def _sampled_moments(
        self, x: torch.Tensor, handoff: _GradientHandOff | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Mean ``(mats, F)`` and ``E[x x^T]`` ``(mats, F, F)`` of the sampled, standardized
        data matrix, and the standardization's per-sample ``(scale, shift)``."""
        padded = None
        if self.padding_mode != "zeros" and self.kernel_size != (1, 1):
            padded = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        sampler = self._sampler(x if padded is None else padded)
        mats, features = self.running_mean.shape
        return _SampledMoments.apply(
            x, padded, sampler, self.scale_invariance, self.eps, mats, features, handoff
        )

    @torch.no_grad()
    def _sampled_data(self, x: torch.Tensor) -> torch.Tensor:
        """The sampled data matrix of ``x`` (unstandardized): ``(mats, F, S)``."""
        if self.padding_mode != "zeros" and self.kernel_size != (1, 1):
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return self._sampler(x).gather(x, None, None).view(*self.running_mean.shape, -1)

    # Forward --------------------------------------------------------------------------------

    def whitened_weight(
        self, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` for a batch's ``(mu, Cov)``, by default for the running statistics."""
        mean, deconv = self._statistics(mean, cov)
        weight, bias = self._whiten(self.weight.flatten(1), self.bias, mean, deconv, cov)
        return weight.view_as(self.weight), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self._describe()}: expected (N, C, H, W) input; got {x.shape}")
        standardized_conv = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        handoff = None
        if self._computes_statistics(x.shape[0]):
            handoff = _GradientHandOff() if standardized_conv else None
            mean, outer, scale, shift = self._sampled_moments(x, handoff)
            weight, bias = self.whitened_weight(*self._covariance(mean, outer))
        else:
            scale = shift = None
            if self.scale_invariance != "none" and x.shape[0] > 0:
                scale, shift = sample_standardization(x, self.scale_invariance, self.eps)
            weight, bias = self.whitened_weight()
        if standardized_conv and (scale is not None or handoff is not None):
            geometry = (self.stride, self.padding, self.dilation, self.groups)
            return _StandardizedConv.apply(x, weight, bias, scale, shift, *geometry, handoff)
        if scale is None:
            return self._conv_forward(x, weight, bias)
        out = self._conv_forward(x, weight, None) * scale.view(-1, 1, 1, 1)
        constant = bias.view(1, -1, 1, 1)
        if shift is not None:
            constant = constant + shift.view(-1, 1, 1, 1) * self._weight_sums(x, weight)
        return out + constant

    def _weight_sums(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``conv(1, W')``: ``(1, O, H', W')``, or ``(1, O, 1, 1)`` without zero padding."""
        if self.padding_mode != "zeros":
            # Reflect/replicate/circular padding of a constant image is constant.
            return weight.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        ones = x.new_ones(1, 1, *x.shape[2:])
        summed = weight.sum(dim=1, keepdim=True)
        return F.conv2d(ones, summed, None, self.stride, self.padding, self.dilation)

    # Protocol -------------------------------------------------------------------------------

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with ``W'``, ``b'`` from the running statistics.

        With scale invariance it standardizes each input sample in a forward pre-hook first.
        """
        weight, bias = self.whitened_weight()
        plain = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            padding_mode=self.padding_mode,
        ).to(weight)
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
        return _with_input_standardization(plain, self.scale_invariance, self.eps)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set ``W``, ``b`` so that the running-statistics layer computes the plain conv.

        Exact for ND; with scale invariance the input is standardized first, which no weight
        can undo. A layer without bias cannot absorb a nonzero ``b' + sum W' mu``.
        """
        raw, raw_bias = self._unwhiten(weight.flatten(1), bias)
        self.weight.copy_(raw.view_as(self.weight))
        if self.bias is not None:
            self.bias.copy_(raw_bias)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", sampling_stride={self.sampling_stride}" + self._deconv_repr()
        )


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
        self._init_deconv(
            features=self.block,
            mats=1,
            iters=iters,
            eps=eps,
            momentum=momentum,
            scale_invariance=scale_invariance,
            freeze=freeze,
            freeze_iter=freeze_iter,
            freeze_schedule=freeze_schedule,
            sync=sync,
            isqrt_backend=isqrt_backend,
            device=device,
            dtype=dtype,
        )

    def whitened_weight(
        self, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` for a batch's ``(mu, Cov)``, by default for the running statistics."""
        mean, deconv = self._statistics(mean, cov)
        return self._whiten(self.weight, self.bias, mean, deconv, cov)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        rows = standardize(rows, self.scale_invariance, self.eps)
        if self._computes_statistics(rows.shape[0]):
            chunks = rows.reshape(-1, self.block)
            moments = second_moments(chunks.t()[None, None])
            weight, bias = self.whitened_weight(*self._covariance(*moments))
        else:
            weight, bias = self.whitened_weight()
        return F.linear(rows, weight, bias).view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W'``, ``b'`` (input standardization in a pre-hook)."""
        weight, bias = self.whitened_weight()
        plain = nn.Linear(self.in_features, self.out_features, bias=True).to(weight)
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
        return _with_input_standardization(plain, self.scale_invariance, self.eps)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set ``W``, ``b`` so that the running-statistics layer computes the plain linear."""
        raw, raw_bias = self._unwhiten(weight, bias)
        self.weight.copy_(raw)
        if self.bias is not None:
            self.bias.copy_(raw_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._deconv_repr()


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
        if sampling_stride < 1:
            raise ValueError(
                f"DeconvConvTranspose2d: sampling_stride must be >= 1; got {sampling_stride}"
            )
        taps = self.kernel_size[0] * self.kernel_size[1]
        if groups > 1:
            self.block, mats, self._layout = in_channels // groups, groups, _PER_GROUP
        else:
            self.block = resolve_block(block, in_channels, "DeconvConvTranspose2d")
            mats, self._layout = 1, _INTERLEAVED
        self.sampling_stride = sampling_stride
        self._init_deconv(
            features=taps * self.block,
            mats=mats,
            iters=iters,
            eps=eps,
            momentum=momentum,
            scale_invariance=scale_invariance,
            freeze=freeze,
            freeze_iter=freeze_iter,
            freeze_schedule=freeze_schedule,
            sync=sync,
            isqrt_backend=isqrt_backend,
            device=device,
            dtype=dtype,
        )

    # The weight (C_in, C_out/g, kh, kw) as a correlation kernel (C_out, C_in/g * kh * kw).

    def _correlation_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        in_channels, out_per_group, kh, kw = weight.shape
        grouped = weight.reshape(self.groups, in_channels // self.groups, out_per_group, kh, kw)
        kernel = grouped.flip(-1, -2).transpose(1, 2)
        return kernel.reshape(self.groups * out_per_group, -1)

    def _transposed_weight(self, kernel: torch.Tensor) -> torch.Tensor:
        in_channels, out_per_group, kh, kw = self.weight.shape
        grouped = kernel.reshape(self.groups, out_per_group, in_channels // self.groups, kh, kw)
        return grouped.transpose(1, 2).flip(-1, -2).reshape(self.weight.shape)

    def whitened_weight(
        self, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` in ``nn.ConvTranspose2d`` layout for a batch's ``(mu, Cov)``, by
        default for the running statistics."""
        mean, deconv = self._statistics(mean, cov)
        kernel = self._correlation_kernel(self.weight)
        kernel, bias = self._whiten(kernel, self.bias, mean, deconv, cov)
        return self._transposed_weight(kernel), bias

    def _sampled_data(self, x: torch.Tensor) -> torch.Tensor:
        mats, features = self.running_mean.shape
        padding = tuple(
            max(d * (k - 1) - p, 0)
            for d, k, p in zip(self.dilation, self.kernel_size, self.padding)
        )
        strides = tuple(self.sampling_stride * s for s in self.stride)
        patches = F.unfold(x, self.kernel_size, self.dilation, padding, strides)
        if self._layout == _PER_GROUP:
            return patches.reshape(x.shape[0], mats, features, -1)
        return patches.reshape(x.shape[0], 1, features, -1)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self._describe()}: expected (N, C, H, W) input; got {x.shape}")
        x = standardize(x, self.scale_invariance, self.eps)
        if self._computes_statistics(x.shape[0]):
            moments = second_moments(self._sampled_data(x))
            weight, bias = self.whitened_weight(*self._covariance(*moments))
        else:
            weight, bias = self.whitened_weight()
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    @torch.no_grad()
    def fuse(self) -> nn.ConvTranspose2d:
        """A plain ``nn.ConvTranspose2d`` with ``W'``, ``b'`` (standardization in a pre-hook)."""
        weight, bias = self.whitened_weight()
        plain = nn.ConvTranspose2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            groups=self.groups,
            bias=True,
            dilation=self.dilation,
        ).to(weight)
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
        return _with_input_standardization(plain, self.scale_invariance, self.eps)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set ``W``, ``b`` so that the running-statistics layer computes the plain layer."""
        kernel, raw_bias = self._unwhiten(self._correlation_kernel(weight), bias)
        self.weight.copy_(self._transposed_weight(kernel))
        if self.bias is not None:
            self.bias.copy_(raw_bias)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", sampling_stride={self.sampling_stride}" + self._deconv_repr()
        )


__all__ = [
    "FREEZE_SCHEDULES",
    "SCALE_INVARIANCES",
    "DeconvConv2d",
    "DeconvConvTranspose2d",
    "DeconvLinear",
    "computes_statistics_at",
    "resolve_block",
    "sample_standardization",
    "second_moments",
    "standardize",
]
