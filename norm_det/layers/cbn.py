"""Cross-iteration batch normalization (CBN).

Yao, Cao, Zheng, Huang & Lin, "Cross-Iteration Batch Normalization", CVPR 2021
(arXiv 2002.05712), section 3. A mini-batch of one or two images gives poor statistics; CBN pools
those of the last ``k`` iterations. They were measured with older weights, so each is moved to
the current weights ``theta_t`` of the layer's own convolution by a first-order Taylor term:

    mu_{t-tau}(theta_t) = mu_{t-tau} + dmu_{t-tau}/dtheta . (theta_t - theta_{t-tau})
    nu_{t-tau}(theta_t) = nu_{t-tau} + dnu_{t-tau}/dtheta . (theta_t - theta_{t-tau})

with ``mu = E[y]``, ``nu = E[y^2]`` per channel over ``N x H x W`` (``y`` the convolution's output)
and the dot product taken row by row: output channel ``c`` depends on row ``c`` of the weight
only. The pooled statistics (the paper's eq. 8) and the normalization are

    mu_bar = 1/n sum_tau mu_{t-tau}(theta_t)
    nu_bar = 1/n sum_tau max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2)
    sigma_bar^2 = nu_bar - mu_bar^2,        y_hat = (y - mu_bar) / sqrt(sigma_bar^2 + eps)

over the ``n <= k`` iterations held (``tau = 0`` is the current one); ``max`` keeps every
compensated variance ``nu - mu^2`` non-negative. Gradients flow through the current iteration's
``mu_t``, ``nu_t`` only; the compensated statistics of the past are constants, as in the paper
and the release (whose Taylor term uses ``weight.data``).

The gradients ``dmu_t/dtheta = E[x_patch]`` and ``dnu_t/dtheta = 2 E[y x_patch]`` are taken by
``torch.autograd.grad`` from the convolution's own graph, so a reparametrized convolution
(:class:`~norm_det.layers.weight_std.WSConv2d`) gets the term in its raw ``weight`` parameter
with the reparametrization's Jacobian included. The layer needs that convolution:
:meth:`CrossIterationBatchNorm2d.pair_with` (called by norm_det's builders and
``surgery.convert``) gives it, without making it a submodule.

The Taylor term covers every parameter of the convolution indexed by output channel
(``weight``, a ``bias`` when there is one, PWS's ``alpha``); a bias enters the mean exactly
(``dmu/db = 1``) and leaves the variance unchanged.

Numerics: the layer keeps ``(mu, sigma^2 = nu - mu^2)`` and the gradient of ``sigma^2`` rather than
``nu``, and pools the variance as ``mean(max(sigma_tau^2, 0)) + mean((mu_tau - mu_bar)^2)``. That is
``nu_bar - mu_bar^2`` exactly (``max(nu, mu^2) = mu^2 + max(nu - mu^2, 0)``; the compensated
``sigma_tau^2(theta_t) = sigma_tau^2 + dsigma^2/dtheta . d - (dmu/dtheta . d)^2``), without
subtracting two large second moments in float32.

Defaults and schedule, from the release (github.com/Howal/Cross-iterationBatchNorm):

- ``window`` ``k = 4``: the detection configs ``configs/cbn/*_cbn_buffer3_burnin8_1x.py`` keep
  ``buffer_num=3`` past iterations next to the current one (``mmdet/models/utils/CBN.py``).
- ``burnin = 60000`` iterations: those configs give ``burnin=8`` epochs of the 12-epoch 1x
  schedule, turned into iterations by ``tools/train.py``; 8/12 of the 1x schedule's 90k
  iterations (at 16 images each) is 60k. Scale it with the schedule (it ends with the first
  learning-rate step).
- During burn-in the layer is BatchNorm2d and keeps no history (the release's ``two_stage``
  schedule: ``buffer_num = 0`` while ``iter_count <= burnin``); afterwards the window starts
  empty and fills over the next ``k - 1`` iterations.
- The running statistics for eval are the batch's own mean and unbiased variance, with
  ``momentum`` as in BatchNorm2d (the release updates them with ``cur_mu`` and ``cur_sigma2``), so
  eval is BatchNorm2d's eval and folds into the convolution.

Where the release differs from the paper, the paper is followed: the release drops an
iteration whose compensated variance is negative from both averages instead of taking
``max(nu, mu^2)``, normalizes by ``sigma + eps`` instead of ``sqrt(sigma^2 + eps)`` and uses the
unbiased batch variance while it is plain BN; here the plain-BN phase is exactly
``nn.BatchNorm2d``. The statistics are each process's own, as in the release and the paper
(no synchronization across processes).

One forward is one iteration: a layer applied to several inputs per step (a head shared over
FPN levels) pools those inputs in its window.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.checks import (
    check_feature_maps,
    check_fraction,
    check_integer,
    check_positive,
)
from norm_det.layers.norm_state import init_norm_state, inverse_std_scale

# {parameter name: (dmu/dp, dsigma^2/dp, p)}, per output channel, all detached.
Taylor = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _PastIteration(NamedTuple):
    """What one iteration leaves for the next ``k - 1``: all detached, per channel ``(C,)``.

    ``taylor`` maps a convolution parameter's name to ``(dmu/dp, dsigma^2/dp, p)`` at that
    iteration; it is empty when no parameter required a gradient (a frozen convolution, whose
    statistics stay exact).
    """

    mean: torch.Tensor
    var: torch.Tensor
    taylor: Taylor


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j a[c, j] b[c, j]`` per leading index ``c``: ``(C, ...) x (C, ...) -> (C,)``."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def check_pairable(owner: str, num_features: int, conv: nn.Module) -> None:
    """``ValueError`` naming ``owner`` unless ``conv`` has a weight of ``(num_features, ...)``."""
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(
            f"{owner}.pair_with: expected a convolution with a weight of ({num_features}, ...); "
            f"got {type(conv).__name__} with weight "
            f"{None if weight is None else tuple(weight.shape)}"
        )
    if weight.shape[0] != num_features:
        raise ValueError(
            f"{owner}.pair_with: the convolution has {weight.shape[0]} output channels; this "
            f"layer normalizes {num_features}"
        )


def output_channel_parameters(conv: nn.Module, num_features: int) -> dict[str, torch.Tensor]:
    """``conv``'s own parameters indexed by output channel (leading dimension ``num_features``)."""
    return {
        name: p
        for name, p in conv.named_parameters(recurse=False)
        if p.dim() >= 1 and p.shape[0] == num_features
    }


def taylor_gradients(
    mean: torch.Tensor, var: torch.Tensor, tracked: dict[str, torch.Tensor]
) -> Taylor | None:
    """``{name: (dmu_t/dp, dsigma_t^2/dp, p)}`` for the ``tracked`` parameters, detached.

    None when the statistics do not depend on the ``weight`` among them (or on any of them):
    the layer is then not paired with the convolution whose output it normalizes.
    """
    inputs = tuple(tracked.values())
    weight = tracked.get("weight")
    if not mean.requires_grad:
        return None
    ones = torch.ones_like(mean)
    # Channel c depends on row c of each parameter only, so the gradient of the sum over
    # channels holds every channel's own gradient in its row.
    grad_mean = torch.autograd.grad(mean, inputs, ones, retain_graph=True, allow_unused=True)
    grad_var = torch.autograd.grad(var, inputs, ones, retain_graph=True, allow_unused=True)
    if weight is not None and grad_mean[tuple(tracked).index("weight")] is None:
        return None
    return {
        name: (gm, gv, p.detach().clone())
        for (name, p), gm, gv in zip(tracked.items(), grad_mean, grad_var)
        if gm is not None and gv is not None
    }


def compensate(
    past: _PastIteration, params: dict[str, torch.Tensor], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, sigma^2)`` of a past iteration moved to the current ``params`` (first order).

    The Taylor term of every parameter still held; ``sigma^2(theta_t)`` is kept non-negative
    (``max(nu, mu^2) - mu^2 = max(sigma^2, 0)``, with ``nu`` and ``mu`` both compensated).
    ``like``: the current statistics, whose dtype the shifts take.
    """
    mean_shift = torch.zeros_like(like)
    var_shift = torch.zeros_like(like)
    for name, (grad_mean, grad_var, then) in past.taylor.items():
        if name not in params:
            continue
        step = params[name].detach() - then
        mean_shift += _row_dot(grad_mean, step).to(like.dtype)
        var_shift += _row_dot(grad_var, step).to(like.dtype)
    return past.mean + mean_shift, (past.var + var_shift - mean_shift.square()).clamp(min=0)


def pool_window(
    mean: torch.Tensor,
    var: torch.Tensor,
    history: list[_PastIteration],
    params: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled ``(mu_bar, sigma_bar^2)`` of the current ``(mean, var)`` and ``history``.

    ``sigma_bar^2 = mean(max(sigma_tau^2, 0)) + mean((mu_tau - mu_bar)^2)``, which is the
    paper's ``nu_bar - mu_bar^2`` (module docstring).
    """
    means, variances = [mean], [var]
    for past in history:
        past_mean, past_var = compensate(past, params, mean)
        means.append(past_mean)
        variances.append(past_var)
    stacked_means = torch.stack(means)
    pooled_mean = stacked_means.mean(dim=0)
    pooled_var = torch.stack(variances).mean(dim=0)
    pooled_var = pooled_var + (stacked_means - pooled_mean).square().mean(dim=0)
    return pooled_mean, pooled_var


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel of ``x: (N, C, H, W)``."""
    scale = inverse_std_scale(var, eps, weight)
    # Centre first, as BatchNorm2d does: x * scale - mean * scale would cancel two large
    # numbers in float32 where the mean is many standard deviations.
    out = (x - mean.to(x.dtype).view(1, -1, 1, 1)) * scale.to(x.dtype).view(1, -1, 1, 1)
    return out if bias is None else out + bias.to(x.dtype).view(1, -1, 1, 1)


def _batch_norm(norm: CrossIterationBatchNorm2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """BatchNorm2d's forward with ``norm``'s state: the batch's statistics or the running ones."""
    momentum = norm.momentum if training else 0.0
    return F.batch_norm(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training, momentum, norm.eps
    )


@torch.no_grad()
def _update_running_statistics(
    norm: CrossIterationBatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """The running mean and unbiased variance move by ``momentum``, as BatchNorm2d's do."""
    norm.running_mean.lerp_(mean.detach().to(norm.running_mean), norm.momentum)
    unbiased = var.detach() * (count / (count - 1))
    norm.running_var.lerp_(unbiased.to(norm.running_var), norm.momentum)


class _PairedNorm(nn.Module):
    """A norm whose statistics depend on the weights of the convolution before it.

    The layer protocol's ``pair_with``: the norm holds that convolution, and a history of
    statistics of past iterations, which it forgets whenever the weights may have changed (a new
    pairing, a loaded state dict, ``.to()``). Subclasses define ``num_features``.
    """

    num_features: int

    def __init__(self) -> None:
        super().__init__()
        # Plain attributes, not submodules or buffers: the convolution belongs to the model (no
        # second copy of its weight in the state dict), and DistributedDataParallel must not
        # broadcast one process's history to the others.
        object.__setattr__(self, "_paired_conv", None)
        self._history: list[_PastIteration] = []

    def pair_with(self, conv: nn.Module) -> None:
        """Use ``conv``'s parameters for the Taylor term; ``conv`` computes this layer's input.

        ``conv`` is held as a plain attribute, not registered: it stays out of this layer's
        ``state_dict`` and ``modules()``, and a ``deepcopy`` of the model pairs the copies.

        Raises:
            ValueError: ``conv`` has no ``weight`` of ``(num_features, ...)``.
        """
        check_pairable(type(self).__name__, self.num_features, conv)
        object.__setattr__(self, "_paired_conv", conv)
        self.reset_history()

    @property
    def paired_conv(self) -> nn.Module | None:
        """The convolution given to :meth:`pair_with`, or None."""
        return self._paired_conv

    def reset_history(self) -> None:
        """Forget the past iterations; the window fills again from the next one."""
        self._history.clear()

    def _apply(self, fn, *args, **kwargs):
        # The history is not moved with the buffers (it is no buffer): rebuild it instead.
        self.reset_history()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # New weights: the statistics of the past no longer describe them.
        self.reset_history()
        super()._load_from_state_dict(*args, **kwargs)


def _training_count(norm: CrossIterationBatchNorm2d, x: torch.Tensor) -> int:
    """The values per channel of the training batch ``x``; raises where CBN cannot train on it."""
    if norm.window > 1 and norm.paired_conv is None:
        raise RuntimeError(
            f"{type(norm).__name__}({norm.extra_repr()}) is not paired with the convolution "
            "whose output it normalizes: call norm.pair_with(conv) (norm_det's "
            "build_conv_norm and surgery.convert pair the norms they build)"
        )
    count = x.numel() // norm.num_features
    if count < 2:
        raise ValueError(
            f"{type(norm).__name__}: expected more than 1 value per channel when training; "
            f"got input of size {tuple(x.shape)}"
        )
    return count


def batch_norm_folded_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's eval transform ``y = scale * x + shift``, per channel ``(C,)``."""
    scale = inverse_std_scale(running_var, eps, weight)
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


class CrossIterationBatchNorm2d(_PairedNorm):
    """Batch normalization over the compensated statistics of the last ``window`` iterations.

    Args:
        num_features: channels ``C`` of the input ``(N, C, H, W)``, the output channels of the
            paired convolution.
        window: iterations pooled, ``k``, the current one included; 1 is BatchNorm2d.
        burnin: training forwards spent as BatchNorm2d before the window is used.
        eps: added to the pooled variance.
        momentum: of the running mean and variance, as in ``nn.BatchNorm2d``.
        affine: learn the per-channel ``weight`` and ``bias``.

    Shapes: ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    State: ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``
    (the iteration counter that ends burn-in) are saved, under BatchNorm2d's names, so a
    BatchNorm2d checkpoint loads as is. The window's history is not saved: after a resume it
    is rebuilt over the next ``k - 1`` iterations (loading a state dict, ``.to()`` and
    :meth:`pair_with` clear it).
    """

    _abbr_ = "cbn"
    _no_weight_decay = ("weight", "bias")

    def __init__(
        self,
        num_features: int,
        *,
        window: int = 4,
        burnin: int = 60000,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_integer(name, "window", window, 1)
        check_integer(name, "burnin", burnin, 0)
        check_fraction(name, "momentum", momentum)
        check_positive(name, "eps", eps)
        factory = {"device": device, "dtype": dtype}
        init_norm_state(self, num_features, eps=eps, momentum=momentum, affine=affine, **factory)
        self.window = window
        self.burnin = burnin
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    # -----------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_maps(self, x, self.num_features)
        if not self.training or x.numel() == 0:
            # An empty batch (a head with no boxes) has no statistics: eval transform, no update.
            return _batch_norm(self, x, training=False)
        count = _training_count(self, x)
        self.num_batches_tracked.add_(1)
        if self.window == 1 or int(self.num_batches_tracked) <= self.burnin:
            self.reset_history()
            return _batch_norm(self, x, training=True)
        return self._cross_iteration_forward(x, count)

    def _cross_iteration_forward(self, x: torch.Tensor, count: int) -> torch.Tensor:
        stats_input = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(stats_input, dim=(0, 2, 3), correction=0)
        params = output_channel_parameters(self._paired_conv, self.num_features)
        tracked = {name: p for name, p in params.items() if p.requires_grad}
        differentiable = torch.is_grad_enabled() and bool(tracked)
        taylor = taylor_gradients(mean, var, tracked) if differentiable else {}
        if taylor is None:
            raise RuntimeError(
                f"{type(self).__name__}({self.extra_repr()}): the input does not depend on the "
                f"paired {type(self._paired_conv).__name__}'s weight; pair the layer with the "
                "convolution whose output it normalizes (pair_with)"
            )
        pooled_mean, pooled_var = pool_window(mean, var, self._history, params)
        _update_running_statistics(self, mean, var, count)
        # The current iteration joins the window when its gradients are known (or not needed:
        # frozen convolution); a no-grad forward in training mode reads the window only.
        if differentiable or not tracked:
            self._history.insert(0, _PastIteration(mean.detach(), var.detach(), taylor))
            del self._history[self.window - 1 :]
        return normalize(x, pooled_mean, pooled_var, self.eps, self.weight, self.bias)

    # -----------------------------------------------------------------------------------------
    # Inference

    @torch.no_grad()
    def folded_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval transform ``y = scale * x + shift``, per channel ``(C,)``."""
        return batch_norm_folded_affine(
            self.running_mean, self.running_var, self.eps, self.weight, self.bias
        )

    @torch.no_grad()
    def fuse(self) -> nn.BatchNorm2d:
        """An ``nn.BatchNorm2d`` in eval mode computing this layer's eval transform."""
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine).to(
            self.running_mean
        )
        bn.load_state_dict(self.state_dict())
        return bn.eval()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, window={self.window}, burnin={self.burnin}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )


__all__ = ["CrossIterationBatchNorm2d"]
