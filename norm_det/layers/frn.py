"""Filter response normalization with a thresholded linear unit (FRN + TLU).

Singh & Krishnan, "Filter Response Normalization Layer: Eliminating Batch Dependence in the
Training of Deep Neural Networks", CVPR 2020, section 3 and Algorithm 1. Per sample and channel,
over the ``M = H x W`` positions,

    nu^2 = sum_i x_i^2 / M,   x_hat = x / sqrt(nu^2 + eps),   y = gamma x_hat + beta,
    z = max(y, tau)                                        (TLU, the layer's activation).

There is no mean centering and no batch statistic: the layer computes the same function in
training and in eval, for any batch size. ``gamma`` (``weight``) starts at 1, ``beta`` (``bias``)
and ``tau`` at 0, all per channel. The paper's ``eps`` is 1e-6. For activation maps of few
positions (1x1, where ``x_hat`` degenerates to ``sign(x)``) the paper learns it instead, bounded
below as ``eps = 1e-6 + |eps_l|`` with one learned scalar ``eps_l`` started at 1e-4; its
Algorithm 1 adds ``|eps|`` for that reason. These numbers are the issue's and our reading of the
paper: no stored copy of it that we could search holds the passage. ``learnable_eps`` keeps the
``eps`` argument as the lower bound.

The layer cannot fold into the convolution before it: ``nu^2`` is each sample's own statistic,
so its eval transform is no fixed affine map (``folded_affine`` is None); and no torch module
computes it, so there is no ``fuse`` (a fused model keeps the layer).

Training runs one autograd function with the backward written out (as
:mod:`norm_det.layers.weight_std` does): composed of tensor ops, autograd keeps and replays five
full-size temporaries. It works through blocks of rows (:mod:`norm_det.layers.row_blocks`,
shared with :mod:`norm_det.layers.evonorm`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from norm_det.layers.checks import check_feature_maps, check_integer, check_positive
from norm_det.layers.row_blocks import (
    block_scratch,
    blocks,
    channel_rows,
    forward_mode,
    rows_per_block,
    statistics_dtype,
)

# The paper's starting value of the learned epsilon's free part ``eps_l``.
LEARNED_EPS_INIT = 1e-4


def _frn_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: torch.Tensor | None,
    eps: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, r)``: the output ``(N, C, H, W)`` and ``r = 1/sqrt(nu^2 + eps)`` per row."""
    n, channels, height, width = x.shape
    numel = height * width
    rows = x.view(n * channels, numel)
    stat = statistics_dtype(x.dtype)
    r = torch.empty(n * channels, dtype=stat, device=x.device)
    # Written through a view, returned as the tensor itself: a custom Function's output that
    # is a view could not take an in-place ReLU after it.
    result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = result.view_as(rows)
    pieces = [out, rows, r, channel_rows(weight, n), channel_rows(bias, n)]
    if tau is not None:
        pieces.append(channel_rows(tau, n))
    for out_b, x_b, r_b, weight_b, bias_b, *tau_b in blocks(rows_per_block(rows), *pieces):
        # nu^2 = ||x||^2 / M: one streaming reduction, no x^2 temporary.
        nu2 = torch.linalg.vector_norm(x_b, dim=1, dtype=stat).square_().div_(numel)
        torch.rsqrt(nu2.add_(eps), out=r_b)
        scale = (r_b[:, None] * weight_b).to(x.dtype)
        torch.addcmul(bias_b, x_b, scale, out=out_b)
        if tau_b:
            out_b.clamp_(min=tau_b[0])
    return result, r


class FilterResponseNormFunction(torch.autograd.Function):
    """FRN (+ TLU) of ``x: (N, C, H, W)`` with ``weight, bias, tau: (C,)``.

    Per (sample, channel) row with ``M = H W`` positions, ``r = (nu^2 + eps)^(-1/2)``,
    ``a = gamma r``, TLU mask ``m = [y > tau]`` (all ones without TLU), ``g_y = m g`` and
    ``s = sum_i g_y,i x_i``, the backward is

        dL/dx = a g_y - (a r^2 s / M) x,     dL/dgamma = sum_n r s,
        dL/dbeta = sum_n sum_i g_y,i,        dL/dtau = sum_n sum_i (g_i - g_y,i),
        dL/deps = -1/2 sum_rows a r^2 s,

    that is, per block of rows, the mask, two row sums, a row dot product and two fused passes.
    The mask comes from the output: ``z > tau`` exactly where ``y > tau`` (``z = tau``
    elsewhere). Second derivatives are not supported.

    Forward args: ``x``, ``weight``, ``bias``, ``tau`` (None: no TLU), ``eps`` (a float, or a
    0-d tensor when it is learned), all in ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        x = x.contiguous()
        out, r = _frn_forward(x, weight, bias, tau, eps)
        # The output gives TLU's mask; without TLU it is not needed, and not keeping it lets an
        # in-place ReLU follow (a model whose own forward applies one).
        ctx.save_for_backward(x, out if tau is not None else None, r, weight, tau)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, out, r, weight, tau = ctx.saved_tensors
        n, channels, height, width = x.shape
        numel = height * width
        stat = r.dtype
        rows = x.view(n * channels, numel)
        z = rows if out is None else out.view(n * channels, numel)  # read only with TLU
        grad = grad.contiguous().view_as(rows)
        scale = (r.view(n, channels) * weight).view(-1)  # a = gamma r
        needs_x = ctx.needs_input_grad[0]

        grad_x = torch.empty_like(rows)
        # Per row: s, sum_i g_y,i and (with TLU) sum_i g_i.
        dot, grad_y_sum, grad_sum = torch.empty(3, n * channels, dtype=stat, device=x.device)
        pieces = [rows, z, grad, grad_x, dot, grad_y_sum, grad_sum, scale, r]
        if tau is not None:
            pieces.append(channel_rows(tau, n))
        for x_b, z_b, g_b, dx_b, dot_b, gy_sum_b, g_sum_b, a_b, r_b, *tau_b in blocks(
            rows_per_block(rows), *pieces
        ):
            if tau_b:
                grad_y = torch.gt(z_b, tau_b[0], out=dx_b).mul_(g_b)
                torch.sum(g_b, 1, dtype=stat, out=g_sum_b)
            else:
                grad_y = g_b
            torch.sum(grad_y, 1, dtype=stat, out=gy_sum_b)
            dot_b.copy_(torch.linalg.vecdot(grad_y, x_b))
            if needs_x:
                a = a_b[:, None].to(x.dtype)
                c = (a_b * r_b.square() * dot_b).div_(-numel)[:, None].to(x.dtype)
                # dx = a g_y + c x, written over g_y where g_y is in dx already.
                scaled = dx_b.mul_(a) if tau_b else torch.mul(g_b, a, out=dx_b)
                scaled.addcmul_(x_b, c)

        grad_weight = (r * dot).view(n, channels).sum(0).to(weight.dtype)
        grad_bias = grad_y_sum.view(n, channels).sum(0).to(weight.dtype)
        grad_tau = None
        if tau is not None:
            grad_tau = (grad_sum - grad_y_sum).view(n, channels).sum(0).to(tau.dtype)
        grad_eps = None
        if ctx.needs_input_grad[4]:
            grad_eps = (scale * r.square() * dot).sum().mul_(-0.5).to(x.dtype)
        grad_input = grad_x.view_as(x) if needs_x else None
        return grad_input, grad_weight, grad_bias, grad_tau, grad_eps


def filter_response_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: torch.Tensor | None,
    eps: torch.Tensor | float,
) -> torch.Tensor:
    """FRN (+ TLU) in plain differentiable tensor ops, for tracers and exporters.

    Args:
        x: ``(N, C, H, W)``; ``weight``, ``bias``, ``tau`` (None: no TLU): ``(C,)``; ``eps``:
            the whole epsilon.

    Returns:
        ``max(weight * x / sqrt(mean_hw(x^2) + eps) + bias, tau)``, ``(N, C, H, W)``.
    """
    nu2 = x.square().mean(dim=(2, 3), keepdim=True)
    y = x * torch.rsqrt(nu2 + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y if tau is None else torch.maximum(y, tau.view(1, -1, 1, 1))


class FilterResponseNorm2d(nn.Module):
    """FRN of ``(N, C, H, W)`` activations, followed by the TLU ``max(y, tau)`` by default.

    Args:
        num_channels: ``C``.
        eps: the constant added to ``nu^2`` (paper: 1e-6); with ``learnable_eps``, its lower
            bound.
        learnable_eps: learn the epsilon as ``eps + |learned_eps|``, ``learned_eps`` a scalar
            parameter started at 1e-4 (the paper's choice for 1x1 activation maps).
        activation: apply the TLU (the layer replaces a norm and its ReLU); False: ``y`` alone,
            for a norm that no activation follows.

    Parameters: ``weight`` (``gamma``, 1), ``bias`` (``beta``, 0), ``tau`` (0; only with
    ``activation``), all ``(C,)``; ``learned_eps`` (0-d; only with ``learnable_eps``). No
    buffers: training and eval compute the same function.

    Shapes: ``(N, C, H, W)`` -> ``(N, C, H, W)``, in the input's dtype.
    """

    _abbr_ = "frn"
    _no_weight_decay = ("weight", "bias", "tau", "learned_eps")

    @property
    def carries_activation(self) -> bool:
        """Whether it applies TLU, the activation after it (the layer protocol)."""
        return self.activation

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-6,
        learnable_eps: bool = False,
        activation: bool = True,
    ) -> None:
        super().__init__()
        check_integer("FilterResponseNorm2d", "num_channels", num_channels, 1)
        check_positive("FilterResponseNorm2d", "eps", eps)
        self.num_channels = num_channels
        self.eps = eps
        self.learnable_eps = learnable_eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.tau = nn.Parameter(torch.zeros(num_channels)) if activation else None
        self.learned_eps = nn.Parameter(torch.tensor(LEARNED_EPS_INIT)) if learnable_eps else None

    def effective_eps(self) -> torch.Tensor | float:
        """The epsilon added to ``nu^2``: ``eps``, or ``eps + |learned_eps|``."""
        if self.learned_eps is None:
            return self.eps
        return self.learned_eps.abs() + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_maps(self, x, self.num_channels)
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        tau = None if self.tau is None else self.tau.to(x.dtype)
        eps = self.effective_eps()
        if isinstance(eps, torch.Tensor):
            eps = eps.to(x.dtype)
        mode = forward_mode(x, self.weight, self.bias, self.tau, self.learned_eps)
        if mode == "reference":
            return filter_response_norm_reference(x, weight, bias, tau, eps)
        if mode == "autograd":
            return FilterResponseNormFunction.apply(x, weight, bias, tau, eps)
        return _frn_forward(x.contiguous(), weight, bias, tau, eps)[0]

    def folded_affine(self) -> None:
        """None: ``nu^2`` is each sample's own statistic, no fixed affine map (layer protocol)."""
        return None

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps}, learnable_eps={self.learnable_eps}, "
            f"activation={self.activation}"
        )


__all__ = [
    "FilterResponseNorm2d",
    "FilterResponseNormFunction",
    "block_scratch",
    "blocks",
    "channel_rows",
    "filter_response_norm_reference",
    "forward_mode",
    "rows_per_block",
    "statistics_dtype",
]
