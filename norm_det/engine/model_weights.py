"""Weights into a model: a whole model's state dict, strictly, or a pretrained backbone alone.

A file that does not fit the model fails with the first missing and unexpected keys rather than
leaving layers silently at their initialization. A pretrained backbone (``MODEL.WEIGHTS`` in any
format :mod:`norm_det.weights` reads) is loaded into the model's backbone, warm-started in the
scheme the backbone was built with; the other layers keep their initialization.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from norm_det.engine.distributed_model import unwrap_model
from norm_det.files import WeightFileError, read_weight_file

__all__ = [
    "load_backbone_weights",
    "load_initial_weights",
    "load_model_weights",
    "read_model_weights",
    "state_dict_of",
]

# The checkpointer's logger: these lines are part of what it reports when it loads weights.
logger = logging.getLogger("norm_det.engine.checkpointer")


def state_dict_of(loaded: Any, source: str) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file: a norm_det checkpoint or a bare state dict."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(
            f"{source} holds neither a state dict (parameter name -> tensor) nor a checkpoint "
            f"with a 'model' state dict; found {type(loaded).__name__}"
        )
    state = dict(loaded)
    # Saved from a DistributedDataParallel wrapper.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_model_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load ``state_dict`` into ``model``, strictly.

    Raises:
        ValueError: keys are missing or unexpected (naming the first of each and the counts), or
            a tensor's shape differs from the model's; ``source`` says where the weights came from.
    """
    model = unwrap_model(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]!r})")
        raise ValueError(
            f"{source} does not match {type(model).__name__}: {' and '.join(parts)}. Was it "
            "saved from a model built with a different config (architecture, depth, or norm "
            "scheme)?"
        )
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source} does not match {type(model).__name__}: {key!r} has shape "
                f"{tuple(value.shape)} in the file and {tuple(expected[key].shape)} in the model"
            )
    model.load_state_dict(state_dict)


def read_model_weights(
    model: nn.Module, path: str | os.PathLike, source: str, *, allow_pickle: bool = False
) -> Any:
    """Read the weights file or checkpoint ``path`` and load its model state into ``model``.

    Returns:
        What the file holds (:func:`norm_det.files.read_weight_file`), for the rest of a
        checkpoint's training state.

    Raises:
        FileNotFoundError: no such file.
        norm_det.files.WeightFileError: the file cannot be read (truncated, empty, text, a
            pickle ...); the message names it.
        ValueError: it does not fit the model (:func:`load_model_weights`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: file does not exist")
    loaded = read_weight_file(path, allow_pickle=allow_pickle)
    load_model_weights(model, state_dict_of(loaded, source), source)
    return loaded


def load_initial_weights(
    model: nn.Module,
    weights: str,
    backbone_scheme: Any,
    weights_format: str | None,
    allow_pickle: bool,
) -> None:
    """Load ``MODEL.WEIGHTS`` into ``model``: a whole model's weights, or a pretrained backbone.

    ``weights`` may be a pretrained backbone alone, in any format :mod:`norm_det.weights` reads
    (torchvision, detectron2, mmdet, norm_det): when it does not fit the whole model, it is
    loaded into the model's backbone, warm-started in ``backbone_scheme`` (the scheme the
    backbone was built with; None: no such fall-back); the other layers keep their
    initialization. ``weights_format`` names the backbone file's format (None: from its keys;
    ``MODEL.WEIGHTS_FORMAT``); given with ``backbone_scheme``, the file is loaded as a backbone
    at once. ``allow_pickle`` lets a pickle be read (``MODEL.WEIGHTS_ALLOW_PICKLE``).

    Raises:
        norm_det.files.WeightFileError: the file cannot be read (the message names the key).
        ValueError: it fits neither the model nor, when tried, its backbone.
    """
    source = f"MODEL.WEIGHTS '{weights}'"
    backbone = dict(source=source, weights_format=weights_format, allow_pickle=allow_pickle)
    if weights_format and backbone_scheme is not None:  # a backbone, by its format
        load_backbone_weights(model, weights, backbone_scheme, mismatch=None, **backbone)
        return
    try:
        read_model_weights(model, weights, source, allow_pickle=allow_pickle)
    except WeightFileError as unreadable:
        raise WeightFileError(f"MODEL.WEIGHTS: {unreadable}") from None
    except ValueError as mismatch:
        if backbone_scheme is None:
            raise
        load_backbone_weights(model, weights, backbone_scheme, mismatch=mismatch, **backbone)
        return
    logger.info("loaded model weights from %s", Path(weights))


def load_backbone_weights(
    model: nn.Module,
    weights: str,
    scheme: Any,
    *,
    mismatch: ValueError | None,
    source: str,
    weights_format: str | None,
    allow_pickle: bool,
) -> None:
    """Load the pretrained backbone file ``weights`` into ``model``'s backbone, in ``scheme``.

    Args:
        mismatch: why ``weights`` did not load as a whole model, when that was tried first;
            None when ``weights_format`` said it is a backbone.
        source: how messages name the file.
        weights_format: the file's format (``MODEL.WEIGHTS_FORMAT``); None: from its keys.
        allow_pickle: let a pickle be read (``MODEL.WEIGHTS_ALLOW_PICKLE``).

    Raises:
        ValueError: the file does not load as a backbone either, with ``mismatch`` when given.
    """
    from norm_det.weights import load_pretrained_backbone

    try:
        report = load_pretrained_backbone(
            unwrap_model(model),
            weights,
            scheme,
            fmt=weights_format,
            allow_pickle=allow_pickle,
        )
    except ValueError as error:
        if mismatch is None:
            raise ValueError(f"{source} (MODEL.WEIGHTS_FORMAT {weights_format}): {error}") from None
        raise ValueError(
            f"{mismatch}\nNor does it load as a pretrained backbone: {error}"
        ) from None
    logger.info(
        "%s is a pretrained backbone, not a whole model: loaded %d tensors into %s in "
        "scheme %s; the other layers keep their initialization",
        source,
        report["loaded"],
        report["backbone"],
        scheme,
    )
