"""A model in DistributedDataParallel, and the model such a wrapper holds.

Checkpoints, hooks and error messages speak of the model itself: its state dict keys without the
wrapper's ``module.`` prefix, its class name rather than the wrapper's.
"""

from __future__ import annotations

from torch import nn

from norm_det.utils.comm import get_world_size

__all__ = ["unwrap_model", "wrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model.module`` for a DistributedDataParallel wrapper, else ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_model(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else itself."""
    if get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # Buffers are synced once at construction; afterwards each process keeps its own norm
        # statistics (checkpoints hold rank 0's), saving a broadcast per forward.
        forward_sync_buffers=False,
    )
