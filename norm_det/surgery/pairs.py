"""How a parent's children form conv+norm pairs and where a ReLU follows them.

A convolution is a conv+norm pair with the norm directly after it in its parent's registration
order, over the same channels (torchvision's ``conv1``, ``bn1``; ``Conv2dNormActivation``;
mmdet's blocks), or with the norm it holds as its attribute ``norm`` (detectron2's ``Conv2d``,
:func:`~norm_det.surgery.attached_norm`). In a parent that runs its children in order the ReLU
after a norm is a child too: its slot, which a scheme's normalization-activation layer fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.activation_blocks import activated_children, knows_block
from norm_det.layers.protocol import ActivationInNorm
from norm_det.schemes import Scheme, carries_activation
from norm_det.surgery.framework_convs import _applies_activation
from norm_det.surgery.placement import _become
from norm_det.surgery.queries import attached_norm, is_conv, is_norm, norm_channels

# Containers whose forward runs their children in registration order, besides nn.Sequential:
# torchvision's IntermediateLayerGetter (a ResNet trunk's stem), mmcv's ConvModule (conv, norm,
# activate in its default order).
_IN_ORDER_CONTAINERS = ("IntermediateLayerGetter", "ConvModule")


def _runs_in_order(parent: nn.Module) -> bool:
    """Whether ``parent``'s forward applies its children one after another in their order."""
    if type(parent).__name__ == "ConvModule":
        return tuple(getattr(parent, "order", ())) == ("conv", "norm", "act")
    return isinstance(parent, nn.Sequential) or type(parent).__name__ in _IN_ORDER_CONTAINERS


@dataclass(frozen=True)
class _Siblings:
    """A parent's children, as a walk over them reads them.

    Args:
        children: ``(name, child)`` in registration order.
        activated_names: the children the parent's own forward follows by a ReLU, where
            :mod:`norm_det.activation_blocks` knows the parent.
        in_order: the parent runs its children one after another (:func:`_runs_in_order`).
        known: the walk knows where every ReLU after a norm is (in order, or a known block).
    """

    children: list[tuple[str, nn.Module]]
    activated_names: set[str]
    in_order: bool
    known: bool

    @classmethod
    def of(cls, parent: nn.Module) -> _Siblings:
        in_order = _runs_in_order(parent)
        return cls(
            list(parent.named_children()),
            activated_children(parent),
            in_order,
            in_order or knows_block(parent),
        )

    def following(self, index: int) -> nn.Module | None:
        """The child after ``children[index]``, None for the last."""
        return self.children[index + 1][1] if index + 1 < len(self.children) else None


def _activation_slot(children: list[tuple[str, nn.Module]], index: int) -> nn.Module | None:
    """The ReLU (or :class:`ActivationInNorm`) at ``children[index]``, in a parent that runs its
    children in order, so that it is applied to the output of the child before it."""
    slot = children[index][1] if index < len(children) else None
    return slot if isinstance(slot, (nn.ReLU, ActivationInNorm)) else None


def _update_slot(slot: nn.Module, norm: nn.Module | None) -> None:
    """The ReLU slot after ``norm``: an :class:`ActivationInNorm` where it carries the
    activation, a ReLU otherwise."""
    carried = norm is not None and carries_activation(norm)
    if carried != isinstance(slot, ActivationInNorm):
        _become(slot, ActivationInNorm() if carried else nn.ReLU(inplace=True))
    if type(norm) is nn.Identity and isinstance(slot, nn.ReLU):
        # A pre-activation norm that went: the ReLU now sees the unit's input itself, which
        # the identity path still needs.
        slot.inplace = False


def _own_relu(conv: nn.Module) -> bool:
    """Whether ``conv`` applies a ReLU after its own norm (detectron2's ``Conv2d`` with an
    ``activation``), or keeps the place of one that its norm now carries."""
    activation = getattr(conv, "activation", None)
    return activation in (F.relu, F.relu_, torch.relu, torch.relu_) or isinstance(
        activation, (nn.ReLU, ActivationInNorm)
    )


def _is_sibling_pair(conv: nn.Module, following: nn.Module | None) -> bool:
    """``conv`` followed by the norm ``following`` in their parent: one conv+norm pair."""
    return (
        is_conv(conv)
        and following is not None
        and is_norm(following)
        and norm_channels(following) == conv.out_channels
        # A convolution with a norm or activation of its own is not directly followed by it.
        and attached_norm(conv) is None
        and not _applies_activation(conv)
    )


def _is_empty_norm_unit(
    children: list[tuple[str, nn.Module]], index: int, scheme: Scheme, in_order: bool
) -> bool:
    """``children[index]`` is the ``conv`` of a norm-free scheme's conv+norm unit (norm_det's
    ``ConvNormAct``: ``conv``, then an empty ``norm`` slot) and ``scheme`` puts a norm there."""
    if not in_order or scheme.norm is None or index + 1 >= len(children):
        return False
    (name, conv), (next_name, following) = children[index], children[index + 1]
    return (
        (name, next_name) == ("conv", "norm")
        and type(following) is nn.Identity
        and is_conv(conv)
        and attached_norm(conv) is None
    )
