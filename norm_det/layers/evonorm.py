"""EvoNorm-B0 and EvoNorm-S0: evolved normalization-activation layers.

Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers", NeurIPS 2020, Table 1
(the expressions of B0 and S0) and the authors' release (``evonorm`` in
``models/official/resnet/resnet_model.py`` of github.com/tensorflow/tpu). Per channel ``c``,
with ``gamma`` (``weight``, 1), ``beta`` (``bias``, 0) and ``v`` (1) learned per channel,

    B0:  y = x / max(sqrt(s2_bwh(x) + eps), v x + sqrt(s2_wh(x) + eps)) * gamma + beta,
    S0:  y = x sigmoid(v x) / sqrt(s2_whg(x) + eps) * gamma + beta,

``s2_wh`` the variance over ``H x W`` of each sample's channel, ``s2_whg`` the variance over
``C/G x H x W`` of each sample's group of ``C/G`` consecutive channels (GroupNorm's groups,
``G = 32``), and ``s2_bwh`` the variance over ``N x H x W`` of the channel in training and its
running average in eval. As in the release (``tf.nn.moments``), every variance the output uses
is the biased one (divided by the count), and ``eps = 1e-5``. The release's moving variance
starts at 1 and moves by ``decay = 0.9`` towards the biased batch variance; here ``running_var``
moves by ``momentum = 0.1`` towards the unbiased one, as ``nn.BatchNorm2d``'s does, so that the
population statistics that norm_det recomputes (PreciseBN) mean the same for every BN-like
layer; the two differ by the factor ``NHW / (NHW - 1)``.

``activation=False`` is the release's ``nonlinearity=False``, the norm of a layer that no
activation follows (a residual branch's last norm, a projection shortcut's): there the release
applies the affine transform alone, ``y = gamma x + beta`` (no statistic, no ``v``, no running
variance). Such a layer is a fixed per-channel affine map and folds into the convolution before
it (``folded_affine``). With the activation neither folds: S0's statistic belongs to each sample;
B0 divides by ``max(., v x + ...)``, which depends on the sample's own ``x`` and its
instance variance, even in eval. No torch module computes them, so there is no ``fuse``.

The release excludes every EvoNorm variable (``gamma``, ``beta``, ``v``) from weight decay
(``resnet_main.py``: variables named ``evonorm``), hence ``_no_weight_decay``. Its S0 falls
back to the largest group count of at most 32 that divides ``C``; here groups behave exactly as
:class:`norm_det.layers.group_norm.GroupNorm`'s (:func:`~norm_det.layers.group_norm.
resolve_groups`).

Training runs one autograd function per layer with the backward written out, working through
blocks of rows whose temporaries stay in cache on CPU (the helpers of :mod:`norm_det.layers.frn`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from norm_det.layers.checks import check_feature_maps, check_integer, check_positive
from norm_det.layers.group_norm import DEFAULT_GROUPS, resolve_groups
from norm_det.layers.row_blocks import (
    block_scratch,
    blocks,
    channel_rows,
    forward_mode,
    rows_per_block,
    statistics_dtype,
)


def _biased_var(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The variance over ``dims`` (divided by the count), dims kept, in plain tensor ops."""
    return (x - x.mean(dim=dims, keepdim=True)).square().mean(dim=dims, keepdim=True)


def _moments(rows: torch.Tensor, per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, sum of squared deviations)`` of each row of ``rows: (R, ...)``, two-pass.

    The squared deviations are summed from the centered row (in a block-sized scratch), so the
    variance keeps its accuracy when the mean is large against the spread.
    """
    stat = statistics_dtype(rows.dtype)
    count = rows[0].numel() if len(rows) else 1
    dims = tuple(range(1, rows.dim()))
    mean = torch.empty(len(rows), dtype=stat, device=rows.device)
    squares = torch.empty_like(mean)
    scratch = block_scratch(rows, per_block)
    shape = (-1,) + (1,) * len(dims)
    for x_b, mean_b, squares_b in blocks(per_block, rows, mean, squares):
        torch.sum(x_b, dims, dtype=stat, out=mean_b).div_(count)
        centered = torch.sub(x_b, mean_b.to(rows.dtype).view(shape), out=scratch[: len(x_b)])
        squares_b.copy_(torch.linalg.vector_norm(centered, dim=dims, dtype=stat).square_())
    return mean, squares


# ---------------------------------------------------------------------------------------------
# EvoNorm-S0


def _group_rows(per_channel: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """A ``(C,)`` tensor as ``(N * G, C/G, 1)``, one row per (sample, group)."""
    return per_channel.view(1, groups, -1).expand(n, -1, -1).reshape(n * groups, -1, 1)


def _s0_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    v: torch.Tensor,
    groups: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, r)``: the output; per (sample, group) row the mean, ``1/sqrt(var + eps)``."""
    n, channels, height, width = x.shape
    rows = x.view(n * groups, channels // groups, height * width)
    per_block = rows_per_block(rows)
    mean, squares = _moments(rows, per_block)
    r = torch.rsqrt(squares.div_(rows[0].numel()).add_(eps))

    weight_r, bias_r, v_r = (_group_rows(p, n, groups) for p in (weight, bias, v))
    # Written through a view, returned as the tensor itself: a custom Function's output that
    # is a view could not take an in-place ReLU after it.
    result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = result.view_as(rows)
    scratch = block_scratch(rows, per_block)
    for x_b, out_b, r_b, w_b, b_b, v_b in blocks(per_block, rows, out, r, weight_r, bias_r, v_r):
        gate = torch.mul(x_b, v_b, out=scratch[: len(x_b)]).sigmoid_()
        gate.mul_((w_b * r_b.view(-1, 1, 1)).to(x.dtype))
        torch.addcmul(b_b, gate, x_b, out=out_b)
    return result, mean, r


class EvoNormS0Function(torch.autograd.Function):
    """EvoNorm-S0 of ``x: (N, C, H, W)`` with ``weight, bias, v: (C,)`` and ``G`` groups.

    Per (sample, group) row of ``M = (C/G) H W`` elements with mean ``mu`` and
    ``r = (var + eps)^(-1/2)``, ``s = sigmoid(v x)``, ``a = gamma r`` and output gradient ``g``:

        p = g x s (1 - s),   T_c = sum_hw g x s,   k = r^3 sum_c gamma_c T_c / M,
        dL/dx = a (g s + v p) - k (x - mu),
        dL/dgamma = sum_n r T,   dL/dv = sum_n a sum_hw p x,   dL/dbeta = sum_n sum_hw g.

    ``s`` is recomputed rather than stored, so the graph holds nothing of full size but ``x``.
    Second derivatives are not supported.

    Forward args: ``x``, ``weight``, ``bias``, ``v`` (in ``x``'s dtype), ``groups``, ``eps``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, v, groups, eps):
        x = x.contiguous()
        out, mean, r = _s0_forward(x, weight, bias, v, groups, eps)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, v, mean, r)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, v, mean, r = ctx.saved_tensors
        groups = ctx.groups
        n, channels, height, width = x.shape
        per_group = channels // groups
        stat = r.dtype
        rows = x.view(n * groups, per_group, height * width)
        grad = grad.contiguous().view_as(rows)
        count = rows[0].numel()
        per_block = rows_per_block(rows)

        weight_r, v_r = _group_rows(weight.to(stat), n, groups), _group_rows(v, n, groups)
        grad_x = torch.empty_like(rows)
        gate, gated, product = (block_scratch(rows, per_block) for _ in range(3))
        # Per (row, channel of the group): T, sum_hw p x and sum_hw g.
        total, slope, grad_sum = torch.empty(3, n * groups, per_group, dtype=stat, device=x.device)
        for x_b, g_b, dx_b, w_b, v_b, mu_b, r_b, t_b, sl_b, gs_b in blocks(
            per_block, rows, grad, grad_x, weight_r, v_r, mean, r, total, slope, grad_sum
        ):
            length = len(x_b)
            s = torch.mul(x_b, v_b, out=gate[:length]).sigmoid_()
            g_s = torch.mul(g_b, s, out=gated[:length])
            p = torch.mul(g_s, x_b, out=product[:length])
            torch.sum(p, 2, dtype=stat, out=t_b)
            p.addcmul_(p, s, value=-1.0)  # g x s - g x s s = g x s (1 - s)
            torch.sum(g_b, 2, dtype=stat, out=gs_b)
            k = (w_b.view(length, -1) * t_b).sum(1).mul_(r_b.pow(3)).div_(count)
            a = (w_b * r_b.view(-1, 1, 1)).to(x.dtype)
            torch.addcmul(g_s, p, v_b, out=dx_b).mul_(a)
            dx_b.addcmul_(x_b, (-k).to(x.dtype).view(-1, 1, 1))
            dx_b.add_((k * mu_b).to(x.dtype).view(-1, 1, 1))
            torch.sum(p.mul_(x_b), 2, dtype=stat, out=sl_b)

        r_g = r.view(n, groups, 1)
        grad_weight = (r_g * total.view(n, groups, per_group)).sum(0)
        grad_v = (weight_r.view(n, groups, per_group) * r_g * slope.view(n, groups, per_group)).sum(
            0
        )
        grad_bias = grad_sum.view(n, groups, per_group).sum(0)
        grad_input = grad_x.view_as(x) if ctx.needs_input_grad[0] else None
        return (
            grad_input,
            grad_weight.reshape(-1).to(weight.dtype),
            grad_bias.reshape(-1).to(weight.dtype),
            grad_v.reshape(-1).to(v.dtype),
            None,
            None,
        )


def evonorm_s0_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    v: torch.Tensor,
    groups: int,
    eps: float,
) -> torch.Tensor:
    """EvoNorm-S0 in plain differentiable tensor ops, for tracers and exporters."""
    n, channels, height, width = x.shape
    grouped = x.reshape(n, groups, channels // groups * height * width)
    std = (_biased_var(grouped, (2,)) + eps).sqrt().expand_as(grouped).reshape_as(x)
    shape = (1, -1, 1, 1)
    return x * torch.sigmoid(v.view(shape) * x) / std * weight.view(shape) + bias.view(shape)


# ---------------------------------------------------------------------------------------------
# EvoNorm-B0


def _b0_denominator(
    x_b: torch.Tensor,
    v_b: torch.Tensor,
    inst_b: torch.Tensor,
    batch_b: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """``max(batch_std, v x + instance_std)`` of a block of rows, written to ``out``."""
    return torch.addcmul(inst_b, x_b, v_b, out=out).clamp_(min=batch_b)


def _b0_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    v: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The output and ``(inst_mean, inst_std, batch_mean, batch_std)`` for the backward.

    In training the batch statistics come from the per-row moments (Chan et al.'s pairwise
    combination, no second pass over ``x``) and ``running_var`` moves towards the unbiased
    batch variance; in eval ``batch_std`` is ``sqrt(running_var + eps)`` (``batch_mean`` then
    unused).
    """
    n, channels, height, width = x.shape
    count = height * width
    rows = x.view(n * channels, count)
    per_block = rows_per_block(rows)
    inst_mean, inst_squares = _moments(rows, per_block)
    inst_std = (inst_squares / count).add_(eps).sqrt_()
    if training:
        means = inst_mean.view(n, channels)
        batch_mean = means.mean(0)
        batch_squares = (
            inst_squares.view(n, channels).sum(0) + (means - batch_mean).square().sum(0) * count
        )
        batch_var = batch_squares / (n * count)
        with torch.no_grad():
            unbiased = batch_squares / (n * count - 1)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    else:
        batch_mean = torch.zeros(channels, dtype=inst_std.dtype, device=x.device)
        batch_var = running_var.to(inst_std.dtype)
    batch_std = (batch_var + eps).sqrt()

    inst_std_x = inst_std.to(x.dtype).view(-1, 1)
    batch_std_x = channel_rows(batch_std.to(x.dtype), n)
    v_r, weight_r, bias_r = (channel_rows(p, n) for p in (v, weight, bias))
    # Written through a view, returned as the tensor itself: a custom Function's output that
    # is a view could not take an in-place ReLU after it.
    result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = result.view_as(rows)
    scratch = block_scratch(rows, per_block)
    for x_b, out_b, v_b, is_b, bs_b, w_b, b_b in blocks(
        per_block, rows, out, v_r, inst_std_x, batch_std_x, weight_r, bias_r
    ):
        d = _b0_denominator(x_b, v_b, is_b, bs_b, scratch[: len(x_b)])
        torch.div(x_b, d, out=out_b).mul_(w_b).add_(b_b)
    return result, (inst_mean, inst_std, batch_mean, batch_std)


class EvoNormB0Function(torch.autograd.Function):
    """EvoNorm-B0 of ``x: (N, C, H, W)`` with ``weight, bias, v: (C,)``.

    Per (sample, channel) row of ``M = H W`` positions: instance mean ``mu_i`` and std
    ``sigma_i = sqrt(var_i + eps)``; per channel the batch mean ``mu_b`` and std ``sigma_b``
    (a constant from ``running_var`` in eval); ``d = max(sigma_b, v x + sigma_i)``,
    ``m = [v x + sigma_i > sigma_b]``, ``y = gamma x / d + beta``. With output gradient ``g``
    and ``e = -gamma g x / d^2 = dL/dd``:

        dL/dx = gamma g / d + v m e + (sum_hw m e) / (M sigma_i) (x - mu_i)
                + (sum_nhw (1 - m) e) / (N M sigma_b) (x - mu_b)      (last term: training),
        dL/dgamma = sum g x / d,   dL/dv = sum m e x,   dL/dbeta = sum g.

    The last term needs a sum over the whole batch, so a second pass over the blocks adds the
    terms in ``x`` once every block's sums are known. Second derivatives are not supported.

    Forward args: ``x``, ``weight``, ``bias``, ``v``, ``running_var`` (updated in place when
    ``training``), ``training``, ``momentum``, ``eps``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, v, running_var, training, momentum, eps):
        x = x.contiguous()
        out, saved = _b0_forward(x, weight, bias, v, running_var, training, momentum, eps)
        ctx.training = training
        ctx.save_for_backward(x, weight, v, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, v, inst_mean, inst_std, batch_mean, batch_std = ctx.saved_tensors
        n, channels, height, width = x.shape
        count = height * width
        stat = inst_std.dtype
        rows = x.view(n * channels, count)
        grad = grad.contiguous().view_as(rows)
        per_block = rows_per_block(rows)
        weight_s = weight.to(stat)
        inst_std_x = inst_std.to(x.dtype).view(-1, 1)
        batch_std_x = channel_rows(batch_std.to(x.dtype), n)
        v_r = channel_rows(v, n)
        # The first pass's part of dx, gamma g / d - gamma v (m g x / d^2), takes these per row.
        gamma_r = channel_rows(weight, n)
        gamma_v_r = channel_rows(-(weight * v), n)

        grad_x = torch.empty_like(rows)
        recip, scaled, masked = (block_scratch(rows, per_block) for _ in range(3))
        # Per row: sum g x / d, sum g x / d^2, sum m g x / d^2, sum m g x^2 / d^2, sum g.
        sums = torch.empty(5, n * channels, dtype=stat, device=x.device)
        for x_b, g_b, dx_b, v_b, is_b, bs_b, gm_b, gv_b, s_b in blocks(
            per_block,
            rows,
            grad,
            grad_x,
            v_r,
            inst_std_x,
            batch_std_x,
            gamma_r,
            gamma_v_r,
            sums.t(),
        ):
            length = len(x_b)
            d = _b0_denominator(x_b, v_b, is_b, bs_b, recip[:length])
            m = torch.gt(d, bs_b, out=masked[:length])
            d.reciprocal_()
            g_d = torch.mul(g_b, d, out=scaled[:length])
            s_b[:, 0].copy_(torch.linalg.vecdot(g_d, x_b))
            gx_d2 = d.mul_(g_d).mul_(x_b)
            torch.sum(gx_d2, 1, dtype=stat, out=s_b[:, 1])
            m_gx_d2 = m.mul_(gx_d2)
            torch.sum(m_gx_d2, 1, dtype=stat, out=s_b[:, 2])
            s_b[:, 3].copy_(torch.linalg.vecdot(m_gx_d2, x_b))
            torch.sum(g_b, 1, dtype=stat, out=s_b[:, 4])
            torch.mul(g_d, gm_b, out=dx_b).addcmul_(m_gx_d2, gv_b)

        g_x_d, g_x_d2, m_g_x_d2, m_g_x2_d2, g_sum = sums.view(5, n, channels)
        gamma = weight_s.view(1, -1)
        # e = -gamma g x / d^2: sum_hw m e and, per channel, sum_nhw (1 - m) e.
        inst_coef = -gamma * m_g_x_d2 / (count * inst_std.view(n, channels))
        x_coef, shift = inst_coef, inst_coef * inst_mean.view(n, channels)
        if ctx.training:
            batch_grad = (-gamma * (g_x_d2 - m_g_x_d2)).sum(0, keepdim=True)
            batch_coef = batch_grad / (n * count * batch_std.view(1, -1))
            x_coef = x_coef + batch_coef
            shift = shift + batch_coef * batch_mean.view(1, -1)
        x_coef = x_coef.reshape(-1, 1).to(x.dtype)
        shift = shift.reshape(-1, 1).to(x.dtype)
        for x_b, dx_b, c_b, sh_b in blocks(per_block, rows, grad_x, x_coef, shift):
            dx_b.addcmul_(x_b, c_b).sub_(sh_b)

        grad_weight = g_x_d.sum(0).to(weight.dtype)
        grad_v = (-gamma * m_g_x2_d2).sum(0).to(v.dtype)
        grad_bias = g_sum.sum(0).to(weight.dtype)
        grad_input = grad_x.view_as(x) if ctx.needs_input_grad[0] else None
        return grad_input, grad_weight, grad_bias, grad_v, None, None, None, None


def evonorm_b0_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    v: torch.Tensor,
    batch_var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """EvoNorm-B0 in plain differentiable tensor ops, for tracers and exporters.

    Args:
        batch_var: ``(C,)``, the batch's biased variance (training) or ``running_var`` (eval).
    """
    shape = (1, -1, 1, 1)
    right = v.view(shape) * x + (_biased_var(x, (2, 3)) + eps).sqrt()
    denominator = torch.maximum((batch_var + eps).sqrt().view(shape), right)
    return x / denominator * weight.view(shape) + bias.view(shape)


# ---------------------------------------------------------------------------------------------
# The layers


class _EvoNorm(nn.Module):
    """What EvoNorm-B0 and -S0 share: the parameters, the check of the arguments, the affine
    map of ``activation=False``."""

    _no_weight_decay = ("weight", "bias", "v")

    @property
    def carries_activation(self) -> bool:
        """Whether it applies its non-linearity, the activation after it (the layer protocol)."""
        return self.activation

    def __init__(self, num_channels: int, eps: float, activation: bool) -> None:
        super().__init__()
        name = type(self).__name__
        check_integer(name, "num_channels", num_channels, 1)
        check_positive(name, "eps", eps)
        self.num_channels = num_channels
        self.eps = eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels)) if activation else None

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        """The release's ``nonlinearity=False``: ``gamma x + beta``.

        Computed as batch norm in eval mode with mean 0, variance 1 and eps 0, which is
        ``x * gamma + beta`` to rounding: torch's fused kernels then make one full-size tensor
        each way, where the autograd of ``addcmul`` makes three.
        """
        zeros = torch.zeros(self.num_channels, dtype=x.dtype, device=x.device)
        ones = torch.ones_like(zeros)
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return nn.functional.batch_norm(x, zeros, ones, weight, bias, False, 0.0, 0.0)

    @torch.no_grad()
    def folded_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel ``(scale, shift)`` of ``activation=False``; None with the activation,
        whose output is no affine map of ``x`` (layer protocol)."""
        if self.activation:
            return None
        return self.weight.detach().clone(), self.bias.detach().clone()


class EvoNormS0(_EvoNorm):
    """EvoNorm-S0 of ``(N, C, H, W)`` activations: a batch-independent norm and activation.

    Args:
        num_channels: ``C``.
        groups: groups of consecutive channels whose variance is shared, as GroupNorm's (32).
        eps: added to the group variance (release: 1e-5).
        activation: the S0 expression (it replaces a norm and its activation); False: the
            release's affine map ``gamma x + beta`` for a norm no activation follows.
        strict: the group count was asked for (a scheme option): refuse one that does not
            divide ``C`` instead of falling back to the gcd with a warning.

    Parameters: ``weight``, ``bias``, ``v`` (only with ``activation``), all ``(C,)``. No
    buffers: training and eval compute the same function.

    Raises:
        ValueError: ``groups`` does not divide ``num_channels`` and was asked for, or a bad
            ``eps`` / ``num_channels``.
    """

    _abbr_ = "evonorm_s0"

    def __init__(
        self,
        num_channels: int,
        *,
        groups: int = DEFAULT_GROUPS,
        eps: float = 1e-5,
        activation: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__(num_channels, eps, activation)
        self.groups = resolve_groups(num_channels, groups, strict, "EvoNormS0", ("EvoNorm-S0",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_maps(self, x, self.num_channels)
        if not self.activation:
            return self._affine(x)
        weight, bias, v = (p.to(x.dtype) for p in (self.weight, self.bias, self.v))
        mode = forward_mode(x, self.weight, self.bias, self.v)
        if mode == "reference":
            return evonorm_s0_reference(x, weight, bias, v, self.groups, self.eps)
        if mode == "autograd":
            return EvoNormS0Function.apply(x, weight, bias, v, self.groups, self.eps)
        return _s0_forward(x.contiguous(), weight, bias, v, self.groups, self.eps)[0]

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, groups={self.groups}, eps={self.eps}, "
            f"activation={self.activation}"
        )


class EvoNormB0(_EvoNorm):
    """EvoNorm-B0 of ``(N, C, H, W)`` activations: batch and instance statistics together.

    Args:
        num_channels: ``C``.
        eps: added to the batch and instance variances (release: 1e-5).
        momentum: update rate of ``running_var`` (release: decay 0.9, i.e. 0.1).
        activation: the B0 expression (it replaces a norm and its activation); False: the
            release's affine map ``gamma x + beta`` for a norm no activation follows (no
            statistics, no ``running_var``).

    Parameters: ``weight``, ``bias``, ``v`` (only with ``activation``), all ``(C,)``. Buffers:
    ``running_var`` ``(C,)``, started at 1 (only with ``activation``), used in eval.

    Raises:
        ValueError: a bad ``eps``, ``momentum`` or ``num_channels``; in training, a batch with
            one value per channel (its unbiased variance is undefined, as for BatchNorm).
    """

    _abbr_ = "evonorm_b0"

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        activation: bool = True,
    ) -> None:
        super().__init__(num_channels, eps, activation)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EvoNormB0: momentum must be in [0, 1]; got {momentum}")
        self.momentum = momentum
        self.register_buffer("running_var", torch.ones(num_channels) if activation else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_maps(self, x, self.num_channels)
        if not self.activation:
            return self._affine(x)
        n, _, height, width = x.shape
        if self.training and n * height * width == 1:
            raise ValueError(
                f"EvoNormB0({self.extra_repr()}): training needs more than one value per channel "
                f"for the batch variance; got input {tuple(x.shape)}"
            )
        weight, bias, v = (p.to(x.dtype) for p in (self.weight, self.bias, self.v))
        mode = forward_mode(x, self.weight, self.bias, self.v)
        if mode == "reference":
            if self.training:
                batch_var = _biased_var(x, (0, 2, 3)).flatten()
                if x.numel() > 0:
                    with torch.no_grad():
                        count = n * height * width
                        unbiased = batch_var.detach() * (count / (count - 1))
                        self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
            else:
                batch_var = self.running_var.to(x.dtype)
            return evonorm_b0_reference(x, weight, bias, v, batch_var, self.eps)
        args = (x, weight, bias, v, self.running_var, self.training, self.momentum, self.eps)
        if mode == "autograd":
            return EvoNormB0Function.apply(*args)
        return _b0_forward(x.contiguous(), *args[1:])[0]

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, "
            f"activation={self.activation}"
        )


__all__ = [
    "EvoNormB0",
    "EvoNormB0Function",
    "EvoNormS0",
    "EvoNormS0Function",
    "evonorm_b0_reference",
    "evonorm_s0_reference",
]
