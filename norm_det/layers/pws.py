"""Parametric weight standardization (PWS).

Liu, Ge, Li and Gui, "Delving into Variance Transmission and Normalization: Shift of Average
Gradient Makes the Network Collapse", AAAI 2021 (the PWS paper), eq. 12: for every filter
``o`` with ``n = k*k*C_in`` elements,

    W_hat_o = sqrt(2 / n) * (W_o - E[W_o]) / sqrt(Var[W_o] + gamma),
    Y_o = alpha_o * (X conv W_hat_o) + beta_o,

with ``Var`` the population variance of the filter's elements, ``gamma`` a fixed constant
(1e-4 for detection backbones, 1e-3 at large learning rates), ``alpha`` trainable per filter
(initialised to 1, never weight-decayed) and ``beta`` the trainable bias. Because
``E[grad W_o] = 0`` (eq. 13) the filters keep their mean; the layer folds into a plain
convolution for inference.

``init_alpha`` is the PWS release's ``initalpha`` (``PWSConv.__first_forward`` in
``modules/utils/pws_layer.py`` of github.com/lyxzzz/PWSConv): on the first training forward
``alpha`` is set to ``sqrt(2 / Var(Y))``, ``Var`` the unbiased variance over *all* elements of
that batch's output (``output.var()``, one number for every channel), so that the output starts
with variance 2. The release's ImageNet configs (``configs/imagenet/pws.py``) turn it on; its
ResNet blocks keep it on the stem, the shortcut convolutions and the first convolution of each
residual block, and turn it off for the others.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from norm_det.layers.distributed import all_reduce_sum
from norm_det.layers.weight_std import (
    StandardizedConvMixin,
    fan_in_normal_init,
    parametric_standardize_filters,
)

# The variance that ``init_alpha`` gives the first training batch's output (the release's 2).
INIT_ALPHA_TARGET_VARIANCE = 2.0


def global_output_variance(output: torch.Tensor) -> float | None:
    """The unbiased variance of all elements of ``output`` over the batches of every process.

    In float64 and in two passes (the mean, then the squared deviations from it), each summed
    over the processes. None when they hold fewer than two elements together.
    """
    output = output.double()
    count_and_sum = all_reduce_sum(torch.stack([output.new_tensor(output.numel()), output.sum()]))
    count, total = count_and_sum.tolist()
    if count < 2:
        return None
    squares = all_reduce_sum((output - total / count).square().sum())
    return float(squares) / (count - 1)


def init_alpha_scale(output: torch.Tensor, owner: str) -> float | None:
    """``sqrt(2 / Var)``, the factor of ``alpha`` that gives ``output`` variance 2 (``init_alpha``).

    ``Var`` is :func:`global_output_variance`. None where it says nothing about the scale: fewer
    than two elements, or an output that does not vary.

    Raises:
        FloatingPointError: the variance is NaN or Inf; the message starts with ``owner``.
    """
    variance = global_output_variance(output)
    if variance is None:
        return None
    if not math.isfinite(variance):
        raise FloatingPointError(
            f"{owner}: init_alpha: the first training batch's output variance is {variance} "
            "(NaN or Inf reached this layer)"
        )
    if variance == 0:
        return None
    return math.sqrt(INIT_ALPHA_TARGET_VARIANCE / variance)


def _accept_other_init_alpha_setting(
    layer: PWSConv2d,
    state_dict: dict,
    prefix: str,
    had_flag: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
) -> None:
    """After ``layer`` loaded ``state_dict``: accept a state dict of the other ``init_alpha``.

    One saved without the flag carries a trained ``alpha``, not to be initialized again; a flag
    this layer does not keep is dropped. ``had_flag``: the state dict held the flag.
    """
    key = prefix + "alpha_initialized"
    if layer.init_alpha and not had_flag and prefix + "alpha" in state_dict:
        layer.alpha_initialized.fill_(True)
        if key in missing_keys:
            missing_keys.remove(key)
    if not layer.init_alpha and had_flag and key in unexpected_keys:
        unexpected_keys.remove(key)
    if layer.init_alpha:
        layer._alpha_pending = not bool(layer.alpha_initialized)


class PWSConv2d(StandardizedConvMixin, nn.Conv2d):
    """Convolution with parametric weight standardization (PWS paper, eq. 12).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode:
            as in ``nn.Conv2d``.
        bias: learn ``beta`` (default True: PWS replaces the norm, so the layer needs its shift).
        gamma: the fixed constant added to the filter variance.
        init_alpha: on the first training forward, scale ``alpha`` so that the batch's output
            has unbiased variance 2 over all its elements (the release's ``initalpha``). Done
            once: the buffer ``alpha_initialized`` (in the state dict) records it, so a reloaded
            layer is not initialized again; :meth:`load_plain_weights` and loading a state dict
            saved without the option set it too (the loaded ``alpha`` is kept). With several
            processes the variance is that of the whole batch over all of them, so every
            process gets the same ``alpha`` (the release measures each process's own).
    """

    _no_weight_decay = ("alpha",)

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
        gamma: float = 1e-4,
        init_alpha: bool = False,
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
        )
        self.gamma = gamma
        self.init_alpha = init_alpha
        self.alpha = nn.Parameter(torch.ones(out_channels))
        if init_alpha:
            self.register_buffer("alpha_initialized", torch.tensor(False))
        # The buffer's value as a Python bool: reading a CUDA buffer every forward would wait
        # for the device.
        self._alpha_pending = init_alpha
        # He initialisation, so that Var[W] starts where the paper's experiments start.
        fan_in_normal_init(self, "relu")

    def standardized_weight(self) -> torch.Tensor:
        """``alpha_o * W_hat_o`` for every filter: ``(C_out, C_in/groups, k, k)``."""
        return parametric_standardize_filters(self.weight, self.alpha, gamma=self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._alpha_pending and self.training:
            self._initialize_alpha(x)
        return super().forward(x)

    @torch.no_grad()
    def _initialize_alpha(self, x: torch.Tensor) -> None:
        """Scale ``alpha`` so that this batch's output has variance 2 (``init_alpha``).

        ``alpha`` starts at 1, so this sets it to ``sqrt(2 / Var)`` as the release does. The
        variance is taken of the output without the bias (the release includes its bias,
        which both initialize to 0). A batch whose output does not vary (an all-zero input)
        says nothing about the scale: ``alpha`` then waits for the next training batch.
        """
        output = self._conv_forward(x, self.standardized_weight(), None)
        scale = init_alpha_scale(output, f"{type(self).__name__}({self.extra_repr()})")
        if scale is not None:
            self.alpha.mul_(scale)
            self._mark_alpha_initialized()

    def _mark_alpha_initialized(self) -> None:
        self.alpha_initialized.fill_(True)
        self._alpha_pending = False

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        had_flag = prefix + "alpha_initialized" in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        _accept_other_init_alpha_setting(
            self, state_dict, prefix, had_flag, missing_keys, unexpected_keys
        )

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Reproduce a plain convolution with ``weight`` and ``bias`` where PWS allows.

        ``W`` takes the plain weight and ``alpha`` the factor that restores each filter's
        scale, so the only change is the removal of each filter's mean (which PWS forbids).
        """
        var = self._take_plain_weights(weight, bias)
        # W_hat_o = sqrt(2/n) * (W_o - E[W_o]) / sqrt(var + gamma): alpha undoes both factors.
        self.alpha.copy_(torch.sqrt(var + self.gamma) / math.sqrt(2.0 / self.fan_in))
        if self.init_alpha:
            self._mark_alpha_initialized()  # the plain layer's scale, not to be re-initialized

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", gamma={self.gamma}"
            + (", init_alpha=True" if self.init_alpha else "")
        )
