"""The PWS and IterNorm releases' ImageNet ResNets: source formats ``pws-release`` and
``iternorm-release``.

**IterNorm** (``iternorm-release``): github.com/huangleiBuaa/IterNorm-pytorch, for Huang, Zhou,
Zhu, Liu & Shao, "Iterative Normalization: Beyond Standardization towards Efficient Whitening",
CVPR 2019. Its ImageNet ResNets (``ImageNet/models/resnet.py``) are torchvision's with the stem's
norm ``bn1`` an ``IterNorm`` (``--norm=ItN --norm-cfg=T=5,num_channels=64``) and every other norm
a BatchNorm; the "DF" runs (``--arch-cfg=last=True``) add an ``IterNorm`` ``last_bn`` on the
pooled features before ``fc``. Files: ``best.pth``, a bare state dict (``module.`` stripped), or
``checkpoint.pth``, ``{"model": state_dict, "cfg": argparse.Namespace, "optimizer", ...}``
(``allow_pickle`` for the Namespace). Keys are torchvision's; the IterNorm's are ``bn1.weight``
``(1, C, 1, 1)``, ``bn1.running_mean`` ``(G, c, 1)`` and ``bn1.running_wm`` ``(G, c, c)`` for
``G`` groups of ``c`` contiguous channels (``c = 64`` halved until it divides ``C``). Eval
computes ``y = weight * (running_wm @ (x - running_mean)) + bias`` per group.

They load into norm_det's ResNet with the ``IterNorm`` scheme, ``group_channels`` the release's
``c``, ``iters`` its ``T = 5`` (which the file does not record). Module paths are torchvision's;
IterNorm tensors are flattened to norm_det's ``(C,)`` and ``running_wm`` regrouped into norm_det's
``(C / g, g, g)`` blocks; each BatchNorm becomes an IterNorm whose running whitening is the
diagonal ``1 / sqrt(running_var + 1e-5)`` (its ``num_batches_tracked`` is dropped), and
``last_bn``, a fixed affine map in eval, is folded into ``fc``. Eval is exact (the same affine
maps, to float rounding); training whitens every layer, not only the stem as the release does:
norm_det's ResNet takes one scheme for all its norms.

**PWS** (``pws-release``): github.com/lyxzzz/PWSConv, for Liu, Ge, Li & Gui, "Delving into
Variance Transmission and Normalization: Shift of Average Gradient Makes the Network Collapse",
AAAI 2021. Its ImageNet ResNet-50 (``configs/imagenet/pws.py``) has a ``PWSConv`` for every
convolution: ``weight``, ``bias`` and ``alpha`` of shape ``(O, 1, 1, 1)``, eval kernel
``sqrt(2 / fan_in) * alpha * layer_norm(weight, eps=gamma)`` with ``gamma = 1e-4`` (norm_det's
PWS exactly, ``alpha`` flattened). Its units are ``x + f(relu(x))``, the projection shortcut on
``relu(x)``: norm_det's pre-activation ResNet (``preact=True``) with the PWS scheme, whose
pre-activation is the ReLU alone. Files: the ``Saver``'s ``{"state_dict": model.state_dict(),
"epoch", "optimizer"}`` with keys ``backbone.layer1.0.conv1.alpha``, ``neck.norm.weight``,
``head.fc.weight``, or ``process_ckpt.py``'s ``{"state_dict": backbone keys, "author"}``.

The release keeps two norms, both one-group GroupNorms: ``backbone.norm1`` after the stem
convolution (before the ReLU and max-pool) and ``neck.norm`` on the last stage's output. The
first becomes ``stem.conv1.norm`` of a pre-activation ResNet built with
``stem_norm="GN(groups=1)"`` (``MODEL.RESNETS.STEM_NORM``), whose stem is the convolution, that
norm and a ReLU as the release's: reading returns ``arguments`` ``preact=True`` and that
``stem_norm`` (no tensor holds a GroupNorm's group count). The neck (``neck.norm`` and its ReLU,
then the pooling) and the head (``head.fc``) are the ImageNet classifier, dropped: norm_det's
backbone ends at the last stage, and its ``final`` there is only a ReLU for PWS, not the neck's
GroupNorm. Eval is exact: the same convolutions, norm and ReLUs in the same order (the release's
backbone returns each stage's output before any ReLU; norm_det's ``res5`` has ``final``'s ReLU
applied).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from norm_det.layers.deconv import resolve_block
from norm_det.weights.backbone_weights import BackboneWeights
from norm_det.weights.keymaps import group_by_module, namings
from norm_det.weights.sources import SourceFormat, register, unplaced_keys_error

_TORCHVISION = namings("torchvision", "resnet")[0]

# ---------------------------------------------------------------------------------------------
# IterNorm release.

ITERNORM_TITLE = "the IterNorm release (huangleiBuaa/IterNorm-pytorch)"
# The release's BatchNorm2d layers keep torch's default eps; its IterNorm iterates T = 5 times
# in every ImageNet script. Neither is in the file.
_BN_EPS = 1e-5
_ITERNORM_ITERS = 5
_ITERNORM_GROUP = 64  # the release's num_channels, when the file has no IterNorm to tell
_BN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_ITERNORM_TENSORS = {"weight", "bias", "running_mean", "running_wm"}


def _is_release_iternorm(state: Mapping[str, torch.Tensor], module: str) -> bool:
    """The release's IterNorm keeps ``running_mean`` as ``(G, c, 1)``; norm_det's is ``(C,)``."""
    mean, whitening = state.get(f"{module}.running_mean"), state.get(f"{module}.running_wm")
    return (
        isinstance(mean, torch.Tensor)
        and isinstance(whitening, torch.Tensor)
        and mean.dim() == 3
        and mean.shape[-1] == 1
        and whitening.dim() == 3
    )


def claims_iternorm_release(state: Mapping[str, torch.Tensor]) -> bool:
    """A torchvision-named ResNet whose stem norm ``bn1`` is the release's IterNorm."""
    return _is_release_iternorm(state, "bn1") and "layer1.0.conv1.weight" in state


def _regroup(blocks: torch.Tensor, group: int, key: str, source: str) -> torch.Tensor:
    """Block-diagonal whitening ``(G, c, c)`` as norm_det's ``(C / group, group, group)``.

    ``c`` must divide ``group``: each of norm_det's blocks holds ``group / c`` of the file's on
    its diagonal, zeros elsewhere (the same matrix).
    """
    count, c, _ = blocks.shape
    if group % c:
        raise ValueError(
            f"{source}: {key} whitens groups of {c} channels, which norm_det's IterNorm with "
            f"groups of {group} channels cannot hold"
        )
    per_block = group // c
    grouped = blocks.reshape(count // per_block, per_block, c, c)
    out = blocks.new_zeros(count // per_block, group, group)
    for index in range(per_block):
        span = slice(index * c, (index + 1) * c)
        out[:, span, span] = grouped[:, index]
    return out


def _iternorm_tensors(
    state: Mapping[str, torch.Tensor], module: str, group: int, source: str
) -> dict[str, torch.Tensor]:
    """norm_det IterNorm tensors (``weight``, ``bias``, ``running_mean`` ``(C,)``, ``running_wm``
    ``(C / g, g, g)``) of the release's IterNorm or BatchNorm ``module``; ``g`` is norm_det's
    group for the layer's width (``group`` or the whole width)."""
    tensors = {name: state[f"{module}.{name}"] for name in ("weight", "bias", "running_mean")}
    tensors = {name: value.reshape(-1) for name, value in tensors.items()}
    channels = tensors["weight"].numel()
    layer_group = resolve_block(group, channels, f"IterNorm of {module}")
    if f"{module}.running_wm" in state:
        blocks = state[f"{module}.running_wm"]
    else:
        blocks = torch.rsqrt(state[f"{module}.running_var"] + _BN_EPS).reshape(-1, 1, 1)
    if blocks.shape[0] * blocks.shape[1] != channels or tensors["running_mean"].numel() != channels:
        raise ValueError(
            f"{source}: {module} has {channels} channels (weight) but its statistics are "
            f"{tuple(state[f'{module}.running_mean'].shape)} and {tuple(blocks.shape)}"
        )
    tensors["running_wm"] = _regroup(blocks, layer_group, f"{module}.running_wm", source)
    return tensors


def _fold_last_bn_into_fc(
    state: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """``fc(last_bn(z))`` as one linear map (``last_bn`` in eval: ``gamma * (M (z - mu)) +
    beta``, ``M`` block diagonal), computed in float64: ``fc.weight`` and ``fc.bias``."""
    weight, bias = state["fc.weight"], state["fc.bias"]
    gamma, beta = (state[f"last_bn.{n}"].reshape(-1).double() for n in ("weight", "bias"))
    mean = state["last_bn.running_mean"].reshape(-1).double()
    whitening = torch.block_diag(*state["last_bn.running_wm"].double())
    if not weight.shape[1] == gamma.numel() == mean.numel() == whitening.shape[0]:
        raise ValueError(
            f"{source}: last_bn normalizes {gamma.numel()} features (running_wm "
            f"{tuple(state['last_bn.running_wm'].shape)}) but fc.weight is {tuple(weight.shape)}"
        )
    linear = gamma[:, None] * whitening
    shift = beta - linear @ mean
    return {
        "fc.weight": (weight.double() @ linear).to(weight.dtype),
        "fc.bias": (bias.double() + weight.double() @ shift).to(bias.dtype),
    }


def _prefix_of(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], key: str) -> str:
    return next((p for p in prefixes if f"{p}{key}" in state), prefixes[0])


def read_iternorm_release(state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
    """The release's ResNet as norm_det's ResNet with the IterNorm scheme (module docstring).

    Raises:
        ValueError: keys that are not the release's (naming the first), or a group size
            norm_det's IterNorm cannot hold.
    """
    local = state  # (read_state_dict has stripped a DataParallel model's ``module.``)
    # Keys of no known module or tensor name come first in the error, then those of modules
    # that lack a tensor (a BN without running_var cannot become a whitening).
    unknown: list[str] = []
    incomplete: list[str] = []
    modules = group_by_module(list(local))
    whitening_groups = [
        int(local[f"{m}.running_wm"].shape[-1])
        for m in modules
        if m != "last_bn" and _is_release_iternorm(local, m)
    ]
    group = max(whitening_groups, default=_ITERNORM_GROUP)
    tensors: dict[str, torch.Tensor] = {}
    fold_last_bn = False
    for module, all_names in modules.items():
        target = "last_bn" if module == "last_bn" else _TORCHVISION.to_norm_det(module)
        is_norm = target is not None and target.endswith((".norm", "last_bn"))
        allowed = _BN_TENSORS | _ITERNORM_TENSORS if is_norm else {"weight", "bias"}
        names = all_names & allowed if target is not None else set()
        unknown += [f"{module}.{n}" for n in sorted(all_names - names)]
        if not names:
            continue
        keys = [f"{module}.{name}" for name in sorted(names)]
        release_iternorm = names == _ITERNORM_TENSORS and _is_release_iternorm(local, module)
        if target == "last_bn":
            fold_last_bn = release_iternorm and {"fc.weight", "fc.bias"} <= local.keys()
            incomplete += [] if fold_last_bn else keys
        elif is_norm:
            bn = _BN_TENSORS - {"num_batches_tracked"} <= names <= _BN_TENSORS
            if not (release_iternorm or bn):
                incomplete += keys
                continue
            converted = _iternorm_tensors(local, module, group, source)
            tensors.update({f"{target}.{n}": v for n, v in converted.items()})
        else:
            tensors.update({f"{target}.{n}": local[f"{module}.{n}"] for n in names})
    if fold_last_bn:
        tensors.update(_fold_last_bn_into_fc(local, source))
    unplaced = unknown + incomplete
    if unplaced:
        raise unplaced_keys_error(source, ITERNORM_TITLE, len(state) - len(unplaced), unplaced)
    scheme = f"IterNorm(group_channels={group}, iters={_ITERNORM_ITERS})"
    return BackboneWeights(
        arch="resnet",
        tensors=tensors,
        framework=ITERNORM_RELEASE.name,
        meta={"scheme": scheme},
        naming=ITERNORM_RELEASE.name,
    )


# ---------------------------------------------------------------------------------------------
# PWS release.

PWS_TITLE = "the PWS release (lyxzzz/PWSConv)"
_PWS_PREFIXES = ("backbone.", "")
# The classifier of the release's Model: ReluNeck's one-group GroupNorm and LinearClsHead's fc.
PWS_DROPPED = ("neck.norm.weight", "neck.norm.bias", "head.fc.weight", "head.fc.bias")
_PWS_STEM_NORM = "norm1"
_PWS_CONV_TENSORS = {"weight", "bias", "alpha"}
# The scheme of the release's convolutions (gamma of configs/imagenet/pws.py; the file holds a
# trained alpha, which init_alpha would re-initialize).
PWS_RELEASE_SCHEME = "PWS(gamma=0.0001, init_alpha=False)"
# backbone.norm1: mmcv's GN of configs/imagenet/pws.py (num_groups=1, torch's eps 1e-5).
PWS_STEM_NORM = "GN(groups=1)"


def _is_release_alpha(value: torch.Tensor | None) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[1:] == (1, 1, 1)


def claims_pws_release(state: Mapping[str, torch.Tensor]) -> bool:
    """PWS convolutions whose ``alpha`` is ``(O, 1, 1, 1)`` (norm_det's is ``(O,)``) at the stem
    ``conv1`` and at ``layer1.0.conv1``, under ``backbone.`` or bare."""
    return any(
        _is_release_alpha(state.get(f"{p}conv1.alpha"))
        and _is_release_alpha(state.get(f"{p}layer1.0.conv1.alpha"))
        for p in _PWS_PREFIXES
    )


_LAST_CONV = re.compile(r"res\d\.\d+\.conv(?P<conv>\d)\.conv")


def _preact_module(target: str, last_conv: int) -> str:
    """norm_det's pre-activation ResNet holds each unit's last convolution and its shortcut as
    bare convolutions (no norm follows them there); its stem, with a ``stem_norm``, is a
    conv+norm unit as torchvision's (``stem.conv1.conv``)."""
    if target.endswith(".shortcut.conv"):
        return target[: -len(".conv")]
    match = _LAST_CONV.fullmatch(target)
    if match is not None and int(match.group("conv")) == last_conv:
        return target[: -len(".conv")]
    return target


def pws_release_tensors(
    state: Mapping[str, torch.Tensor], source: str = "the state dict"
) -> dict[str, torch.Tensor]:
    """The release's backbone under the names of norm_det's pre-activation ResNet.

    Args:
        state: the release's state dict (``backbone.`` keys, or the backbone's own).
        source: the file, for messages.

    Returns:
        For ``ResNet(preact=True, norm=PWS_RELEASE_SCHEME, stem_norm=PWS_STEM_NORM)``: every
        convolution's ``weight``, ``bias`` and ``alpha`` (flattened to ``(O,)``), and the stem
        GroupNorm's ``weight`` and ``bias`` as ``stem.conv1.norm``.

    Raises:
        ValueError: keys that are neither the release's backbone nor its classifier
            (:data:`PWS_DROPPED`), naming the first.
    """
    prefix = _prefix_of(state, _PWS_PREFIXES, "conv1.alpha")
    inside = [k for k in state if k.startswith(prefix) and k not in PWS_DROPPED]
    modules = group_by_module([k[len(prefix) :] for k in inside])
    last_conv = 3 if "layer1.0.conv3" in modules else 2
    tensors: dict[str, torch.Tensor] = {}
    unplaced = [k for k in state if not k.startswith(prefix) and k not in PWS_DROPPED]
    for module, names in modules.items():
        if module == _PWS_STEM_NORM:
            allowed, target = {"weight", "bias"}, "stem.conv1.norm"
        else:
            allowed, target = _PWS_CONV_TENSORS, _TORCHVISION.to_norm_det(module)
            if target is None or target.endswith(".norm"):
                allowed = set()
            else:
                target = _preact_module(target, last_conv)
        for name in sorted(names):
            key = f"{prefix}{module}.{name}"
            if name not in allowed:
                unplaced.append(key)
            else:
                value = state[key]
                tensors[f"{target}.{name}"] = value.reshape(-1) if name == "alpha" else value
    if unplaced:
        raise unplaced_keys_error(source, PWS_TITLE, len(state) - len(unplaced), unplaced)
    return tensors


def read_pws_release(state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
    """The release's backbone as norm_det's pre-activation PWS ResNet with a one-group GroupNorm
    after the stem convolution (module docstring); its classifier is dropped.

    Raises:
        ValueError: keys that are not the release's, naming the first.
    """
    return BackboneWeights(
        arch="resnet",
        tensors=pws_release_tensors(state, source),
        framework=PWS_RELEASE.name,
        meta={"scheme": PWS_RELEASE_SCHEME},
        naming=PWS_RELEASE.name,
        arguments={"preact": True, "stem_norm": PWS_STEM_NORM},
    )


# ---------------------------------------------------------------------------------------------

PWS_RELEASE = register(SourceFormat("pws-release", PWS_TITLE, claims_pws_release, read_pws_release))
ITERNORM_RELEASE = register(
    SourceFormat("iternorm-release", ITERNORM_TITLE, claims_iternorm_release, read_iternorm_release)
)

__all__ = [
    "ITERNORM_RELEASE",
    "PWS_DROPPED",
    "PWS_RELEASE",
    "PWS_RELEASE_SCHEME",
    "PWS_STEM_NORM",
    "claims_iternorm_release",
    "claims_pws_release",
    "pws_release_tensors",
    "read_iternorm_release",
    "read_pws_release",
]
