"""A convolution's sampled data matrix ``X``: where its patches lie, and its moments in one
autograd node.

Part of :mod:`norm_det.layers.deconv` (its docstring has the algorithm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.deconv.standardization import _sample_mean_std, _sample_mean_std_grad
from norm_det.layers.isqrt import symmetric_matmul


def _tap_range(size: int, positions: int, stride: int, offset: int) -> tuple[int, int, int]:
    """The sampled positions ``a`` whose tap reads inside the input, ``0 <= a*stride + offset <
    size``: ``(first, end, first input index)``; empty when ``end <= first``."""
    first = max(0, -(offset // stride))
    end = min(positions, (size - 1 - offset) // stride + 1)
    return first, end, first * stride + offset


class _GridSampler:
    """``k x k`` patches at every ``(s_h, s_w)``-th position of a zero-padded input.

    The patches are stored as ``buffer`` ``(C, kh*kw, N, L_h, L_w)`` (padding entries 0): its
    rows ``c * kh*kw + t`` are the unfold order of the columns of the data matrix, so
    ``buffer.view(mats, F, S)`` is the data matrix of either grouping (interleaved: row
    ``f * G + g``; per convolution group: ``g * F + f``) with one sample per column. Each tap is
    one strided slice of the input, so no full im2col exists and no index is computed.
    """

    def __init__(
        self,
        kernel: tuple[int, int],
        dilation: tuple[int, int],
        padding: tuple[int, int, int, int],
        strides: tuple[int, int],
        size: tuple[int, int],
    ) -> None:
        (kh, kw), (dh, dw), (top, bottom, left, right) = kernel, dilation, padding
        (sh, sw), (height, width) = strides, size
        self.positions = (
            (height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (width + left + right - dw * (kw - 1) - 1) // sw + 1,
        )
        self.kernel_taps = kh * kw
        # (tap, positions along H, along W, input rows, input columns)
        self.taps: list[tuple[int, slice, slice, slice, slice]] = []
        for i in range(kh):
            a0, a1, r0 = _tap_range(height, self.positions[0], sh, i * dh - top)
            for j in range(kw):
                b0, b1, c0 = _tap_range(width, self.positions[1], sw, j * dw - left)
                if a1 > a0 and b1 > b0:
                    rows = slice(r0, r0 + (a1 - a0 - 1) * sh + 1, sh)
                    cols = slice(c0, c0 + (b1 - b0 - 1) * sw + 1, sw)
                    self.taps.append((i * kw + j, slice(a0, a1), slice(b0, b1), rows, cols))

    def gather(
        self, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        """The patches of ``scale[n] * x[n] + shift[n]`` (zero padding): the buffer."""
        n, channels = x.shape[:2]
        buffer = x.new_zeros(channels, self.kernel_taps, n, *self.positions)
        view = (n, 1, 1, 1)
        for tap, a, b, rows, cols in self.taps:
            source = x[:, :, rows, cols]
            target = buffer[:, tap, :, a, b].transpose(0, 1)
            if scale is None:
                target.copy_(source)
            elif shift is None:
                torch.mul(source, scale.view(view), out=target)
            else:
                torch.addcmul(shift.view(view), source, scale.view(view), out=target)
        return buffer

    def sample_sums(
        self, grad: torch.Tensor, buffer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample ``n``: ``<grad, buffer>`` and ``grad`` summed over the entries inside
        the input (not the padding)."""
        per_tap = grad.sum(0)  # (kh*kw, N, L_h, L_w)
        inside = grad.new_zeros(per_tap.shape[0], 1, *per_tap.shape[2:])
        for tap, a, b, _, _ in self.taps:
            inside[tap, :, a, b] = 1
        products = (grad * buffer).sum((0, 1, 3, 4))
        return products, (per_tap * inside).sum((0, 2, 3))

    def scatter_add_(
        self, target: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor | None
    ) -> None:
        """``target`` ``(N, C, H, W)`` += the input gradient of the buffer's ``grad``."""
        view = (target.shape[0], 1, 1, 1)
        for tap, a, b, rows, cols in self.taps:
            source = grad[:, tap, :, a, b].transpose(0, 1)
            if scale is None:
                target[:, :, rows, cols] += source
            else:
                target[:, :, rows, cols].addcmul_(source, scale.view(view))


class _PixelSampler:
    """Every ``step``-th of the ``N*H*W`` pixels (a 1x1 convolution's data), as ``(C, M)``.

    Viewed as ``(mats, F, M * C / (mats * F))`` this is the data matrix of either grouping.
    """

    def __init__(self, step: int, x: torch.Tensor) -> None:
        n, _, height, width = x.shape
        index = torch.arange(0, n * height * width, step, device=x.device)
        pixel = index % (height * width)
        self.index = (index // (height * width), pixel // width, pixel % width)
        self.samples = n

    def gather(
        self, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        sample = self.index[0]
        buffer = x.transpose(0, 1)[(slice(None), *self.index)]  # (C, M)
        if scale is not None:
            buffer.mul_(scale[sample])
        if shift is not None:
            buffer.add_(shift[sample])
        return buffer

    def sample_sums(
        self, grad: torch.Tensor, buffer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zeros, sample = grad.new_zeros(self.samples), self.index[0]
        products = zeros.index_add(0, sample, (grad * buffer).sum(0))
        return products, zeros.index_add(0, sample, grad.sum(0))

    def scatter_add_(
        self, target: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor | None
    ) -> None:
        if scale is not None:
            grad = grad * scale[self.index[0]]
        # Indexing a transposed view writes into ``target`` whatever its memory layout.
        target.transpose(0, 1)[(slice(None), *self.index)] += grad


def _padded_input(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` padded as ``conv`` pads it, where the patches must come from a padded copy: a
    kernel larger than 1x1 padded other than with zeros (the samplers leave zeros out)."""
    if conv.padding_mode != "zeros" and conv.kernel_size != (1, 1):
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    return None


def _conv_sampler(conv: nn.Conv2d, x: torch.Tensor) -> _GridSampler | _PixelSampler:
    """Where the data matrix's samples of ``x`` (or of its padded copy) come from: patch
    centres every ``sampling_stride * stride`` pixels, every ``s_h * s_w``-th pixel for 1x1."""
    strides = (conv.sampling_stride * conv.stride[0], conv.sampling_stride * conv.stride[1])
    if conv.kernel_size == (1, 1):
        return _PixelSampler(strides[0] * strides[1], x)
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    padding = (top, bottom, left, right) if conv.padding_mode == "zeros" else (0, 0, 0, 0)
    return _GridSampler(conv.kernel_size, conv.dilation, padding, strides, x.shape[2:])


def _transposed_conv_data(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """The data matrix ``(N, mats, F, L)`` of a transposed convolution: the im2col of ``x`` with
    its kernel, dilation and "full" padding ``dilation * (k - 1) - padding`` every
    ``sampling_stride * stride`` pixels (the inserted zeros of ``stride > 1`` left out)."""
    mats, features = conv.running_mean.shape
    padding = tuple(
        max(d * (k - 1) - p, 0) for d, k, p in zip(conv.dilation, conv.kernel_size, conv.padding)
    )
    strides = tuple(conv.sampling_stride * s for s in conv.stride)
    patches = F.unfold(x, conv.kernel_size, conv.dilation, padding, strides)
    return patches.reshape(x.shape[0], mats, features, -1)


class _GradientHandOff:
    """The input gradient of :class:`_StandardizedConv`, handed on to :class:`_SampledMoments`.

    Both nodes of a training step differentiate with respect to the same ``x``. Instead of two
    full-size gradients that autograd would add, the convolution leaves its ``conv^T(g, W)``
    here (with the per-sample scale still to apply, if any) and returns none for ``x``; the
    statistics' backward, which always runs after it (it needs the convolution's gradients of
    ``scale``, ``shift`` and, through ``D``, of ``W``), scales it and adds its own part in
    place.
    """

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # what ``grad`` still has to be scaled by

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        taken, self.grad, self.scale = (self.grad, self.scale), None, None
        return taken


class _SampledMoments(torch.autograd.Function):
    """``x -> (mean, E[x x^T], scale, shift)`` of a convolution's sampled, standardized data.

    One node for what are otherwise three (per-sample statistics, standardized patches, Gram
    matrix): forward reads ``x`` twice for the statistics and the sampled entries once;
    backward writes ``dL/dx`` once (the statistics' part) and adds the sampled entries' part to
    it in place, instead of three full-size gradients that autograd would sum.

    Args of ``apply``: ``x`` ``(N, C, H, W)``; ``padded``: the input the patches are taken from
    when the convolution pads other than with zeros (``F.pad`` of ``x``), else ``None``;
    ``sampler``: a :class:`_GridSampler` or :class:`_PixelSampler`; ``mode``, ``eps``: the scale
    invariance; ``mats``, ``features``: the data matrix's shape ``(mats, F, S)``.

    Returns ``mean`` ``(mats, F)``, ``E[x x^T]`` ``(mats, F, F)`` and ``S``'s ``scale``,
    ``shift`` ``(N,)`` (``None`` where the mode has none).
    """

    @staticmethod
    def forward(ctx, x, padded, sampler, mode, eps, mats, features, handoff):
        n = x.shape[0]
        scale = shift = mean_std = None
        if mode == "layernorm":
            mean_std = _sample_mean_std(x)
            scale = 1.0 / (mean_std[1] + eps)
            shift = -mean_std[0] * scale
        elif mode == "l1norm":
            absolute = torch.linalg.vector_norm(x.reshape(n, -1), ord=1, dim=1)
            scale = 1.0 / (absolute / x[0].numel() + eps)
        buffer = sampler.gather(x if padded is None else padded, scale, shift)
        data = buffer.view(mats, features, -1)
        count = data.shape[-1]
        mean = data.sum(-1).div_(count)
        outer = symmetric_matmul(data, data.transpose(-1, -2)).div_(count)
        ctx.sampler, ctx.mode, ctx.handoff = sampler, mode, handoff
        ctx.padded_shape = None if padded is None else padded.shape
        ctx.save_for_backward(x, buffer, scale, shift, *(mean_std or ()))
        return mean, outer, scale, shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_outer, grad_scale, grad_shift):
        x, buffer, scale, shift, *mean_std = ctx.saved_tensors
        mode, sampler = ctx.mode, ctx.sampler
        handed, handed_scale = (None, None) if ctx.handoff is None else ctx.handoff.take()
        none = (None,) * 8
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return none
        data = buffer.view(grad_outer.shape[0], grad_outer.shape[1], -1)
        count = data.shape[-1]
        # mean = sum(data) / S, E[x x^T] = data data^T / S.
        grad = torch.baddbmm(
            grad_mean[:, :, None],
            grad_outer + grad_outer.transpose(-1, -2),
            data,
            beta=1.0 / count,
            alpha=1.0 / count,
        ).view_as(buffer)
        if mode == "none" and ctx.padded_shape is not None:
            grad_x = None  # only the padded copy's patches reach the loss through the moments
        elif mode == "none":
            grad_x = torch.zeros_like(x) if handed is None else handed
        else:
            # The data is P = scale * patches + shift * inside:
            # dL/dscale += <G, patches> = (<G, P> - shift <G, inside>) / scale.
            products, inside = sampler.sample_sums(grad, buffer)
            if shift is None:
                grad_scale = grad_scale + products / scale
            else:
                grad_scale = grad_scale + (products - shift * inside) / scale
                grad_shift = grad_shift + inside
            view = (-1, 1, 1, 1)
            if mode == "layernorm":
                # scale = 1 / (std + eps), shift = -mean * scale.
                mean, std = mean_std
                grad_std = -scale.square() * (grad_scale - grad_shift * mean)
                grad_x = _sample_mean_std_grad(
                    x, mean, std, -grad_shift * scale, grad_std, handed, handed_scale
                )
            else:
                # scale = 1 / (E|x| + eps).
                coefficient = (-scale.square() * grad_scale / x[0].numel()).view(view)
                grad_x = x.sign().mul_(coefficient)
                if handed is not None:
                    if handed_scale is not None:
                        handed = handed.mul_(handed_scale.view(view))
                    grad_x = handed.add_(grad_x)
        if ctx.padded_shape is None:
            sampler.scatter_add_(grad_x, grad, scale)
            return grad_x, *none[1:]
        grad_padded = x.new_zeros(ctx.padded_shape)
        sampler.scatter_add_(grad_padded, grad, scale)
        return grad_x, grad_padded, *none[2:]


def _sampled_moments(
    conv: nn.Conv2d, x: torch.Tensor, handoff: _GradientHandOff | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean ``(mats, F)`` and ``E[x x^T]`` ``(mats, F, F)`` of the sampled, standardized data
    matrix of an ND convolution's input ``x``, and the standardization's per-sample
    ``(scale, shift)``."""
    padded = _padded_input(conv, x)
    sampler = _conv_sampler(conv, x if padded is None else padded)
    mats, features = conv.running_mean.shape
    return _SampledMoments.apply(
        x, padded, sampler, conv.scale_invariance, conv.eps, mats, features, handoff
    )
