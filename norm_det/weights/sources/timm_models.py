"""timm's ResNets: ResNet-V2 with Big Transfer's weights, the NF-ResNets and ``resnet50_gn``.

Release: Ross Wightman, PyTorch Image Models (timm), github.com/huggingface/pytorch-image-models
(read at version 1.0.31: ``timm/models/resnetv2.py``, ``nfnet.py``, ``resnet.py``,
``timm/layers/std_conv.py``, ``norm_act.py``). A timm checkpoint is the model's bare state dict
(``torch.save`` ``.pth``, or ``.safetensors`` on the Hugging Face hub), under the timm model's
own module names, with no prefix; the ImageNet classifier is ``head.fc`` (``fc`` in ``resnet``).

``timm-resnetv2``: ``resnetv2_50x1_bit`` and the other Big Transfer models (Kolesnikov, Beyer,
Zhai, Puigcerver, Yung, Gelly & Houlsby, "Big Transfer (BiT): General Visual Representation
Learning", ECCV 2020), and timm's BN ResNet-V2s (``resnetv2_50``, ``resnetv2_18``): the
pre-activation ResNet-V2 of He, Zhang, Ren & Sun, "Identity Mappings in Deep Residual
Networks", ECCV 2016, with the 7x7 stem. Keys: ``stem.conv.weight``,
``stages.0.blocks.0.norm1.weight``, ``...conv1.weight``, ``...norm2``, ``...conv2``, ``...norm3``,
``...conv3.weight``, ``...downsample.conv.weight``, ``norm.weight`` (after the last stage),
``head.fc.weight`` (a 1x1 convolution). A unit's ``norm1`` (before ``conv1`` and the shortcut)
is norm_det's ``res2.0.preact.norm``, ``norm{k}`` (before ``conv{k}``) is ``res2.0.conv{k-1}.norm``,
the last convolution and ``downsample.conv`` are lone (``res2.0.conv3``, ``res2.0.shortcut``),
``norm`` is ``final.norm``, ``head.fc`` becomes ``fc`` reshaped to ``(classes, features)``.
Norms without statistics are BiT's: GroupNorm (32 groups, eps 1e-5) and ReLU, and every
convolution is timm's ``StdConv2d`` with eps 1e-8, which standardizes with the population
variance, ``(W - mean) / sqrt(var + eps)`` (so does BiT's release, with 1e-10): the scheme
``GN+WS(groups=32, ws_eps=1e-08, ws_population=True)``. The stem pads its map with zeros before
the 3x3 stride-2 max pool (``stem_type='fixed'``): ``stem_pool="zero_pad"``. Norms with
statistics are timm's BatchNorm + ReLU with plain convolutions and the usual max pool: ``BN``.
Exact: the same operations in the same order.

``timm-nf-resnet``: ``nf_resnet50`` (timm's NF-ResNets of Brock, De & Smith, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets", ICLR 2021). Keys
``stem.conv.{weight,bias,gain}``, ``stages.0.0.conv1.gain``, ``stages.0.0.downsample.conv.bias``,
``head.fc.weight`` (linear); no norms. A unit computes ``x + alpha * f(relu(x) / sqrt(var))``
with ``alpha = 0.2`` and the expected variance restarting after each stage's first unit, as
norm_det's NF pre-activation unit; its projection shortcut average-pools 2x2 before a stride-1
1x1 convolution (``avg_down``); the stem is a 7x7 convolution and the max pool. Every
convolution is a ``ScaledStdConv2d`` (eps 1e-5: ``NF(ws_eps=1e-05)``) whose gain ``(C, 1, 1, 1)``
becomes norm_det's ``(C,)``. timm moves the activation gain gamma (its 1.7139588594436646 for
ReLU, DeepMind's float32 estimate) from the activations into the convolutions: the stem's
convolution, which follows no activation, carries it too, and the last ReLU has none. norm_det
scales each ReLU by its own gamma (1.7128585, exact; :mod:`norm_det.layers.nf`). A convolution is
linear in its gain and ReLU is positively homogeneous, so the gains make it exact: the stem's is
multiplied by timm's gamma, every other by the ratio of the two gammas; and for the last ReLU the
last stage runs at ``1 / gamma`` scale inside: the convolutions that write its residual stream
(``conv3``, the shortcut) have gain and bias divided by norm_det's gamma, those that read it
after its first unit (``conv1``) the gain multiplied, so that ``final``'s ``gamma * relu(x /
gamma)`` is timm's ``relu(x)``. Every output map equals timm's.

``timm-resnet-gn``: ``resnet50_gn``: torchvision's names (``layer1.0.bn1.weight``) with
GroupNorm (32 groups) in the ``bn`` slots, plain convolutions, the stride in the 3x3. Its keys
are the torchvision naming's, but no published torchvision ResNet has norms without statistics,
so a torchvision-named bottleneck ResNet with its classifier and no statistics anywhere is read
as this file: the scheme ``GN(groups=32)``, never GN+WS (timm has no WS ResNet in these names).
A GN+WS network saved in torchvision's names reads with ``fmt="torchvision"`` and its
``source_scheme``. Files with statistics (torchvision's BN ResNets) are never claimed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from norm_det.layers.nf import ACTIVATION_GAMMAS
from norm_det.weights.backbone_weights import BackboneWeights
from norm_det.weights.keymaps import namings, split_key
from norm_det.weights.sources import SourceFormat, register, unplaced_keys_error

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# The tensors of each kind of layer (norm_det's module -> its kind: see _kind).
_CONV_TENSORS = frozenset({"weight"})
_NORM_TENSORS = frozenset({"weight", "bias", *_STATISTICS})
_FC_TENSORS = frozenset({"weight", "bias"})
_STAGES = 4  # timm's stages 0..3 are norm_det's res2..res5

# Big Transfer's norms and weight standardization, as timm builds resnetv2_*_bit.
BIT_SCHEME = "GN+WS(groups=32, ws_eps=1e-08, ws_population=True)"
# nf_resnet50: NfCfg's alpha (0.2) and std_conv_eps (1e-5), ReLU.
NF_RESNET_SCHEME = "NF(alpha=0.2, activation='relu', ws_eps=1e-05)"
RESNET_GN_SCHEME = "GN(groups=32)"
# timm's ReLU gain (its _nonlin_gamma table, from DeepMind's nfnets/base.py), in its convolutions.
TIMM_RELU_GAMMA = 1.7139588594436646

_V2_UNIT = re.compile(r"stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.(?P<module>.+)")
_NF_UNIT = re.compile(r"stages\.(?P<stage>\d+)\.(?P<block>\d+)\.(?P<module>.+)")
_CONV_OR_NORM = re.compile(r"(?P<kind>conv|norm)(?P<index>[1-9])")


def _unit_module(match: re.Match[str] | None, last_conv: int) -> str | None:
    """norm_det's module for a module of a timm pre-activation unit (see the module docstring).

    Args:
        match: a ``_V2_UNIT`` / ``_NF_UNIT`` match of the module path, or None.
        last_conv: the unit's last (lone) convolution: 3 in a bottleneck, 2 in a basic unit.
    """
    if match is None or int(match["stage"]) >= _STAGES:
        return None
    unit = f"res{int(match['stage']) + 2}.{int(match['block'])}"
    module = match["module"]
    if module == "downsample.conv":
        return f"{unit}.shortcut"
    layer = _CONV_OR_NORM.fullmatch(module)
    if layer is None or int(layer["index"]) > last_conv:
        return None
    index = int(layer["index"])
    if layer["kind"] == "conv":
        return f"{unit}.conv{index}" if index == last_conv else f"{unit}.conv{index}.conv"
    return f"{unit}.preact.norm" if index == 1 else f"{unit}.conv{index - 1}.norm"


def _kind(module: str) -> str:
    """``"norm"``, ``"fc"`` or ``"conv"``: the kind of layer of a norm_det ResNet module."""
    if module == "fc":
        return "fc"
    return "norm" if module.endswith(".norm") else "conv"


def _place(
    state: Mapping[str, torch.Tensor],
    module_of: Callable[[str], str | None],
    tensor_names: Mapping[str, frozenset[str]],
    source: str,
    title: str,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` under norm_det's name.

    Args:
        module_of: a file's module path -> norm_det's module, or None (no place for it).
        tensor_names: the tensors a layer of each kind (:func:`_kind`) holds in this format.

    Raises:
        ValueError: keys with no place, a module or a tensor name (naming the first).
    """
    tensors: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    for key, value in state.items():
        module, tensor = split_key(key)
        target = module_of(module)
        if target is None or tensor not in tensor_names[_kind(target)]:
            unplaced.append(key)
        else:
            tensors[f"{target}.{tensor}"] = value
    if unplaced:
        raise unplaced_keys_error(source, title, len(tensors), unplaced)
    return tensors


def _has_statistics(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.endswith(_STATISTICS) for key in state)


def _weights(
    name: str, tensors: dict[str, torch.Tensor], scheme: str, **arguments: Any
) -> BackboneWeights:
    return BackboneWeights(
        arch="resnet",
        tensors=tensors,
        framework=name,
        naming=name,
        meta={"scheme": scheme},
        arguments=arguments,
    )


# ---------------------------------------------------------------------------------------------
# ResNet-V2: Big Transfer (GN + WS) and timm's BN ResNet-V2s.

RESNETV2 = "timm-resnetv2"
_RESNETV2_TITLE = "timm's ResNet-V2 (Big Transfer's resnetv2_*_bit, resnetv2_50)"


def _claims_resnetv2(state: Mapping[str, torch.Tensor]) -> bool:
    # The 7x7 stem alone (no deep stem), pre-activation (a final norm, none in the stem).
    return (
        "stem.conv.weight" in state
        and "stages.0.blocks.0.norm1.weight" in state
        and "norm.weight" in state
        and "stem.norm.weight" not in state
    )


def _read_resnetv2(state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
    last_conv = 3 if "stages.0.blocks.0.conv3.weight" in state else 2
    fixed = {"stem.conv": "stem.conv1", "norm": "final.norm", "head.fc": "fc"}

    def module_of(module: str) -> str | None:
        return fixed.get(module) or _unit_module(_V2_UNIT.fullmatch(module), last_conv)

    names = {"conv": _CONV_TENSORS, "norm": _NORM_TENSORS, "fc": _FC_TENSORS}
    tensors = _place(state, module_of, names, source, _RESNETV2_TITLE)
    if "fc.weight" in tensors:  # a 1x1 convolution over the pooled map: a linear layer
        tensors["fc.weight"] = tensors["fc.weight"].flatten(1)
    if _has_statistics(state):
        return _weights(RESNETV2, tensors, "BN", preact=True, stem_pool="max", avg_down=False)
    return _weights(
        RESNETV2, tensors, BIT_SCHEME, preact=True, stem_pool="zero_pad", avg_down=False
    )


# ---------------------------------------------------------------------------------------------
# NF-ResNets.

NF_RESNET = "timm-nf-resnet"
_NF_RESNET_TITLE = "timm's NF-ResNet (nf_resnet50)"


def _claims_nf_resnet(state: Mapping[str, torch.Tensor]) -> bool:
    # Scaled-WS gains, the units directly under the stages, the 7x7 stem (not NF-RegNet's 3x3).
    stem = state.get("stem.conv.weight")
    return (
        "stem.conv.gain" in state
        and "stages.0.0.conv1.gain" in state
        and stem is not None
        and stem.dim() == 4
        and stem.shape[-1] == 7
    )


def _nf_gain_and_bias_factors(module: str, last_stage: int) -> tuple[float, float]:
    """``(gain factor, bias factor)`` of norm_det's conv ``module`` over timm's (see the module
    docstring: timm's gamma in its convolutions, norm_det's in its activations)."""
    ours = ACTIVATION_GAMMAS["relu"]
    if module == "stem.conv1":
        return TIMM_RELU_GAMMA, 1.0
    gain, bias = TIMM_RELU_GAMMA / ours, 1.0
    stage, block, _ = module.split(".", 2)
    if int(stage[len("res") :]) == last_stage:
        # After the stage's first unit, conv1 and the shortcut read its stream, kept at 1 / gamma.
        if int(block) > 0 and module.endswith((".conv1.conv", ".shortcut")):
            gain *= ours
        if module.endswith((".conv3", ".shortcut")):  # they write it
            gain, bias = gain / ours, bias / ours
    return gain, bias


def _read_nf_resnet(state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
    fixed = {"stem.conv": "stem.conv1", "head.fc": "fc"}

    def module_of(module: str) -> str | None:
        return fixed.get(module) or _unit_module(_NF_UNIT.fullmatch(module), 3)

    # Scaled-WS convolutions with bias and gain; no norms.
    names = {"conv": frozenset({"weight", "bias", "gain"}), "norm": frozenset(), "fc": _FC_TENSORS}
    tensors = _place(state, module_of, names, source, _NF_RESNET_TITLE)
    last_stage = max((int(key[3]) for key in tensors if key.startswith("res")), default=5)
    for key in [k for k in tensors if k.endswith(".gain")]:
        module = split_key(key)[0]
        gain_factor, bias_factor = _nf_gain_and_bias_factors(module, last_stage)
        tensors[key] = tensors[key].reshape(-1) * gain_factor
        if bias_factor != 1.0 and f"{module}.bias" in tensors:
            tensors[f"{module}.bias"] = tensors[f"{module}.bias"] * bias_factor
    return _weights(
        NF_RESNET, tensors, NF_RESNET_SCHEME, preact=True, stem_pool="max", avg_down=True
    )


# ---------------------------------------------------------------------------------------------
# resnet50_gn.

RESNET_GN = "timm-resnet-gn"
_RESNET_GN_TITLE = "timm's resnet50_gn (torchvision's names, GroupNorm)"
_RESNET_GN_KEYS = ("conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv3.weight", "fc.weight")


def _claims_resnet_gn(state: Mapping[str, torch.Tensor]) -> bool:
    return all(key in state for key in _RESNET_GN_KEYS) and not _has_statistics(state)


def _read_resnet_gn(state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
    (torchvision,) = namings("torchvision", "resnet")
    names = {"conv": _CONV_TENSORS, "norm": frozenset({"weight", "bias"}), "fc": _FC_TENSORS}
    tensors = _place(state, torchvision.to_norm_det, names, source, _RESNET_GN_TITLE)
    return _weights(
        RESNET_GN,
        tensors,
        RESNET_GN_SCHEME,
        preact=False,
        stem_pool="max",
        avg_down=False,
        stride_in_1x1=False,
    )


register(SourceFormat(RESNETV2, _RESNETV2_TITLE, _claims_resnetv2, _read_resnetv2))
register(SourceFormat(NF_RESNET, _NF_RESNET_TITLE, _claims_nf_resnet, _read_nf_resnet))
register(SourceFormat(RESNET_GN, _RESNET_GN_TITLE, _claims_resnet_gn, _read_resnet_gn))
