"""Mean-shift rejection: channel-wise zero-mean convolutions (CZMIG).

Ruff, Beck & Bach, "Mean Shift Rejection: Training Deep Neural Networks Without Minibatch
Statistics or Normalization", 2019, section 3. A spatial filter whose every ``(out, in)`` slice
sums to zero ignores a constant added to an input channel, so a network on this *channel-wise
zero-mean* (CZM) isocline needs no mean subtraction. Per spatial convolution:

- 3.1 reparametrization ``W = e^g * V``, one ``g`` per output filter, ``e^g`` initialised to 0.8;
- 3.2 CZM initialisation: ``V ~ U(-1, 1)``, the spatial mean of every ``(out, in)`` slice
  removed, then every filter scaled to unit L2 norm;
- 3.3 CZM gradients: after backward, outside the graph, ``grad_V -= z * spatial_mean(grad_V)``
  (``z``, the *zmg* factor, 0.85); the update component normal to the isocline shrinks by
  ``1 - z`` (6.6x at 0.85);
- 3.4 L2 unity magnitude anchoring (LUMA): the loss ``lambda * sum_f (||V_f|| - 1)^2`` replaces
  weight decay on ``V`` and ``g`` (``lambda`` = the weight decay it replaces, 5e-4 in the paper);
- 4.4 multiplicative noise ``U(1 - a, 1 + a)``, ``a = 0.1``, at residual-unit inputs, in training
  only.

CZMG and LUMA act on their own at every optimizer step, in any training loop: each layer adds
LUMA's gradient to ``grad_V`` and then applies CZMG once per ``optimizer.step()``, from torch's
global optimizer step pre-hook (:mod:`norm_det.layers.protocol`), on the complete gradient
(accumulated, all-reduced, unscaled) — what adding LUMA to the loss and correcting the gradient
before the step gives, exactly, with no call from the loop. LUMA is therefore not a term of the
loss: its value at the step is kept in ``step_losses["loss_luma"]``.

1x1 convolutions have no spatial extent and stay plain ``nn.Conv2d`` (:func:`czm_conv2d`); so
does the first convolution on the image (the scheme's ``keep_first_conv_plain``). The choices the
paper leaves open are listed in ``docs/czm.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from norm_det.layers.protocol import no_weight_decay_parameters, track_step_layers
from norm_det.layers.weight_std import copy_plain_bias, plain_conv_like


def check_czm_options(
    owner: str,
    *,
    zmg: float | None = None,
    luma: float | None = None,
    noise: float | None = None,
) -> None:
    """Raise ``ValueError`` naming ``owner`` when an option is outside its valid range.

    ``zmg`` in ``[0, 1]``, ``luma`` >= 0, the noise amplitude in ``[0, 1)`` (so the factor stays
    positive); ``None`` skips a check.
    """
    ranges = (
        ("zmg", zmg, "[0, 1]", lambda x: 0.0 <= x <= 1.0),
        ("luma", luma, "[0, inf)", lambda x: 0.0 <= x < math.inf),
        ("noise amplitude", noise, "[0, 1)", lambda x: 0.0 <= x < 1.0),
    )
    for name, value, interval, valid in ranges:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ValueError(f"{owner}: {name} must be a number in {interval}; got {value!r}")


def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output filter: ``(C_out, ...) -> (C_out,)``."""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


def _check_czm_conv_options(
    kernel_size: tuple[int, int], zmg: float, luma: float, init_scale: float
) -> None:
    """Raise ``ValueError`` for a :class:`CZMConv2d` built with a 1x1 kernel or a bad option."""
    if kernel_size == (1, 1):
        raise ValueError(
            "CZMConv2d: kernel_size must have a spatial extent; got 1x1, whose channel-wise "
            "zero mean would be an all-zero filter. Use czm_conv2d (plain nn.Conv2d for 1x1)."
        )
    check_czm_options("CZMConv2d", zmg=zmg, luma=luma)
    if init_scale <= 0:
        raise ValueError(f"CZMConv2d: init_scale (e^g) must be > 0; got {init_scale!r}")


def czm_initial_filters(like: torch.Tensor) -> torch.Tensor:
    """CZM initialisation (section 3.2) of a tensor shaped like ``like``, ``(C_out, C_in, kh, kw)``.

    ``U(-1, 1)``, the spatial mean of every ``(out, in)`` slice removed, then every filter
    scaled to unit L2 norm.
    """
    sample = torch.empty_like(like).uniform_(-1.0, 1.0)
    sample -= sample.mean(dim=(-2, -1), keepdim=True)
    return sample / _filter_norms(sample).view(-1, 1, 1, 1)


def split_plain_filters(
    weight: torch.Tensor, fallback: torch.Tensor, tiny: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, g)`` with ``e^g * V == weight`` and unit ``||V_f||``: the plain filters' parts.

    ``V = W_f / ||W_f||`` and ``e^g = ||W_f||`` per filter; an all-zero filter takes its ``V``
    from ``fallback`` (shaped like ``weight``) and ``e^g = tiny``.
    """
    norms = _filter_norms(weight)
    nonzero = norms > 0
    safe = torch.where(nonzero, norms, torch.ones_like(norms))
    v = torch.where(nonzero.view(-1, 1, 1, 1), weight / safe.view(-1, 1, 1, 1), fallback)
    return v, torch.where(nonzero, safe, torch.full_like(norms, tiny)).log()


class _LumaAndCZMG:
    """LUMA's gradient and CZMG (sections 3.3, 3.4) on a layer's ``v``, at every optimizer step.

    Part of :class:`CZMConv2d`: the layer defines ``v``, ``zmg`` and ``luma``. Torch's optimizer
    step pre-hook (:mod:`norm_det.layers.protocol`) runs :meth:`before_optimizer_step` on the
    layers it tracks; layers track themselves when made, unpickled or deep-copied.
    """

    v: nn.Parameter
    zmg: float
    luma: float

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled and deep-copied layers are made without __init__: they take part too.
        super().__setstate__(state)
        track_step_layers(self)

    def luma_loss(self) -> torch.Tensor | None:
        """LUMA (section 3.4): scalar ``luma * sum_f (||V_f|| - 1)^2``, in the autograd graph.

        None when ``luma`` is 0 or ``v`` is frozen. The layer applies its gradient itself at
        every optimizer step; adding this value to a loss as well would apply it twice.
        """
        if self.luma == 0 or not self.v.requires_grad:
            return None
        return self.luma * (_filter_norms(self.v) - 1.0).square().sum()

    @torch.no_grad()
    def correct_gradient(self) -> None:
        """CZMG (section 3.3): ``grad_V -= zmg * mean over (kh, kw) of grad_V``, in place.

        A second call on the same gradient subtracts again; :meth:`before_optimizer_step` calls
        it once per optimizer step.
        """
        grad = self.v.grad
        if grad is None or self.zmg == 0:
            return
        grad.sub_(grad.mean(dim=(-2, -1), keepdim=True), alpha=self.zmg)

    def before_optimizer_step(self) -> dict[str, torch.Tensor]:
        """LUMA's gradient added to ``grad_V``, then CZMG: once per optimizer step.

        Run by torch's optimizer step pre-hook (:mod:`norm_det.layers.protocol`) on the complete
        gradient of the step. The result equals the old recipe — LUMA added to the loss of each
        of the step's passes with the passes' weights (summing to 1), CZMG on the accumulated
        gradient before the step — whatever the loop does. Without a task gradient (``v`` unused
        in the forward) the gradient is LUMA's alone, as a loss term would have given.

        Returns:
            ``{"loss_luma": value}`` (detached; empty when LUMA is off), for logging.
        """
        values: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            loss = self.luma_loss()
            if loss is not None:
                (luma_grad,) = torch.autograd.grad(loss, self.v)
        if loss is not None:
            if self.v.grad is None:
                self.v.grad = luma_grad
            else:
                self.v.grad.add_(luma_grad)
            values["loss_luma"] = loss.detach()
        self.correct_gradient()
        return values


class CZMConv2d(_LumaAndCZMG, nn.Conv2d):
    """Spatial convolution with CZM reparametrization, initialisation, gradients and LUMA.

    The layer computes ``conv(x, e^g * V) + b``. Its parameters are ``v`` (``(C_out,
    C_in/groups, kh, kw)``), ``g`` (``(C_out,)``) and the optional ``bias`` (``(C_out,)``); none
    of them is weight-decayed (LUMA regularizes ``v``; ``bias`` plays the part of the BN shift it
    replaces). ``weight`` reads the effective weight ``e^g * V`` (computed; writing to it has no
    effect — use :meth:`load_plain_weights`). At every step of an optimizer that holds ``v``,
    :meth:`before_optimizer_step` adds LUMA's gradient and applies CZMG (see the module
    docstring); ``step_losses`` then holds that step's ``{"loss_luma": value}``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as in ``nn.Conv2d``; the kernel must have a spatial
            extent (not 1x1).
        zmg: the zmg factor ``z`` of the gradient modification, in ``[0, 1]`` (0: CZMI only).
        luma: the LUMA loss weight ``lambda`` (0: no loss).
        init_scale: the initial ``e^g`` (the paper: below 1 for stable early training, 0.8).

    Shapes:
        ``x: (N, C_in, H, W) -> (N, C_out, H', W')`` as ``nn.Conv2d``.
    """

    _no_weight_decay = ("v", "g", "bias")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        zmg: float = 0.85,
        luma: float = 5e-4,
        init_scale: float = 0.8,
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
        _check_czm_conv_options(self.kernel_size, zmg, luma, init_scale)
        self.zmg = zmg
        self.luma = luma
        self.init_scale = init_scale
        template = self.weight
        # V replaces nn.Conv2d's weight: keeping both would leave a dead parameter in the model.
        del self.weight
        self.v = nn.Parameter(torch.empty_like(template))
        self.g = nn.Parameter(template.new_empty(out_channels))
        self.step_losses: dict[str, torch.Tensor] = {}
        self.reset_parameters()
        track_step_layers(self)

    def __getattr__(self, name: str) -> Any:
        if name == "weight" and "v" in self._parameters:
            return self.effective_weight()
        return super().__getattr__(name)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CZM initialisation (section 3.2) of ``v``, ``e^g = init_scale``, zero bias."""
        if "v" not in self._parameters:
            # Called by nn.Conv2d.__init__ before `v` exists; that weight is discarded.
            super().reset_parameters()
            return
        self.v.copy_(czm_initial_filters(self.v))
        self.g.fill_(math.log(self.init_scale))
        if self.bias is not None:
            self.bias.zero_()

    def effective_weight(self) -> torch.Tensor:
        """``e^g * V``: ``(C_out, C_in/groups, kh, kw)``, in the autograd graph."""
        return self.g.exp().view(-1, 1, 1, 1) * self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Reproduce a plain convolution exactly: ``V = W_f / ||W_f||``, ``e^g = ||W_f||``.

        The layer's function is preserved (``e^g * V == W``), and ``||V_f|| = 1`` so LUMA starts
        at zero; the spatial means of the plain filters are kept, so the warm-started layer is
        *not* on the CZM isocline (CZMG then only damps moves away from it). An all-zero filter
        keeps its CZM-initialised ``V`` with ``e^g`` the smallest positive normal float.
        """
        v, g = split_plain_filters(weight, self.v, torch.finfo(self.g.dtype).tiny)
        self.v.copy_(v)
        self.g.copy_(g)
        copy_plain_bias(self, bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with weight ``e^g * V`` and the same bias."""
        return plain_conv_like(self, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", zmg={self.zmg}, luma={self.luma}"


def czm_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    *,
    zmg: float = 0.85,
    luma: float = 5e-4,
    **kwargs: Any,
) -> nn.Conv2d:
    """The CZM scheme's convolution: :class:`CZMConv2d`, or a plain ``nn.Conv2d`` for 1x1.

    The paper applies CZM to "each filter that has spatial dimensions greater than 1"; a 1x1
    filter's only element is its own spatial mean. Other arguments are ``nn.Conv2d``'s.
    """
    size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if size == (1, 1):
        return nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)
    return CZMConv2d(in_channels, out_channels, kernel_size, zmg=zmg, luma=luma, **kwargs)


class MultiplicativeNoise(nn.Module):
    """``x * U(1 - a, 1 + a)`` element-wise in training, the identity in eval (section 4.4).

    One independent factor per element (sample, channel, position); the factor has mean 1, so
    eval needs no rescaling.

    Args:
        amplitude: ``a``, in ``[0, 1)`` (the paper: 0.1).

    Shapes:
        any ``x -> x``'s shape.
    """

    def __init__(self, amplitude: float = 0.1) -> None:
        super().__init__()
        check_czm_options("MultiplicativeNoise", noise=amplitude)
        self.amplitude = amplitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.amplitude == 0:
            return x
        noise = torch.empty_like(x).uniform_(1.0 - self.amplitude, 1.0 + self.amplitude)
        return x * noise

    def fuse(self) -> nn.Identity:
        """Eval is the identity."""
        return nn.Identity()

    def extra_repr(self) -> str:
        return f"amplitude={self.amplitude}"


def czm_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: weight decay off for CZM's ``v``, ``g``, ``bias``.

    Every parameter a layer lists in ``_no_weight_decay`` (and torch norms' affine parameters)
    goes to a group with ``weight_decay=0``; the rest (plain 1x1 convs, the first conv, linear
    layers) keep ``weight_decay``. LUMA, the extra loss, replaces the decay on ``v``.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest,
        "weight_decay": 0.0}]``, empty groups left out.
    """
    exempt = no_weight_decay_parameters(model)
    decayed, undecayed = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (undecayed if name in exempt else decayed).append(parameter)
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


__all__ = [
    "CZMConv2d",
    "MultiplicativeNoise",
    "check_czm_options",
    "czm_conv2d",
    "czm_param_groups",
]
