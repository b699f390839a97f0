"""The walk of :func:`convert`: every conv+norm pair, lone layer and predictor of a model."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from norm_det.activation_blocks import leave_out_carried_relus
from norm_det.layers.protocol import track_step_layers
from norm_det.schemes import Scheme, carries_activation, get_scheme, predictor_scheme
from norm_det.surgery.lone_layers import _convert_lone
from norm_det.surgery.pairs import (
    _activation_slot,
    _is_empty_norm_unit,
    _is_sibling_pair,
    _Siblings,
    _update_slot,
)
from norm_det.surgery.placement import _become
from norm_det.surgery.predictors import is_predictor
from norm_det.surgery.queries import is_conv, is_norm
from norm_det.surgery.residual import insert_residual_inputs
from norm_det.surgery.selection import _Selection
from norm_det.surgery.units import _convert_unit, _Options

_PLAIN_TYPES = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
# Layers `convert` must not silently skip when the user asked for them with `include`.
_UNSUPPORTED_TYPES = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
# The image convolution has at most this many input channels (an RGB or a grayscale image).
_IMAGE_CHANNELS = 3


class _Converter:
    """One walk of :func:`convert`; its predictors are converted by ``self.predictors``."""

    def __init__(
        self,
        scheme: Scheme,
        selection: _Selection,
        image_conv: str | None,
        keep_weights: bool,
        seen: set[int] | None = None,
        predictor_walk: bool = False,
    ) -> None:
        self.options = _Options(scheme, image_conv, keep_weights)
        self.selection = selection
        self.seen: set[int] = set() if seen is None else seen
        # Conv+norm pairs where the model's own forward decides whether a ReLU follows, so a
        # scheme's norm_act cannot replace norm and ReLU together (convert warns).
        self.unplaced_activations: list[str] = []
        # Predictors keep the model's weights whatever keep_weights says: a detector starts them
        # near zero output, a property of the detector, not of the normalization.
        self.predictors = (
            self
            if predictor_walk
            else _Converter(
                predictor_scheme(scheme), selection, None, True, self.seen, predictor_walk=True
            )
        )

    def walk(self, parent: nn.Module, prefix: str) -> None:
        """Convert ``parent``'s children, whose paths start with ``prefix``."""
        siblings = _Siblings.of(parent)
        index = 0
        while index < len(siblings.children):
            index += self._step(parent, siblings, index, prefix)
        if siblings.activated_names and any(
            carries_activation(getattr(m, "norm", m)) for m in parent.children()
        ):
            leave_out_carried_relus(parent)

    def _step(self, parent: nn.Module, siblings: _Siblings, index: int, prefix: str) -> int:
        """Convert ``siblings.children[index]`` (with the norm after it, the ReLU after that);
        returns how many children it took."""
        name, child = siblings.children[index]
        path = f"{prefix}{name}"
        if id(child) in self.seen:  # a module registered twice is converted once
            return 1
        self.seen.add(id(child))
        if self.predictors is not self and is_predictor(parent, name):
            self.predictors.visit(child, path)
            return 1
        following = siblings.following(index)
        pair = _is_sibling_pair(child, following) or _is_empty_norm_unit(
            siblings.children, index, self.options.scheme, siblings.in_order
        )
        if pair and self.selection(path):
            return self._pair(siblings, index, path)
        # A norm with no convolution before it (a pre-activation unit's), then a ReLU.
        in_order = siblings.in_order and is_norm(child)
        slot = _activation_slot(siblings.children, index + 1) if in_order else None
        self.visit(child, path, activated=slot is not None or name in siblings.activated_names)
        if slot is not None and self.selection(path):
            _update_slot(slot, child)
            self.seen.add(id(slot))
            return 2
        return 1

    def _pair(self, siblings: _Siblings, index: int, path: str) -> int:
        """Convert the conv+norm pair at ``siblings.children[index]``; returns the children it
        took (the ReLU slot after it too)."""
        (_, conv), (norm_name, norm) = siblings.children[index : index + 2]
        self.seen.add(id(norm))
        slot = _activation_slot(siblings.children, index + 2) if siblings.in_order else None
        activated = (
            slot is not None or carries_activation(norm) or norm_name in siblings.activated_names
        )
        replacement, new_norm = _convert_unit(self.options, conv, norm, path, activated)
        _become(conv, replacement)
        _become(norm, nn.Identity() if new_norm is None else new_norm)
        if slot is not None:
            _update_slot(slot, new_norm)
            self.seen.add(id(slot))
            return 3
        if not siblings.known and not activated and self.options.scheme.norm_act is not None:
            self.unplaced_activations.append(path)
        return 2

    def visit(self, module: nn.Module, path: str, activated: bool = False) -> None:
        """Convert ``module`` (a layer or a subtree), not paired with a following norm."""
        if _is_leaf(module):
            if self.selection(path):
                _become(module, _convert_lone(self.options, module, path, activated))
        elif isinstance(module, _UNSUPPORTED_TYPES) or not any(True for _ in module.children()):
            _check_supported(self.selection, self.options.scheme, module, path)
        else:
            self.walk(module, path + ".")


def _is_leaf(module: nn.Module) -> bool:
    return is_conv(module) or is_norm(module) or isinstance(module, _PLAIN_TYPES)


def _check_supported(selection: _Selection, scheme: Scheme, module: nn.Module, path: str) -> None:
    if isinstance(module, _UNSUPPORTED_TYPES) and selection.explicitly_included(path):
        raise ValueError(
            f"convert: cannot convert layer {path!r} of type {type(module).__name__} to scheme "
            f"{scheme}; supported layers are Conv2d (+ a following 2-d norm), Linear, "
            "ConvTranspose2d and 2-d norms. Remove it from `include` or add it to `exclude`."
        )


def _image_conv_path(model: nn.Module) -> str | None:
    """The path of the convolution that sees the image, for ``keep_first_conv_plain``.

    The first convolution in registration order with at most 3 input channels (an RGB or
    grayscale image). Registration order alone is not enough: detectron2's FPN registers its
    lateral convolutions before its ResNet. None for a part of a network that takes no image
    (a head, a neck).
    """
    for name, module in model.named_modules():
        if is_conv(module) and module.in_channels <= _IMAGE_CHANNELS:
            return name
    return None


def convert(
    model: nn.Module,
    scheme: str | Mapping[str, Any] | Scheme | None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_weights: bool = True,
) -> nn.Module:
    """Convert ``model`` in place to ``scheme`` and return it.

    Args:
        model: any module (a torchvision ResNet, a whole Mask R-CNN, an mmdet or detectron2
            model, ...).
        scheme: a scheme name, ``NAME(option=value)`` string, dict or :class:`Scheme`.
        include: glob patterns of module paths (``"backbone.*"``; a path also selects its
            subtree); only matching layers are converted. ``None`` converts everything.
        exclude: patterns of module paths left untouched.
        keep_weights: carry the model's weights over (see the module docstring). False: every
            layer ``convert`` builds keeps its own initialisation, as in a model built with the
            scheme (for training from scratch: CZM's and PWS's initialisations are part of the
            methods); convolutions kept in place keep their weights, and so do the predictors
            (the detector's near-zero start, which a scheme's predictor takes through
            ``load_plain_weights``). Layers that already are what the scheme builds in their
            place are kept as they are either way.

    Returns:
        The converted model (a new module only when ``model`` itself is a single layer that
        changes class).

    Raises:
        ValueError: a layer that ``include`` names explicitly cannot be converted (its path and
            type are in the message), or the scheme is unknown.
    """
    resolved = get_scheme(scheme)
    converter = _Converter(
        resolved, _Selection(include, exclude), _image_conv_path(model), keep_weights
    )
    if _is_leaf(model):
        model = _convert_lone(converter.options, model, "")
    else:
        converter.walk(model, "")
        _warn_unplaced_activations(resolved, converter.unplaced_activations)
        if resolved.residual_input is not None:
            insert_residual_inputs(model, resolved.residual_input, converter.selection)
        if resolved.post_convert is not None:
            resolved.post_convert(model)
    # Layers that took a new class in place were made as other objects: they act at optimizer
    # steps (CZM's gradient correction) once tracked under their new identity.
    track_step_layers(model)
    return model


def _warn_unplaced_activations(scheme: Scheme, paths: list[str]) -> None:
    if not paths:
        return
    shown = ", ".join(repr(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    warnings.warn(
        f"convert to {scheme}: after {len(paths)} conv+norm pair(s) ({shown}) the model's own "
        "forward decides whether a ReLU follows, which convert cannot see or replace; there the "
        "norm is the scheme's norm without its activation, followed by the model's ReLU where it "
        "applies one, not the paper's normalization-activation layer. norm_det's own models "
        "(and containers that run their children in order) get the paper's layer.",
        stacklevel=3,
    )
