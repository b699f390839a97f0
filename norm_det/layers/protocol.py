"""Walk a model for the layer protocol described in :mod:`norm_det.layers`.

The optimizer and trainer call these helpers; they never test for a concrete layer class, so a
new scheme's layers take part by defining the protocol attributes alone.

A layer's work at every optimizer step (CZM's gradient correction and its anchoring loss) runs
from torch's global optimizer step pre-hook, which :func:`track_step_layers` installs: every
loop that calls ``optimizer.step()`` runs it — norm_det's trainer, detectron2's, mmengine's
``OptimWrapper``, AMP's ``GradScaler.step`` and a hand-written ``loss.backward();
optimizer.step()`` alike — once per step, on complete gradients: accumulated over the passes,
averaged over processes by DistributedDataParallel, unscaled by the ``GradScaler``. Gradient
hooks on the tensors would not do: they fire once per backward pass (k times per step under
gradient accumulation) and see gradients still multiplied by AMP's loss scale.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

# torch's own normalization layers: their affine parameters are never weight-decayed.
TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def no_weight_decay_parameters(model: nn.Module) -> set[str]:
    """Qualified names of the parameters of ``model`` that must get no weight decay.

    These are the affine parameters of torch's norm layers and every parameter a layer names in
    its ``_no_weight_decay`` class attribute.
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, TORCH_NORM_TYPES):
            own = tuple(n for n, _ in module.named_parameters(recurse=False))
        else:
            own = tuple(getattr(module, "_no_weight_decay", ()))
        for param_name in own:
            if getattr(module, param_name, None) is not None:
                names.add(prefix + param_name)
    return names


# ---------------------------------------------------------------------------------------------
# Work at every optimizer step, run by torch for any loop.

# Layers with ``before_optimizer_step``; weak, so a discarded model takes its layers with it.
_TRACKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# layer -> weak references to the gradients it last prepared (None for a missing gradient).
_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()
_HOOK_HANDLES: list[Any] = []


def track_step_layers(*modules: nn.Module) -> int:
    """Have every layer in ``modules`` that defines ``before_optimizer_step`` take part.

    Such layers call it for themselves when they are made (``__init__``, unpickling, deep
    copy); :func:`norm_det.surgery.convert` calls it on the model it changed. Tracking again is
    harmless. Installs the optimizer step hooks on first use.

    Returns:
        The number of such layers found.
    """
    count = 0
    for module in modules:
        for layer in module.modules():
            if callable(getattr(layer, "before_optimizer_step", None)):
                _TRACKED.add(layer)
                count += 1
    if count and not _HOOK_HANDLES:
        _HOOK_HANDLES.append(register_optimizer_step_pre_hook(_before_step))
        _HOOK_HANDLES.append(register_optimizer_step_post_hook(_after_step))
    return count


def _stepped_layers(optimizer: torch.optim.Optimizer) -> list[nn.Module]:
    """Tracked layers with a parameter of their own in ``optimizer``, in its parameter order."""
    owners = {id(p): layer for layer in list(_TRACKED) for p in layer.parameters(recurse=False)}
    layers: dict[int, nn.Module] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            layer = owners.get(id(parameter))
            if layer is not None:
                layers.setdefault(id(layer), layer)
    return list(layers.values())


def _gradient_refs(layer: nn.Module) -> tuple[Any, ...]:
    return tuple(
        None if p.grad is None else weakref.ref(p.grad) for p in layer.parameters(recurse=False)
    )


def _already_prepared(layer: nn.Module) -> bool:
    """Whether ``layer``'s current gradients are the very tensors it last prepared."""
    marks = _PREPARED.get(layer)
    if marks is None:
        return False
    grads = [p.grad for p in layer.parameters(recurse=False)]
    return len(marks) == len(grads) and all(
        (mark is None and grad is None) or (mark is not None and mark() is grad)
        for mark, grad in zip(marks, grads)
    )


def prepare_optimizer_step(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Run ``before_optimizer_step()`` of the tracked layers whose parameters ``optimizer`` holds.

    Called by torch's optimizer step pre-hook before every ``optimizer.step()``. A loop may call
    it itself, earlier (norm_det's trainer does, before gradient clipping); the step then leaves
    those gradients alone, since a layer acts once on a gradient: until the step is done, the
    same gradient tensors are not prepared again (so nested ``step`` calls, such as an
    optimizer subclass whose ``step`` clips and then calls its parent's, act once).

    Returns:
        The summed values of the penalties whose gradients the layers added (``loss_luma``),
        detached, for logging; empty when no layer acted.
    """
    values: dict[str, torch.Tensor] = {}
    for layer in _stepped_layers(optimizer):
        if _already_prepared(layer):
            continue
        returned = {
            name: value.detach() for name, value in (layer.before_optimizer_step() or {}).items()
        }
        _PREPARED[layer] = _gradient_refs(layer)
        layer.step_losses = returned
        for name, value in returned.items():
            values[name] = values[name] + value if name in values else value
    return values


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    prepare_optimizer_step(optimizer)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    # The next gradient of these layers is a new one, even where the loop zeroes the same
    # tensors in place (zero_grad(set_to_none=False)).
    for layer in _stepped_layers(optimizer):
        _PREPARED.pop(layer, None)


def collect_step_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The penalty values the layers of ``model`` applied at their last optimizer step.

    Sums each layer's ``step_losses`` (what its ``before_optimizer_step`` last returned, which
    :func:`prepare_optimizer_step` keeps there), keyed as the layer keys them (``loss_luma``):
    what a loss term in the graph would have logged.
    """
    values: dict[str, torch.Tensor] = {}
    for module in model.modules():
        losses: Mapping[str, torch.Tensor] | None = getattr(module, "step_losses", None)
        for name, value in (losses or {}).items():
            values[name] = values[name] + value if name in values else value
    return values


# ---------------------------------------------------------------------------------------------
# The activation slot of a normalization-activation layer.


class ActivationInNorm(nn.Identity):
    """The place of a ReLU that the layer before it applies (a norm that carries its activation).

    Model code keeps an activation slot after every conv+norm it activates. With a scheme whose
    norm is a normalization-activation layer (FRN + TLU, EvoNorm) the slot holds this instead of
    ``nn.ReLU``, so that :func:`norm_det.surgery.convert` to any other scheme knows a ReLU goes
    back there.
    """
