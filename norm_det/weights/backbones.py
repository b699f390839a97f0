"""norm_det backbones for weights read from a file: their shape, their scheme, loading them.

A converted or fused checkpoint is computed by a real network: the tensors are loaded into
norm_det's :class:`~norm_det.modeling.ResNet` or :class:`~norm_det.modeling.VGG16SSD` built with
the scheme they were trained with, and :mod:`norm_det.surgery` does the rest. The network's
shape (depth, widths) is read from the tensors, or from a backbone already built.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from norm_det.modeling.backbone.resnet import RESNET_SPECS, STAGE_NAMES, ResNet
from norm_det.modeling.backbone.vgg import VGG16SSD
from norm_det.weights.keymaps import group_by_module, split_key

_SHOWN_KEYS = 5
# Tensors of the ImageNet classifier, which norm_det's backbones do not have.
CLASSIFIER_UNITS = ("fc", "classifier.0", "classifier.3", "classifier.6")


def unit_of(module: str) -> str:
    """The conv+norm unit of a module path (``res2.0.conv1.conv`` -> ``res2.0.conv1``).

    A pre-activation ResNet's lone convolutions are units of their own (``stem.conv1``,
    ``res2.0.conv3``, ``res2.0.shortcut``), and so are its norms without a convolution
    (``res2.0.preact.norm`` -> ``res2.0.preact``, ``final.norm`` -> ``final``).
    """
    head, _, last = module.rpartition(".")
    return head if last in ("conv", "norm") and head else module


def units_of(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """The units that have tensors in a norm_det-named state dict."""
    return {unit_of(module) for module in group_by_module(list(tensors))}


def _out_channels(tensors: Mapping[str, torch.Tensor], module: str) -> int:
    for name in ("weight", "v"):  # a CZM convolution holds V instead of its weight
        tensor = tensors.get(f"{module}.{name}")
        if tensor is not None:
            return int(tensor.shape[0])
    raise ValueError(f"the checkpoint has no weight for {module!r}")


def _conv_module(modules: Mapping[str, set[str]], unit: str) -> str | None:
    """The module holding ``unit``'s convolution: ``unit.conv`` (a conv+norm pair), ``unit``
    itself (a pre-activation ResNet's lone convolution), or None."""
    return next((m for m in (f"{unit}.conv", unit) if m in modules), None)


def _is_preact(modules: Mapping[str, set[str]], last_conv: str) -> bool:
    """Whether norm_det-named ResNet modules are a pre-activation ResNet-V2's: a unit's last
    convolution (``last_conv``) and its stem (unless it has a ``stem_norm``) are lone
    convolutions, and its norms (none in NF, PWS) stand before the units and after the last."""
    return (
        "stem.conv1" in modules
        or last_conv in modules
        or any(m == "final.norm" or m.endswith(".preact.norm") for m in modules)
    )


# A pre-activation stem norm of affine parameters only is taken for the one published with one
# (the PWS release's one-group GroupNorm): no tensor holds a GroupNorm's group count, so a
# format whose stem norm has other groups says so in its BackboneWeights.arguments.
AFFINE_STEM_NORM = "GN(groups=1)"


def _stem_norm(modules: Mapping[str, set[str]], preact: bool) -> str | None:
    """The ``stem_norm`` of a pre-activation ResNet's modules: its stem is a conv+norm unit
    (``stem.conv1.conv``); a norm with running statistics is a BN's, one with affine
    parameters only :data:`AFFINE_STEM_NORM`."""
    if not preact or "stem.conv1.conv" not in modules:
        return None
    return "BN" if "running_var" in modules.get("stem.conv1.norm", set()) else AFFINE_STEM_NORM


def resnet_arguments(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """:class:`ResNet` keyword arguments that fit norm_det-named ResNet ``tensors``.

    Depth, widths, ``preact`` (a ResNet-V2: lone last convolutions in the units, pre-activation
    norms) and ``stem_norm`` (a ResNet-V2 whose stem is a conv+norm unit; see
    :func:`_stem_norm`) come from the tensors. Strides, dilations and poolings leave no trace
    in weights: the torchvision layout (stride in the 3x3, no dilation, the max-pool stem,
    strided 1x1 projections) is assumed.

    Raises:
        ValueError: the blocks per stage are no depth norm_det builds (18, 34, 50, 101).
    """
    modules = group_by_module(list(tensors))
    blocks: dict[str, set[int]] = {}
    for module in modules:
        stage, _, rest = module.partition(".")
        if stage in STAGE_NAMES[1:] and rest.split(".")[0].isdigit():
            blocks.setdefault(stage, set()).add(int(rest.split(".")[0]))
    stages = [name for name in STAGE_NAMES[1:] if name in blocks]
    if not stages or stages != list(STAGE_NAMES[1 : len(stages) + 1]):
        raise ValueError(f"the checkpoint's ResNet stages are {stages}; expected res2 .. res5")
    counts = tuple(len(blocks[name]) for name in stages)
    bottleneck = _conv_module(modules, "res2.0.conv3") is not None
    depth = next(
        (
            d
            for d, (spec, is_bottleneck) in RESNET_SPECS.items()
            if spec[: len(counts)] == counts and is_bottleneck == bottleneck
        ),
        None,
    )
    if depth is None:
        raise ValueError(
            f"the checkpoint's ResNet has {counts} {'bottleneck' if bottleneck else 'basic'} "
            f"blocks per stage; norm_det builds ResNet-{', '.join(map(str, RESNET_SPECS))}"
        )
    last_conv = "res2.0.conv3" if bottleneck else "res2.0.conv2"
    preact = _is_preact(modules, last_conv)
    return dict(
        depth=depth,
        stem_channels=_out_channels(tensors, _conv_module(modules, "stem.conv1") or "stem.conv1"),
        res2_channels=_out_channels(tensors, _conv_module(modules, last_conv) or last_conv),
        bottleneck_channels=_out_channels(tensors, "res2.0.conv1.conv") if bottleneck else 64,
        out_features=tuple(stages),
        preact=preact,
        stem_norm=_stem_norm(modules, preact),
    )


def resnet_arguments_of(resnet: ResNet) -> dict[str, Any]:
    """The :class:`ResNet` keyword arguments (but ``norm`` and ``freeze_at``) of ``resnet``."""
    arguments = resnet_arguments(resnet.state_dict())
    arguments["out_features"] = tuple(resnet.out_features)
    # The poolings leave no trace in the tensors, nor a GroupNorm's groups.
    arguments.update(
        stem_pool=resnet.stem_pool, avg_down=resnet.avg_down, stem_norm=resnet.stem_norm
    )
    # A dilated stage keeps the previous stage's stride.
    strides = resnet.out_feature_strides
    arguments["replace_stride_with_dilation"] = tuple(
        stage in strides and strides[stage] == strides[previous]
        for previous, stage in itertools.pairwise(STAGE_NAMES[1:])
    )
    first = getattr(resnet, "res3", None)
    arguments["stride_in_1x1"] = bool(
        first is not None and hasattr(first[0], "conv3") and first[0].conv1.conv.stride == (2, 2)
    )
    return arguments


def vgg_arguments(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """:class:`VGG16SSD` keyword arguments that fit norm_det-named VGG ``tensors``."""
    return dict(base_channels=_out_channels(tensors, "features.conv1_1.conv"))


def vgg_arguments_of(vgg: VGG16SSD) -> dict[str, Any]:
    """The :class:`VGG16SSD` keyword arguments (but the schemes) of ``vgg``."""
    return dict(base_channels=vgg.features.conv1_1.conv.out_channels)


def arguments_for(arch: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor keyword arguments of norm_det's ``arch`` backbone that fit ``tensors``."""
    return resnet_arguments(tensors) if arch == "resnet" else vgg_arguments(tensors)


def arguments_of(backbone: nn.Module) -> dict[str, Any]:
    """Constructor keyword arguments (but the schemes) of a built norm_det backbone."""
    if isinstance(backbone, ResNet):
        return resnet_arguments_of(backbone)
    return vgg_arguments_of(backbone)


def build_backbone(arch: str, scheme: Any, **arguments: Any) -> nn.Module:
    """norm_det's ``arch`` backbone with every layer of ``scheme``, in eval mode."""
    if arch == "resnet":
        return ResNet(norm=scheme, **arguments).eval()
    if arch == "vgg":
        return VGG16SSD(norm=scheme, extra_norm=scheme, **arguments).eval()
    raise ValueError(f"unknown backbone architecture {arch!r}; expected 'resnet' or 'vgg'")


def find_backbone(model: nn.Module) -> tuple[str, nn.Module, str]:
    """``(path, module, arch)`` of the first norm_det ResNet or VGG16SSD inside ``model``.

    Raises:
        ValueError: ``model`` holds neither.
    """
    for path, module in model.named_modules():
        if isinstance(module, ResNet):
            return path, module, "resnet"
        if isinstance(module, VGG16SSD):
            return path, module, "vgg"
    raise ValueError(
        f"{type(model).__name__} holds no norm_det ResNet or VGG16SSD backbone to load weights into"
    )


def infer_scheme(tensors: Mapping[str, torch.Tensor]) -> str:
    """The scheme norm_det-named backbone ``tensors`` were saved from, read from their names.

    Raises:
        ValueError: the tensors fit more than one scheme (GN and GN+WS; ND and NDPP): the caller
            must say which (``source_scheme``, ``--source-scheme``).
    """
    conv_tensors: set[str] = set()
    norm_tensors: set[str] = set()
    for module, names in group_by_module(list(tensors)).items():
        if module.endswith(".conv"):
            conv_tensors |= names
        elif module.endswith(".norm"):
            norm_tensors |= names
    if "running_deconv" in conv_tensors:
        raise ValueError(
            "the checkpoint holds network-deconvolution weights, which are ND or NDPP alike; "
            "say which with source_scheme (--source-scheme ND or NDPP, with its options)"
        )
    if "alpha" in conv_tensors:
        return "PWS"
    if "v" in conv_tensors and "g" in conv_tensors:
        return "CZM"
    if "running_wm" in norm_tensors:
        return "IterNorm"
    if "running_mean" in norm_tensors:
        return "BN"
    if "weight" in norm_tensors:
        raise ValueError(
            "the checkpoint's norms have affine parameters but no statistics, as GN and GN+WS "
            "alike; say which with source_scheme (--source-scheme 'GN(groups=32)' or 'GN+WS')"
        )
    return "none"


def _fold_conv_bias_into_statistics(
    tensors: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """A conv bias before a BN (torchvision's vgg16_bn) becomes part of the BN's running mean.

    ``BN(conv(x) + b)`` with mean ``mu`` is ``BN(conv(x))`` with mean ``mu - b``: exact.
    """
    for key in [k for k in tensors if k.endswith(".conv.bias") and k not in expected]:
        mean_key = key[: -len("conv.bias")] + "norm.running_mean"
        if mean_key in tensors and mean_key in expected:
            tensors[mean_key] = tensors[mean_key] - tensors.pop(key)


def load_backbone_tensors(
    backbone: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "the checkpoint"
) -> list[str]:
    """Load norm_det-named ``tensors`` into ``backbone``, every unit they cover strictly.

    Units the tensors do not cover (SSD's extra layers when the source is an ImageNet VGG) keep
    their initialisation; the ImageNet classifier (``fc``, ``classifier``) has no place in a
    norm_det backbone and is left out; a BN's ``num_batches_tracked`` may be absent (frozen-BN
    checkpoints have none), or present where the backbone has frozen BNs.

    Returns:
        The keys left out.

    Raises:
        ValueError: a tensor the backbone has no place for, a tensor missing from a unit the
            checkpoint covers, or a shape that differs (naming key and both shapes).
    """
    expected = backbone.state_dict()
    tensors = dict(tensors)
    _fold_conv_bias_into_statistics(tensors, expected)
    left_out = [k for k in classifier_tensors(tensors) if k not in expected]
    for key in left_out:
        del tensors[key]
    # A BN's step counter has no place in a frozen BN (torchvision's and detectron2's alike).
    for key in [k for k in tensors if k.endswith("num_batches_tracked") and k not in expected]:
        del tensors[key]
    unexpected = [k for k in tensors if k not in expected]
    covered = units_of(tensors)
    missing = [
        k
        for k in expected
        if k not in tensors
        and unit_of(split_key(k)[0]) in covered
        and not k.endswith("num_batches_tracked")
    ]
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:_SHOWN_KEYS])})"
            )
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:_SHOWN_KEYS])})")
        raise ValueError(
            f"{source} does not fit a {type(backbone).__name__} of these layers: "
            f"{' and '.join(parts)} tensors; "
            + (
                _stem_norm_hint(backbone, tensors)
                or "were the weights saved with another scheme? "
                "(say which with source_scheme / --source-scheme)"
            )
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)} in the checkpoint and "
                f"{tuple(expected[key].shape)} in the {type(backbone).__name__}"
            )
    backbone.load_state_dict(tensors, strict=False)
    return left_out


def _stem_norm_hint(backbone: nn.Module, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What to say when a pre-activation stem with a norm meets one without: the scheme is
    not at fault but ``stem_norm``. None when the stems agree."""
    if not isinstance(backbone, ResNet) or not backbone.preact:
        return None
    has_norm = "stem.conv1.conv" in group_by_module(list(tensors))
    if has_norm == (backbone.stem_norm is not None):
        return None
    if has_norm:
        return (
            "the checkpoint's pre-activation stem has a norm after its convolution "
            "(stem.conv1.norm) and the backbone's none: build it with stem_norm "
            "(MODEL.RESNETS.STEM_NORM, e.g. 'GN(groups=1)')"
        )
    return (
        f"the backbone's pre-activation stem has a norm (stem_norm={backbone.stem_norm!r}) "
        "and the checkpoint's is a lone convolution (stem.conv1): build it without "
        "(MODEL.RESNETS.STEM_NORM: '')"
    )


def classifier_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ImageNet classifier's tensors (``fc``, ``classifier``), which conversions carry over."""
    return {k: v for k, v in tensors.items() if unit_of(split_key(k)[0]) in CLASSIFIER_UNITS}


def covered_state(backbone: nn.Module, units: set[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``backbone`` in ``units`` (what a checkpoint of those units holds)."""
    return {
        key: value
        for key, value in backbone.state_dict().items()
        if unit_of(split_key(key)[0]) in units
    }
