"""The steps of a weight conversion, as ``tools/convert_weights.py`` runs them.

A backbone checkpoint is read (:func:`~norm_det.weights.formats.read_checkpoint`), optionally
warm-started in another scheme (:func:`warm_start_backbone`, with the calibration images of
:func:`read_calibration_images`), fused (:func:`~norm_det.weights.deploy.fuse_weights`) and
written in any framework's format (:func:`~norm_det.weights.formats.write_checkpoint`). A whole
norm_det model is built from its config (:func:`model_from_config`), its backbone warm-started
from a backbone checkpoint (:func:`warm_start_model_backbone`), and saved, fused or not, with the
config that builds it (:func:`save_model`).

Each step returns what it found, so that a caller reports it; nothing here prints. docs/weights.md
says what each scheme conversion preserves; docs/deploy.md covers deployment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from fvcore.common.config import CfgNode
from torch import nn

from norm_det.weights.backbones import infer_scheme
from norm_det.weights.deploy import (
    deploy_config,
    export_onnx,
    fuse_weights,
    fused_copy,
    inexact_layers,
)
from norm_det.weights.formats import BackboneWeights
from norm_det.weights.io import load_file, save_file
from norm_det.weights.warm_start import (
    backbone_weights,
    load_pretrained_backbone,
    output_agreement,
    pretrained_reference,
    warm_start,
)

# The inputs on which a warm start is compared with its source when no images are given.
RANDOM_PROBE_SHAPE = (2, 3, 224, 224)


def read_calibration_images(
    path: str | os.PathLike | None, *, source: str | None = None
) -> torch.Tensor | None:
    """The ``(N, 3, H, W)`` tensor of normalized images a torch file holds, as float32.

    Args:
        path: the file; None gives None.
        source: how the error message names the file (default: its path in quotes).

    Raises:
        ValueError: the file holds anything else.
    """
    if path is None:
        return None
    images = load_file(path)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        name = source or f"'{path}'"
        raise ValueError(f"{name} must hold one (N, 3, H, W) tensor; found {found}")
    return images.float()


def describe_checkpoint(weights: BackboneWeights, source: str | os.PathLike) -> str:
    """What :func:`~norm_det.weights.formats.read_checkpoint` found in ``source``, in words."""
    return (
        f"{len(weights.tensors)} {weights.arch.upper()} backbone tensors from {source} "
        f"({weights.naming}"
        + (f" under {weights.prefix!r}" if weights.prefix else "")
        + (f", {len(weights.others)} more outside the backbone" if weights.others else "")
        + ")"
    )


class WarmStart(NamedTuple):
    """What :func:`warm_start_backbone` made, and how closely it reproduces its source."""

    weights: BackboneWeights  # the warm-started backbone; its meta records the new scheme
    source_scheme: str  # the scheme it was started from
    agreement: dict[str, float]  # output_agreement: relative_l2, relative_max, cosine
    probe: str  # the inputs the outputs were compared on, in words

    def describe(self) -> str:
        """How closely the warm start reproduces its source, in words."""
        return (
            f"outputs differ by {self.agreement['relative_l2']:.2e} (relative L2), cosine "
            f"{self.agreement['cosine']:.4f}, on {self.probe} in eval mode"
        )


def warm_start_backbone(
    weights: BackboneWeights,
    scheme: Any,
    *,
    source_scheme: Any | None = None,
    calibration_images: torch.Tensor | None = None,
) -> WarmStart:
    """``weights`` warm-started in ``scheme``, compared with the source network in eval mode.

    The comparison runs on the calibration images, or on :data:`RANDOM_PROBE_SHAPE` random
    inputs without them.

    Args:
        source_scheme: the scheme ``weights`` were saved with, where their tensors do not tell.
        calibration_images: ``(N, 3, H, W)``: fit the warm-started units to the source
            network's activations on them (see :func:`~norm_det.weights.warm_start.warm_start`).
    """
    reference = pretrained_reference(weights, source_scheme)
    converted = warm_start(reference, scheme, calibration_images=calibration_images)
    if calibration_images is not None:
        probe, where = calibration_images, "the calibration images"
    else:
        count, _, height, width = RANDOM_PROBE_SHAPE
        probe = torch.randn(*RANDOM_PROBE_SHAPE)
        where = f"{count} random {height}x{width} inputs"
    agreement = output_agreement(reference, converted, probe)
    source = source_scheme or weights.scheme or infer_scheme(weights.tensors)
    return WarmStart(backbone_weights(converted, weights, scheme), source, agreement, where)


def finish_backbone(
    weights: BackboneWeights,
    *,
    fuse: bool = False,
    source_scheme: Any | None = None,
    allow_inexact: bool = False,
) -> BackboneWeights:
    """``weights`` as they are written: fused into plain layers (``fuse``, see
    :func:`~norm_det.weights.deploy.fuse_weights`), or else recording ``source_scheme`` in their
    meta where they name no scheme of their own (changed in place)."""
    if fuse:
        return fuse_weights(weights, source_scheme=source_scheme, allow_inexact=allow_inexact)
    if source_scheme and not weights.scheme:
        weights.meta["scheme"] = source_scheme
    return weights


def model_from_config(config_file: str, opts: list[str] | None = None) -> tuple[CfgNode, nn.Module]:
    """``(cfg, model)``: the norm_det model of ``config_file`` (with ``KEY VALUE`` overrides
    ``opts``), built on the CPU, in eval mode."""
    from norm_det.config import load_config
    from norm_det.modeling import build_model

    cfg = load_config(config_file, opts or ())
    cfg.MODEL.DEVICE = "cpu"
    return cfg, build_model(cfg).eval()


def backbone_scheme(cfg: CfgNode, arch: str) -> str:
    """The scheme name a config gives its ``arch`` (``"resnet"`` or ``"vgg"``) backbone."""
    return cfg.MODEL.RESNETS.NORM if arch == "resnet" else cfg.MODEL.VGG.NORM


def warm_start_model_backbone(
    model: nn.Module,
    cfg: CfgNode,
    weights: BackboneWeights,
    *,
    source_scheme: Any | None = None,
    calibration_images: torch.Tensor | None = None,
) -> tuple[dict[str, Any], str]:
    """Warm-start the backbone of ``model`` (built from ``cfg``) from ``weights``, in place.

    The other layers keep their initialization.

    Returns:
        ``(report, scheme)``: :func:`~norm_det.weights.warm_start.load_pretrained_backbone`'s
        report and the backbone's scheme in ``cfg`` (``""`` for none).
    """
    scheme = backbone_scheme(cfg, weights.arch)
    report = load_pretrained_backbone(
        model,
        weights,
        scheme or None,
        source_scheme=source_scheme,
        calibration_images=calibration_images,
    )
    return report, scheme


def save_model(
    model: nn.Module,
    cfg: CfgNode,
    path: str | os.PathLike,
    *,
    fuse: bool = False,
    allow_inexact: bool = False,
) -> list[str]:
    """Write ``{"model": state dict, "meta": {"format": "norm_det", "config": ...}}`` to ``path``.

    Args:
        fuse: write the fused model's weights (``meta["fused"]`` True), with the config that
            builds the fused model (:func:`~norm_det.weights.deploy.deploy_config`); otherwise
            ``model``'s own weights and ``cfg`` (for ``MODEL.WEIGHTS``).
        allow_inexact: with ``fuse``, accept layers that keep their per-sample input
            standardization (NDPP).

    Returns:
        The fused model's layers that plain weights cannot express (empty without ``fuse``).
    """
    if not fuse:
        meta = {"format": "norm_det", "config": cfg.dump()}
        save_file({"model": model.state_dict(), "meta": meta}, path)
        return []
    fused = fused_copy(model)
    inexact = inexact_layers(fused)
    config = deploy_config(cfg, allow_inexact=allow_inexact)
    meta = {"format": "norm_det", "fused": True, "config": config.dump()}
    save_file({"model": fused.state_dict(), "meta": meta}, path)
    return inexact


def export_model_onnx(
    model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int] = (320, 320)
) -> tuple[Path, tuple[str, ...]]:
    """Export ``model`` fused to ONNX (:func:`~norm_det.weights.deploy.export_onnx`), traced on
    a random example image of ``image_size`` (height and width stay dynamic).

    Returns:
        ``export_onnx``'s ``(path, output names)``.
    """
    image = torch.rand(3, *image_size)
    return export_onnx(model, image, path)


__all__ = [
    "RANDOM_PROBE_SHAPE",
    "WarmStart",
    "backbone_scheme",
    "describe_checkpoint",
    "export_model_onnx",
    "finish_backbone",
    "model_from_config",
    "read_calibration_images",
    "save_model",
    "warm_start_backbone",
    "warm_start_model_backbone",
]
