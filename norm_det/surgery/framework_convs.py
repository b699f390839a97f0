"""A scheme's convolution in the place of a convolution that applies its own norm and activation.

detectron2's ``Conv2d`` computes ``activation(norm(conv(x)))`` in its forward. Where
:func:`norm_det.surgery.convert` puts a scheme's convolution in its place, the new layer is the
scheme's class with :class:`_AppliesNormActivation` in front (made at run time, one class per
scheme convolution and model class: :func:`norm_det.utils.runtime_classes.made_class`), and
:func:`norm_det.surgery.fuse` makes it the model's class again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from norm_det.utils.runtime_classes import made_class


def _applies_own_extras(conv: nn.Conv2d) -> bool:
    # detectron2's Conv2d sets both attributes (None when unused) and applies them; nn.Conv2d
    # applies neither, whatever a model stores on it.
    return _model_conv_class(conv) is not nn.Conv2d and any(
        name in conv.__dict__ or name in conv._modules for name in ("norm", "activation")
    )


def _applies_activation(conv: nn.Module) -> bool:
    return getattr(conv, "activation", None) is not None


def _model_conv_class(conv: nn.Conv2d) -> type[nn.Conv2d]:
    """The model's own class behind convolution ``conv``: what :func:`fuse` makes it again.

    ``nn.Conv2d`` for norm_det's layers; the framework's class (detectron2's ``Conv2d``) for a
    scheme convolution :func:`convert` put in its place.
    """
    if isinstance(conv, _AppliesNormActivation):
        return type(conv)._model_class
    return nn.Conv2d if hasattr(conv, "fuse") else type(conv)


class _AppliesNormActivation:
    """Mixin: a scheme's convolution followed by ``self.norm`` and ``self.activation``.

    :func:`convert` gives a scheme's convolution this behaviour where it replaces a convolution
    whose class (``_model_class``, detectron2's ``Conv2d``) applied both in its forward; either
    may be None. The classes are made on demand, one per (scheme conv class, model class).
    """

    _model_class: type[nn.Conv2d] = nn.Conv2d
    _conv_class: type[nn.Conv2d] = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, C_in, H, W) -> activation(norm(conv(x))): (N, C_out, H', W')``."""
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def fuse(self) -> nn.Conv2d:
        """The model's convolution class with the plain weights, the fused norm, the activation.

        The norm is not folded into the weights here (the layer protocol's ``fuse`` keeps the
        convolution's own weights); :func:`fuse` folds it.
        """
        plain = super().fuse()
        norm = self.norm.fuse() if hasattr(self.norm, "fuse") else self.norm
        return _in_model_class(plain, self._model_class, norm, self.activation)


def _applying_norm_activation(
    conv_class: type[nn.Conv2d], model_class: type[nn.Conv2d]
) -> type[nn.Conv2d]:
    """``conv_class`` that also applies ``norm`` and ``activation``, fused to ``model_class``."""
    return made_class(
        _AppliesNormActivation, conv_class, _conv_class=conv_class, _model_class=model_class
    )


def _rebuild(conv_class: type[nn.Conv2d], model_class: type[nn.Conv2d]) -> nn.Module:
    # Loads the layers pickled (as norm_det.surgery._rebuild) before made_class named them.
    cls = _applying_norm_activation(conv_class, model_class)
    return cls.__new__(cls)


def _in_model_class(
    conv: nn.Conv2d,
    model_class: type[nn.Conv2d],
    norm: nn.Module | None,
    activation: Any,
) -> nn.Conv2d:
    """A new convolution ``conv`` (plain or a scheme's) in the contract of ``model_class``.

    ``model_class`` needs no state but ``nn.Conv2d``'s, ``norm`` and ``activation`` (as
    detectron2's ``Conv2d``): a plain ``conv`` becomes an instance of it.
    """
    if type(conv) is nn.Conv2d:
        conv.__class__ = model_class
    else:
        conv.__class__ = _applying_norm_activation(type(conv), model_class)
    conv.norm = norm
    conv.activation = activation
    return conv


def _layer_class(layer: nn.Module) -> type:
    """The class ``layer`` is an instance of, seen through a norm-and-activation form."""
    return layer._conv_class if isinstance(layer, _AppliesNormActivation) else type(layer)


def _same_layer(old: nn.Module, new: nn.Module) -> bool:
    """``old`` already is what ``new`` would be: the same class with the same options."""
    return _layer_class(old) is type(new) and old.extra_repr() == new.extra_repr()
