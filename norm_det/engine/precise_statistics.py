"""Precise running statistics: re-estimate every layer's running averages at the final weights.

A layer with batch statistics (BN, SyncBN, ND/ND++, IterNorm) keeps exponential moving averages
``running ← (1 − momentum)·running + momentum·batch`` of what it estimated during training, and
uses them in eval. With momentum 0.1 the average spans the last ~10 forwards, made with weights
that have since moved; at a large learning rate (ND++ trains at 0.1) the eval network is then not
the trained one. Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021, §3) and detectron2's
``PreciseBN`` hook re-estimate the averages with the weights fixed: forward a number of training
batches and take the plain mean of the per-forward statistics.

:func:`recompute_running_statistics` does that for every layer whose running statistics are such
moving averages — a module with a ``momentum`` attribute and buffers named ``running_*`` (torch's
BN, norm_det's SyncBN, the ND/ND++ layers' ``running_mean`` / ``running_deconv``, IterNorm's
``running_mean`` / ``running_wm``, CBN's and BCN's batch statistics, EvoNorm-B0's
``running_var``, MABN's running second moment) — so a new scheme's layer takes part by following
that naming.
A layer applied several times per forward (an RPN head on each FPN level) contributes every call.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from norm_det.layers.distributed import all_reduce_sum, get_world_size

__all__ = ["layers_with_running_statistics", "recompute_running_statistics"]

logger = logging.getLogger(__name__)

_PREFIX = "running_"


def layers_with_running_statistics(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """``(layer, names of its running_* buffers)`` for every layer with moving averages."""
    found = []
    for module in model.modules():
        if not hasattr(module, "momentum"):
            continue
        names = tuple(
            name
            for name, buffer in module.named_buffers(recurse=False)
            if name.startswith(_PREFIX) and buffer is not None and buffer.is_floating_point()
        )
        if names:
            found.append((module, names))
    return found


@torch.no_grad()
def recompute_running_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    num_batches: int,
) -> int:
    """Replace the running statistics of ``model`` by their mean over ``num_batches`` forwards.

    Each layer's statistics are those of one training-mode forward (momentum 1 for the pass, and
    ND/ND++'s ``freeze`` schedule off, so every forward estimates them); the result is their
    plain mean over all forwards of all batches, averaged over processes when there are several.
    Momentum, the freeze flags, the step counters (``num_batches_tracked``, which drive the
    freeze schedule) and the layers' other buffers (MABN's history) are restored, so training
    continues as if the pass had not happened.

    Args:
        model: the (unwrapped) model; it is put in training mode for the pass and returned to
            the mode it was in.
        batches: yields at least ``num_batches`` inputs for ``forward``.
        forward: ``forward(model, batch)``, a training-mode forward (its result is dropped).
        num_batches: how many batches; every process must pass the same number.

    Returns:
        the number of layers whose statistics were recomputed (0: the model has none, and
        nothing was forwarded).

    Raises:
        ValueError: ``num_batches`` < 1, or ``batches`` ran out before ``num_batches``.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches (TEST.PRECISE_BN.NUM_ITER) is {num_batches}; expected >= 1")
    layers = layers_with_running_statistics(model)
    if not layers:
        return 0
    saved = [(layer, layer.momentum, getattr(layer, "freeze", None)) for layer, _ in layers]
    # Step counters (num_batches_tracked everywhere) and the layers' other state (MABN's
    # moving-average history) come back as they were; only the running_* averages change.
    kept = {
        id(buffer): buffer
        for name, buffer in model.named_buffers()
        if name.rsplit(".", 1)[-1] == "num_batches_tracked"
    }
    for layer, _ in layers:
        for name, buffer in layer.named_buffers(recurse=False):
            if buffer is not None and not name.startswith(_PREFIX):
                kept[id(buffer)] = buffer
    counters = [(buffer, buffer.clone()) for buffer in kept.values()]
    sums = {(id(layer), name): torch.zeros_like(getattr(layer, name)) for layer, names in layers
            for name in names}  # fmt: skip
    calls = dict.fromkeys((id(layer) for layer, _ in layers), 0)

    def accumulate(layer: nn.Module, names: tuple[str, ...]) -> None:
        calls[id(layer)] += 1
        for name in names:
            sums[(id(layer), name)] += getattr(layer, name)

    handles = [
        layer.register_forward_hook(lambda m, _i, _o, names=names: accumulate(m, names))
        for layer, names in layers
    ]
    was_training = model.training
    model.train()
    try:
        for layer, _, freeze in saved:
            layer.momentum = 1.0
            if isinstance(freeze, bool):
                layer.freeze = False
        seen = 0
        for batch in itertools.islice(batches, num_batches):
            forward(model, batch)
            seen += 1
        if seen < num_batches:
            raise ValueError(
                f"precise statistics: the data gave {seen} batches, {num_batches} were asked for "
                "(TEST.PRECISE_BN.NUM_ITER)"
            )
    finally:
        for handle in handles:
            handle.remove()
        for layer, momentum, freeze in saved:
            layer.momentum = momentum
            if isinstance(freeze, bool):
                layer.freeze = freeze
        for buffer, value in counters:
            buffer.copy_(value)
        model.train(was_training)
    distributed = get_world_size() > 1
    updated = 0
    for layer, names in layers:
        count = calls[id(layer)]
        if distributed:
            # Every process must join each all-reduce, also for a layer it never called.
            device = getattr(layer, names[0]).device
            count = round(all_reduce_sum(torch.tensor([float(count)], device=device)).item())
        if count == 0:
            continue
        for name in names:
            total = sums[(id(layer), name)]
            if distributed:
                total = all_reduce_sum(total)
            getattr(layer, name).copy_(total / count)
        updated += 1
    unused = len(layers) - updated
    logger.info(
        "precise statistics: recomputed %d layers over %d batches%s",
        updated,
        num_batches,
        f" ({unused} layers were not called)" if unused else "",
    )
    return updated
