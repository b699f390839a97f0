"""Weight-standardized convolution.

Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
2019: every filter is standardized over its ``(C_in, k, k)`` elements,
``W_hat = (W - mean(W)) / (std(W) + eps)``, before the convolution. Paired with GroupNorm it
trains detectors at one image per GPU.

Big Transfer (Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning",
ECCV 2020) standardizes with the *population* variance and adds ``eps`` inside the square root,
``W_hat = (W - mean(W)) / sqrt(var(W) + eps)`` (its release's ``StdConv2d``, eps 1e-10; timm's
``StdConv2d``, eps 1e-8 for the BiT weights): :class:`WSConv2d` computes either form
(``population``), since the two differ by ``sqrt(n / (n - 1))`` per filter, no weight can turn one
into the other, and a network trained with one is reproduced only by the same form.

The standardization itself (shared with :mod:`norm_det.layers.pws` and :mod:`norm_det.layers.nf`)
is one autograd function with the backward written out: composed of tensor ops, it made autograd
record and replay every one of them, about ten passes over the weight per training step.
:class:`StandardizedConvMixin` holds what the three convolutions share. It is a mixin placed
before ``nn.Conv2d``, not a subclass of it, so that ``nn.Conv2d`` stays among each class's direct
bases: mmengine's initializers (``init_cfg=dict(type='Kaiming', layer='Conv2d')``) select modules
by the names of their class and its direct bases.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _center_and_scale(
    flat: torch.Tensor, alpha: torch.Tensor | None, gamma: float, eps: float, *, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of :class:`FilterStandardization`: ``(y, mean, var, scale)``, all per row.

    ``y: (O, n)`` and ``(O, 1)`` for the rest; ``var`` is unbiased for WS (``alpha`` None), the
    population variance for PWS. ``inplace`` writes ``y`` over the centered copy of ``flat``,
    which autograd cannot record.
    """
    n = flat.shape[1]
    mean = flat.mean(dim=1, keepdim=True)
    centered = flat - mean
    # Two passes (mean, then the norm of the centered rows, which the output needs anyway)
    # instead of torch.var: its CPU Welford reduction measured ~30x slower than a sum.
    squares = torch.linalg.vector_norm(centered, dim=1, keepdim=True).square()
    if alpha is None:
        var = squares / (n - 1)
        scale = torch.reciprocal(var.sqrt() + eps)
    else:
        var = squares / n
        # sqrt(2/n) / sqrt(var + gamma), with n kept out of math.sqrt for the tracer.
        scale = torch.rsqrt((var + gamma) * (n / 2)) * alpha.view(-1, 1)
    out = centered.mul_(scale) if inplace else centered * scale
    return out, mean, var, scale


class FilterStandardization(torch.autograd.Function):
    """Per row ``o`` of a flattened weight ``w: (O, n)``: ``y_o = (w_o - mean(w_o)) * c_o``.

    ``c_o`` depends on the row's variance ``v_o`` only:

    - WS (``alpha`` None): ``c = 1 / (sqrt(v) + eps)``, ``v`` the unbiased variance;
    - PWS (``alpha: (O,)``): ``c = alpha_o * sqrt(2/n) / sqrt(v + gamma)``, ``v`` the
      population variance (the PWS paper, eq. 12).

    With ``g = dL/dy``, ``z = w - mean(w)`` and ``s = sum_j g_j z_j`` per row, the backward is
    ``dL/dw_i = c (g_i - mean(g)) + (dc/dv) (2 / (n - d)) s z_i`` (``d`` the variance's
    correction, 1 or 0), and for PWS ``dL/dalpha = s sqrt(2/n) / sqrt(v + gamma)``. It takes two
    row reductions of ``g`` and two fused passes. ``z`` is not stored, so that the graph holds no
    copy of the weight: ``s = g . w - mean(w) sum(g)`` and ``z_i`` enters as ``w_i - mean(w)``
    inside the fused pass, which costs float32 accuracy only for filters whose mean is many
    times their spread. A constant row (WS, ``v = 0``) gets no gradient through ``v``, as with
    ``torch.std``. Second derivatives are not supported.

    Forward args: ``flat: (O, n)``, ``alpha: (O,)`` or None, ``gamma`` (PWS), ``eps`` (WS).
    """

    @staticmethod
    def forward(
        ctx, flat: torch.Tensor, alpha: torch.Tensor | None, gamma: float, eps: float
    ) -> torch.Tensor:
        out, mean, var, scale = _center_and_scale(flat, alpha, gamma, eps, inplace=True)
        ctx.gamma = gamma
        ctx.save_for_backward(flat, alpha, mean, var, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, alpha, mean, var, scale = ctx.saved_tensors
        n = flat.shape[1]
        product = torch.mul(grad, flat)
        grad_sum = grad.sum(dim=1, keepdim=True)
        dot = product.sum(dim=1, keepdim=True).sub_(mean * grad_sum)
        grad_weight = grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (dot * torch.rsqrt((var + ctx.gamma) * (n / 2))).view_as(alpha)
        if ctx.needs_input_grad[0]:
            if alpha is None:
                # dc/dv * 2/(n-1) = -c^2 / ((n-1) sqrt(v)); zero where the row is constant.
                std = var.sqrt()
                slope = (scale * scale).div_(std * -(n - 1)).masked_fill_(std == 0, 0.0)
            else:
                # dc/dv * 2/n = -c / (n (v + gamma)).
                slope = scale / ((var + ctx.gamma) * -n)
            coef = slope.mul_(dot)
            offset = (scale * grad_sum).div_(-n).sub_(coef * mean)
            grad_weight = torch.addcmul(offset, grad, scale, out=product).addcmul_(flat, coef)
        return grad_weight, grad_alpha, None, None


def _standardize(
    weight: torch.Tensor, alpha: torch.Tensor | None, gamma: float, eps: float
) -> torch.Tensor:
    flat = weight.flatten(1)
    tracked = weight.requires_grad or (alpha is not None and alpha.requires_grad)
    if torch.jit.is_tracing():
        # Exporters (ONNX, TorchScript) get plain, differentiable ops in every grad mode.
        out = _center_and_scale(flat, alpha, gamma, eps, inplace=False)[0]
    elif torch.is_grad_enabled() and tracked:
        out = FilterStandardization.apply(flat, alpha, gamma, eps)
    else:
        out = _center_and_scale(flat, alpha, gamma, eps, inplace=True)[0]
    return out.view_as(weight)


def standardize_filters(weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """WS: ``(W_o - mean(W_o)) / (std(W_o) + eps)`` per filter, ``std`` unbiased.

    Args:
        weight: ``(C_out, ...)``, one filter per leading index.

    Returns:
        The standardized weight, shaped like ``weight``.
    """
    return _standardize(weight, None, 0.0, eps)


def parametric_standardize_filters(
    weight: torch.Tensor, alpha: torch.Tensor, *, gamma: float
) -> torch.Tensor:
    """PWS (eq. 12): ``alpha_o sqrt(2/n) (W_o - mean(W_o)) / sqrt(Var(W_o) + gamma)``.

    Args:
        weight: ``(C_out, ...)``, one filter of ``n`` elements per leading index.
        alpha: ``(C_out,)``.
        gamma: added to the population variance.

    Returns:
        The standardized weight, shaped like ``weight``.
    """
    return _standardize(weight, alpha, gamma, 0.0)


def plain_conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``conv``'s geometry and the given weight and bias."""
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
    ).to(weight)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain


@torch.no_grad()
def copy_plain_bias(conv: nn.Module, bias: torch.Tensor | None) -> None:
    """Set ``conv``'s bias, where it has one, to a plain layer's ``bias`` (zero if it has none)."""
    if conv.bias is None:
        return
    if bias is None:
        conv.bias.zero_()
    else:
        conv.bias.copy_(bias)


def fan_in_normal_init(conv: nn.Conv2d, nonlinearity: str) -> None:
    """He's fan-in normal init of ``conv.weight`` for ``nonlinearity``; a zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity=nonlinearity)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class StandardizedConvMixin:
    """Makes an ``nn.Conv2d`` convolve with :meth:`standardized_weight`.

    Mixed into the WS, PWS and scaled WS convolutions (``class X(StandardizedConvMixin,
    nn.Conv2d)``), which differ only in how they standardize their filters: each defines
    ``standardized_weight``; the forward and :meth:`fuse` use it.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def fan_in(self) -> int:
        """``n = C_in/groups * k_h * k_w``: the number of elements of one filter."""
        return self.weight[0].numel()

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses: ``(C_out, C_in/groups, k_h, k_w)``."""
        raise NotImplementedError(f"{type(self).__name__} defines no standardized_weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the standardized weight and the bias."""
        return plain_conv_like(self, self.standardized_weight(), self.bias)

    @torch.no_grad()
    def _take_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Copy a plain convolution's ``weight`` and ``bias`` in (for ``load_plain_weights``).

        Returns:
            The population variance of each plain filter, ``(C_out,)``: a subclass sets its
            per-filter scale from it so that the standardized filter keeps the plain one's scale.
        """
        var = weight.flatten(1).var(dim=1, unbiased=False)
        self.weight.copy_(weight)
        copy_plain_bias(self, bias)
        return var


class WSConv2d(StandardizedConvMixin, nn.Conv2d):
    """``nn.Conv2d`` whose filters are standardized at every forward.

    Args:
        eps: added to the unbiased standard deviation (Qiao et al.'s code), or with
            ``population`` to the population variance.
        population: BiT's form, ``(W - mean) / sqrt(var + eps)`` with the population variance
            (timm's ``StdConv2d``); False: Qiao et al.'s ``(W - mean) / (std + eps)``.
        Other arguments are those of ``nn.Conv2d``.
    """

    def __init__(self, *args, eps: float = 1e-5, population: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.population = bool(population)

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses: ``(C_out, C_in/groups, k, k)``."""
        if not self.population:
            return standardize_filters(self.weight, eps=self.eps)
        # PWS's eq. 12 with alpha = sqrt(n / 2) is (W - mean) / sqrt(var + eps): one kernel.
        alpha = self.weight.new_full((self.weight.shape[0],), math.sqrt(self.fan_in / 2))
        return parametric_standardize_filters(self.weight, alpha, gamma=self.eps)

    def extra_repr(self) -> str:
        form = ", population=True" if self.population else ""
        return super().extra_repr() + f", eps={self.eps}{form}"


__all__ = [
    "FilterStandardization",
    "StandardizedConvMixin",
    "WSConv2d",
    "copy_plain_bias",
    "fan_in_normal_init",
    "parametric_standardize_filters",
    "plain_conv_like",
    "standardize_filters",
]
