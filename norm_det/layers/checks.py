"""Argument checks shared by the layers: a ``ValueError`` naming the layer, the argument, what
was given and what is expected."""

from __future__ import annotations


def check_integer(owner: str, arg: str, value: object, low: int) -> None:
    """``ValueError`` naming ``owner`` and ``arg`` unless ``value`` is an int ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {arg} must be an integer >= {low}; got {value!r}")


def check_fraction(owner: str, arg: str, value: float) -> None:
    """``ValueError`` naming ``owner`` and ``arg`` unless ``0 <= value <= 1``."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{owner}: {arg} must be in [0, 1]; got {value!r}")


def check_positive(owner: str, arg: str, value: float) -> None:
    """``ValueError`` naming ``owner`` and ``arg`` unless ``value > 0`` (NaN fails too)."""
    if not value > 0:
        raise ValueError(f"{owner}: {arg} must be > 0; got {value!r}")


def check_one_of(owner: str, arg: str, value: object, choices: tuple) -> None:
    """``ValueError`` naming ``owner`` and ``arg`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: {arg} must be one of {choices}; got {value!r}")


def check_feature_maps(layer: object, x: object, channels: int) -> None:
    """``ValueError`` naming ``layer`` (its class and ``extra_repr``) unless ``x`` is a
    ``(N, channels, H, W)`` tensor."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{type(layer).__name__}({layer.extra_repr()}): expected (N, {channels}, H, W) input; "
            f"got {tuple(x.shape)}"
        )


__all__ = [
    "check_feature_maps",
    "check_fraction",
    "check_integer",
    "check_one_of",
    "check_positive",
]
