"""The network-deconvolution releases' ImageNet ResNets: ND++ and ND (ICLR 2020).

- ``ndpp-release``: amazon-science/network-deconvolution-pp, ``Classification/main_imagenet.py``
  with ``models/resnet_imagenet.py`` and ``models/deconv.py`` (``Deconv``, ``Delinear``). Ye,
  Zhou, McKinney, Liu, Zhou and Zhdanov, "Exploiting Invariance in Training Deep Neural
  Networks", AAAI 2022. Example key: ``module.layer1.0.conv1.running_cov_isqrt`` ``(F, F)``.
- ``nd-release``: yechengxi/deconvolution, ``main_imagenet.py`` with ``models/resnet_imagenet.py``
  and ``models/deconv.py`` (``FastDeconv``, ``Delinear``). Ye, Evanusa, He, Mitrokhin,
  Goldstein, Yorke, Fermüller and Aloimonos, "Network Deconvolution", ICLR 2020. Example key:
  ``module.layer1.0.conv1.running_deconv`` ``(F, F)``.

Both save ``{"epoch", "arch", "state_dict", "best_acc1", "optimizer"}`` (``checkpoint.pth.tar``,
``model_best.pth.tar``) from a (Distributed)DataParallel model, so every key starts with
``module.`` (the container reader strips it; a bare state dict with or without it is read too).
The optimizer's momenta are outside ``state_dict`` and never read. The ResNets have torchvision's
module names (``conv1``, ``layer{1-4}.{b}.conv{1-3}``, ``downsample.0``, ``fc``), the stride in
the 3x3, and no BN: every convolution, the stem's too, is a deconvolution layer with a bias,
``weight`` ``(O, C, k, k)``, ``bias`` ``(O,)``, ``running_mean`` ``(F,)`` and the whitening
matrix ``(F, F)`` (``running_cov_isqrt`` in ND++, ``running_deconv`` in ND), ``F = k*k*B``,
``B = min(block, C)`` (``gcd`` when it does not divide); no step counter is saved. The classifier
is ``Delinear`` (``fc.running_mean`` ``(B,)``, ``fc.<matrix>`` ``(B, B)``; ``--block-fc 64``) or
a plain ``nn.Linear``.

In eval a layer computes ``conv(S x, W D) + b - sum(W D mu)``: the columns of the weight matrix
(unfold order) form ``C/B`` interleaved groups, column ``j`` in group ``j mod (C/B)``, and ``D``
multiplies each group's ``F`` columns. ``S`` is ND++'s scale invariance (``--norm-type
layernorm``: ``x / (sigma + eps) - mu / (sigma + eps)`` over each sample, unbiased ``sigma``,
``eps`` = the layer's 1e-5; nothing in ND). norm_det's :class:`~norm_det.layers.deconv.
DeconvConv2d` / ``DeconvLinear`` compute exactly this with the same column layout, so the
conversion is renames (torchvision's module names, :mod:`~norm_det.weights.keymaps`) and
reshapes: ``running_mean`` -> ``(1, F)``, the matrix -> ``running_deconv`` ``(1, F, F)``.

Where the releases differ from norm_det's ND / NDPP ResNet:

- ND keeps a BatchNorm after each shortcut's deconvolution (``downsample.1``; ND++ too with
  ``--keep-bn``), where norm_det's ND ResNet has no norm: its eval transform (eps 1e-5) is folded
  into that layer's weight and bias, ``W <- a W``, ``b <- a b + c``, which scales ``W D`` and
  ``sum(W D mu)`` alike: exact in eval (a model trained on from it trains that shortcut without
  the BN). Its ``num_batches_tracked`` goes with it.
- ND's ``ChannelDeconv`` between ``layer4`` and the pooling (``deconv1``, with ``--delinear
  False``) belongs to the ImageNet head, which norm_det's backbone does not have: dropped.
- The stem's options that only act in training (``n_iter=15``, ``freeze=True``,
  ``freeze_iter=100``) are per layer in the releases and have no per-layer form in a scheme; the
  scheme carries the other layers' (``iters=5``, sampling stride 3, ``sync`` as trained).
- The ND++ code without ``--norm-type`` trains without scale invariance, in the same keys: read
  such a file with ``source_scheme`` (``--source-scheme "NDPP(scale_invariance='none')"``).
- ResNeXt (grouped) and ResNet-152 variants have no norm_det counterpart (their shapes do not
  fit; the loader names them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from norm_det.schemes import get_scheme
from norm_det.surgery import fold_affine_into
from norm_det.weights.backbone_weights import BackboneWeights
from norm_det.weights.keymaps import namings, split_key
from norm_det.weights.sources import SourceFormat, register, unplaced_keys_error

# Modules whose presence (with a 2-d whitening matrix) says "this release's ResNet".
_PROBES = ("conv1", "layer1.0.conv1")
_BN_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_BN_AFFINE = ("weight", "bias", "running_mean", "running_var")
# nn.BatchNorm2d's default, which both releases' shortcut BNs use.
_BN_EPS = 1e-5


@dataclass(frozen=True)
class _Release:
    """What tells one release's files apart and what its layers computed.

    Args:
        name, title: the format's (see :class:`~norm_det.weights.sources.SourceFormat`).
        matrix: the name of the layers' whitening-matrix buffer.
        scheme: the norm_det scheme the layers are.
        options: that scheme's options as the release trained them (block sizes are read from
            the tensors).
        head_modules: module paths of the ImageNet head beside ``fc``, dropped.
    """

    name: str
    title: str
    matrix: str
    scheme: str
    options: Mapping[str, Any]
    head_modules: tuple[str, ...] = ()


def _claims(release: _Release) -> Callable[[Mapping[str, torch.Tensor]], bool]:
    def claims(state: Mapping[str, torch.Tensor]) -> bool:
        """The stem and the first block's conv hold this release's 2-d whitening matrix."""
        for module in _PROBES:
            matrix = state.get(f"{module}.{release.matrix}")
            if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
                return False
        return True

    return claims


def _layer_tensors(
    release: _Release, module: str, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A deconvolution layer's tensors under norm_det's tensor names and shapes.

    ``running_mean`` ``(F,)`` -> ``(1, F)`` and the matrix ``(F, F)`` -> ``running_deconv``
    ``(1, F, F)`` (a grouped layer's ``(G * F,)`` and ``(G, F, F)`` -> ``(G, F)``, ``(G, F, F)``).
    """
    converted = {name: tensors[name] for name in ("weight", "bias") if name in tensors}
    matrix = tensors.get(release.matrix)
    if matrix is not None:
        matrix = matrix if matrix.dim() == 3 else matrix[None]
        converted["running_deconv"] = matrix
    mean = tensors.get("running_mean")
    if mean is not None:
        features = matrix.shape[-1] if matrix is not None else mean.numel()
        converted["running_mean"] = mean.reshape(-1, features)
    return {f"{module}.{name}": value for name, value in converted.items()}


def _fold_norm(
    tensors: dict[str, torch.Tensor], conv: str, norm: Mapping[str, torch.Tensor]
) -> None:
    """Fold a BN's eval transform into the deconvolution layer ``conv`` before it (exact: see
    the module docstring), computed in float64 and stored in the file's dtype."""
    weight = tensors[f"{conv}.weight"]
    bn = {name: norm[name].double() for name in _BN_AFFINE}
    scale = bn["weight"] * torch.rsqrt(bn["running_var"] + _BN_EPS)
    shift = bn["bias"] - bn["running_mean"] * scale
    bias = tensors.get(f"{conv}.bias")
    folded = fold_affine_into(
        weight.double(), None if bias is None else bias.double(), scale, shift
    )
    tensors[f"{conv}.weight"], tensors[f"{conv}.bias"] = (t.to(weight.dtype) for t in folded)


def _block(tensors: Mapping[str, torch.Tensor], fc: bool) -> int | None:
    """The ``block`` option: the most channels per whitening group of the convolutions (each
    has ``min(block, C)``, or ``gcd``), or the classifier's group size (``fc``)."""
    sizes = []
    for key, matrix in tensors.items():
        module, name = split_key(key)
        if name != "running_deconv" or (module == "fc") != fc:
            continue
        weight = tensors.get(f"{module}.weight")
        taps = 1 if fc or weight is None or weight.dim() != 4 else weight[0, 0].numel()
        sizes.append(matrix.shape[-1] // taps)
    return max(sizes, default=None)


def _read(release: _Release, state: Mapping[str, torch.Tensor], source: str) -> BackboneWeights:
    """Every tensor of a release's state dict under norm_det's names, or the error naming the
    first keys that have no place (``source`` names the file)."""
    naming = namings("torchvision", "resnet")[0]
    by_module: dict[str, dict[str, str]] = {}  # module -> tensor name -> the file's key
    for key in state:
        module, name = split_key(key)
        by_module.setdefault(module, {})[name] = key
    placeable = {release.matrix, "weight", "bias", "running_mean"}
    tensors: dict[str, torch.Tensor] = {}
    norms: dict[str, dict[str, str]] = {}  # norm_det conv path -> the keys of the BN after it
    unplaced: set[str] = set()
    for module, keys in by_module.items():
        if module in release.head_modules:
            continue
        target = naming.to_norm_det(module) if module else None
        if target is None:
            unplaced.update(keys.values())
        elif target.endswith(".norm"):
            norms[target[: -len("norm")] + "conv"] = keys
            unplaced.update(key for name, key in keys.items() if name not in _BN_TENSORS)
        else:
            unplaced.update(key for name, key in keys.items() if name not in placeable)
            layer = {name: state[key] for name, key in keys.items() if name in placeable}
            tensors.update(_layer_tensors(release, target, layer))
    for conv, keys in norms.items():
        # A BN after a deconvolution layer (ND's shortcut BN) folds into it; no other has a place.
        if f"{conv}.running_deconv" in tensors and all(name in keys for name in _BN_AFFINE):
            _fold_norm(tensors, conv, {name: state[key] for name, key in keys.items()})
        else:
            unplaced.update(keys.values())
    if unplaced:
        ordered = [key for key in state if key in unplaced]
        raise unplaced_keys_error(source, release.title, len(state) - len(ordered), ordered)
    sizes = {
        option: _block(tensors, fc) for option, fc in (("block", False), ("linear_block", True))
    }
    options = {**{k: v for k, v in sizes.items() if v is not None}, **release.options}
    return BackboneWeights(
        arch="resnet",
        tensors=tensors,
        framework=release.name,
        meta={"scheme": str(get_scheme(release.scheme, **options))},
        naming=release.name,
    )


def _register(release: _Release) -> SourceFormat:
    return register(
        SourceFormat(
            name=release.name,
            title=release.title,
            claims=_claims(release),
            read=functools.partial(_read, release),
        )
    )


# Options as the READMEs' ImageNet runs trained them (main_imagenet.py's defaults: --stride 3,
# --deconv-iter 5, --eps 1e-5; ND++: --sync True --norm-type layernorm; ND has no sync).
NDPP_RELEASE = _register(
    _Release(
        name="ndpp-release",
        title="the ND++ release's ImageNet ResNet (amazon-science/network-deconvolution-pp)",
        matrix="running_cov_isqrt",
        scheme="NDPP",
        options={
            "stride": 3,
            "iters": 5,
            "eps": 1e-5,
            "sync": True,
            "scale_invariance": "layernorm",
        },
    )
)
ND_RELEASE = _register(
    _Release(
        name="nd-release",
        title="the Network Deconvolution release's ImageNet ResNet (yechengxi/deconvolution)",
        matrix="running_deconv",
        scheme="ND",
        options={"stride": 3, "iters": 5, "eps": 1e-5, "sync": False},
        head_modules=("deconv1",),
    )
)

__all__ = ["NDPP_RELEASE", "ND_RELEASE"]
