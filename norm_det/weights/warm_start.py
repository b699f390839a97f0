"""Start a backbone of any scheme from BN-pretrained weights.

:func:`warm_start` converts a pretrained backbone with :func:`norm_det.surgery.convert`, which
carries the weights over as far as the math allows (docs/weights.md has the measurements):

- BN -> FrozenBN, SyncBN: exact (same statistics, same arithmetic);
- BN -> IterNorm: exact in eval (here the BN's statistics become IterNorm's running mean and a
  diagonal running whitening); training whitens with batch statistics;
- BN -> PWS, CZM, ND, NDPP, ``none``: the BN's eval transform is folded into the convolution's
  weight and bias, which the new layer then reproduces: exactly for CZM, ND (in eval) and
  ``none``; PWS removes each filter's mean, NDPP standardizes each sample's input first, which
  no weight can undo;
- BN -> GN, GN+WS: the affine parameters are kept and the statistics dropped; a norm that
  computes its statistics per sample cannot reproduce a BN: not function-preserving.

Given a few images (``calibration_images``), :func:`calibrate` then fits what the scheme lets it
fit to the BN network's own activations, unit by unit: ND / NDPP statistics are estimated on the
images, and each unit's per-channel output scale and shift (the conv's through
``load_plain_weights`` for norm-free schemes, the norm's affine parameters otherwise) are set by
least squares against the BN unit's output on the same input. Exact units are left alone.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from norm_det.schemes import get_scheme
from norm_det.surgery import convert, effective_weights, fold_affine_into, folded_affine
from norm_det.weights.backbones import (
    arguments_for,
    arguments_of,
    build_backbone,
    classifier_tensors,
    covered_state,
    find_backbone,
    infer_scheme,
    load_backbone_tensors,
    units_of,
)
from norm_det.weights.formats import BackboneWeights, read_checkpoint

# The config keys of the ResNet arguments a checkpoint's format may require.
_CONFIG_KEYS = {
    "preact": "MODEL.RESNETS.PREACT",
    "stem_pool": "MODEL.RESNETS.STEM_POOL",
    "stem_norm": "MODEL.RESNETS.STEM_NORM",
    "avg_down": "MODEL.RESNETS.AVG_DOWN",
    "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
}
# A unit whose converted output is within this relative error needs no calibration.
_EXACT = 1e-6


def conv_norm_units(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(path, conv, norm)`` of every module with children ``conv`` and ``norm``, in order."""
    return [
        (path, module.conv, module.norm)
        for path, module in model.named_modules()
        if isinstance(getattr(module, "conv", None), nn.Conv2d)
        and isinstance(getattr(module, "norm", None), nn.Module)
    ]


def warm_start(
    reference: nn.Module,
    scheme: Any,
    *,
    calibration_images: torch.Tensor | None = None,
) -> nn.Module:
    """A copy of the pretrained ``reference`` backbone converted to ``scheme``, in eval mode.

    Args:
        reference: a backbone with its pretrained weights (any scheme; BN for ImageNet models).
        scheme: the target scheme (name, ``NAME(option=value)``, dict or Scheme).
        calibration_images: ``(N, 3, H, W)`` images, normalized as the backbone expects, to fit
            the converted units to (see :func:`calibrate`); None keeps the conversion as is.
    """
    reference.eval()
    # A pre-activation ResNet's stem_norm (the PWS release's one-group GN) is its own, not the
    # scheme's: ResNet marks it (norm_det.surgery.keep_norm), and convert keeps it.
    model = convert(copy.deepcopy(reference), get_scheme(scheme)).eval()
    _carry_statistics_into_whitening(model, reference)
    if calibration_images is not None:
        calibrate(model, reference, calibration_images)
    return model


@torch.no_grad()
def _carry_statistics_into_whitening(model: nn.Module, reference: nn.Module) -> None:
    """Give a whitening norm (IterNorm) that replaced a BN the BN's statistics, exactly.

    In eval a BN is ``(x - mu) / sqrt(var + eps)`` per channel: the whitening norm with running
    mean ``mu`` and the diagonal running whitening ``1 / sqrt(var + eps)`` computes the same.
    """
    reference_norms = {path: norm for path, _, norm in conv_norm_units(reference)}
    for path, _, norm in conv_norm_units(model):
        source = reference_norms.get(path)
        whitening = getattr(norm, "running_wm", None)
        variance = getattr(source, "running_var", None)
        if not isinstance(whitening, torch.Tensor) or not isinstance(variance, torch.Tensor):
            continue
        groups, size, _ = whitening.shape
        inverse_std = torch.rsqrt(variance + source.eps).view(groups, size)
        whitening.copy_(torch.diag_embed(inverse_std).to(whitening))
        norm.running_mean.copy_(source.running_mean.view_as(norm.running_mean))


# ---------------------------------------------------------------------------------------------
# Calibration.


@contextmanager
def _recording(units: list[tuple[str, nn.Module, nn.Module]]) -> Iterator[dict[str, Any]]:
    """Record each unit's conv input and norm output while the block runs."""
    records: dict[str, Any] = {}
    handles = []
    for path, conv, norm in units:

        def conv_input(module, args, path=path):
            records[path + ":in"] = args[0].detach().clone()

        def norm_output(module, args, output, path=path):
            # Clone: the ReLU after the unit works in place.
            records[path + ":out"] = output.detach().clone()

        handles.append(conv.register_forward_pre_hook(conv_input))
        handles.append(norm.register_forward_hook(norm_output))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _estimates_new_statistics(module: nn.Module, reference: nn.Module) -> bool:
    """Whether ``module`` keeps running statistics that ``reference`` did not give it.

    A norm that replaced a BN holds the pretrained statistics (re-estimating them on a few
    images would only lose them); ND / NDPP convolutions start from identity statistics.
    """
    if not isinstance(getattr(module, "running_mean", None), torch.Tensor):
        return False
    if getattr(module, "momentum", None) is None:
        return False
    # Statistics a BN handed over (to a BN, or to a whitening norm) are the pretrained ones.
    return not isinstance(getattr(reference, "running_var", None), torch.Tensor)


@torch.no_grad()
def refresh_statistics(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Set ``module``'s running statistics to those of the batch ``x``: one training forward
    with momentum 1 (its step counter is restored). Returns its eval output on ``x``."""
    counter = getattr(module, "num_batches_tracked", None)
    saved = None if counter is None else counter.clone()
    momentum = module.momentum
    module.momentum = 1.0
    module.train()
    try:
        module(x)
    finally:
        module.momentum = momentum
        module.eval()
        if saved is not None:
            counter.copy_(saved)
    return module(x)


def _channel_fit(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``(a, c)`` minimizing ``||a z + c - y||^2`` over ``(N, C, H, W)`` maps."""
    z = z.transpose(0, 1).flatten(1).double()
    y = y.transpose(0, 1).flatten(1).double()
    z_mean, y_mean = z.mean(1), y.mean(1)
    zc, yc = z - z_mean[:, None], y - y_mean[:, None]
    variance = (zc * zc).sum(1)
    scale = torch.where(variance > 0, (zc * yc).sum(1) / variance.clamp_min(1e-300), 0.0)
    return scale, y_mean - scale * z_mean


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).norm() / target.norm().clamp_min(1e-12))


def _plain_target(conv: nn.Module, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the plain conv a reference unit computes (its norm folded when it can)."""
    weight, bias = effective_weights(conv)
    affine = folded_affine(norm) if not isinstance(norm, nn.Identity) else None
    if affine is not None and affine[0].dim() == 1:
        return fold_affine_into(weight, bias, *(t.detach() for t in affine))
    return weight, weight.new_zeros(weight.shape[0]) if bias is None else bias


def _statistics_size(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """``(samples, features)`` of the covariance ``module`` would estimate from input ``x``
    (output ``y``): ND / NDPP pool ``C k^2 / F`` column groups of the patches sampled every
    ``sampling_stride`` outputs; IterNorm a ``c x c`` matrix per group over ``N H W``."""
    stride = getattr(module, "sampling_stride", 1)
    positions = y.shape[0] * math.ceil(y.shape[-2] / stride) * math.ceil(y.shape[-1] / stride)
    if isinstance(getattr(module, "running_deconv", None), torch.Tensor):
        mats, features = module.running_mean.shape
        groups = x.shape[1] * math.prod(module.kernel_size) // (mats * features)
        return positions * groups, features
    whitening = getattr(module, "running_wm", None)
    return positions, int(whitening.shape[-1]) if isinstance(whitening, torch.Tensor) else 1


def _refresh_if_estimable(
    module: nn.Module, reference: nn.Module, x: torch.Tensor, path: str, report: dict
) -> None:
    if not _estimates_new_statistics(module, reference):
        return
    samples, features = _statistics_size(module, x, module(x))
    if samples < features:
        report["too_few_samples"].append(f"{path} ({samples} samples for {features} features)")
        return
    refresh_statistics(module, x)
    report["statistics"].append(path)


@torch.no_grad()
def calibrate(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> dict[str, list[str]]:
    """Fit the converted ``model``'s units to the ``reference`` units' outputs on ``images``.

    Each unit is fitted on the reference network's own input to it, so the fits do not depend
    on each other. Per unit, in order: layers that keep statistics the reference did not give
    them (ND / NDPP convolutions, IterNorm) take the statistics of that input, provided it has
    at least as many samples as the covariance has features (else they keep identity
    statistics); then, unless the unit already reproduces the reference, each output channel's
    scale ``a`` and shift ``c`` are fitted by least squares (``a * z + c ~ y``, ``z`` the unit's
    output at unit scale and zero shift): in the norm's affine parameters when it has them,
    else in the convolution's weight and bias through its ``load_plain_weights``.

    Args:
        model: the converted backbone (same module paths as ``reference``).
        reference: the pretrained backbone.
        images: ``(N, 3, H, W)``, normalized as the backbone expects.

    Returns:
        ``{"statistics": units whose statistics were estimated, "too_few_samples": units that
        had too few, "fitted": units whose scale and shift were fitted}``.
    """
    model.eval()
    reference.eval()
    reference_units = {path: (conv, norm) for path, conv, norm in conv_norm_units(reference)}
    units = [u for u in conv_norm_units(model) if u[0] in reference_units]
    with _recording(conv_norm_units(reference)) as records:
        reference(images)
    report: dict[str, list[str]] = {"statistics": [], "too_few_samples": [], "fitted": []}
    for path, conv, norm in units:
        x, target = records[path + ":in"], records[path + ":out"]
        reference_conv, reference_norm = reference_units[path]
        _refresh_if_estimable(conv, reference_conv, x, path + ".conv", report)
        _refresh_if_estimable(norm, reference_norm, conv(x), path + ".norm", report)
        if _relative_error(norm(conv(x)), target) <= _EXACT:
            continue
        if _fit_unit(conv, norm, x, target, reference_units[path]):
            report["fitted"].append(path)
    return report


def _fit_unit(
    conv: nn.Module,
    norm: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    reference_unit: tuple[nn.Module, nn.Module],
) -> bool:
    affine = [getattr(norm, name, None) for name in ("weight", "bias")]
    if all(isinstance(t, nn.Parameter) and t.numel() == target.shape[1] for t in affine):
        weight, bias = affine
        weight.fill_(1.0)
        bias.zero_()
        scale, shift = _channel_fit(norm(conv(x)), target)
        weight.copy_(scale.view_as(weight))
        bias.copy_(shift.view_as(bias))
        return True
    if isinstance(norm, nn.Identity) and hasattr(conv, "load_plain_weights"):
        weight, bias = _plain_target(*reference_unit)
        conv.load_plain_weights(weight, torch.zeros_like(bias))
        scale, shift = _channel_fit(conv(x), target)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        conv.load_plain_weights(weight * scale.to(weight).view(shape), shift.to(bias))
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Measuring.


def _maps(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _maps(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _maps(value)]
    return []


@torch.no_grad()
def output_agreement(
    reference: nn.Module, model: nn.Module, inputs: Any, *, train: bool = False
) -> dict[str, float]:
    """How closely ``model`` reproduces ``reference`` on ``inputs`` (every output tensor).

    Args:
        train: run ``model`` in training mode (statistics from the batch: ND, NDPP, GN...);
            ``reference`` always runs in eval mode. The model's state is restored afterwards.

    Returns:
        ``relative_l2`` (worst over the outputs of ``||out - ref|| / ||ref||``),
        ``relative_max`` (worst ``max |out - ref| / max |ref|``) and ``cosine`` (the lowest
        cosine similarity between an output and its reference).
    """
    reference.eval()
    state = copy.deepcopy(model.state_dict()) if train else None
    model.train(train)
    try:
        outputs, references = _maps(model(inputs)), _maps(reference(inputs))
    finally:
        model.eval()
        if state is not None:
            model.load_state_dict(state)
    if len(outputs) != len(references) or not outputs:
        raise ValueError("the two models' outputs do not correspond")
    relative_l2, relative_max, cosine = 0.0, 0.0, 1.0
    for out, ref in zip(outputs, references):
        diff = (out - ref).double()
        relative_l2 = max(relative_l2, float(diff.norm() / ref.double().norm().clamp_min(1e-12)))
        relative_max = max(
            relative_max, float(diff.abs().max() / ref.double().abs().max().clamp_min(1e-12))
        )
        cosine = min(
            cosine,
            float(
                torch.nn.functional.cosine_similarity(
                    out.double().flatten(), ref.double().flatten(), dim=0
                )
            ),
        )
    return {"relative_l2": relative_l2, "relative_max": relative_max, "cosine": cosine}


# ---------------------------------------------------------------------------------------------
# The whole path, for a model or for a file.


def pretrained_reference(
    weights: BackboneWeights, source_scheme: Any | None = None, **arguments: Any
) -> nn.Module:
    """norm_det's backbone holding ``weights`` with the scheme they were saved with.

    Args:
        source_scheme: that scheme, when neither the file's metadata nor the tensors' names
            tell (GN vs GN+WS, ND vs NDPP; see :func:`~norm_det.weights.backbones.
            infer_scheme`).
        arguments: the backbone's constructor arguments (default: read from the tensors).
    """
    scheme = source_scheme or weights.scheme or infer_scheme(weights.tensors)
    arguments = {**(arguments or arguments_for(weights.arch, weights.tensors)), **weights.arguments}
    reference = build_backbone(weights.arch, scheme, **arguments)
    load_backbone_tensors(reference, weights.tensors, f"the {weights.framework} checkpoint")
    return reference


def backbone_weights(backbone: nn.Module, like: BackboneWeights, scheme: Any) -> BackboneWeights:
    """``backbone``'s tensors as :class:`BackboneWeights` covering the units ``like`` covers.

    An ImageNet VGG has no SSD extra layers, so neither has its conversion; the ImageNet
    classifier, which norm_det's backbones lack, is carried over from ``like`` unchanged.
    """
    tensors = covered_state(backbone, units_of(like.tensors))
    tensors.update(classifier_tensors(like.tensors))
    meta = dict(like.meta, scheme=str(get_scheme(scheme)))
    return BackboneWeights(
        like.arch,
        tensors,
        like.framework,
        like.prefix,
        dict(like.others),
        meta,
        like.naming,
        dict(like.arguments),
    )


def convert_weights(
    weights: BackboneWeights,
    scheme: Any,
    *,
    source_scheme: Any | None = None,
    calibration_images: torch.Tensor | None = None,
) -> BackboneWeights:
    """``weights`` warm-started in ``scheme`` (see :func:`warm_start`), under norm_det's names."""
    reference = pretrained_reference(weights, source_scheme)
    converted = warm_start(reference, scheme, calibration_images=calibration_images)
    return backbone_weights(converted, weights, scheme)


def _check_layout(weights: BackboneWeights, shape: Mapping[str, Any], path: str) -> None:
    """A ResNet file of another depth would load into the stages' first blocks and leave the
    rest at their initialization; a pre-activation file's units have other modules: refuse
    both, naming the checkpoint's and the backbone's."""
    if weights.arch != "resnet" or "depth" not in shape:
        return
    found = arguments_for(weights.arch, weights.tensors)
    where = f"the model's backbone ({path or 'the model'})"
    if found["depth"] != shape["depth"]:
        raise ValueError(
            f"the {weights.framework} checkpoint holds a ResNet-{found['depth']} but {where} is "
            f"a ResNet-{shape['depth']} (MODEL.RESNETS.DEPTH)"
        )
    preact = found.get("preact", False)  # (a format's own arguments are compared after this)
    if "preact" not in weights.arguments and "preact" in shape and preact != shape["preact"]:
        kinds = {True: "a pre-activation ResNet-V2", False: "a post-activation ResNet"}
        raise ValueError(
            f"the {weights.framework} checkpoint holds {kinds[bool(preact)]} but {where} is "
            f"{kinds[bool(shape['preact'])]} (MODEL.RESNETS.PREACT: {bool(preact)})"
        )


def load_pretrained_backbone(
    model: nn.Module,
    weights: BackboneWeights | str | os.PathLike,
    scheme: Any,
    *,
    source_scheme: Any | None = None,
    calibration_images: torch.Tensor | None = None,
    allow_pickle: bool = False,
    fmt: str | None = None,
) -> dict[str, Any]:
    """Start ``model``'s backbone (any scheme) from pretrained weights of any known format.

    The weights are loaded into a backbone of ``model``'s backbone's shape with the scheme they
    were saved with, warm-started in ``scheme`` (see :func:`warm_start`) and copied into the
    model's backbone; units the weights do not cover keep their initialisation.

    Args:
        model: a norm_det model (or backbone) holding a norm_det ResNet or VGG16SSD.
        weights: a file (torchvision, norm_det, detectron2, mmdet) or its :class:`BackboneWeights`.
        scheme: the scheme the model's backbone was built with (``cfg.MODEL.RESNETS.NORM``).
        source_scheme, calibration_images: see :func:`pretrained_reference` and
            :func:`warm_start`.
        allow_pickle: read a ``.pkl`` file (see :func:`norm_det.weights.io.load_file`).
        fmt: the file's format (see :func:`~norm_det.weights.formats.read_state_dict`);
            None recognises it from its keys.

    Returns:
        ``{"backbone": path, "loaded": number of tensors, "left_out": classifier keys}``.

    Raises:
        ValueError: the weights are of another architecture, or do not fit the backbone
            (naming the tensor and both shapes), or do not fit ``scheme``'s layers.
    """
    if not isinstance(weights, BackboneWeights):
        weights = read_checkpoint(weights, allow_pickle=allow_pickle, fmt=fmt)
    path, backbone, arch = find_backbone(model)
    if arch != weights.arch:
        raise ValueError(
            f"the checkpoint holds a {weights.arch.upper()} backbone but the model's backbone "
            f"({path or 'the model'}) is a {arch.upper()}"
        )
    shape = arguments_of(backbone)
    _check_layout(weights, shape, path)
    differing = {
        key: f"{key}={value!r} (the model's backbone has {shape[key]!r})"
        for key, value in weights.arguments.items()
        if key in shape and shape[key] != value
    }
    if differing:
        keys = ", ".join(_CONFIG_KEYS.get(key, key) for key in differing)
        raise ValueError(
            f"the {weights.framework} checkpoint's {weights.arch.upper()} has "
            f"{', '.join(differing.values())}: build the model's backbone "
            f"({path or 'the model'}) to match ({keys})"
        )
    reference = pretrained_reference(weights, source_scheme, **shape)
    converted = warm_start(reference, scheme, calibration_images=calibration_images)
    tensors = covered_state(converted, units_of(weights.tensors))
    expected = backbone.state_dict()
    mismatched = [
        k for k, v in tensors.items() if k not in expected or expected[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(
            f"the warm-started weights do not fit {path or 'the model'}'s layers (first: "
            f"{', '.join(mismatched[:5])}); was the model's backbone built with scheme "
            f"{get_scheme(scheme)}?"
        )
    backbone.load_state_dict(tensors, strict=False)
    left_out = list(classifier_tensors(weights.tensors))
    return {"backbone": path, "loaded": len(tensors), "left_out": left_out}
