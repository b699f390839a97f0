"""Moving average batch normalization (MABN) and its centred convolution.

Yan, Wan, Zhang, Zhang, Wei & Sun, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization", ICLR 2020 (arXiv 2001.06838), section 4. BN's backward
holds two batch statistics besides ``mu_B`` and ``sigma_B^2`` (section 3.1, eq. 5):
``g_B = E[dL/dy]`` and ``Psi_B = E[y dL/dy]``; at a batch of one or two images all four are
noisy. MABN

- drops ``mu`` and ``g`` (section 4.2): the preceding convolution's filters are centred,
  ``W_c <- W_c - mean(W_c)`` over ``(C_in, k, k)`` (:class:`CenteredConv2d`), and the layer
  divides by the second moment ``chi = E[x^2]`` alone, with no mean subtraction;
- replaces the batch statistics by moving averages over iterations (section 4.1): in the
  forward a simple moving average of the last ``m`` batches' ``chi``, in the backward an
  exponential moving average of ``Psi``.

Per channel, over ``N x H x W``, at iteration ``t``:

    chi_t     = E[x^2]
    chi_bar_t = 1/m sum_{s=0}^{m-1} chi_{t-s}                         (SMA, forward)
    z         = x / sqrt(chi_bar_t + eps),   x_hat = r_t z,   y = gamma x_hat + beta
    Psi_t     = E[x_hat_grad . r_t z],       x_hat_grad = dL/dx_hat = gamma dL/dy
    Psi_bar_t = (1 - a) Psi_bar_{t-1} + a Psi_t                     (EMA, backward)
    dL/dx     = (r_t x_hat_grad - z Psi_bar_t) / sqrt(chi_bar_t + eps)

``r_t`` is the release's renormalization (Batch Renormalization's ``r``, Ioffe 2017, a constant
in the backward): ``r_t = clip(sqrt((chi_bar_t + eps) / (chi_hat_{t-1} + eps)), 1/lambda,
lambda)`` with ``chi_hat`` the running second moment, 1 before ``renorm_warmup_iters``; with
``renorm_clip=None`` it is 1 always. During warm-up (the first ``warmup_iters`` iterations, and
until ``m`` batches are held) the layer uses the batch's own ``chi_t`` and ``Psi_t``: its
backward is then the exact derivative of ``y = gamma r x / sqrt(E[x^2] + eps) + beta``.

Eval divides by the running second moment ``chi_hat`` (``running_var``; it plays the variance's
part, there is no mean): ``y = gamma x / sqrt(chi_hat + eps) + beta``, a per-channel affine map
that folds into the preceding convolution. ``chi_hat`` is updated as
``(1 - momentum) chi_hat + momentum chi_t``.

Defaults, from the release (github.com/megvii-model/MABN; ``MABN.py`` and
``det/maskrcnn_benchmark/layers/MABN.py``, COCO Mask R-CNN with 2 images per GPU):

- ``buffer_size`` ``m = 16``: the release's ``real_B / B`` = 32 / 2, the "real batch" of 32
  simulated with a normalization batch of 2 (the paper's small-batch setting);
- ``warmup_iters = 100``;
- ``momentum = 0.02``: the release's ``momentum=0.98`` on the old value of ``running_var``;
  the EMA of ``Psi`` uses ``backward_momentum = 0.02`` likewise;
- ``renorm_clip = 5`` and ``renorm_warmup_iters = 1000``: the release clamps ``r`` to
  ``[1/5, 5]`` after ``max(1000, warmup_iters)`` iterations.

Where the release differs from the paper's equations, the paper is followed: the release
averages ``Psi`` by the same SMA buffer as ``chi``, the paper by an EMA; and its running
statistic averages the SMA ``chi_bar``, here the batch's ``chi_t`` (same expectation, and what
precise statistics re-estimates). The statistics are each process's own, as in the release.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from norm_det.layers.checks import (
    check_feature_maps,
    check_fraction,
    check_integer,
    check_positive,
)
from norm_det.layers.norm_state import init_norm_state, inverse_std_scale
from norm_det.layers.weight_std import plain_conv_like


def _channels(t: torch.Tensor) -> torch.Tensor:
    """``(C,)`` -> ``(1, C, 1, 1)`` for broadcasting over ``(N, C, H, W)``."""
    return t.view(1, -1, 1, 1)


class MovingAverageNormalization(torch.autograd.Function):
    """``y = gamma r x inv_std + beta`` whose backward uses the moving-average ``Psi``.

    ``inv_std = 1/sqrt(chi_bar + eps)`` and ``r`` are ``(C,)`` constants of the forward. The
    backward computes ``Psi_t = E[r gamma (dL/dy) z]`` (``z = x inv_std``), folds it into the EMA
    ``psi_average`` (in place; the first backward sets it), and returns
    ``dL/dx = inv_std (r gamma dL/dy - z Psi_bar)`` with ``Psi_bar`` the EMA where
    ``use_average`` is true and ``Psi_t`` where it is not. Second derivatives are not supported.

    Forward args: ``x: (N, C, H, W)``, ``weight``/``bias``: ``(C,)`` or None, ``inv_std``,
    ``ratio``: ``(C,)``, ``psi_average: (C,)`` and ``psi_steps`` (a long scalar counting the
    backwards seen) updated in place, ``momentum`` of the EMA, ``use_average``: a bool scalar
    tensor (no host synchronization).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        inv_std: torch.Tensor,
        ratio: torch.Tensor,
        psi_average: torch.Tensor,
        psi_steps: torch.Tensor,
        momentum: float,
        use_average: torch.Tensor,
    ) -> torch.Tensor:
        ctx.momentum = momentum
        ctx.save_for_backward(x, weight, inv_std, ratio, use_average)
        ctx.psi = (psi_average, psi_steps)
        scale = inv_std * ratio
        if weight is not None:
            scale = scale * weight
        out = x * _channels(scale)
        return out if bias is None else out + _channels(bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, inv_std, ratio, use_average = ctx.saved_tensors
        psi_average, psi_steps = ctx.psi
        z = x * _channels(inv_std)
        grad_x_hat = grad if weight is None else grad * _channels(weight)
        scaled = grad_x_hat * _channels(ratio)
        psi = (scaled * z).mean(dim=(0, 2, 3))
        with torch.no_grad():
            updated = torch.where(psi_steps == 0, psi, psi_average.lerp(psi, ctx.momentum))
            psi_average.copy_(updated)
            psi_steps.add_(1)
        psi_bar = torch.where(use_average, psi_average, psi)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (scaled - z * _channels(psi_bar)) * _channels(inv_std)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * z).sum(dim=(0, 2, 3)) * ratio
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def second_moment_affine(
    second_moment: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of ``y = weight x / sqrt(second_moment + eps) + bias``, per channel."""
    scale = inverse_std_scale(second_moment, eps, weight)
    shift = torch.zeros_like(scale) if bias is None else bias
    return scale, shift


@torch.no_grad()
def _advance_statistics(
    norm: MovingAverageBatchNorm2d, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training iteration's statistics of ``x``; updates ``norm``'s buffers.

    Counts the iteration, stores the batch's ``chi_t`` in the SMA buffer and moves the running
    second moment towards it.

    Returns:
        ``(inv_std, ratio, use_average)``: ``1/sqrt(chi_bar + eps)`` and the renormalization
        ``r``, both ``(C,)``, and whether the averages replace the batch's statistics (a bool
        tensor: no Python branch, no host synchronization per layer).
    """
    stats = norm.running_var
    norm.num_batches_tracked.add_(1)
    step = norm.num_batches_tracked
    chi = x.detach().square().mean(dim=(0, 2, 3)).to(stats)
    slot = (step - 1).remainder(norm.buffer_size).view(1)
    norm.chi_history.index_copy_(0, slot, chi.view(1, -1))
    use_average = (step > norm.warmup_iters) & (step >= norm.buffer_size)
    chi_bar = torch.where(use_average, norm.chi_history.mean(dim=0), chi)
    inv_std = torch.rsqrt(chi_bar + norm.eps)
    ratio = torch.ones_like(chi_bar)
    if norm.renorm_clip is not None:
        clip = norm.renorm_clip
        renorm = torch.sqrt((chi_bar + norm.eps) / (stats + norm.eps)).clamp(1 / clip, clip)
        ratio = torch.where(step > norm.renorm_warmup_iters, renorm, ratio)
    norm.running_var.lerp_(chi, norm.momentum)
    return inv_std, ratio, use_average


class MovingAverageBatchNorm2d(nn.Module):
    """MABN: normalization by the moving-average second moment, with moving-average gradients.

    Put it after a :class:`CenteredConv2d` (without bias): it subtracts no mean.

    Args:
        num_features: channels ``C`` of the input ``(N, C, H, W)``.
        eps: added to the second moment.
        momentum: of the running second moment ``running_var`` used in eval.
        buffer_size: iterations ``m`` of the forward's simple moving average (the "real batch"
            divided by the batch per process).
        warmup_iters: training forwards that use the batch's own statistics first.
        backward_momentum: of the exponential moving average of ``Psi`` in the backward.
        renorm_clip: ``lambda`` of the renormalization ``r`` in ``[1/lambda, lambda]``; None:
            no renormalization.
        renorm_warmup_iters: training forwards with ``r = 1`` first.
        affine: learn the per-channel ``weight`` and ``bias``.

    Shapes: ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    State (all saved): ``running_var``, the SMA buffer ``chi_history: (m, C)``, the EMA
    ``psi_average`` and the counters ``num_batches_tracked`` and ``num_backward_tracked``, so a
    resumed run continues exactly.
    """

    _abbr_ = "mabn"
    _no_weight_decay = ("weight", "bias")

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.02,
        buffer_size: int = 16,
        warmup_iters: int = 100,
        backward_momentum: float = 0.02,
        renorm_clip: float | None = 5.0,
        renorm_warmup_iters: int = 1000,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_integer(name, "buffer_size", buffer_size, 1)
        check_integer(name, "warmup_iters", warmup_iters, 0)
        check_integer(name, "renorm_warmup_iters", renorm_warmup_iters, 0)
        check_fraction(name, "momentum", momentum)
        check_fraction(name, "backward_momentum", backward_momentum)
        if renorm_clip is not None and not renorm_clip >= 1.0:
            raise ValueError(f"{name}: renorm_clip must be >= 1 or None; got {renorm_clip!r}")
        check_positive(name, "eps", eps)
        factory = {"device": device, "dtype": dtype}
        init_norm_state(self, num_features, eps=eps, momentum=momentum, affine=affine, **factory)
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.backward_momentum = backward_momentum
        self.renorm_clip = renorm_clip
        self.renorm_warmup_iters = renorm_warmup_iters
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("chi_history", torch.zeros(buffer_size, num_features, **factory))
        self.register_buffer("psi_average", torch.zeros(num_features, **factory))
        counter = {"dtype": torch.long, "device": device}
        self.register_buffer("num_batches_tracked", torch.tensor(0, **counter))
        self.register_buffer("num_backward_tracked", torch.tensor(0, **counter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_maps(self, x, self.num_features)
        if not self.training or x.numel() == 0:
            # An empty batch (a head with no boxes) has no statistics: eval transform, no update.
            scale, shift = second_moment_affine(self.running_var, self.eps, self.weight, self.bias)
            return x * _channels(scale).to(x.dtype) + _channels(shift).to(x.dtype)
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        inv_std, ratio, use_average = _advance_statistics(self, compute)
        out = MovingAverageNormalization.apply(
            compute,
            self.weight,
            self.bias,
            inv_std.to(compute.dtype),
            ratio.to(compute.dtype),
            self.psi_average,
            self.num_backward_tracked,
            self.backward_momentum,
            use_average,
        )
        return out.to(x.dtype)

    @torch.no_grad()
    def folded_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval transform ``y = scale * x + shift``, per channel ``(C,)``."""
        scale, shift = second_moment_affine(self.running_var, self.eps, self.weight, self.bias)
        return scale.clone(), shift.clone()

    @torch.no_grad()
    def fuse(self) -> nn.BatchNorm2d:
        """An ``nn.BatchNorm2d`` in eval mode (zero running mean) with this eval transform."""
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine).to(
            self.running_var
        )
        bn.running_mean.zero_()
        bn.running_var.copy_(self.running_var)
        if self.affine:
            bn.weight.copy_(self.weight)
            bn.bias.copy_(self.bias)
        return bn.eval()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"buffer_size={self.buffer_size}, warmup_iters={self.warmup_iters}, "
            f"backward_momentum={self.backward_momentum}, renorm_clip={self.renorm_clip}, "
            f"renorm_warmup_iters={self.renorm_warmup_iters}, affine={self.affine}"
        )


class CenteredConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose filters are centred at every forward (MABN's weight centralization).

    ``W_c <- W_c - mean(W_c)`` over each filter's ``(C_in / groups, k, k)`` elements, so that
    the output has (about) zero mean and MABN can divide by the second moment alone (section
    4.2). Arguments are those of ``nn.Conv2d``; the release advises ``bias=False``.
    """

    def centered_weight(self) -> torch.Tensor:
        """The weight the convolution uses: ``(C_out, C_in/groups, k, k)``, zero mean per row."""
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.centered_weight(), self.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the centred weight."""
        return plain_conv_like(self, self.centered_weight(), self.bias)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take a plain convolution's weight and bias.

        The layer then computes that convolution with each filter's mean removed: the closest
        (least-squares) centred filter; exact for filters of zero mean.

        Raises:
            ValueError: a shape differs from this layer's, or a bias is given to a layer
                without one.
        """
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"CenteredConv2d.load_plain_weights: weight of shape {tuple(weight.shape)}; "
                f"expected {tuple(self.weight.shape)}"
            )
        self.weight.copy_(weight)
        if bias is None:
            if self.bias is not None:
                self.bias.zero_()
            return
        if self.bias is None or tuple(bias.shape) != tuple(self.bias.shape):
            raise ValueError(
                f"CenteredConv2d.load_plain_weights: bias of shape {tuple(bias.shape)}; this "
                f"layer has {'no bias' if self.bias is None else tuple(self.bias.shape)}"
            )
        self.bias.copy_(bias)


__all__ = ["CenteredConv2d", "MovingAverageBatchNorm2d", "MovingAverageNormalization"]
