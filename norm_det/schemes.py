"""The scheme registry: one name says how every linear operator of a network is built.

A *scheme* answers four questions — which convolution class, which linear class, which
transposed-convolution class, and which norm (or none) follows a convolution. Model builders,
integrations and :mod:`norm_det.surgery` ask this registry; none of them names a layer class.

It also says *where* its layers go, the same for every route that builds a network (norm_det's
model builders, :func:`norm_det.surgery.convert`, the detectron2 and mmdet integrations): every
convolution of the backbone, neck and heads (lone ones too when ``replaces_lone_convs``), every
linear and transposed convolution; the convolution on the image plain when
``keep_first_conv_plain`` (:func:`image_conv_scheme`); the predictors — class scores, box
deltas, objectness, mask and segmentation logits — plain unless the scheme's paper puts its
layers there too (``replaces_predictors``, :func:`predictor_scheme`); its ``residual_input`` at
the input of every residual unit.

Names forgive case and separators (``"GN+WS"`` == ``"gn_ws"`` == ``"gnws"``, ``"ND++"`` ==
``"NDPP"``) and carry options, in a string (``"GN(groups=16)"``) or a dict
(``{"name": "GN", "groups": 16}``). A new scheme is one decorated function::

    @register_scheme("MyNorm", paper="Me et al., 2026")
    def my_norm(eps: float = 1e-5) -> Scheme:
        return Scheme(conv=nn.Conv2d, norm=partial(MyNorm, eps=eps))
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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

NormFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class Scheme:
    """How to build the linear operators of a network, and what follows a convolution.

    Args:
        conv: called as ``conv(in_channels, out_channels, kernel_size, stride=, padding=,
            dilation=, groups=, bias=)``.
        norm: called as ``norm(num_channels)``; ``None`` when nothing follows a convolution.
            Where the network applies no activation after it (the last norm of a residual
            branch, FPN), this is the whole norm.
        norm_act: called as ``norm_act(num_channels)``: one layer that is the norm *and* the
            activation after it, for schemes whose paper replaces "norm, then ReLU" by one
            normalization-activation layer (FRN + TLU, EvoNorm; NF's scaled ReLU). It goes
            where the network applies a ReLU after the norm, in place of both; ``None`` (the
            default): ``norm``, then the network's ReLU.
        linear: called as ``linear(in_features, out_features, bias=)``.
        conv_transpose: called like ``nn.ConvTranspose2d``.
        conv_bias: whether the convolution of a conv+norm pair has a bias (default: only when
            there is no norm to provide the shift).
        replaces_lone_convs: whether convolutions that have no norm after them (FPN outputs,
            heads, predictors) also become ``conv`` (default: when the scheme has no norm and
            its conv is not plain).
        keep_first_conv_plain: leave the first convolution on the image a plain ``nn.Conv2d``.
        replaces_predictors: the predictors (the last layer of every head: class scores, box
            deltas, objectness, mask and segmentation logits) are the scheme's layers too.
            False (the default): they are plain ``nn.Conv2d`` / ``nn.Linear`` with bias, as the
            detector's own; a scheme sets it only where its paper normalizes them.
        residual_input: factory of a module applied to the input of every residual unit
            (CZM's multiplicative noise); model builders and :func:`norm_det.surgery.convert`
            insert it. ``None``: nothing is inserted.
        residual_alpha: normalizer-free residual scaling: pre-activation units compute
            ``x + residual_alpha * f(x / beta)``, ``beta`` the expected std of ``x`` (NF-ResNets).
            ``None``: ``x + f(x)``. Post-activation ResNets have no such form and ignore it.
        post_convert: called as ``post_convert(model)`` at the end of
            :func:`norm_det.surgery.convert`, for model-level changes a scheme needs.
        name, options: filled in by the registry.
    """

    conv: Callable[..., nn.Module] = nn.Conv2d
    norm: NormFactory | None = None
    norm_act: NormFactory | None = None
    linear: Callable[..., nn.Module] = nn.Linear
    conv_transpose: Callable[..., nn.Module] = nn.ConvTranspose2d
    conv_bias: bool | None = None
    replaces_lone_convs: bool | None = None
    keep_first_conv_plain: bool = False
    replaces_predictors: bool = False
    residual_input: Callable[[], nn.Module] | None = None
    residual_alpha: float | None = None
    post_convert: Callable[[nn.Module], None] | None = None
    name: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conv_bias is None:
            object.__setattr__(self, "conv_bias", self.norm is None)
        if self.replaces_lone_convs is None:
            object.__setattr__(
                self, "replaces_lone_convs", self.norm is None and self.conv is not nn.Conv2d
            )

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., Scheme]
    paper: str


_REGISTRY: dict[str, _Entry] = {}
_SPEC = re.compile(r"^\s*(?P<name>[^()]*?)\s*(?:\((?P<args>.*)\))?\s*$", re.DOTALL)


def normalize_scheme_name(name: str) -> str:
    """The registry key of a name: lower case, ``++`` read as ``pp``, separators dropped."""
    return re.sub(r"[^a-z0-9]", "", name.strip().lower().replace("++", "pp"))


def register_scheme(
    name: str, *, aliases: tuple[str, ...] = (), paper: str = ""
) -> Callable[[Callable[..., Scheme]], Callable[..., Scheme]]:
    """Register ``factory(**options) -> Scheme`` under ``name`` and ``aliases``.

    The factory's keyword arguments are the scheme's options, their defaults the papers'.
    """

    def decorator(factory: Callable[..., Scheme]) -> Callable[..., Scheme]:
        entry = _Entry(name, factory, paper)
        for key in {normalize_scheme_name(n) for n in (name, *aliases)}:
            existing = _REGISTRY.get(key)
            if existing is not None and existing.name != name:
                raise ValueError(f"scheme name {key!r} is already registered by {existing.name!r}")
            _REGISTRY[key] = entry
        return factory

    return decorator


def available_schemes() -> list[str]:
    """Canonical names of all registered schemes."""
    return sorted({entry.name for entry in _REGISTRY.values()}, key=str.lower)


def scheme_papers() -> dict[str, str]:
    """Canonical name -> the paper it implements (for documentation tables)."""
    return {entry.name: entry.paper for entry in _REGISTRY.values()}


def scheme_options(name: str) -> dict[str, Any]:
    """The options of scheme ``name`` with their default values."""
    factory = _lookup(name).factory
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()}


def _lookup(name: str) -> _Entry:
    entry = _REGISTRY.get(normalize_scheme_name(name) or "none")
    if entry is None:
        known = ", ".join(available_schemes())
        raise ValueError(f"unknown normalization scheme {name!r}; known schemes: {known}")
    return entry


def parse_scheme_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"GN(groups=16, eps=1e-6)"`` into ``("GN", {"groups": 16, "eps": 1e-6})``."""
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"cannot parse scheme {spec!r}; expected NAME or NAME(option=value, ...)")
    name, args = match.group("name"), match.group("args")
    if not args or not args.strip():
        return name, {}
    try:
        call = ast.parse(f"_({args})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise SyntaxError("options must be given as option=value")
        options = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise ValueError(
            f"cannot parse the options of scheme {spec!r} ({error}); "
            "expected NAME(option=value, ...) with literal values"
        ) from None
    if None in options:
        raise ValueError(f"cannot parse scheme {spec!r}: '**' is not allowed in options")
    return name, options


def get_scheme(spec: str | Mapping[str, Any] | Scheme | None = None, **options: Any) -> Scheme:
    """Resolve a scheme from a name, a ``NAME(option=value)`` string, a dict or a Scheme.

    Args:
        spec: ``"NDPP"``, ``"GN(groups=16)"``, ``{"name": "GN", "groups": 16}`` (``"type"`` is
            accepted for ``"name"``), an existing :class:`Scheme` (returned as is), or
            ``None`` / ``""`` for ``"none"``.
        options: further options; they override those in ``spec``.

    Raises:
        ValueError: an unknown name (listing the known ones) or option (listing the valid ones).
    """
    if isinstance(spec, Scheme):
        if options:
            raise ValueError(f"cannot add options {sorted(options)} to an already built scheme")
        return spec
    if spec is None:
        name, parsed = "none", {}
    elif isinstance(spec, Mapping):
        parsed = dict(spec)
        name = parsed.pop("name", None) or parsed.pop("type", None)
        if not isinstance(name, str):
            raise ValueError(f"a scheme given as a dict needs a 'name' string; got {dict(spec)!r}")
    elif isinstance(spec, str):
        name, parsed = parse_scheme_spec(spec)
    else:
        raise TypeError(f"a scheme is a name, a dict or a Scheme, not {type(spec).__name__}")
    parsed.update(options)
    entry = _lookup(name)
    valid = scheme_options(entry.name)
    unknown = sorted(set(parsed) - set(valid))
    if unknown:
        described = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(
            f"scheme {entry.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options (with defaults): {described}"
        )
    scheme = entry.factory(**parsed)
    return dataclasses.replace(scheme, name=entry.name, options=parsed)


# ---------------------------------------------------------------------------------------------
# Where a scheme's layers go: the rule every route follows.


def image_conv_scheme(scheme: str | Mapping[str, Any] | Scheme | None) -> Scheme:
    """The scheme of the convolution on the image.

    Plain (``none``: a convolution with bias and no norm) for schemes that declare
    ``keep_first_conv_plain`` (CZM: the image has no mean shift to reject), else the scheme.
    """
    resolved = get_scheme(scheme)
    return get_scheme("none") if resolved.keep_first_conv_plain else resolved


def predictor_scheme(scheme: str | Mapping[str, Any] | Scheme | None) -> Scheme:
    """The scheme of a predictor (class scores, box deltas, objectness, mask / seg logits).

    The scheme itself where it ``replaces_predictors`` (ND, ND++: "all layers"), else ``none``:
    a plain ``nn.Conv2d`` / ``nn.Linear`` with bias, which the detector initialises near zero.
    """
    resolved = get_scheme(scheme)
    return resolved if resolved.replaces_predictors else get_scheme("none")


# ---------------------------------------------------------------------------------------------
# Builders: what model code calls.


def build_conv_norm(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """One convolution and the norm that follows it (``nn.Identity`` when the scheme has none).

    Args:
        activation: a ReLU follows the norm (see :func:`build_norm`).

    Returns:
        ``(conv, norm)``; ``conv`` maps ``(N, in_channels, H, W)`` to
        ``(N, out_channels, H', W')`` and ``norm`` keeps the shape.
    """
    resolved = get_scheme(scheme)
    conv = resolved.conv(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=resolved.conv_bias,
    )
    norm = build_norm(resolved, out_channels, activation=activation)
    pair_norm(norm, conv)
    return conv, norm


def build_norm(
    scheme: str | Mapping[str, Any] | Scheme | None, num_channels: int, activation: bool = False
) -> nn.Module:
    """The norm a scheme puts after a convolution with ``num_channels`` outputs, or Identity.

    Args:
        activation: the network applies a ReLU after the norm here. For a scheme with a
            ``norm_act`` the result is that layer, which carries the activation (see
            :func:`carries_activation`); otherwise the scheme's norm.
    """
    resolved = get_scheme(scheme)
    factory = resolved.norm_act if activation and resolved.norm_act is not None else resolved.norm
    return factory(num_channels) if factory is not None else nn.Identity()


def carries_activation(norm: nn.Module) -> bool:
    """Whether layer ``norm`` applies the activation after it (a ``norm_act`` layer).

    Such a layer says so by its attribute ``carries_activation`` (see :mod:`norm_det.layers`).
    """
    return bool(getattr(norm, "carries_activation", False))


def pair_norm(norm: nn.Module, conv: nn.Module) -> None:
    """Tell a norm whose statistics depend on the weights before it (CBN) its convolution.

    Such a norm has ``pair_with(conv)`` (see :mod:`norm_det.layers`); others are left alone.
    """
    if hasattr(norm, "pair_with"):
        norm.pair_with(conv)


def build_conv(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    bias: bool = True,
) -> nn.Module:
    """A convolution with no norm after it (an FPN output, a predictor).

    It is the scheme's convolution when the scheme replaces lone convolutions (PWS, ND/ND++),
    otherwise a plain ``nn.Conv2d``.
    """
    resolved = get_scheme(scheme)
    factory = resolved.conv if resolved.replaces_lone_convs else nn.Conv2d
    return factory(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )


def build_linear(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_features: int,
    out_features: int,
    bias: bool = True,
) -> nn.Module:
    """The scheme's fully connected layer: ``(N, in_features) -> (N, out_features)``."""
    return get_scheme(scheme).linear(in_features, out_features, bias=bias)


def build_conv_transpose(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    groups: int = 1,
    bias: bool = True,
    dilation: int | tuple[int, int] = 1,
) -> nn.Module:
    """The scheme's transposed convolution (mask-head upsampling), arguments as torch's."""
    return get_scheme(scheme).conv_transpose(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        bias=bias,
        dilation=dilation,
    )


# ---------------------------------------------------------------------------------------------
# Built-in schemes.

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


def _group_norm(groups: int, eps: float) -> NormFactory:
    strict = not isinstance(groups, _DefaultGroups)
    return partial(GroupNorm, num_groups=int(groups), eps=eps, strict=strict)


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


def _deconv_scheme(
    scale_invariance: str, block: int, linear_block: int, stride: int, **options: Any
) -> Scheme:
    # Every linear operator is whitened: convolutions (lone ones too), linear layers and
    # transposed convolutions; nothing follows a convolution. The predictors too: the ND++ paper
    # ("Object Detection") uses ND++ "to enhance all layers" of Mask R-CNN (the mask head's
    # convolution and correlation layers included), "enforcing the invariance properties at every
    # layer of the network"; Network Deconvolution (ICLR 2020) likewise deconvolves every layer.
    return Scheme(
        replaces_predictors=True,
        conv=partial(
            DeconvConv2d,
            block=block,
            sampling_stride=stride,
            scale_invariance=scale_invariance,
            **options,
        ),
        norm=None,
        linear=partial(
            DeconvLinear, block=linear_block, scale_invariance=scale_invariance, **options
        ),
        conv_transpose=partial(
            DeconvConvTranspose2d,
            block=block,
            sampling_stride=stride,
            scale_invariance=scale_invariance,
            **options,
        ),
    )


@register_scheme("ND", aliases=("NetworkDeconvolution", "Deconv"), paper=_ND_PAPER)
def _nd(
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
) -> Scheme:
    # Detection defaults: block 64 (convs) / 256 (linear), patch sampling every 5 pixels (COCO
    # scale; 3 at ImageNet scale), T = 5; statistics averaged over processes when there are any.
    # freeze_schedule: "ndpp" (the ND++ release) or "iclr2020" (the Network Deconvolution code).
    return _deconv_scheme(
        "none",
        block,
        linear_block,
        stride,
        iters=iters,
        eps=eps,
        momentum=momentum,
        freeze=freeze,
        freeze_iter=freeze_iter,
        freeze_schedule=freeze_schedule,
        sync=sync,
    )


@register_scheme("NDPP", aliases=("ND++", "NetworkDeconvolutionPP"), paper=_NDPP_PAPER)
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
    # ND with per-sample standardization (scale invariance): "layernorm" or "l1norm".
    return _deconv_scheme(
        scale_invariance,
        block,
        linear_block,
        stride,
        iters=iters,
        eps=eps,
        momentum=momentum,
        freeze=freeze,
        freeze_iter=freeze_iter,
        freeze_schedule=freeze_schedule,
        sync=sync,
    )


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


@register_scheme(
    "FRN",
    aliases=("FilterResponseNorm", "FRN+TLU", "FilterResponseNormalization"),
    paper="Singh & Krishnan, Filter Response Normalization Layer, CVPR 2020",
)
def _frn(eps: float = 1e-6, learnable_eps: bool = False) -> Scheme:
    # FRN's own eps (1e-6, the paper's); learnable_eps: eps + |learned|, for 1x1 feature maps.
    layer = partial(FilterResponseNorm2d, eps=eps, learnable_eps=learnable_eps)
    return Scheme(
        conv=nn.Conv2d,
        norm=partial(layer, activation=False),
        norm_act=partial(layer, activation=True),
    )


_EVONORM_PAPER = "Liu, Brock, Simonyan & Le, Evolving Normalization-Activation Layers, NeurIPS 2020"


@register_scheme("EvoNorm-B0", aliases=("EvoNormB0",), paper=_EVONORM_PAPER)
def _evonorm_b0(eps: float = 1e-5, momentum: float = 0.1) -> Scheme:
    # Batch variance (a running average in eval) against the sample's own: B0. Without the
    # activation the release's layer is its affine only (gamma x + beta).
    layer = partial(EvoNormB0, eps=eps, momentum=momentum)
    return Scheme(
        conv=nn.Conv2d,
        norm=partial(layer, activation=False),
        norm_act=partial(layer, activation=True),
    )


@register_scheme("EvoNorm-S0", aliases=("EvoNormS0",), paper=_EVONORM_PAPER)
def _evonorm_s0(groups: int = _DEFAULT_GROUPS, eps: float = 1e-5) -> Scheme:
    # x sigmoid(v x) over the group std: S0, batch-independent.
    layer = partial(
        EvoNormS0, groups=int(groups), eps=eps, strict=not isinstance(groups, _DefaultGroups)
    )
    return Scheme(
        conv=nn.Conv2d,
        norm=partial(layer, activation=False),
        norm_act=partial(layer, activation=True),
    )


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
    return Scheme(
        conv=partial(WSConv2d, eps=ws_eps),
        norm=partial(
            BatchChannelNorm2d,
            groups=int(groups),
            eps=eps,
            momentum=momentum,
            estimate=estimate,
            strict=not isinstance(groups, _DefaultGroups),
        ),
    )
