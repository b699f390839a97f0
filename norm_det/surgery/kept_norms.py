"""Norms that are not the scheme's: :func:`norm_det.surgery.convert` leaves them as they are.

A network may hold a norm that its scheme does not decide: the PWS release's stem has a
one-group GroupNorm after its PWS convolution (:class:`~norm_det.modeling.backbone.ResNet`'s
``stem_norm``) whatever the rest of the network uses. :func:`keep_norm` marks such a norm;
``convert`` then converts the convolution before it as at any conv+norm unit (the scheme's
convolution, its weights carried over, its bias kept: the norm is not folded into it) and keeps
the norm object, its class and its weights. The mark is an attribute of the module: deepcopy and
pickle keep it, and no state-dict key changes.
"""

from __future__ import annotations

from torch import nn

from norm_det.surgery.queries import is_norm

__all__ = ["is_kept_norm", "keep_norm"]

# The instance attribute that holds the mark (a plain attribute: no parameter, buffer or child).
_MARK = "_norm_det_kept_norm"


def keep_norm(norm: nn.Module) -> nn.Module:
    """Mark ``norm`` so that :func:`~norm_det.surgery.convert` leaves it as it is; returns it.

    Raises:
        ValueError: ``norm`` is not a 2-d norm layer (:func:`~norm_det.surgery.is_norm`).
    """
    if not is_norm(norm):
        raise ValueError(
            f"keep_norm: expected a 2-d norm layer (BN, GN, FrozenBN, ...); got "
            f"{type(norm).__name__}"
        )
    setattr(norm, _MARK, True)
    return norm


def is_kept_norm(module: nn.Module | None) -> bool:
    """Whether ``module`` is a norm :func:`keep_norm` marked."""
    return module is not None and bool(module.__dict__.get(_MARK, False))
