"""Key maps between the backbone names of torchvision, detectron2, mmdet / mmseg and norm_det.

A state-dict key is a module path and a tensor name (``layer1.0.bn1`` + ``running_var``). Only the
module path differs between frameworks; the tensor names are those of the layers themselves, so
one map serves every scheme (``alpha`` of a PWS conv, ``running_deconv`` of an ND conv, GN's
``weight``) and a round trip through any frameworks gives back the same keys.

Each framework's names are a :class:`Naming`: a tuple of module-path templates, row by row
parallel to norm_det's own (:data:`NORM_DET_ROWS`). Templates take ``{stage}`` (2..5),
``{layer}`` (= stage - 1, torchvision's ``layer1`` .. ``layer4``), ``{block}``, ``{conv}`` (1..3),
``{last}`` (2 or 3: the lone last convolution of a pre-activation unit) and ``{abbr}`` (the
norm's short name in mmdet: ``bn``, ``gn``, ``iternorm``); ``None`` says the framework has no
such module. The ImageNet classifier (ResNet ``fc``, VGG ``classifier``) keeps
its name in every framework, so that a conversion never loses it.

ResNet, module by module (norm_det / torchvision / detectron2 / mmdet)::

    stem.conv1.conv          conv1                      stem.conv1            conv1
    stem.conv1.norm          bn1                        stem.conv1.norm       bn1 | gn1
    res2.0.conv1.conv        layer1.0.conv1             res2.0.conv1          layer1.0.conv1
    res2.0.conv1.norm        layer1.0.bn1               res2.0.conv1.norm     layer1.0.bn1
    res2.0.shortcut.conv     layer1.0.downsample.0      res2.0.shortcut       layer1.0.downsample.0
    res2.0.shortcut.norm     layer1.0.downsample.1      res2.0.shortcut.norm  layer1.0.downsample.1
    fc                       fc                         stem.fc               fc

The pre-activation ResNet-V2 (``ResNet(preact=True)``) has modules that only norm_det names
(the other frameworks' ResNets are post-activation; timm's and BiT's V2 layouts are source
formats, :mod:`norm_det.weights.sources`): the lone convolutions ``stem.conv1``,
``res2.0.conv3`` (``conv2`` in a basic unit) and ``res2.0.shortcut``, and the norms
``res2.0.preact.norm`` and ``final.norm``. The lone last convolution is ``{last}``, never
``conv1``, so that detectron2's names (``res2.0.conv1``: a conv whose norm is
``res2.0.conv1.norm``) never read as a complete norm_det V2 backbone.

VGG-16 (SSD300): norm_det's ``features.conv{s}_{i}`` and ``fc.conv5_{i}`` are torchvision's
``features.{index}`` (``vgg16`` indices, or ``vgg16_bn``'s with the BN at ``index + 1``); mmdet's
``SSDVGG`` adds fc6 / fc7 as ``features.31`` / ``features.33`` and its ``SSDNeck`` holds L2Norm
and the extra layers. detectron2 has no VGG.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

FRAMEWORKS = ("torchvision", "norm_det", "detectron2", "mmdet")
ARCHITECTURES = ("resnet", "vgg")

_PLACEHOLDERS = {
    "stage": r"(?P<stage>[2-5])",
    "layer": r"(?P<layer>[1-4])",
    "block": r"(?P<block>\d+)",
    "conv": r"(?P<conv>[1-3])",
    "last": r"(?P<last>[23])",
    "abbr": r"(?P<abbr>bn|gn|iternorm)",
}
_FIELD = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> re.Pattern[str]:
    pattern, position = "", 0
    for match in _FIELD.finditer(template):
        pattern += re.escape(template[position : match.start()]) + _PLACEHOLDERS[match.group(1)]
        position = match.end()
    return re.compile(pattern + re.escape(template[position:]))


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def norm_abbreviation(tensor_names: set[str]) -> str:
    """mmdet's short name of a norm from its tensors: ``bn`` (statistics), ``gn``, ``iternorm``."""
    if "running_wm" in tensor_names:
        return "iternorm"
    if "running_mean" in tensor_names:
        return "bn"
    return "gn"


@dataclass(frozen=True)
class Naming:
    """The backbone module names of one framework, row by row parallel to norm_det's.

    Args:
        framework: one of :data:`FRAMEWORKS`.
        arch: ``"resnet"`` or ``"vgg"``.
        rows: one template (or ``None``: no such module) per row of ``NORM_DET_ROWS[arch]``.
        prefixes: where the backbone sits in this framework's files (``"backbone.body."`` in a
            detector); the first is written, all are tried when reading.
        other_parts: key prefixes of the framework's non-backbone parts (FPN, heads): kept when
            writing the same framework, never mistaken for unknown keys.
        variant: tells apart two layouts of one framework (``vgg16`` / ``vgg16_bn``).
    """

    framework: str
    arch: str
    rows: tuple[str | None, ...]
    prefixes: tuple[str, ...] = ("",)
    other_parts: tuple[str, ...] = ()
    variant: str = ""
    _patterns: tuple[re.Pattern[str] | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.rows) != len(NORM_DET_ROWS[self.arch]):
            raise ValueError(f"naming {self.name}: one template per norm_det row is needed")
        patterns = tuple(None if row is None else _compile(row) for row in self.rows)
        object.__setattr__(self, "_patterns", patterns)

    @property
    def name(self) -> str:
        return f"{self.framework}/{self.arch}" + (f"/{self.variant}" if self.variant else "")

    def to_norm_det(self, module: str) -> str | None:
        """norm_det's module path for this framework's ``module`` (relative to the prefix)."""
        for row, pattern in enumerate(self._patterns):
            match = None if pattern is None else pattern.fullmatch(module)
            if match is not None:
                values = dict(match.groupdict())
                if "layer" in values:
                    values["stage"] = str(int(values.pop("layer")) + 1)
                return _fill(NORM_DET_ROWS[self.arch][row], values)
        return None

    def from_norm_det(self, module: str, tensor_names: set[str]) -> str | None:
        """This framework's module path for norm_det's ``module``; None when it has none.

        ``tensor_names`` (the module's tensors) choose mmdet's norm abbreviation.
        """
        for row, pattern in enumerate(_NORM_DET_PATTERNS[self.arch]):
            match = pattern.fullmatch(module)
            if match is None:
                continue
            template = self.rows[row]
            if template is None:
                return None
            values = dict(match.groupdict())
            values["layer"] = str(int(values["stage"]) - 1) if "stage" in values else ""
            values["abbr"] = norm_abbreviation(tensor_names)
            return _fill(template, values)
        return None


# ---------------------------------------------------------------------------------------------
# ResNet.

# The pre-activation ResNet-V2's own modules (see the module docstring).
_NORM_DET_RESNET_V2 = (
    "stem.conv1",
    "res{stage}.{block}.conv{last}",
    "res{stage}.{block}.shortcut",
    "res{stage}.{block}.preact.norm",
    "final.norm",
)
_NO_RESNET_V2 = (None,) * len(_NORM_DET_RESNET_V2)
NORM_DET_RESNET = (
    "stem.conv1.conv",
    "stem.conv1.norm",
    "res{stage}.{block}.conv{conv}.conv",
    "res{stage}.{block}.conv{conv}.norm",
    "res{stage}.{block}.shortcut.conv",
    "res{stage}.{block}.shortcut.norm",
    "fc",
    *_NORM_DET_RESNET_V2,
)
_TORCHVISION_RESNET = (
    "conv1",
    "bn1",
    "layer{layer}.{block}.conv{conv}",
    "layer{layer}.{block}.bn{conv}",
    "layer{layer}.{block}.downsample.0",
    "layer{layer}.{block}.downsample.1",
    "fc",
    *_NO_RESNET_V2,
)
_DETECTRON2_RESNET = (
    "stem.conv1",
    "stem.conv1.norm",
    "res{stage}.{block}.conv{conv}",
    "res{stage}.{block}.conv{conv}.norm",
    "res{stage}.{block}.shortcut",
    "res{stage}.{block}.shortcut.norm",
    # detectron2's convert-torchvision-to-d2 moves the classifier under the stem.
    "stem.fc",
    *_NO_RESNET_V2,
)
_MMDET_RESNET = (
    "conv1",
    "{abbr}1",
    "layer{layer}.{block}.conv{conv}",
    "layer{layer}.{block}.{abbr}{conv}",
    "layer{layer}.{block}.downsample.0",
    "layer{layer}.{block}.downsample.1",
    "fc",
    *_NO_RESNET_V2,
)

# ---------------------------------------------------------------------------------------------
# VGG-16 as SSD300 uses it.

_VGG_CONVS = tuple(
    (f"features.conv{stage}_{index}" if stage < 5 else f"fc.conv5_{index}")
    for stage, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for index in range(1, count + 1)
)
# Positions of the 13 convolutions in torchvision's vgg16.features and vgg16_bn.features.
_VGG16_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_BN_INDICES = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
_SSD_FC = ("fc.fc6", "fc.fc7")
_MMDET_SSD_FC = ("features.31", "features.33")  # mmdet's SSDVGG appends fc6 / fc7 to features
_SSD_EXTRAS = tuple(f"extras.{k}.{j}" for k in range(4) for j in range(2))
_CLASSIFIER = ("classifier.0", "classifier.3", "classifier.6")


def _vgg_rows(
    convs: tuple[str | None, ...],
    norms: tuple[str | None, ...],
    l2norm: str | None,
    extras: tuple[tuple[str, str] | None, ...],
    classifier: tuple[str, ...],
) -> tuple[str | None, ...]:
    rows: list[str | None] = []
    for conv, norm in zip(convs, norms):
        rows += [conv, norm]
    rows.append(l2norm)
    for pair in extras:
        rows += list(pair) if pair is not None else [None, None]
    return (*rows, *classifier)


NORM_DET_VGG = _vgg_rows(
    tuple(f"{m}.conv" for m in (*_VGG_CONVS, *_SSD_FC)),
    tuple(f"{m}.norm" for m in (*_VGG_CONVS, *_SSD_FC)),
    "l2norm",
    tuple((f"{m}.conv", f"{m}.norm") for m in _SSD_EXTRAS),
    _CLASSIFIER,
)
_NO_SSD_PARTS = (None, None)
_TORCHVISION_VGG = _vgg_rows(
    (*(f"features.{i}" for i in _VGG16_INDICES), *_NO_SSD_PARTS),
    (None,) * 15,
    None,
    (None,) * len(_SSD_EXTRAS),
    _CLASSIFIER,
)
_TORCHVISION_VGG_BN = _vgg_rows(
    (*(f"features.{i}" for i in _VGG16_BN_INDICES), *_NO_SSD_PARTS),
    (*(f"features.{i + 1}" for i in _VGG16_BN_INDICES), *_NO_SSD_PARTS),
    None,
    (None,) * len(_SSD_EXTRAS),
    _CLASSIFIER,
)
_MMDET_EXTRAS = tuple(
    (f"neck.extra_layers.{k}.{j}.conv", f"neck.extra_layers.{k}.{j}.{{abbr}}")
    for k in range(4)
    for j in range(2)
)
_MMDET_INDICES = tuple(f"backbone.features.{i}" for i in (*_VGG16_INDICES, 31, 33))
# mmdet's own SSDVGG: no norm after the VGG convolutions.
_MMDET_VGG = _vgg_rows(
    _MMDET_INDICES,
    (None,) * 15,
    "neck.l2_norm",
    _MMDET_EXTRAS,
    tuple(f"backbone.{c}" for c in _CLASSIFIER),
)
# norm_det's mmdet integration (NormDetConvert with add_norms) wraps each VGG conv with a norm.
_MMDET_VGG_NORMED = _vgg_rows(
    tuple(f"{m}.conv" for m in _MMDET_INDICES),
    tuple(f"{m}.norm" for m in _MMDET_INDICES),
    "neck.l2_norm",
    _MMDET_EXTRAS,
    tuple(f"backbone.{c}" for c in _CLASSIFIER),
)

NORM_DET_ROWS: dict[str, tuple[str, ...]] = {"resnet": NORM_DET_RESNET, "vgg": NORM_DET_VGG}
_NORM_DET_PATTERNS = {
    arch: tuple(_compile(r) for r in rows) for arch, rows in NORM_DET_ROWS.items()
}

# Non-backbone parts of full models, per framework (their keys are never "unknown").
_NORM_DET_PARTS = ("backbone.fpn.", "rpn.", "roi_heads.", "classifier.", "head.")
_TORCHVISION_PARTS = ("backbone.fpn.", "rpn.", "roi_heads.", "classifier.", "aux_classifier.")
_DETECTRON2_PARTS = (
    "backbone.fpn_lateral",
    "backbone.fpn_output",
    "proposal_generator.",
    "roi_heads.",
    "sem_seg_head.",
    "pixel_mean",
    "pixel_std",
)
_MMDET_PARTS = (
    "neck.",
    "rpn_head.",
    "roi_head.",
    "bbox_head.",
    "decode_head.",
    "auxiliary_head.",
    "data_preprocessor.",
)

# Reading tries every naming; writing takes the first of a framework that can name all modules.
NAMINGS: tuple[Naming, ...] = (
    Naming("norm_det", "resnet", NORM_DET_RESNET, ("", "backbone.body."), _NORM_DET_PARTS),
    Naming("norm_det", "vgg", NORM_DET_VGG, ("", "backbone."), _NORM_DET_PARTS),
    Naming(
        "torchvision",
        "resnet",
        _TORCHVISION_RESNET,
        # classification, detection (backbone.body), segmentation (backbone) models
        ("", "backbone.body.", "backbone."),
        _TORCHVISION_PARTS,
    ),
    Naming("torchvision", "vgg", _TORCHVISION_VGG, ("",), (), "vgg16"),
    Naming("torchvision", "vgg", _TORCHVISION_VGG_BN, ("",), (), "vgg16_bn"),
    Naming(
        "detectron2", "resnet", _DETECTRON2_RESNET, ("", "backbone.bottom_up."), _DETECTRON2_PARTS
    ),
    Naming("mmdet", "resnet", _MMDET_RESNET, ("backbone.", ""), _MMDET_PARTS),
    Naming("mmdet", "vgg", _MMDET_VGG, ("",), _MMDET_PARTS, "ssdvgg"),
    Naming("mmdet", "vgg", _MMDET_VGG_NORMED, ("",), _MMDET_PARTS, "ssdvgg_normed"),
)


def namings(framework: str | None = None, arch: str | None = None) -> list[Naming]:
    """The namings of ``framework`` and / or ``arch`` (all when None)."""
    return [
        n
        for n in NAMINGS
        if (framework is None or n.framework == framework) and (arch is None or n.arch == arch)
    ]


def split_key(key: str) -> tuple[str, str]:
    """``"layer1.0.bn1.running_var"`` -> ``("layer1.0.bn1", "running_var")``."""
    module, _, tensor = key.rpartition(".")
    return module, tensor


def group_by_module(keys: list[str]) -> dict[str, set[str]]:
    """Module path -> the names of its tensors."""
    modules: dict[str, set[str]] = {}
    for key in keys:
        module, tensor = split_key(key)
        modules.setdefault(module, set()).add(tensor)
    return modules


def rename_from_norm_det(
    state: Mapping[str, torch.Tensor], naming: Naming, prefix: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """norm_det-named backbone tensors in ``naming`` under ``prefix``.

    Returns:
        The renamed tensors, in ``state``'s order, and the norm_det keys ``naming`` has no name
        for.
    """
    tensors = group_by_module(list(state))
    renamed: dict[str, torch.Tensor] = {}
    unnamed: list[str] = []
    for key, value in state.items():
        module, tensor = split_key(key)
        target = naming.from_norm_det(module, tensors[module])
        if target is None:
            unnamed.append(key)
        else:
            renamed[f"{prefix}{target}.{tensor}"] = value
    return renamed, unnamed


def writable_naming(
    framework: str, arch: str, state: Mapping[str, torch.Tensor], drop_unmapped: bool = False
) -> tuple[Naming, list[str]]:
    """The naming of ``framework`` to write the norm_det ``state`` in, and the keys it drops.

    The first layout that names every module is taken; with ``drop_unmapped`` the one that names
    the most, dropping the rest.

    Raises:
        ValueError: the framework has no backbone ``arch``, or (without ``drop_unmapped``) none of
            its layouts names every module (listing the tensors the closest layout lacks).
    """
    candidates = namings(framework, arch)
    if not candidates:
        targets = ", ".join(sorted({n.framework for n in namings(arch=arch)}))
        raise ValueError(
            f"{framework} has no {arch.upper()} backbone that norm_det can write; "
            f"targets for {arch.upper()}: {targets}"
        )
    ranked = sorted(
        ((rename_from_norm_det(state, naming, "")[1], naming) for naming in candidates),
        key=lambda pair: len(pair[0]),
    )
    unnamed, naming = ranked[0]
    if unnamed and not drop_unmapped:
        raise ValueError(
            f"{len(unnamed)} tensors have no counterpart in {framework}'s {arch.upper()} "
            f"(first: {', '.join(unnamed[:5])}); pass drop_unmapped=True (--drop-unmapped) to "
            "leave them out"
        )
    return naming, unnamed
