"""The built-in schemes: one registered factory each, its keyword arguments the scheme's options
with the papers' defaults (DESIGN.md's table; the layers in :mod:`norm_det.layers`).

Importing :mod:`norm_det.schemes` imports this module, which registers them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from norm_det.layers import FrozenBatchNorm2d, GroupNorm, PWSConv2d, SyncBatchNorm, WSConv2d
from norm_det.layers.bcn import BatchChannelNorm2d
from norm_det.layers.cbn import CrossIterationBatchNorm2d
from norm_det.layers.czm import MultiplicativeNoise, check_czm_options, czm_conv2d
from norm_det.layers.deconv import DeconvConv2d, DeconvConvTranspose2d, DeconvLinear
from norm_det.layers.evonorm import EvoNormB0, EvoNormS0
from norm_det.layers.frn import FilterResponseNorm2d
from norm_det.layers.group_norm import DEFAULT_GROUPS
from norm_det.layers.iternorm import IterNorm
from norm_det.layers.mabn import CenteredConv2d, MovingAverageBatchNorm2d
from norm_det.layers.nf import ScaledStdConv2d, scaled_activation
from norm_det.schemes.registry import NormFactory, Scheme, register_scheme

_GN_PAPER = "Wu & He, Group Normalization, ECCV 2018"


# Predictors (Scheme.replaces_predictors): for BN, SyncBN, FrozenBN, GN, GN+WS and IterNorm a
# predictor is a lone convolution or linear layer with no norm after it, which these schemes never
# change; GN's paper (section 6, detection) puts GN in the backbone, FPN and head convolutions
# only. They keep the default, plain predictors.


@register_scheme("none", aliases=("plain", "identity"), paper="plain convolution with bias")
def _none() -> Scheme:
    return Scheme(conv=nn.Conv2d, norm=None)


@register_scheme("BN", aliases=("BatchNorm", "BatchNorm2d"), paper="Ioffe & Szegedy, ICML 2015")
def _bn(eps: float = 1e-5, momentum: float = 0.1) -> Scheme:
    return Scheme(conv=nn.Conv2d, norm=partial(nn.BatchNorm2d, eps=eps, momentum=momentum))


@register_scheme(
    "SyncBN", aliases=("SyncBatchNorm",), paper="Peng et al., MegDet, CVPR 2018 (cross-GPU BN)"
)
def _sync_bn(eps: float = 1e-5, momentum: float = 0.1, stats_mode: str = "N") -> Scheme:
    # stats_mode "N": the statistics of the union of all processes' batches (heads whose
    # inputs are empty on some processes stay right); "default": each process counts equally.
    return Scheme(
        conv=nn.Conv2d,
        norm=partial(SyncBatchNorm, eps=eps, momentum=momentum, stats_mode=stats_mode),
    )


@register_scheme(
    "FrozenBN", aliases=("FrozenBatchNorm", "FrozenBatchNorm2d"), paper="Detectron; " + _GN_PAPER
)
def _frozen_bn(eps: float = 1e-5) -> Scheme:
    return Scheme(conv=nn.Conv2d, norm=partial(FrozenBatchNorm2d, eps=eps))


class _DefaultGroups(int):
    """GN's default group count: an ``int`` that says the ``groups`` option was not given."""


# Groups a user gives must divide every width the norm meets (else a ValueError naming them); only
# the default falls back to fewer groups on narrow layers (norm_det.layers.GroupNorm).
_DEFAULT_GROUPS = _DefaultGroups(DEFAULT_GROUPS)


def _grouping(groups: int) -> tuple[int, bool]:
    """The group count of a ``groups`` option, and whether it must divide every width."""
    return int(groups), not isinstance(groups, _DefaultGroups)


def _group_norm(groups: int, eps: float) -> NormFactory:
    count, strict = _grouping(groups)
    return partial(GroupNorm, num_groups=count, eps=eps, strict=strict)


@register_scheme("GN", aliases=("GroupNorm",), paper=_GN_PAPER)
def _gn(groups: int = _DEFAULT_GROUPS, eps: float = 1e-5) -> Scheme:
    return Scheme(conv=nn.Conv2d, norm=_group_norm(groups, eps))


@register_scheme(
    "GN+WS",
    aliases=("WS+GN", "GNWS"),
    paper="Qiao et al., Weight Standardization, 2019; " + _GN_PAPER,
)
def _gn_ws(
    groups: int = _DEFAULT_GROUPS,
    eps: float = 1e-5,
    ws_eps: float = 1e-5,
    ws_population: bool = False,
) -> Scheme:
    # ws_population: Big Transfer's WS, (W - mean) / sqrt(var + ws_eps) with the population
    # variance (timm's StdConv2d; its BiT weights use ws_eps 1e-8); else Qiao et al.'s std + eps.
    return Scheme(
        conv=partial(WSConv2d, eps=ws_eps, population=ws_population),
        norm=_group_norm(groups, eps),
    )


@register_scheme(
    "PWS",
    paper="Liu et al., Delving into Variance Transmission and Normalization (AAAI 2021), eq. 12",
)
def _pws(gamma: float = 1e-4, init_alpha: bool = True) -> Scheme:
    # init_alpha: the release's data-dependent alpha (variance 2 on the first training batch),
    # on by default as in the release's configs, here on every PWS convolution (the release
    # spares the later convolutions of a block). PWS keeps its input's scale: without it (the
    # paper's alpha = 1, init_alpha=False) detectron2's Caffe-style configs (PIXEL_STD 1, pixels
    # of std ~60) start at 22x GN's loss and diverge, mmdet's at 1.9x.
    # Predictors plain: the PWS paper ("Object Detection in COCO") removes the BN layers and
    # "replace[s] all conv layers in the backbone with PWS layer"; it standardizes the convs
    # that had a norm to remove, never the predictors. norm_det extends PWS to the neck and head
    # convolutions (lone ones too), one rule for every route; a PWS mask predictor starts at
    # unit-variance logits instead of near zero (the detectron2 route's loss of 52).
    return Scheme(conv=partial(PWSConv2d, gamma=gamma, init_alpha=init_alpha), norm=None)


# ---------------------------------------------------------------------------------------------
# Whitening: ND, NDPP, IterNorm (norm_det.layers.deconv, norm_det.layers.iternorm).


_ND_PAPER = "Ye et al., Network Deconvolution, ICLR 2020"
_NDPP_PAPER = (
    "Ye et al., Exploiting Invariance in Training Deep Neural Networks (ND++), AAAI 2022, Alg. 1"
)


def _ndpp(
    block: int = 64,
    linear_block: int = 256,
    stride: int = 5,
    iters: int = 5,
    eps: float = 1e-5,
    momentum: float = 0.1,
    freeze: bool = False,
    freeze_iter: int = 100,
    freeze_schedule: str = "ndpp",
    sync: bool = True,
    scale_invariance: str = "layernorm",
) -> Scheme:
    # Detection defaults: block 64 (convs) / 256 (linear), patch sampling every 5 pixels (COCO
    # scale; 3 at ImageNet scale), T = 5; statistics averaged over processes when there are any.
    # freeze_schedule: "ndpp" (the ND++ release) or "iclr2020" (the Network Deconvolution code).
    # scale_invariance: the per-sample standardization, "layernorm" or "l1norm" ("none": ND).
    # Every linear operator is whitened: convolutions (lone ones too), linear layers and
    # transposed convolutions; nothing follows a convolution. The predictors too: the ND++ paper
    # ("Object Detection") uses ND++ "to enhance all layers" of Mask R-CNN (the mask head's
    # convolution and correlation layers included), "enforcing the invariance properties at every
    # layer of the network"; Network Deconvolution (ICLR 2020) likewise deconvolves every layer.
    whitening = dict(
        scale_invariance=scale_invariance,
        iters=iters,
        eps=eps,
        momentum=momentum,
        freeze=freeze,
        freeze_iter=freeze_iter,
        freeze_schedule=freeze_schedule,
        sync=sync,
    )
    spatial = dict(block=block, sampling_stride=stride, **whitening)
    return Scheme(
        replaces_predictors=True,
        conv=partial(DeconvConv2d, **spatial),
        norm=None,
        linear=partial(DeconvLinear, block=linear_block, **whitening),
        conv_transpose=partial(DeconvConvTranspose2d, **spatial),
    )


def _option_fixed(factory: Callable[..., Scheme], option: str, value: Any) -> Callable[..., Scheme]:
    """``factory`` with ``option`` fixed at ``value``; its signature, which the registry reads
    as the scheme's options, is ``factory``'s without ``option``."""

    def fixed(**options: Any) -> Scheme:
        return factory(**options, **{option: value})

    signature = inspect.signature(factory)
    kept = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in signature.parameters.values()
        if p.name != option
    ]
    fixed.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    fixed.__name__ = fixed.__qualname__ = f"{factory.__name__}_{option}_{value}"
    return fixed


# ND is ND++ without the per-sample standardization (registered first: scheme_papers' order).
_nd = register_scheme("ND", aliases=("NetworkDeconvolution", "Deconv"), paper=_ND_PAPER)(
    _option_fixed(_ndpp, "scale_invariance", "none")
)
register_scheme("NDPP", aliases=("ND++", "NetworkDeconvolutionPP"), paper=_NDPP_PAPER)(_ndpp)


@register_scheme(
    "IterNorm",
    aliases=("IterativeNormalization",),
    paper="Huang et al., Iterative Normalization, CVPR 2019, Alg. 1",
)
def _iternorm(
    group_channels: int = 64,
    iters: int = 5,
    eps: float = 1e-5,
    momentum: float = 0.1,
    sync: bool = True,
) -> Scheme:
    # Conv2d without bias + group whitening (64 contiguous channels per group, T = 5).
    return Scheme(
        conv=nn.Conv2d,
        norm=partial(
            IterNorm,
            group_channels=group_channels,
            iters=iters,
            eps=eps,
            momentum=momentum,
            sync=sync,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Mean-shift rejection: CZM (norm_det.layers.czm).


@register_scheme(
    "CZM",
    aliases=("CZMIG", "MeanShiftRejection"),
    paper="Ruff, Beck & Bach, Mean Shift Rejection (CZMIG), 2019, section 3",
)
def _czm(zmg: float = 0.85, noise: float = 0.1, luma: float = 5e-4) -> Scheme:
    # zmg: the CZMG factor z; noise: amplitude a of U(1-a, 1+a) at residual-unit inputs
    # (0: none); luma: LUMA loss weight lambda, to be set to the weight decay it replaces.
    # Predictors plain: the paper (section 3.2) makes "each filter that has spatial dimensions
    # greater than 1" CZM in a classifier whose last layer is a plain fully connected one, and
    # has no detector; a predictor is that last layer (SSD's 3x3 predictors stay plain too).
    # The first convolution stays plain ("we do not apply this to the first layer in the net
    # that is connected to the input"), the noise goes at residual-unit inputs (section 4.4).
    check_czm_options("scheme CZM", zmg=zmg, luma=luma, noise=noise)
    return Scheme(
        conv=partial(czm_conv2d, zmg=zmg, luma=luma),
        norm=None,
        keep_first_conv_plain=True,
        residual_input=partial(MultiplicativeNoise, amplitude=noise) if noise > 0 else None,
    )


# ---------------------------------------------------------------------------------------------
# Normalization-activation layers: FRN + TLU, EvoNorm (norm_det.layers.frn, .evonorm). Each
# replaces "norm, then ReLU" where the network has both (Scheme.norm_act); where no activation
# follows (a residual branch's last norm, a shortcut, the FPN) it is the layer without its
# activation, as the papers' releases place it.


def _norm_act_scheme(layer: Callable[..., nn.Module]) -> Scheme:
    """A plain convolution, then ``layer``: with its activation where the network has a ReLU
    after the norm, without it elsewhere."""
    return Scheme(
        conv=nn.Conv2d,
        norm=partial(layer, activation=False),
        norm_act=partial(layer, activation=True),
    )


@register_scheme(
    "FRN",
    aliases=("FilterResponseNorm", "FRN+TLU", "FilterResponseNormalization"),
    paper="Singh & Krishnan, Filter Response Normalization Layer, CVPR 2020",
)
def _frn(eps: float = 1e-6, learnable_eps: bool = False) -> Scheme:
    # FRN's own eps (1e-6, the paper's); learnable_eps: eps + |learned|, for 1x1 feature maps.
    layer = partial(FilterResponseNorm2d, eps=eps, learnable_eps=learnable_eps)
    return _norm_act_scheme(layer)


_EVONORM_PAPER = "Liu, Brock, Simonyan & Le, Evolving Normalization-Activation Layers, NeurIPS 2020"


@register_scheme("EvoNorm-B0", aliases=("EvoNormB0",), paper=_EVONORM_PAPER)
def _evonorm_b0(eps: float = 1e-5, momentum: float = 0.1) -> Scheme:
    # Batch variance (a running average in eval) against the sample's own: B0. Without the
    # activation the release's layer is its affine only (gamma x + beta).
    layer = partial(EvoNormB0, eps=eps, momentum=momentum)
    return _norm_act_scheme(layer)


@register_scheme("EvoNorm-S0", aliases=("EvoNormS0",), paper=_EVONORM_PAPER)
def _evonorm_s0(groups: int = _DEFAULT_GROUPS, eps: float = 1e-5) -> Scheme:
    # x sigmoid(v x) over the group std: S0, batch-independent.
    count, strict = _grouping(groups)
    layer = partial(EvoNormS0, groups=count, eps=eps, strict=strict)
    return _norm_act_scheme(layer)


# ---------------------------------------------------------------------------------------------
# The rest of the field: normalizer-free networks, batch norms over several iterations, batch-
# channel normalization (norm_det.layers.nf, .cbn, .mabn, .bcn).


@register_scheme(
    "NF",
    aliases=("NormFree", "NormalizerFree", "NFResNet"),
    paper="Brock, De & Smith, Characterizing signal propagation ... (NF-ResNets), ICLR 2021, §4",
)
def _nf(alpha: float = 0.2, activation: str = "relu", ws_eps: float = 1e-6) -> Scheme:
    # Scaled weight standardization on every convolution (lone ones too: no norm anywhere), the
    # activation scaled by gamma to keep unit variance (the norm slot where "norm, ReLU" stood),
    # and alpha = 0.2 (the paper's value) in pre-activation units x + alpha f(x / beta)
    # (MODEL.RESNETS.PREACT: the NF-ResNet; a post-activation ResNet has no such form).
    # Predictors plain: the paper's classifier is a plain linear layer.
    if not alpha > 0:
        raise ValueError(f"scheme NF: alpha is {alpha}; expected > 0 (the paper's 0.2)")
    return Scheme(
        conv=partial(ScaledStdConv2d, eps=ws_eps),
        norm=None,
        norm_act=partial(scaled_activation, activation=activation),
        residual_alpha=alpha,
    )


@register_scheme(
    "CBN",
    aliases=("CrossIterationBN", "CrossIterationBatchNorm", "CIBN"),
    paper="Yao et al., Cross-Iteration Batch Normalization, CVPR 2021",
)
def _cbn(window: int = 4, burnin: int = 60000, eps: float = 1e-5, momentum: float = 0.1) -> Scheme:
    # window k = 4 (the current iteration and 3 compensated past ones) and burn-in 8 of 12 epochs
    # of a 1x schedule (60k of 90k iterations): the release's detection configs. Burn-in is in
    # iterations: scale it with the schedule (CBN(burnin=...)). Each norm is paired with the
    # convolution before it (its Taylor term is in that convolution's weight).
    return Scheme(
        conv=nn.Conv2d,
        norm=partial(
            CrossIterationBatchNorm2d, window=window, burnin=burnin, eps=eps, momentum=momentum
        ),
    )


@register_scheme(
    "MABN",
    aliases=("MovingAverageBN", "MovingAverageBatchNorm"),
    paper="Yan et al., Towards Stabilizing Batch Statistics in Backward Propagation of BN, "
    "ICLR 2020",
)
def _mabn(
    buffer_size: int = 16,
    warmup_iters: int = 100,
    momentum: float = 0.02,
    backward_momentum: float = 0.02,
    renorm_clip: float | None = 5.0,
    eps: float = 1e-5,
) -> Scheme:
    # Centred weights in the convolution (MABN normalizes by the second moment, no mean), SMA
    # of the forward statistics over 16 iterations, EMA of the backward ones (the release).
    return Scheme(
        conv=CenteredConv2d,
        norm=partial(
            MovingAverageBatchNorm2d,
            buffer_size=buffer_size,
            warmup_iters=warmup_iters,
            momentum=momentum,
            backward_momentum=backward_momentum,
            renorm_clip=renorm_clip,
            eps=eps,
        ),
    )


@register_scheme(
    "BCN+WS",
    aliases=("BCNWS", "WS+BCN", "BatchChannelNorm"),
    paper="Qiao et al., Micro-Batch Training with Batch-Channel Normalization and Weight "
    "Standardization, 2019",
)
def _bcn_ws(
    groups: int = _DEFAULT_GROUPS,
    eps: float = 1e-5,
    momentum: float = 0.1,
    estimate: bool = False,
    ws_eps: float = 1e-5,
) -> Scheme:
    # estimate=True: the micro-batch variant, normalizing with the estimated (running) batch
    # statistics in training too.
    count, strict = _grouping(groups)
    return Scheme(
        conv=partial(WSConv2d, eps=ws_eps),
        norm=partial(
            BatchChannelNorm2d,
            groups=count,
            eps=eps,
            momentum=momentum,
            estimate=estimate,
            strict=strict,
        ),
    )
