"""Checkpoint formats: recognise a file's framework from its keys, and write any framework's file.

=================  =========================================================================
format             file
=================  =========================================================================
``torchvision``    a bare state dict (``torch.save``), torchvision's names, any prefix of a
                   classification, detection or segmentation model
``norm_det``       ``{"model": state_dict, "meta": {...}}`` (the trainer's checkpoints too)
``detectron2``     ``.pkl``: a pickle of ``{"model": {name: numpy array}, "__author__": ...,
                   "matching_heuristics": True}``, as detectron2's model zoo; ``.pth``: the same
                   dict with tensors, through ``torch.save``
``mmdet``          ``{"state_dict": ..., "meta": {...}}`` with mmdet's names under ``backbone.``
                   (mmseg shares mmdet's names)
=================  =========================================================================

The pretrained files of the papers' releases and of the model zoos (Caffe2-named detectron2
files, timm, BiT ...) are *source formats* (:mod:`norm_det.weights.sources`), read only:
each is recognised from its keys before the namings below are tried, or named with ``fmt``.

Reading tries every naming of :mod:`norm_det.weights.keymaps` under each of its prefixes and
keeps the one that names the most keys; the file's container (``state_dict``, ``__author__``)
breaks ties between identical namings (a bare mmdet ResNet *is* torchvision's). Keys outside the
backbone must belong to a known part of that framework's models (FPN, heads); anything else is
an error listing the first unmatched keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from norm_det.weights.backbone_weights import BackboneWeights
from norm_det.weights.io import PICKLE_SUFFIXES, load_file, save_file, to_tensor
from norm_det.weights.keymaps import (
    FRAMEWORKS,
    Naming,
    namings,
    rename_from_norm_det,
    split_key,
    writable_naming,
)

_AUTHOR = "norm_det"
_ARGUMENTS = "backbone_arguments"  # the meta entry of BackboneWeights.arguments
_SHOWN_KEYS = 5


# ---------------------------------------------------------------------------------------------
# Containers.


def _unwrap(obj: Any, source: str) -> tuple[Mapping[str, Any], str | None, dict[str, Any]]:
    """``(state dict, framework the container suggests, meta)`` of a loaded file."""
    return _container(obj, source)


def _without_data_parallel(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` without the ``module.`` that a (Distributed)DataParallel wrapper puts before
    every key (the papers' releases save their models wrapped)."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _container(obj: Any, source: str) -> tuple[Mapping[str, Any], str | None, dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source} holds a {type(obj).__name__}, not a state dict or a checkpoint dict"
        )
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    model = obj.get("model")
    if isinstance(model, Mapping):
        if "__author__" in obj or "matching_heuristics" in obj:
            return model, "detectron2", dict(obj.get("__norm_det__") or {})
        return model, meta.get("format"), dict(meta)
    state = obj.get("state_dict")
    if isinstance(state, Mapping):
        return state, "mmdet", dict(meta.get("norm_det") or {})
    # Detectron's (Caffe2) pickles: {"blobs": {name: array}, "cfg": ...}; their optimizer
    # momenta stay in, for the source format that reads them to drop (it lists what it drops).
    blobs = obj.get("blobs")
    if isinstance(blobs, Mapping):
        return blobs, None, {}
    if obj and all(_is_array(v) for v in obj.values()):
        return obj, None, {}
    shown = ", ".join(repr(k) for k in list(obj)[:_SHOWN_KEYS])
    raise ValueError(
        f"{source} holds neither a state dict (name -> tensor) nor a checkpoint with 'model' or "
        f"'state_dict'; its first entries are {shown}"
    )


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value).__module__ == "numpy"


# ---------------------------------------------------------------------------------------------
# Detection.


@dataclass
class _Match:
    naming: Naming
    prefix: str
    backbone: dict[str, str]  # file key -> norm_det key
    others: list[str]
    unknown: list[str]


def _match(keys: list[str], naming: Naming, prefix: str) -> _Match:
    backbone: dict[str, str] = {}
    others: list[str] = []
    unknown: list[str] = []
    for key in keys:
        name = None
        if key.startswith(prefix):
            module, tensor = split_key(key[len(prefix) :])
            module_name = naming.to_norm_det(module)
            name = None if module_name is None else f"{module_name}.{tensor}"
        if name is not None:
            backbone[key] = name
        elif key.startswith(naming.other_parts) and naming.other_parts:
            others.append(key)
        else:
            unknown.append(key)
    return _Match(naming, prefix, backbone, others, unknown)


def known_formats() -> list[str]:
    """The names ``fmt`` (``--from``, ``MODEL.WEIGHTS_FORMAT``) accepts: the frameworks, then
    the source formats."""
    from norm_det.weights.sources import source_formats

    return [*FRAMEWORKS, *source_formats()]


def detect(
    state: Mapping[str, Any],
    hint: str | None = None,
    source: str = "the checkpoint",
    *,
    framework: str | None = None,
) -> _Match:
    """The naming and prefix that name the most keys of ``state`` (``hint`` breaks ties);
    only ``framework``'s namings when given.

    Raises:
        ValueError: no known naming matches (listing the first keys), or keys remain that are
            neither backbone nor a known part of the detected framework's models.
    """
    keys = list(state)
    order = {framework: index for index, framework in enumerate(FRAMEWORKS)}
    best: _Match | None = None
    best_rank: tuple[int, int, int, int] | None = None
    for naming in namings(framework):
        for prefix in naming.prefixes:
            match = _match(keys, naming, prefix)
            rank = (
                -len(match.backbone),
                len(match.unknown),
                0 if naming.framework == hint else 1,
                order[naming.framework],
            )
            if best_rank is None or rank < best_rank:
                best, best_rank = match, rank
    if best is None or not best.backbone:
        shown = ", ".join(keys[:_SHOWN_KEYS])
        if framework is not None:
            raise ValueError(
                f"{source}: not a {framework} checkpoint (no {framework} ResNet / VGG-16 naming "
                f"names its keys); first unmatched keys: {shown}"
            )
        raise ValueError(
            f"{source}: no known checkpoint format names its keys (known: "
            f"{', '.join(known_formats())}); first unmatched keys: {shown}"
        )
    if best.unknown:
        shown = ", ".join(best.unknown[:_SHOWN_KEYS])
        raise ValueError(
            f"{source}: {len(best.backbone)} keys read as a {best.naming.name} backbone"
            f"{f' under {best.prefix!r}' if best.prefix else ''}, but {len(best.unknown)} keys "
            f"match no known format; first unmatched keys: {shown}"
        )
    return best


# ---------------------------------------------------------------------------------------------
# Reading and writing.


def read_state_dict(
    state: Mapping[str, Any],
    *,
    hint: str | None = None,
    meta: Mapping[str, Any] | None = None,
    source: str = "the state dict",
    fmt: str | None = None,
) -> BackboneWeights:
    """The backbone weights in a state dict of any known format.

    Args:
        fmt: the format (one of :func:`known_formats`); None recognises it from the keys: the
            first source format that claims them, else the framework naming that names the
            most (see :func:`detect`).

    Raises:
        ValueError: an unknown ``fmt``; keys no format names (listing the known formats and the
            first keys), or keys a recognised format cannot place (naming the first).
    """
    from norm_det.weights.sources import claimant, source_formats

    state = _without_data_parallel(state)
    tensors = {key: to_tensor(value, key, source) for key, value in state.items()}
    if fmt is not None and fmt not in FRAMEWORKS:
        if fmt not in source_formats():
            raise ValueError(
                f"{source}: unknown checkpoint format {fmt!r}; known: {', '.join(known_formats())}"
            )
        reader = source_formats()[fmt]
    else:
        reader = claimant(tensors) if fmt is None else None
    if reader is not None:
        weights = reader.read(tensors, source)
        weights.meta = {**dict(meta or {}), **weights.meta}
        return weights
    match = detect(tensors, hint, source, framework=fmt)
    meta = dict(meta or {})
    arguments = meta.pop(_ARGUMENTS, None)
    return BackboneWeights(
        arch=match.naming.arch,
        tensors={name: tensors[key] for key, name in match.backbone.items()},
        framework=match.naming.framework,
        prefix=match.prefix,
        others={key: tensors[key] for key in match.others},
        meta=meta,
        naming=match.naming.name,
        arguments=dict(arguments) if isinstance(arguments, Mapping) else {},
    )


def read_checkpoint(
    path: str | os.PathLike, *, allow_pickle: bool = False, fmt: str | None = None
) -> BackboneWeights:
    """Read the backbone weights of a checkpoint file of any known format.

    Args:
        path: the file; ``.pkl`` needs ``allow_pickle`` (see :func:`norm_det.weights.io.
            load_file`).
        allow_pickle: the caller trusts the file (read pickles; see ``load_file``).
        fmt: the file's format (see :func:`read_state_dict`); None: recognised from its keys.

    Raises:
        FileNotFoundError, ValueError: a missing, unsafe or unrecognised file (the message says
            which, with the first unmatched keys).
    """
    source = f"'{path}'"
    state, hint, meta = _unwrap(load_file(path, allow_pickle=allow_pickle), source)
    return read_state_dict(state, hint=hint, meta=meta, source=source, fmt=fmt)


def to_framework(
    weights: BackboneWeights, framework: str, *, drop_unmapped: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict of ``weights`` in ``framework``'s names.

    The backbone goes under the file's own prefix when ``framework`` is the one it came from
    (with the file's other parts), else under the framework's usual one: none for torchvision,
    norm_det and detectron2 (its checkpointer matches names by suffix), ``backbone.`` for mmdet.

    Raises:
        ValueError: an unknown framework; tensors without a counterpart in ``framework`` (the
            SSD layers in torchvision's VGG, a detector's FPN and heads in another framework)
            unless ``drop_unmapped``.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown checkpoint format {framework!r}; known: {', '.join(FRAMEWORKS)}")
    naming, _ = writable_naming(framework, weights.arch, weights.tensors, drop_unmapped)
    same = framework == weights.framework
    prefix = weights.prefix if same and weights.prefix in naming.prefixes else naming.prefixes[0]
    state, _ = rename_from_norm_det(weights.tensors, naming, prefix)
    if weights.others and not same and not drop_unmapped:
        shown = ", ".join(list(weights.others)[:_SHOWN_KEYS])
        raise ValueError(
            f"{len(weights.others)} tensors outside the {weights.arch.upper()} backbone (first: "
            f"{shown}) have no {framework} counterpart: norm_det maps backbones between "
            "frameworks, not detector necks or heads; pass drop_unmapped=True "
            "(--drop-unmapped) to write the backbone alone"
        )
    if same:
        state.update(weights.others)
    return state


def _meta(weights: BackboneWeights, framework: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        k: v for k, v in weights.meta.items() if isinstance(v, (str, int, float, bool))
    }
    meta.update(format=framework, arch=weights.arch, converted_from=weights.framework)
    if weights.arguments:  # what the tensors do not tell (a BiT stem's pooling), read back
        meta[_ARGUMENTS] = {
            k: v for k, v in weights.arguments.items() if isinstance(v, (str, int, float, bool))
        }
    return meta


def write_checkpoint(
    weights: BackboneWeights,
    path: str | os.PathLike,
    framework: str,
    *,
    drop_unmapped: bool = False,
) -> Path:
    """Write ``weights`` as a ``framework`` checkpoint file (see the module docstring).

    A detectron2 target with a ``.pkl`` path is written as a pickle of NumPy arrays, as
    detectron2's model zoo files; any other path through ``torch.save``.

    Returns:
        The path written.
    """
    state = to_framework(weights, framework, drop_unmapped=drop_unmapped)
    meta = _meta(weights, framework)
    path = Path(path)
    if framework == "detectron2":
        obj: Any = {
            "model": state,
            "__author__": _AUTHOR,
            "matching_heuristics": True,
            "__norm_det__": meta,
        }
        return save_file(obj, path, as_pickle=path.suffix.lower() in PICKLE_SUFFIXES)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"'{path}': only detectron2 checkpoints are written as pickles (.pkl); "
            f"use .pth for a {framework} checkpoint"
        )
    if framework == "torchvision":
        return save_file(state, path)
    if framework == "mmdet":
        return save_file({"state_dict": state, "meta": {"norm_det": meta}}, path)
    return save_file({"model": state, "meta": meta}, path)
