"""Normalizer-free layers: the scaled weight-standardized convolution and scaled activations.

Brock, De & Smith, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", ICLR 2021 (NF-ResNets), section 4, and Brock, De, Smith & Simonyan,
"High-Performance Large-Scale Image Recognition Without Normalization", ICML 2021 (NFNets).

Scaled weight standardization. Every filter ``i`` of ``N = C_in/groups * k_h * k_w`` elements
(its fan-in) is reparametrized as

    W_hat_i = gain_i * (W_i - mu_i) / sqrt(N * (sigma_i^2 + eps)),

``mu_i`` and ``sigma_i^2`` the mean and the *population* variance of the filter's elements (the
paper's ``sigma_i^2 = (1/N) sum_j (W_ij - mu_i)^2``). Each filter then has mean 0 and
``sum_j W_hat_ij^2 = gain_i^2`` (variance ``gain_i^2 / N``): a unit-variance input gives a
unit-variance output whatever the input's mean, which is what keeps the signal of an unnormalized
network from growing or shifting with depth. ``gain`` is the NFNets paper's learnable affine gain
(one per output channel, initialised to 1, never weight-decayed: the release's
``experiment_nfnets.py`` puts gains and biases in a group without weight decay); the bias is kept.

``eps`` is timm's ``ScaledStdConv2d`` (1e-6, added to the variance). DeepMind's release
(``nfnets/base.py``, ``WSConv2D``) floors the product instead, ``rsqrt(max(N * sigma^2, 1e-4))``;
both only matter for filters that have collapsed to a constant. Written as
``(gain_i / sqrt(2)) * sqrt(2 / N) * (W_i - mu_i) / sqrt(sigma_i^2 + eps)`` the reparametrization
is exactly PWS's eq. 12 with ``alpha = gain / sqrt(2)`` and ``gamma = eps``, so it runs on the
same hand-written autograd function (:mod:`norm_det.layers.weight_std`).

Scaled activations. With ``z ~ N(0, 1)``, ``gamma_g = 1 / sqrt(Var[g(z)])`` restores unit
variance after the non-linearity ``g`` (NF-ResNets, section 4). For ReLU,
``E[relu(z)] = 1/sqrt(2 pi)`` and ``E[relu(z)^2] = 1/2``, so ``Var = (1/2)(1 - 1/pi)`` and
``gamma = sqrt(2 / (1 - 1/pi)) ~ 1.7128585``. SiLU and GELU have no closed form; their ``gamma``
below is that integral evaluated by adaptive quadrature in float64. The release's table
(``nonlinearities`` in ``nfnets/base.py``) has float32 estimates of the same numbers
(relu 1.7139589, silu 1.7881293, gelu 1.7015043). The paper writes ``gamma`` into the weight,
``W_hat = gamma (W - mu) / (sigma sqrt(N))``; a convolution is linear, so scaling the activation
that feeds it (the release's placement, here) computes the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.checks import check_positive
from norm_det.layers.weight_std import (
    StandardizedConvMixin,
    fan_in_normal_init,
    parametric_standardize_filters,
)

# gamma_g = 1 / sqrt(Var[g(z)]), z ~ N(0, 1) (see the module docstring).
ACTIVATION_GAMMAS = {
    "relu": math.sqrt(2.0 / (1.0 - 1.0 / math.pi)),
    "silu": 1.7871872221004417,
    "gelu": 1.700926243363333,
}
_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}
_ALIASES = {"swish": "silu"}

# The PWS form carries sqrt(2 / N); scaled WS wants sqrt(1 / N).
_PWS_TO_SCALED_WS = 1.0 / math.sqrt(2.0)


def _activation_name(activation: str) -> str:
    name = str(activation).lower().replace("_", "").replace("-", "")
    name = _ALIASES.get(name, name)
    if name not in ACTIVATION_GAMMAS:
        raise ValueError(
            f"ScaledActivation: activation is {activation!r}; expected one of "
            f"{sorted(ACTIVATION_GAMMAS)} (or 'swish' for silu)"
        )
    return name


class ScaledActivation(nn.Module):
    """``gamma_g * g(x)``, ``gamma_g`` the constant that keeps a unit Gaussian's variance 1.

    In a network it is the ``norm_act`` of the NF scheme: the layer in a conv's norm slot where
    "norm, then ReLU" stood, carrying the activation (``carries_activation``), with nothing to
    fold into the convolution (``folded_affine`` is None: it is not affine).

    Args:
        activation: ``"relu"``, ``"silu"`` (alias ``"swish"``) or ``"gelu"`` (the erf form);
            case, ``_`` and ``-`` are ignored.
        num_channels: the channels of the convolution it follows (recorded only, so that model
            surgery pairs the two); None where it follows none.

    Shapes: any -> the same.
    """

    carries_activation = True

    def __init__(self, activation: str = "relu", num_channels: int | None = None) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.activation = _activation_name(activation)
        self.gamma = ACTIVATION_GAMMAS[self.activation]
        self._function = _ACTIVATIONS[self.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: ReLU's backward reads its own output.
        return self._function(x) * self.gamma

    def folded_affine(self) -> None:
        """None: a non-linearity, nothing to fold into the preceding convolution."""
        return None

    def extra_repr(self) -> str:
        return f"{self.activation}, gamma={self.gamma:.7f}"


def scaled_activation(num_channels: int, activation: str = "relu") -> ScaledActivation:
    """:class:`ScaledActivation` as a norm factory, called ``factory(num_channels)``."""
    return ScaledActivation(activation, num_channels=num_channels)


class ScaledStdConv2d(StandardizedConvMixin, nn.Conv2d):
    """Convolution with scaled weight standardization and a learnable gain (NF-ResNets).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode: as in ``nn.Conv2d`` (the bias is on by default: an NF network has no
            norm to supply the shift).
        eps: added to each filter's population variance.

    Raises:
        ValueError: ``eps`` <= 0.

    Shapes: as ``nn.Conv2d``.
    """

    _no_weight_decay = ("gain",)

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
        eps: float = 1e-6,
    ) -> None:
        # 0 would turn a constant filter (a zero-initialised one) into NaN.
        check_positive("ScaledStdConv2d", "eps", eps)
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
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(out_channels))
        # The release's fan-in normal init; the standardization makes the scale irrelevant.
        fan_in_normal_init(self, "linear")

    def standardized_weight(self) -> torch.Tensor:
        """``W_hat``, the weight the convolution uses: ``(C_out, C_in/groups, k_h, k_w)``."""
        return parametric_standardize_filters(
            self.weight, self.gain * _PWS_TO_SCALED_WS, gamma=self.eps
        )

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Reproduce a plain convolution with ``weight`` and ``bias`` where scaled WS allows.

        ``W`` takes the plain weight and ``gain`` the factor ``sqrt(N (sigma^2 + eps))`` that
        undoes the scaling, so the only change is the removal of each filter's mean.
        """
        var = self._take_plain_weights(weight, bias)
        self.gain.copy_(torch.sqrt((var + self.eps) * self.fan_in))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


__all__ = ["ACTIVATION_GAMMAS", "ScaledActivation", "ScaledStdConv2d"]
