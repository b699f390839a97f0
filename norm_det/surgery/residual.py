"""The scheme's ``residual_input`` in front of every residual unit, and its removal by fuse.

CZM's multiplicative noise (the MSR paper's §4.4) acts on the input of each residual unit; a
forward pre-hook applies the unit's child ``residual_input``, so that the shortcut and the
residual branch both see it and no state-dict key changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from norm_det.surgery.placement import _place_like


def _apply_residual_input(unit: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (unit.residual_input(args[0]), *args[1:])


def insert_residual_inputs(
    model: nn.Module,
    factory: Callable[[], nn.Module],
    selected: Callable[[str], bool] | None = None,
) -> int:
    """Apply ``factory()`` to the input of every residual unit (a scheme's ``residual_input``).

    A residual unit is a module with a ``downsample`` or ``shortcut`` attribute that is None or
    a module: the BasicBlock / Bottleneck of torchvision, timm and mmdet, detectron2's blocks.
    The new module becomes the unit's child ``residual_input`` and a forward pre-hook applies it
    to the unit's input, so the shortcut and the residual branch both see it and no state-dict
    key changes. Inserting again replaces the module; it does not add a second hook.

    Args:
        selected: ``selected(path)`` says whether the unit at ``path`` gets one (default: all).

    Returns:
        The number of residual units given the module.
    """
    units = [
        (path, unit)
        for path, unit in model.named_modules()
        if any(
            isinstance(getattr(unit, name, False), (nn.Module, type(None)))
            for name in ("downsample", "shortcut")
        )
        and (selected is None or selected(path))
    ]
    for _, unit in units:
        if not isinstance(getattr(unit, "residual_input", None), nn.Module):
            unit.register_forward_pre_hook(_apply_residual_input)
        unit.residual_input = _place_like(factory(), unit)
    return len(units)


def _remove_residual_input_hooks(model: nn.Module) -> None:
    """Drop the pre-hooks of :func:`insert_residual_inputs` once their module is the identity.

    A fused model must run, pickle and export without norm_det.
    """
    for unit in model.modules():
        hooks = unit._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _apply_residual_input]:
            if isinstance(getattr(unit, "residual_input", None), nn.Identity):
                del hooks[key]
                del unit.residual_input
