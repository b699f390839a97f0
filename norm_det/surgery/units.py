"""One convolution and the norm after it (or none: a lone convolution) as the scheme's.

:func:`_convert_unit` is the step :func:`norm_det.surgery.convert` takes at every conv+norm
pair; the weights go over as :mod:`norm_det.surgery` describes: a norm with statistics to a norm
with statistics, a norm's eval transform folded into the convolution where the scheme has no
norm, a reparametrized convolution reduced to its plain weight first. A norm marked with
:func:`~norm_det.surgery.keep_norm` stays; its convolution is converted as beside any norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from norm_det.layers.protocol import ActivationInNorm
from norm_det.schemes import Scheme, carries_activation, image_conv_scheme, pair_norm
from norm_det.surgery.framework_convs import (
    _applies_own_extras,
    _in_model_class,
    _model_conv_class,
    _same_layer,
)
from norm_det.surgery.kept_norms import is_kept_norm
from norm_det.surgery.pairs import _own_relu
from norm_det.surgery.placement import _is_frozen, _place_like
from norm_det.surgery.queries import (
    attached_norm,
    effective_weights,
    fold_affine_into,
    folded_affine,
    load_plain_weights,
)


@dataclass(frozen=True)
class _Options:
    """What one :func:`~norm_det.surgery.convert` walk builds.

    Args:
        scheme: the scheme of every layer but the image convolution.
        image_conv: the path of the convolution on the image (None: no such convolution).
        keep_weights: carry the model's weights over.
    """

    scheme: Scheme
    image_conv: str | None
    keep_weights: bool

    def scheme_at(self, path: str) -> Scheme:
        """The scheme of the convolution at ``path``."""
        return image_conv_scheme(self.scheme) if path == self.image_conv else self.scheme


class _UnitWeights(NamedTuple):
    """The plain weights the converted convolution computes, and where its bias goes."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    with_bias: bool  # the converted convolution has a bias
    shift: torch.Tensor | None  # the bias the new norm takes (see _take_shift)


def _conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
    )
    if conv.padding_mode != "zeros":
        kwargs["padding_mode"] = conv.padding_mode
    return kwargs


def _new_conv(factory: Callable[..., nn.Module], conv: nn.Conv2d, bias: bool) -> nn.Module:
    """``factory``'s convolution with ``conv``'s geometry (a fresh layer, not placed)."""
    return factory(
        conv.in_channels, conv.out_channels, conv.kernel_size, bias=bias, **_conv_kwargs(conv)
    )


def _built_norm(factory: Callable[[int], nn.Module], channels: int, where: str) -> nn.Module:
    """``factory(channels)``; its ValueError (GN groups that do not divide) names ``where``."""
    try:
        return factory(channels)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def _transfer_norm(source: nn.Module, target: nn.Module) -> None:
    """Copy the tensors the two norms share (affine parameters, statistics) with equal shapes."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(source, name, None), getattr(target, name, None)
            if (
                isinstance(src, torch.Tensor)
                and isinstance(dst, torch.Tensor)
                and src.shape == dst.shape
            ):
                dst.copy_(src)


def _take_shift(norm: nn.Module, shift: torch.Tensor) -> None:
    """Give the new ``norm`` the bias ``shift`` its convolution gave up.

    A norm with running statistics in eval computes ``(y - mean) / sqrt(var + eps)`` (then its
    affine transform): with ``mean = -shift``, ``var = 1 - eps`` and the identity affine it
    computes ``y + shift``, exactly what the convolution's bias did. A norm without statistics
    (GN) cannot reproduce it; its affine shift takes the bias.
    """
    with torch.no_grad():
        mean = getattr(norm, "running_mean", None)
        if isinstance(mean, torch.Tensor) and mean.numel() == shift.numel():
            mean.copy_(-shift.reshape(mean.shape))
            variance = getattr(norm, "running_var", None)
            if isinstance(variance, torch.Tensor):
                variance.fill_(1.0 - float(getattr(norm, "eps", 0.0)))
            return
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.numel() == shift.numel():
            bias.copy_(shift.reshape(bias.shape))


def _convert_unit(
    options: _Options,
    conv: nn.Conv2d,
    norm: nn.Module | None,
    path: str,
    activated: bool = False,
) -> tuple[nn.Module, nn.Module | None]:
    """Convert convolution ``conv`` followed by ``norm`` (None: a lone convolution).

    Args:
        activated: a ReLU that :func:`convert` can replace follows ``norm`` (its slot in a
            container that runs its children in order, or a norm that carries it): a
            scheme's ``norm_act`` goes there.

    Returns:
        ``(conv's replacement, norm's replacement)``. The first is ``conv`` itself where the
        scheme keeps a plain convolution: the model's own is kept, its weights changed in
        place. The second is the scheme's norm, or None where the scheme has none, or ``norm``
        itself where it is kept (:func:`~norm_det.surgery.keep_norm`); when ``norm`` is the one
        ``conv`` holds (:func:`attached_norm`), the replacement holds it.
    """
    lone = norm is None
    attached = not lone and norm is attached_norm(conv)
    kept = is_kept_norm(norm)
    scheme = options.scheme_at(path)
    factory = nn.Conv2d if lone and not scheme.replaces_lone_convs else scheme.conv
    if lone and factory is nn.Conv2d and not hasattr(conv, "fuse"):
        return conv, None
    weights = _unit_weights(options, scheme, conv, norm, factory, kept)
    replacement = None if factory is nn.Conv2d else _new_conv(factory, conv, weights.with_bias)
    plain = replacement is None or type(replacement) is nn.Conv2d
    kept_plain = plain and not hasattr(conv, "fuse")
    new_norm = norm if kept else _scheme_norm(scheme, conv, norm, path, activated)
    if _already_built(conv, norm, kept_plain, replacement, new_norm):
        return conv, norm
    if new_norm is not None and not kept:
        new_norm = _placed_norm(options, new_norm, norm, conv, weights.shift)
    replacement = _placed_conv(options, conv, replacement, kept_plain, weights)
    if attached:
        _attach_norm(replacement, conv, new_norm, activated)
    pair_norm(new_norm, replacement)
    return replacement, new_norm


def _unit_weights(
    options: _Options,
    scheme: Scheme,
    conv: nn.Conv2d,
    norm: nn.Module | None,
    factory: Callable[..., nn.Module],
    kept: bool,
) -> _UnitWeights:
    """The plain weights of ``conv`` in the converted unit, ``norm``'s transform folded in where
    the scheme has no norm to put after it (and ``norm`` is not kept)."""
    lone = norm is None
    weight, bias = effective_weights(conv)
    shift = None
    if type(norm) is nn.Identity and bias is not None and not scheme.conv_bias:
        shift, bias = bias, None  # a norm-free scheme's unit: the new norm takes it
    if lone or kept or scheme.norm is not None:
        # The scheme's own convolutions carry a bias where it says so (ND's, lone or not).
        own_bias = bool(scheme.conv_bias) and (not lone or factory is not nn.Conv2d)
        return _UnitWeights(weight, bias, bias is not None or own_bias, shift)
    # The norm goes: the convolution takes over its eval transform, shift included.
    affine = folded_affine(norm)
    if affine is not None and options.keep_weights:
        weight, bias = fold_affine_into(weight, bias, *affine)
    return _UnitWeights(weight, bias, True, shift)


def _scheme_norm(
    scheme: Scheme, conv: nn.Conv2d, norm: nn.Module | None, path: str, activated: bool
) -> nn.Module | None:
    """The scheme's norm after ``conv`` (not placed), None for a lone convolution or where the
    scheme has none; its ``norm_act`` where a ReLU follows."""
    if norm is None:
        return None
    factory = scheme.norm_act if activated and scheme.norm_act is not None else scheme.norm
    if factory is None:
        return None
    return _built_norm(factory, conv.out_channels, f"the norm after convolution '{path}'")


def _already_built(
    conv: nn.Module,
    norm: nn.Module | None,
    kept_plain: bool,
    replacement: nn.Module | None,
    new_norm: nn.Module | None,
) -> bool:
    """Whether ``conv`` (and ``norm``) already are the layers the scheme builds there."""
    if not (kept_plain or (replacement is not None and _same_layer(conv, replacement))):
        return False
    if norm is None:
        return True
    return new_norm is not None and _same_layer(norm, new_norm)


def _placed_norm(
    options: _Options,
    new: nn.Module,
    old: nn.Module,
    conv: nn.Module,
    shift: torch.Tensor | None,
) -> nn.Module:
    """The scheme's norm ``new`` in the place of ``old``, the norm after ``conv``."""
    # A norm without parameters (FrozenBN) is frozen when its convolution is.
    frozen = _is_frozen(old) or (not any(True for _ in old.parameters()) and _is_frozen(conv))
    new = _place_like(new, old, frozen=frozen)
    if options.keep_weights:
        _transfer_norm(old, new)
        if shift is not None:
            _take_shift(new, shift)
    return new


def _placed_conv(
    options: _Options,
    conv: nn.Conv2d,
    replacement: nn.Module | None,
    kept_plain: bool,
    weights: _UnitWeights,
) -> nn.Module:
    """The converted convolution in ``conv``'s place: ``conv`` itself with new weights where it
    stays plain, else ``replacement`` (a plain ``nn.Conv2d`` when None) in the model's class."""
    if kept_plain:
        _set_plain_weights(options, conv, weights)
        return conv
    if replacement is None:
        replacement = _new_conv(nn.Conv2d, conv, weights.with_bias)
    replacement = _place_like(replacement, conv)
    if options.keep_weights:
        load_plain_weights(replacement, weights.weight, weights.bias)
    if _applies_own_extras(conv):
        replacement = _in_model_class(
            replacement,
            _model_conv_class(conv),
            getattr(conv, "norm", None),
            getattr(conv, "activation", None),
        )
    return replacement


def _set_plain_weights(options: _Options, conv: nn.Conv2d, weights: _UnitWeights) -> None:
    if weights.with_bias and conv.bias is None:
        conv.bias = nn.Parameter(
            conv.weight.new_zeros(conv.out_channels),
            requires_grad=conv.weight.requires_grad,
        )
    elif not weights.with_bias and conv.bias is not None:
        conv.register_parameter("bias", None)  # its bias went to the new norm
    if options.keep_weights:
        load_plain_weights(conv, weights.weight, weights.bias)


def _attach_norm(
    replacement: nn.Module, conv: nn.Module, new_norm: nn.Module | None, activated: bool
) -> None:
    """``replacement`` holds ``new_norm`` as ``conv`` held its norm, and keeps its ReLU."""
    replacement.norm = new_norm
    if activated and _own_relu(conv):
        # detectron2's Conv2d applying norm and ReLU: the ReLU's place is kept.
        carried = new_norm is not None and carries_activation(new_norm)
        activation = getattr(conv, "activation", None)
        if carried:
            replacement.activation = ActivationInNorm()
        elif activation is None or isinstance(activation, ActivationInNorm):
            replacement.activation = nn.ReLU()
