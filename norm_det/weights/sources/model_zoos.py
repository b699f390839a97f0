"""Model-zoo files: detectron2's Caffe2-named ImageNet ResNets, mmdet's GN and GN+WS ResNets.

``detectron2-caffe2``: the ImageNet ResNets of Detectron's model zoo (facebookresearch/Detectron),
which detectron2 (facebookresearch/detectron2) still starts its R-CNNs from:
``ImageNetPretrained/MSRA/R-50.pkl`` and ``R-101.pkl`` (He et al., "Deep Residual Learning for
Image Recognition", CVPR 2016: MSRA's Caffe models, each BN folded into an affine ``_bn_s`` /
``_bn_b``) and ``ImageNetPretrained/FAIR/R-50-GN.pkl``, ``R-101-GN.pkl`` (Wu & He, "Group
Normalization", ECCV 2018: ``_gn_s`` / ``_gn_b``, 32 groups). A pickle of ``{"blobs": {name:
array}}`` or of the bare dict, in Caffe2 blob names: ``conv1_w``, ``res_conv1_bn_s`` (BN stem) or
``conv1_gn_s`` (GN stem), ``res2_0_branch2a_w``, ``res2_0_branch2a_bn_b``, ``res2_0_branch1_w``
(the projection), ``fc1000_w``. Renamed as detectron2's ``c2_model_loading`` renames them
(``branch1`` -> ``shortcut``, ``branch2a/b/c`` -> ``conv1/2/3``, ``_s`` -> ``weight``, ``_b`` ->
``bias``, ``fc1000`` -> ``fc``). Deliberately dropped: every ``*_momentum`` (the SGD momentum
Detectron saves beside each parameter; detectron2 drops them too) and ``conv1_b`` (a bias of the
MSRA stem convolution, which Detectron's and detectron2's stems, a norm following, do not use).
An affine is detectron2's ``FrozenBatchNorm2d`` with ``running_mean`` 0 and ``running_var`` 1 (what
its checkpointer gives the statistics these files lack; eps 1e-5, so each scale is Caffe2's
``AffineChannel`` times ``(1 + 1e-5)^-1/2``, as detectron2 computes it): scheme ``FrozenBN``,
``stride_in_1x1=True`` (the MSRA models put the stride in the first 1x1, detectron2's
``STRIDE_IN_1X1: True``). GN files: scheme ``GN(groups=32)``, stride in the 3x3 (detectron2's GN
config sets ``STRIDE_IN_1X1: False``).

``mmdet-gn``, ``mmdet-gn-ws``, ``mmdet-gn-contrib``: the GN ResNets of mmdet's model zoo
(open-mmlab/mmdetection, configs ``gn/`` and ``gn+ws/``; mmengine's ``open-mmlab://`` links):
``detectron/resnet50_gn`` and ``resnet101_gn`` (Detectron's FAIR GN models converted to mmdet),
``jhu/resnet50_gn_ws`` and ``resnet101_gn_ws`` (Qiao et al., "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization", 2019: mmcv's ``ConvWS2d``, the unbiased
std plus eps 1e-5, then GN), ``contrib/resnet50_gn``. mmdet's ResNet state dict, its norms named
by the norm's abbreviation: ``conv1.weight``, ``gn1.weight``, ``layer1.0.conv1.weight``,
``layer1.0.gn1.bias``, ``layer1.0.downsample.0.weight``, ``layer1.0.downsample.1.weight``
(mmdet's naming of :mod:`norm_det.weights.keymaps`). Every config uses 32 groups and
``style='pytorch'`` (the stride in the 3x3). GN and GN+WS files have the same keys: ``mmdet-gn``
is recognised from them (a bare mmdet ResNet with ``gn`` norms: the zoo's pretrained backbones;
mmdet's own detector checkpoints hold theirs under ``backbone.``), ``mmdet-gn-ws`` and
``mmdet-gn-contrib`` are named with ``fmt``.

Input conventions. norm_det's networks take RGB in [0, 1] minus ``MODEL.PIXEL_MEAN``, divided by
``MODEL.PIXEL_STD`` (defaults: ImageNet's ``(0.485, 0.456, 0.406)`` / ``(0.229, 0.224, 0.225)``).
The Caffe2 files and ``detectron/resnet*_gn`` take BGR in [0, 255] minus Caffe's mean
``(103.530, 116.280, 123.675)``, std 1 (detectron2's ``PIXEL_MEAN`` / ``PIXEL_STD`` defaults and
``INPUT.FORMAT: BGR``; mmdet's GN configs' data preprocessor). Source channel ``c`` sees
``x_c = 255 s_j y_j + (255 m_j - mean_c)`` where ``j`` is its RGB channel, ``y`` norm_det's input,
``m`` / ``s`` norm_det's mean / std: Caffe's mean is 255 times ImageNet's, channel by channel
(255 x 0.406 = 103.53 ...), so the offset vanishes and the stem convolution, its input channels
reversed and channel ``j`` scaled by ``255 s_j``, computes on norm_det's input exactly what the
source computes on its own (zero padding included: zero stays zero). The ``jhu`` and ``contrib``
files take mmdet's default, RGB in [0, 255] minus ``(123.675, 116.28, 103.53)`` divided by
``(58.395, 57.12, 57.375)``: 255 times norm_det's, the same input; their stem is unchanged, as a
weight-standardized stem must be (standardization does not commute with scaling input channels).
``meta["source_input"]`` records the source's convention, ``meta["input"]`` norm_det's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from norm_det.config import get_cfg
from norm_det.weights.backbone_weights import BackboneWeights
from norm_det.weights.keymaps import namings, split_key
from norm_det.weights.sources import SourceFormat, register, unplaced_keys_error

# ---------------------------------------------------------------------------------------------
# Input conventions and the stem conversion.


@dataclass(frozen=True)
class InputConvention:
    """How a network's input image is prepared.

    Args:
        channels: ``"RGB"`` or ``"BGR"``, the order of the input channels.
        scale: the pixel range's top (1 for [0, 1], 255 for [0, 255]).
        mean, std: subtracted and divided per input channel, in that order and range.
    """

    channels: str
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __str__(self) -> str:
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return f"{self.channels} in [0, {self.scale:g}] minus ({mean}), divided by ({std})"

    def rgb_index(self, channel: int) -> int:
        """The RGB channel (0 red .. 2 blue) that input channel ``channel`` holds."""
        return 2 - channel if self.channels == "BGR" else channel


# detectron2's MODEL.PIXEL_MEAN / PIXEL_STD defaults with INPUT.FORMAT BGR; mmdet's GN configs.
CAFFE_BGR = InputConvention("BGR", 255.0, (103.530, 116.280, 123.675), (1.0, 1.0, 1.0))
# mmdet's default data preprocessor (bgr_to_rgb=True), which the jhu and contrib configs keep.
MMDET_RGB = InputConvention("RGB", 255.0, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def norm_det_input() -> InputConvention:
    """The input norm_det's networks take by default (``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``)."""
    model = get_cfg().MODEL
    return InputConvention("RGB", 1.0, tuple(model.PIXEL_MEAN), tuple(model.PIXEL_STD))


def convert_stem(
    weight: torch.Tensor, source: InputConvention, target: InputConvention, name: str
) -> torch.Tensor:
    """The stem convolution's weight for ``target``'s input, computing what ``weight`` computes
    on ``source``'s input of the same image.

    Args:
        weight: ``(C_out, 3, k, k)``, for ``source``'s input.
        name: names the file in the error.

    Returns:
        ``(C_out, 3, k, k)``: input channel ``t`` of ``target`` takes the source channel ``c``
        that holds the same colour, scaled by ``source.scale / target.scale * target.std[t] /
        source.std[c]``; ``weight`` itself when the two conventions are the same input.

    Raises:
        ValueError: the two means differ (then no weight alone is exact: the difference would be
            a bias that zero padding breaks at the border).
    """
    pixel_ratio = source.scale / target.scale
    columns, factors = [], []
    for channel in range(3):
        colour = source.rgb_index(channel)
        t = 2 - colour if target.channels == "BGR" else colour
        if abs(pixel_ratio * target.mean[t] - source.mean[channel]) > 1e-9 * source.scale:
            raise ValueError(
                f"{name}: its input mean {source.mean} ({source.channels}) is not the target "
                f"input's {target.mean} ({target.channels}) in its units; its stem cannot be "
                "converted exactly"
            )
        columns.append(t)
        factors.append(pixel_ratio * target.std[t] / source.std[channel])
    if columns == [0, 1, 2] and all(abs(f - 1) < 1e-9 for f in factors):
        # The same input (a weight-standardized stem must stay as it is: standardization does
        # not commute with scaling input channels).
        return weight
    converted = torch.empty_like(weight)
    for channel, (t, factor) in enumerate(zip(columns, factors)):
        converted[:, t] = weight[:, channel].double().mul(factor).to(weight.dtype)
    return converted


def _weights(
    name: str,
    tensors: dict[str, torch.Tensor],
    scheme: str,
    source_input: InputConvention,
    stride_in_1x1: bool,
    source: str,
) -> BackboneWeights:
    """The format's :class:`BackboneWeights`, the stem converted to norm_det's input."""
    target = norm_det_input()
    stem = "stem.conv1.conv.weight"
    if stem in tensors:
        tensors[stem] = convert_stem(tensors[stem], source_input, target, source)
    return BackboneWeights(
        arch="resnet",
        tensors=tensors,
        framework=name,
        meta={
            "scheme": scheme,
            "input": str(target),
            "source_input": str(source_input),
        },
        naming=name,
        arguments={"stride_in_1x1": stride_in_1x1},
    )


# ---------------------------------------------------------------------------------------------
# detectron2-caffe2.

_CAFFE2_TITLE = "detectron2's Caffe2-named ImageNet ResNet (Detectron's MSRA / FAIR .pkl)"
_CAFFE2_KEY = re.compile(
    r"(?P<unit>res_conv1|conv1|res(?P<stage>[2-5])_(?P<block>\d+)_branch(?P<branch>1|2a|2b|2c))"
    r"(?:_(?P<norm>bn|gn))?_(?P<param>[wsb])"
)
_CAFFE2_BRANCHES = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}
_CAFFE2_CLASSIFIER = {"fc1000_w": "fc.weight", "fc1000_b": "fc.bias"}
# The stem convolution's bias (MSRA's Caffe stem has one): unused by Detectron and detectron2.
_CAFFE2_UNUSED = ("conv1_b",)
_MOMENTUM = "_momentum"


def _caffe2_target(key: str) -> tuple[str, str] | None:
    """``(norm_det key, norm kind "bn" | "gn" | "")`` of a Caffe2 blob; None when it has none."""
    if key in _CAFFE2_CLASSIFIER:
        return _CAFFE2_CLASSIFIER[key], ""
    match = _CAFFE2_KEY.fullmatch(key)
    if match is None:
        return None
    unit, norm, param = match.group("unit", "norm", "param")
    if match.group("stage"):
        module = (
            f"res{match.group('stage')}.{int(match.group('block'))}."
            f"{_CAFFE2_BRANCHES[match.group('branch')]}"
        )
    # The BN stem's affine is named res_conv1_bn, the GN stem's norm conv1_gn.
    elif (unit, norm) in (("conv1", None), ("res_conv1", "bn"), ("conv1", "gn")):
        module = "stem.conv1"
    else:
        return None
    if norm is None:
        return (f"{module}.conv.weight", "") if param == "w" else None
    if param == "w":
        return None
    return f"{module}.norm.{'weight' if param == 's' else 'bias'}", norm


def claims_caffe2(state: Mapping[str, torch.Tensor]) -> bool:
    """A Caffe2 ResNet: its stem convolution and first bottleneck under Caffe2 names."""
    return "conv1_w" in state and "res2_0_branch2a_w" in state


def read_caffe2(state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
    """A Caffe2-named ResNet (see the module docstring) under norm_det's names.

    Raises:
        ValueError: blobs with no place (naming the first), a file mixing BN and GN blobs, or one
            with no norm at all.
    """
    tensors: dict[str, torch.Tensor] = {}
    kinds: set[str] = set()
    unplaced: list[str] = []
    for key, value in state.items():
        if key.endswith(_MOMENTUM) or key in _CAFFE2_UNUSED:
            continue
        target = _caffe2_target(key)
        if target is None:
            unplaced.append(key)
            continue
        tensors[target[0]] = value
        kinds.add(target[1])
    if unplaced:
        raise unplaced_keys_error(source, _CAFFE2_TITLE, len(tensors), unplaced)
    kinds.discard("")
    if len(kinds) != 1:
        found = " and ".join(f"_{k}_" for k in sorted(kinds)) or "no _bn_ or _gn_"
        raise ValueError(
            f"{source}: read as {_CAFFE2_TITLE}, it has {found} norm blobs; expected either "
            "BN affines (_bn_s, _bn_b) or GN (_gn_s, _gn_b)"
        )
    if kinds == {"bn"}:
        # detectron2's checkpointer leaves a FrozenBN's absent statistics at 0 and 1.
        for key in [k for k in tensors if k.endswith(".norm.weight")]:
            module = key[: -len(".weight")]
            tensors[f"{module}.running_mean"] = torch.zeros_like(tensors[key])
            tensors[f"{module}.running_var"] = torch.ones_like(tensors[key])
        return _weights("detectron2-caffe2", tensors, "FrozenBN", CAFFE_BGR, True, source)
    return _weights("detectron2-caffe2", tensors, "GN(groups=32)", CAFFE_BGR, False, source)


# ---------------------------------------------------------------------------------------------
# mmdet's GN ResNets.

_MMDET = namings("mmdet", "resnet")[0]
# Norms named by another norm's abbreviation (a BN or IterNorm ResNet) have no place here.
_OTHER_NORM = re.compile(r"(?:^|\.)(?:bn|iternorm)\d$")
_MMDET_TENSORS = {"conv": ("weight",), "norm": ("weight", "bias"), "fc": ("weight", "bias")}


def claims_mmdet_gn(state: Mapping[str, torch.Tensor]) -> bool:
    """A bare mmdet ResNet with GN norms: its stem and first unit's ``gn`` norms, no prefix."""
    return all(k in state for k in ("conv1.weight", "gn1.weight", "layer1.0.gn1.weight"))


def _read_mmdet_resnet(
    state: Mapping[str, torch.Tensor], source: str, title: str
) -> dict[str, torch.Tensor]:
    """mmdet-named GN ResNet tensors under norm_det's names.

    Raises:
        ValueError: keys with no place in a GN ResNet (naming the first).
    """
    tensors: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    for key, value in state.items():
        module, tensor = split_key(key)
        name = None if _OTHER_NORM.search(module) else _MMDET.to_norm_det(module)
        kind = None if name is None else name.rpartition(".")[2]
        if kind in _MMDET_TENSORS and tensor in _MMDET_TENSORS[kind]:
            tensors[f"{name}.{tensor}"] = value
        else:
            unplaced.append(key)
    if unplaced:
        raise unplaced_keys_error(source, title, len(tensors), unplaced)
    return tensors


def _mmdet_gn_format(
    name: str,
    title: str,
    scheme: str,
    source_input: InputConvention,
    claims: Callable[[Mapping[str, torch.Tensor]], bool],
) -> SourceFormat:
    """One of mmdet's GN ResNet files: same keys, its own scheme and input convention."""

    def read(state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
        tensors = _read_mmdet_resnet(state, source, title)
        return _weights(name, tensors, scheme, source_input, False, source)

    read.__doc__ = f"{title} under norm_det's names (see the module docstring)."
    return SourceFormat(name, title, claims, read)


def _named_only(state: Mapping[str, torch.Tensor]) -> bool:
    """Formats whose files have another format's keys claim nothing: ``fmt`` names them."""
    return False


register(SourceFormat("detectron2-caffe2", _CAFFE2_TITLE, claims_caffe2, read_caffe2))
register(
    _mmdet_gn_format(
        "mmdet-gn",
        "mmdet's GN ResNet (open-mmlab://detectron/resnet50_gn, resnet101_gn)",
        "GN(groups=32)",
        CAFFE_BGR,
        claims_mmdet_gn,
    )
)
register(
    _mmdet_gn_format(
        "mmdet-gn-ws",
        "mmdet's GN+WS ResNet (open-mmlab://jhu/resnet50_gn_ws, resnet101_gn_ws)",
        "GN+WS(groups=32)",
        MMDET_RGB,
        _named_only,
    )
)
register(
    _mmdet_gn_format(
        "mmdet-gn-contrib",
        "mmdet's RGB GN ResNet (open-mmlab://contrib/resnet50_gn)",
        "GN(groups=32)",
        MMDET_RGB,
        _named_only,
    )
)

__all__ = [
    "CAFFE_BGR",
    "MMDET_RGB",
    "InputConvention",
    "claims_caffe2",
    "claims_mmdet_gn",
    "convert_stem",
    "norm_det_input",
    "read_caffe2",
]
