"""Source formats: the layouts of the pretrained files researchers have, read into norm_det.

The framework namings of :mod:`norm_det.weights.keymaps` differ only in module paths. The
papers' releases and the model zoos differ in more: tensor names (Caffe2's
``res2_0_branch2a_bn_s``), buffer shapes (the ND++ release's ``running_cov_isqrt``), layers that
norm_det splits or merges (PWS's ``alpha``), input conventions (a BGR stem). Each is a
:class:`SourceFormat`: a test on a state dict's keys (``claims``) and a reader (``read``) that
places every tensor under norm_det's names, with the scheme and the backbone's shape.

A reader is strict: a key it cannot place is an error naming the first such keys, so a file
half in a format is never half loaded. Formats are tried in registration order before the
framework namings; ``fmt=`` (``--from``, ``MODEL.WEIGHTS_FORMAT``) names one and skips the test.

The formats live in the modules of this package, one per family of sources; each registers its
formats on import (:func:`register`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from norm_det.weights.backbone_weights import BackboneWeights

_SHOWN_KEYS = 5

# The modules that hold the formats, imported (and so registered) in this order.
_MODULES = ("deconv_releases", "standardization_releases", "model_zoos", "timm_models")


@dataclass(frozen=True)
class SourceFormat:
    """One layout of pretrained files.

    Args:
        name: what ``--from`` and ``MODEL.WEIGHTS_FORMAT`` call it (``"ndpp-release"``).
        title: the source in words, for messages and docs (the repository or zoo).
        claims: whether a state dict (key -> tensor) is in this layout, from its keys (and
            shapes): cheap, and specific enough never to claim another format's files. It sees
            the keys without a DataParallel wrapper's ``module.`` (read_state_dict strips it).
        read: ``(state, source) -> BackboneWeights``: every tensor under norm_det's names (or
            an error naming the first keys it cannot place, ``source`` naming the file), the
            scheme in ``meta["scheme"]`` and any shape the tensors do not tell in
            ``arguments``.
    """

    name: str
    title: str
    claims: Callable[[Mapping[str, torch.Tensor]], bool]
    read: Callable[[Mapping[str, torch.Tensor], str], BackboneWeights]


_FORMATS: dict[str, SourceFormat] = {}
_LOADED = False


def register(source_format: SourceFormat) -> SourceFormat:
    """Add a format (its name must be new)."""
    if source_format.name in _FORMATS:
        raise ValueError(f"source format {source_format.name!r} is registered twice")
    _FORMATS[source_format.name] = source_format
    return source_format


def source_formats() -> dict[str, SourceFormat]:
    """Name -> format, in the order they are tried."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in _MODULES:
            importlib.import_module(f"{__name__}.{module}")
    return dict(_FORMATS)


def claimant(state: Mapping[str, torch.Tensor]) -> SourceFormat | None:
    """The first format that claims ``state``, or None."""
    return next((f for f in source_formats().values() if f.claims(state)), None)


def unplaced_keys_error(source: str, title: str, placed: int, unplaced: list[str]) -> ValueError:
    """The error of a reader that recognised its format but could not place some keys."""
    shown = ", ".join(unplaced[:_SHOWN_KEYS])
    return ValueError(
        f"{source}: {placed} keys read as {title}, but {len(unplaced)} keys have no place in "
        f"it; first: {shown}"
    )


__all__ = ["SourceFormat", "claimant", "register", "source_formats", "unplaced_keys_error"]
