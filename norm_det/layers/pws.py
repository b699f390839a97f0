"""Parametric weight standardization (PWS).

Wang et al., "Variance Transmission in Convolutional Networks: Parametric Weight
Standardization" (the PWS paper), eq. 12: for every filter ``o`` with ``n = k*k*C_in`` elements,

    W_hat_o = sqrt(2 / n) * (W_o - E[W_o]) / sqrt(Var[W_o] + gamma),
    Y_o = alpha_o * (X conv W_hat_o) + beta_o,

with ``Var`` the population variance of the filter's elements, ``gamma`` a fixed constant
(1e-4 for detection backbones, 1e-3 at large learning rates), ``alpha`` trainable per filter
(initialised to 1, never weight-decayed) and ``beta`` the trainable bias. Because
``E[grad W_o] = 0`` (eq. 13) the filters keep their mean; the layer folds into a plain
convolution for inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from norm_det.layers.weight_std import parametric_standardize_filters, plain_conv_like


class PWSConv2d(nn.Conv2d):
    """Convolution with parametric weight standardization (PWS paper, eq. 12).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode:
            as in ``nn.Conv2d``.
        bias: learn ``beta`` (default True: PWS replaces the norm, so the layer needs its shift).
        gamma: the fixed constant added to the filter variance.
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
        self.alpha = nn.Parameter(torch.ones(out_channels))
        # He initialisation, so that Var[W] starts where the paper's experiments start.
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def fan_in(self) -> int:
        """``n = k*k*C_in/groups``: the number of elements of one filter."""
        return self.weight[0].numel()

    def standardized_weight(self) -> torch.Tensor:
        """``alpha_o * W_hat_o`` for every filter: ``(C_out, C_in/groups, k, k)``."""
        return parametric_standardize_filters(self.weight, self.alpha, gamma=self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Reproduce a plain convolution with ``weight`` and ``bias`` where PWS allows.

        ``W`` takes the plain weight and ``alpha`` the factor that restores each filter's
        scale, so the only change is the removal of each filter's mean (which PWS forbids).
        """
        var = weight.flatten(1).var(dim=1, unbiased=False)
        self.weight.copy_(weight)
        # W_hat_o = sqrt(2/n) * (W_o - E[W_o]) / sqrt(var + gamma): alpha undoes both factors.
        self.alpha.copy_(torch.sqrt(var + self.gamma) / math.sqrt(2.0 / self.fan_in))
        if self.bias is not None:
            if bias is None:
                self.bias.zero_()
            else:
                self.bias.copy_(bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with weight ``alpha * W_hat`` and bias ``beta``."""
        return plain_conv_like(self, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}"
