"""Deployment: fold every scheme into plain layers, as weights other frameworks load, and ONNX.

:func:`norm_det.surgery.fuse` turns a trained network into plain ``nn.Conv2d`` / ``nn.Linear``
layers (GN stays ``nn.GroupNorm``, which depends on the sample). :func:`fuse_weights` writes the
result in the layout the *plain* architectures expect, so that it loads without norm_det:

- ResNet: a convolution without bias followed by a BN, as torchvision, detectron2 and mmdet
  build it. The fused bias goes into an identity BN (weight 1, running mean 0, running variance
  ``1 - eps``: ``(x - 0) / sqrt(1 - eps + eps) * 1 + b`` is ``x + b``), which also loads into
  norm_det's FrozenBN and BN models. Schemes fused into GN (GN, GN+WS) keep the GN: the file
  loads into those architectures built with ``nn.GroupNorm``.
- VGG-16: a convolution with bias and no norm (torchvision's ``vgg16``, mmdet's ``SSDVGG``).

ND++ (NDPP) standardizes each input sample (``x / sigma - mu / sigma``), which no plain layer of
these architectures computes: the fused NDPP layer keeps that as a forward pre-hook, which a
state dict cannot carry. Such weights are refused unless the caller accepts the difference
(``allow_inexact``); docs/deploy.md has the measured effect. :func:`export_onnx` exports the fused
model object itself, pre-hooks included, so ONNX is exact for every scheme.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fvcore.common.config import CfgNode
from torch import nn

from norm_det.schemes import get_scheme
from norm_det.surgery import fuse
from norm_det.weights.backbones import classifier_tensors, covered_state, units_of
from norm_det.weights.formats import BackboneWeights
from norm_det.weights.warm_start import pretrained_reference

# eps of the identity BN that carries a fused bias: torchvision's, detectron2's and mmdet's BN.
BN_EPS = 1e-5
# The norm keys of norm_det configs (docs/models.md), for deploy_config.
NORM_KEYS = (
    "RESNETS",
    "FPN",
    "RPN",
    "ROI_BOX_HEAD",
    "ROI_MASK_HEAD",
    "VGG",
    "SSD",
    "SEM_SEG_HEAD",
)


def inexact_layers(model: nn.Module) -> list[str]:
    """Layers of a fused ``model`` that plain weights cannot express: those that keep a forward
    pre-hook (NDPP's per-sample standardization) or a norm_det class."""
    return [
        name
        for name, module in model.named_modules()
        if module._forward_pre_hooks or type(module).__module__.startswith("norm_det.layers")
    ]


def fused_copy(model: nn.Module) -> nn.Module:
    """A fused (:func:`norm_det.surgery.fuse`) copy of ``model``, in eval mode."""
    return fuse(copy.deepcopy(model).eval())


def _identity_bn(bias: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.ones_like(bias),
        "bias": bias.clone(),
        "running_mean": torch.zeros_like(bias),
        "running_var": torch.full_like(bias, 1.0 - BN_EPS),
        "num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


def bn_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each conv+norm unit's conv bias into an identity BN (units with no norm tensors).

    Raises:
        ValueError: a unit has a conv bias and a norm of its own (a GN after a conv with bias),
            which a conv without bias and a BN cannot express.
    """
    laid_out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.endswith(".conv.bias"):
            laid_out[key] = value
            continue
        unit = key[: -len(".conv.bias")]
        if any(k.startswith(f"{unit}.norm.") for k in state):
            raise ValueError(
                f"{unit}: a convolution with bias followed by its own norm cannot be written as "
                "a convolution without bias and a BN"
            )
        laid_out.update({f"{unit}.norm.{name}": t for name, t in _identity_bn(value).items()})
    return laid_out


def deployed_scheme(fused: nn.Module, arch: str) -> str:
    """The scheme whose norm_det models load :func:`fuse_weights`'s tensors."""
    groups = [m.num_groups for m in fused.modules() if isinstance(m, nn.GroupNorm)]
    if groups:
        return f"GN(groups={groups[0]})"
    return "FrozenBN" if arch == "resnet" else "none"


def fuse_weights(
    weights: BackboneWeights,
    *,
    source_scheme: Any | None = None,
    allow_inexact: bool = False,
) -> BackboneWeights:
    """``weights`` folded into plain layers, in the layout of the plain architectures.

    Args:
        weights: a backbone of any scheme (its scheme from the metadata, the tensors' names or
            ``source_scheme``).
        allow_inexact: write NDPP weights without their per-sample standardization.

    Returns:
        The fused weights under norm_det's names; ``meta["scheme"]`` names the scheme of the
        norm_det models they load into (``FrozenBN`` for a ResNet, ``GN(groups=G)`` when GN
        remains, ``none`` for VGG).

    Raises:
        ValueError: the scheme keeps computations plain weights cannot hold (NDPP), unless
            ``allow_inexact``.
    """
    reference = pretrained_reference(weights, source_scheme)
    fused = fused_copy(reference)
    inexact = inexact_layers(fused)
    if inexact and not allow_inexact:
        raise ValueError(
            f"{len(inexact)} fused layers keep a computation plain weights cannot hold (first: "
            f"{', '.join(inexact[:3])}): ND++'s per-sample input standardization. The weights "
            "alone would compute something else; export the model to ONNX instead "
            "(norm_det.weights.export_onnx), or accept the difference with "
            "allow_inexact=True (--allow-inexact)"
        )
    tensors = covered_state(fused, units_of(weights.tensors))
    if weights.arch == "resnet":
        tensors = bn_layout(tensors)
    tensors.update(classifier_tensors(weights.tensors))
    meta = dict(weights.meta, scheme=deployed_scheme(fused, weights.arch), fused=True)
    return BackboneWeights(
        weights.arch, tensors, weights.framework, weights.prefix, dict(weights.others), meta
    )


def deploy_config(cfg: CfgNode, *, allow_inexact: bool = False) -> CfgNode:
    """The config whose model loads the state dict of a fused ``build_model(cfg)``.

    A fused model has plain convolutions with bias where it had scheme layers and norms, and
    keeps GN: every norm key becomes ``none``, or ``GN(groups=G)`` for the GN schemes.

    Raises:
        ValueError: a key names NDPP (its fused layers standardize their input, which no scheme
            builds), unless ``allow_inexact``.
    """
    fused = cfg.clone()
    fused.defrost()
    for key in NORM_KEYS:
        node = fused.MODEL.get(key)
        if node is None or "NORM" not in node:
            continue
        scheme = get_scheme(node.NORM or None)
        if scheme.name == "NDPP" and not allow_inexact:
            raise ValueError(
                f"MODEL.{key}.NORM is {node.NORM!r}: a fused ND++ layer standardizes its input, "
                "which no scheme's model builds; export the fused model to ONNX instead, or "
                "accept the difference with allow_inexact=True"
            )
        if scheme.name in ("GN", "GN+WS"):
            # The default count stays the default (it falls back on narrow layers as built).
            node.NORM = (
                f"GN(groups={scheme.options['groups']})" if "groups" in scheme.options else "GN"
            )
        else:
            node.NORM = "none"
    return fused


# ---------------------------------------------------------------------------------------------
# ONNX.

DETECTION_OUTPUTS = ("boxes", "scores", "labels", "masks")


class ExportWrapper(nn.Module):
    """One image in, the model's outputs for it as a tuple of tensors out.

    ``forward(image: (3, H, W))`` calls ``model([image])`` and returns the first result's
    ``boxes``, ``scores``, ``labels`` (and ``masks``) for a detector or ``sem_seg`` for
    DeepLab, in that order: ONNX graphs take and give tensors, not lists of dicts.
    """

    def __init__(self, model: nn.Module, output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model([image])[0]
        return tuple(result[name] for name in self.output_names)


@torch.no_grad()
def output_names_of(model: nn.Module, image: torch.Tensor) -> tuple[str, ...]:
    """The names :class:`ExportWrapper` returns for ``model`` (run once on ``image``)."""
    result = model.eval()([image])[0]
    if "sem_seg" in result:
        return ("sem_seg",)
    return tuple(name for name in DETECTION_OUTPUTS if name in result)


def export_onnx(
    model: nn.Module,
    image: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    fused: bool = False,
) -> tuple[Path, tuple[str, ...]]:
    """Export a norm_det model (any scheme) for one image to ONNX, fused.

    The model is fused first (a copy, unless ``fused``), then traced with torch's TorchScript
    exporter (``dynamo=False``: it exports torchvision's detection post-processing, NMS
    included), with the image height and width dynamic.

    Args:
        model: a detector or DeepLab (``model([image]) -> [dict]``).
        image: ``(3, H, W)`` in [0, 1], an example input.
        path: the ``.onnx`` file to write.

    Returns:
        The path and the output names (``boxes``, ``scores``, ``labels`` (, ``masks``) or
        ``sem_seg``).
    """
    model = model.eval() if fused else fused_copy(model)
    names = output_names_of(model, image)
    wrapper = ExportWrapper(model, names).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {"image": {1: "height", 2: "width"}}
    with warnings.catch_warnings():
        # The tracer flags torchvision's size arithmetic, which its ONNX support handles, and
        # torch flags the exporter this function chooses on purpose.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX")
        torch.onnx.export(
            wrapper,
            (image,),
            str(path),
            opset_version=opset,
            input_names=["image"],
            output_names=list(names),
            dynamic_axes=dynamic,
            dynamo=False,
        )
    return path, names


def run_onnx(path: str | os.PathLike, image: torch.Tensor) -> list[np.ndarray]:
    """Run an exported model in onnxruntime (CPU) on one ``(3, H, W)`` image."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image.detach().cpu().numpy()})
