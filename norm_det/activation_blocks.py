"""Where a framework's residual blocks apply a ReLU after a norm, and blocks that leave it out.

A normalization-activation layer (FRN + TLU, EvoNorm, NF's scaled ReLU: a scheme's
``norm_act``) replaces "norm, then ReLU" together. In a container that runs its children in
order :func:`norm_det.surgery.convert` sees the ReLU and replaces it; a residual block's own
``forward`` applies its ReLUs itself (torchvision's ``self.relu``, detectron2's ``F.relu_``), so
``convert`` needs to know which of its norms a ReLU follows, and the block must then leave that
ReLU out where the norm carries it.

:data:`ACTIVATED_NORMS` says it for the ResNet blocks of torchvision, detectron2 and mmdet (by
package and class name: no framework is imported). :func:`leave_out_carried_relus` gives such a
block a ``forward`` that computes the same units, skipping the ReLU after a norm that carries
its activation (:func:`norm_det.schemes.carries_activation`); with any other norm it computes
exactly the framework's function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.schemes import carries_activation
from norm_det.utils.runtime_classes import made_class

__all__ = [
    "ACTIVATED_NORMS",
    "BlockUnits",
    "activated_children",
    "knows_block",
    "leave_out_carried_relus",
]


@dataclass(frozen=True)
class BlockUnits:
    """The dataflow of a residual block (or stem): ``convs[i]`` then ``norms[i]`` in turn.

    Args:
        convs: the block's convolution children, in order.
        norms: the norm child after each (a name), ``None`` where the convolution applies its
            own (detectron2's ``Conv2d.norm``), or ``"@attr"``: the child named by the
            block's attribute ``attr`` (mmdet's ``norm1_name``).
        activated: indices of the units the block's forward follows by a ReLU.
        shortcut: the projection child (None when absent or identity); ``"stem"``: no
            residual, a 3x3 stride-2 max pool follows (detectron2's ``BasicStem``).
    """

    convs: tuple[str, ...]
    norms: tuple[str | None, ...]
    activated: tuple[int, ...]
    shortcut: str


_TORCHVISION_BOTTLENECK = BlockUnits(
    ("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"), (0, 1), "downsample"
)
_TORCHVISION_BASIC = BlockUnits(("conv1", "conv2"), ("bn1", "bn2"), (0,), "downsample")
_MMDET_BOTTLENECK = BlockUnits(
    ("conv1", "conv2", "conv3"), ("@norm1_name", "@norm2_name", "@norm3_name"), (0, 1), "downsample"
)
_MMDET_BASIC = BlockUnits(("conv1", "conv2"), ("@norm1_name", "@norm2_name"), (0,), "downsample")

# (root package, class name) -> the units of its forward.
ACTIVATED_NORMS: dict[tuple[str, str], BlockUnits] = {
    ("torchvision", "Bottleneck"): _TORCHVISION_BOTTLENECK,
    ("torchvision", "BasicBlock"): _TORCHVISION_BASIC,
    ("detectron2", "BottleneckBlock"): BlockUnits(
        ("conv1", "conv2", "conv3"), (None, None, None), (0, 1), "shortcut"
    ),
    ("detectron2", "BasicBlock"): BlockUnits(("conv1", "conv2"), (None, None), (0,), "shortcut"),
    ("detectron2", "BasicStem"): BlockUnits(("conv1",), (None,), (0,), "stem"),
    ("mmdet", "Bottleneck"): _MMDET_BOTTLENECK,
    ("mmdet", "BasicBlock"): _MMDET_BASIC,
}


def _units_of_class(cls: type) -> BlockUnits | None:
    for base in cls.__mro__:
        units = ACTIVATED_NORMS.get((base.__module__.split(".")[0], base.__name__))
        if units is not None:
            return units
    return None


def _units_of(block: nn.Module) -> BlockUnits | None:
    # mmdet's blocks with plugins or activation checkpointing run other code between.
    if getattr(block, "with_plugins", False) or getattr(block, "with_cp", False):
        return None
    return _units_of_class(type(block))


def knows_block(block: nn.Module) -> bool:
    """Whether :data:`ACTIVATED_NORMS` says where ``block``'s forward applies its ReLUs."""
    return _units_of(block) is not None


def _norm_name(block: nn.Module, norm: str | None) -> str | None:
    return getattr(block, norm[1:]) if norm is not None and norm.startswith("@") else norm


def activated_children(block: nn.Module) -> set[str]:
    """Names of ``block``'s children whose output its forward follows by a ReLU.

    The norm children (``bn1``), or the convolutions that apply their own norm (detectron2's
    ``conv1``). Empty for a block :data:`ACTIVATED_NORMS` does not know.
    """
    units = _units_of(block)
    if units is None:
        return set()
    names = set()
    for index in units.activated:
        norm = _norm_name(block, units.norms[index])
        names.add(units.convs[index] if norm is None else norm)
    return names


def _relu_unless_carried(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is not None and carries_activation(norm) else F.relu(x)


class _LeavesOutCarriedReLUs:
    """Mixin: the block's units, with the ReLU left out after a norm that carries it."""

    _units: BlockUnits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The framework block's function, the ReLU after a carrying norm left out."""
        units = self._units
        out = x
        for index, (conv_name, norm_name) in enumerate(zip(units.convs, units.norms)):
            conv = getattr(self, conv_name)
            out = conv(out)
            name = _norm_name(self, norm_name)
            norm = getattr(conv, "norm", None) if name is None else getattr(self, name)
            if name is not None:
                out = norm(out)
            if index in units.activated:
                out = _relu_unless_carried(norm, out)
        if units.shortcut == "stem":
            return F.max_pool2d(out, kernel_size=3, stride=2, padding=1)
        shortcut = getattr(self, units.shortcut, None)
        return F.relu(out + (x if shortcut is None else shortcut(x)))


def _leaving_out(model_class: type[nn.Module]) -> type[nn.Module]:
    return made_class(
        _LeavesOutCarriedReLUs,
        model_class,
        _units=_units_of_class(model_class),
    )


def _rebuild(model_class: type[nn.Module]) -> nn.Module:
    # Loads the blocks pickled before made_class named the classes.
    cls = _leaving_out(model_class)
    return cls.__new__(cls)


def leave_out_carried_relus(block: nn.Module) -> bool:
    """Give ``block`` (in place) the forward that leaves out the ReLU after carrying norms.

    Returns:
        whether ``block`` is a block :data:`ACTIVATED_NORMS` knows (it is then changed).
    """
    if isinstance(block, _LeavesOutCarriedReLUs):
        return True
    if _units_of(block) is None:
        return False
    block.__class__ = _leaving_out(type(block))
    return True
