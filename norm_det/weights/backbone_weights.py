"""The backbone weights a checkpoint file holds, under norm_det's names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BackboneWeights:
    """A backbone's tensors under norm_det's names, and what else its file held.

    Attributes:
        arch: ``"resnet"`` or ``"vgg"``.
        tensors: norm_det module path + tensor name (``res2.0.conv1.conv.weight``) -> tensor,
            relative to the backbone (norm_det's ``ResNet`` / ``VGG16SSD``).
        framework: the framework of the file it was read from.
        prefix: where the backbone sat in that file (``"backbone.body."`` in a detector).
        others: the file's non-backbone tensors (FPN, heads), under their own names.
        meta: what norm_det knows of the weights (``"scheme"``: the scheme they were trained or
            converted with, when known).
        naming: the naming the file used.
        arguments: keyword arguments of norm_det's backbone that the tensors do not tell
            (``preact=True`` for a ResNet-V2, a stem's pooling), added to those read from the
            tensors.
    """

    arch: str
    tensors: dict[str, torch.Tensor]
    framework: str = "norm_det"
    prefix: str = ""
    others: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    naming: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str | None:
        return self.meta.get("scheme")


__all__ = ["BackboneWeights"]
