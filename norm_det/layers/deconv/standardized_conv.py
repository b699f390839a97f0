"""The per-sample standardization folded into a convolution:
``conv(S x, W') = conv(x, W') / sigma - (mu / sigma) conv(1, W')``, in one autograd node for zero
padding (:class:`_StandardizedConv`), in tensor operations otherwise
(:func:`_standardized_conv_by_parts`).

Part of :mod:`norm_det.layers.deconv` (its docstring has the algorithm).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.deconv.sampling import _GradientHandOff
from norm_det.layers.deconv.standardization import _AFFINE_LOOP_MAX

# With at most this many samples the weight gradient is taken per sample (one convolution
# backward each), which spares two passes over the activations.
_PER_SAMPLE_WEIGHT_GRAD_MAX = 8


def _scale_and_add_(out: torch.Tensor, scale: torch.Tensor, constant: torch.Tensor) -> None:
    """``out[n] = scale[n] * out[n] + constant[n, :, None, None]`` in place, ``out`` 4-d."""
    if out.shape[0] > _AFFINE_LOOP_MAX:
        out.mul_(scale.view(-1, 1, 1, 1)).add_(constant[:, :, None, None])
        return
    # One fused multiply-add per sample; torch.addcmul with a broadcast factor ran 9x slower.
    for n, factor in enumerate(scale.tolist()):
        torch.add(constant[n, :, None, None], out[n], alpha=factor, out=out[n])


@functools.lru_cache(maxsize=256)
def _valid_taps(
    size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[tuple[float, ...], ...]:
    """``[out_size][kernel]``: 1 where output position ``h``'s tap ``i`` reads the input."""
    return tuple(
        tuple(float(0 <= h * stride - padding + i * dilation < size) for i in range(kernel))
        for h in range(out_size)
    )


class _StandardizedConv(torch.autograd.Function):
    """``conv(S x, W) + b`` for zero padding, ``S x = scale[n] * x + shift[n]``, unmaterialized.

    ``y = scale[n] * conv(x, W) + b + shift[n] * E`` with ``E = conv(1, W)``: the weight sums
    ``inner[o]`` wherever every tap reads the input, less at the padded border. Forward: the
    convolution and one fused pass. Backward: one reduction of the gradient ``g`` (plus its
    border rows and columns) and the convolution's backward, with ``g`` left unscaled: the
    input gradient is scaled afterwards (by :class:`_SampledMoments` when it is handed on) and,
    for a few samples, the weight gradient is taken per sample,
    ``sum_n scale[n] corr(x_n, g_n)``, which also gives ``dL/dscale[n] =
    <g_n, conv(x_n, W)> = <corr(x_n, g_n), W>`` without another pass over the activations.
    With ``scale`` ``None`` (ND) it is a plain convolution that only hands its input gradient on
    (``handoff``, a :class:`_GradientHandOff` or ``None``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, stride, padding, dilation, groups, handoff):
        ctx.save_for_backward(x, weight, scale, shift)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.handoff = handoff
        if scale is None:  # ND: a plain convolution, here only to hand its input gradient on
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        n, _, height, width = x.shape
        (kh, kw), (out_h, out_w) = weight.shape[2:], out.shape[2:]
        row_taps = _valid_taps(height, out_h, kh, stride[0], padding[0], dilation[0])
        col_taps = _valid_taps(width, out_w, kw, stride[1], padding[1], dilation[1])
        taps = weight.sum(1)  # (O, kh, kw)
        inner = taps.sum((1, 2))
        constant = bias.expand(n, -1)
        if shift is not None:
            constant = constant + shift[:, None] * inner
        _scale_and_add_(out, scale, constant)
        if shift is not None:
            _add_border(out, shift, taps, row_taps, col_taps)
        ctx.valid_taps = (row_taps, col_taps)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, scale, shift = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        n = grad.shape[0]
        view = (-1, 1, 1, 1)
        needs_x, needs_w, needs_scale = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        geometry = (stride, padding, dilation, False, [0, 0], groups)
        sums = grad.sum((2, 3))  # (N, O)
        if scale is None:
            mask = (needs_x, needs_w)
            grad_x, grad_w = _convolution_backward(grad, x, weight, geometry, mask)
            grad_x = _hand_on(ctx.handoff, grad_x, None)
            return grad_x, grad_w, sums.sum(0), *(None,) * 7
        grad_shift = grad_taps = None
        if shift is not None:
            borders = (_Border(valid, grad) for valid in ctx.valid_taps)
            per_tap = _tap_sums(grad, sums, *borders)  # (N, O, kh, kw) = <g, E-parts>
            grad_shift = (per_tap * weight.sum(1)).sum((1, 2, 3))
            grad_taps = (shift.view(view) * per_tap).sum(0)
        per_sample = n <= _PER_SAMPLE_WEIGHT_GRAD_MAX
        grad_x = grad_w = grad_scale = None
        if per_sample:
            if needs_x:
                grad_x = _convolution_backward(grad, x, weight, geometry, (True, False))[0]
            if needs_w or needs_scale:
                products = []
                for i, factor in enumerate(scale.tolist()):
                    part = _convolution_backward(grad[i : i + 1], x[i : i + 1], weight, geometry)[1]
                    products.append(torch.vdot(part.flatten(), weight.flatten()))
                    grad_w = (
                        part.mul_(factor) if grad_w is None else grad_w.add_(part, alpha=factor)
                    )
                grad_scale = torch.stack(products)
        else:
            mask = (needs_x or needs_scale, needs_w)
            grad_x, grad_w = _convolution_backward(
                grad * scale.view(view), x, weight, geometry, mask
            )
            if needs_scale:
                # <g_n, conv(x_n, W)> = <conv^T(g_n, W), x_n>; grad_x = scale * conv^T(g, W).
                grad_scale = torch.linalg.vecdot(grad_x.view(n, -1), x.reshape(n, -1)) / scale
        if grad_w is not None and grad_taps is not None:
            grad_w = grad_w + grad_taps[:, None]
        # The per-sample branch leaves grad_x unscaled.
        grad_x = _hand_on(ctx.handoff, grad_x, scale if per_sample else None)
        if not needs_w:
            grad_w = None
        return grad_x, grad_w, sums.sum(0), grad_scale, grad_shift, *(None,) * 5


def _hand_on(
    handoff: _GradientHandOff | None, grad_x: torch.Tensor | None, scale: torch.Tensor | None
) -> torch.Tensor | None:
    """``scale[n] * grad_x[n]``, or ``None`` after leaving both to ``handoff``."""
    if grad_x is None:
        return None
    if handoff is not None:
        handoff.grad, handoff.scale = grad_x, scale
        return None
    return grad_x if scale is None else grad_x.mul_(scale.view(-1, 1, 1, 1))


def _convolution_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geometry: tuple,
    mask: tuple[bool, bool] = (False, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dL/dx, dL/dweight)`` of ``F.conv2d(x, weight)`` (bias-free), as ``mask`` asks."""
    stride, padding, dilation, transposed, output_padding, groups = geometry
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        None,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        [mask[0], mask[1], False],
    )
    return grad_x, grad_w


class _Border:
    """The output rows (or columns) where some tap reads the zero padding.

    ``index``: those positions ``(B,)``; ``missing``: ``(B, k)``, 1 where tap ``i`` reads the
    padding there.
    """

    def __init__(self, valid: tuple[tuple[float, ...], ...], like: torch.Tensor) -> None:
        border = [h for h, taps in enumerate(valid) if min(taps) < 1]
        self.index = torch.tensor(border, dtype=torch.long, device=like.device)
        missing = [[1.0 - v for v in valid[h]] for h in border]
        kernel = len(valid[0])
        self.missing = torch.tensor(missing, dtype=like.dtype, device=like.device).view(-1, kernel)


def _tap_sums(grad: torch.Tensor, sums: torch.Tensor, rows: _Border, cols: _Border) -> torch.Tensor:
    """``sum_{h,w} grad[n, o, h, w] [tap (i, j) at (h, w) reads the input]``: ``(N, O, kh, kw)``.

    Every tap reads the input away from the border, so the sums are the totals ``sums``
    ``(N, O)`` less what the border rows and columns hold (inclusion-exclusion at the corners):
    only those are read again.
    """
    per_tap = sums[:, :, None, None].expand(
        *sums.shape, rows.missing.shape[1], cols.missing.shape[1]
    )
    if len(rows.index):
        border_rows = grad.index_select(2, rows.index)  # (N, O, B_h, W')
        per_tap = per_tap - torch.matmul(border_rows.sum(3), rows.missing)[..., :, None]
    if len(cols.index):
        border_cols = grad.index_select(3, cols.index)  # (N, O, H', B_w)
        per_tap = per_tap - torch.matmul(border_cols.sum(2), cols.missing)[..., None, :]
        if len(rows.index):
            corners = border_cols.index_select(2, rows.index)  # (N, O, B_h, B_w)
            per_tap = per_tap + torch.einsum(
                "hi,nohw,wj->noij", rows.missing, corners, cols.missing
            )
    return per_tap


def _add_border(
    out: torch.Tensor,
    shift: torch.Tensor,
    taps: torch.Tensor,
    row_taps: tuple[tuple[float, ...], ...],
    col_taps: tuple[tuple[float, ...], ...],
) -> None:
    """``out += shift[n] * (E - inner)`` in place where they differ: the zero-padded border.

    ``E[o, h, w] = sum_ij taps[o, i, j] rows[h, i] cols[w, j]`` equals ``inner[o]`` wherever every
    tap reads the input; the border rows (all columns) and the border columns of the other rows
    are corrected, nothing else is touched.
    """
    like = {"dtype": out.dtype, "device": out.device}
    inner = taps.sum((1, 2))
    column = shift.view(-1, 1, 1, 1)
    interior = [min(valid) >= 1 for valid in row_taps]
    border_rows = [h for h, inside in enumerate(interior) if not inside]
    border_cols = [w for w, valid in enumerate(col_taps) if min(valid) < 1]
    if border_rows:
        rows = torch.tensor([row_taps[h] for h in border_rows], **like)
        edge = torch.einsum("ri,oij,wj->orw", rows, taps, torch.tensor(col_taps, **like))
        index = torch.tensor(border_rows, device=out.device)
        out.index_add_(2, index, column * (edge - inner[:, None, None]))
    if border_cols:
        cols = torch.tensor([col_taps[w] for w in border_cols], **like)
        edge = torch.einsum("oij,cj->oc", taps, cols) - inner[:, None]
        edge = torch.tensor(interior, **like)[None, :, None] * edge[:, None, :]  # (O, H', C)
        out.index_add_(3, torch.tensor(border_cols, device=out.device), column * edge)


def _standardized_conv_by_parts(
    conv: nn.Conv2d,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """``conv(S x, W') + b'`` as ``scale[n] conv(x, W') + b' + shift[n] conv(1, W')`` in plain
    operations: for what :class:`_StandardizedConv` does not take (a padding other than zeros,
    a padding given as a string)."""
    out = conv._conv_forward(x, weight, None) * scale.view(-1, 1, 1, 1)
    constant = bias.view(1, -1, 1, 1)
    if shift is not None:
        constant = constant + shift.view(-1, 1, 1, 1) * _weight_sums(conv, x, weight)
    return out + constant


def _weight_sums(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv(1, W')``: ``(1, O, H', W')``, or ``(1, O, 1, 1)`` without zero padding."""
    if conv.padding_mode != "zeros":
        # Reflect/replicate/circular padding of a constant image is constant.
        return weight.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    ones = x.new_ones(1, 1, *x.shape[2:])
    summed = weight.sum(dim=1, keepdim=True)
    return F.conv2d(ones, summed, None, conv.stride, conv.padding, conv.dilation)
