"""Process-group helpers: the one home of norm_det's ``torch.distributed`` queries and
object exchanges (as detectron2's ``utils/comm.py``).

Without an initialized process group (or with a group of one) every function is the
single-process identity, so callers need no special case: evaluators collect their per-image
results with :func:`all_gather_object` and compute metrics once, on the main process; the
checkpointer and the trainer ask :func:`get_rank` / :func:`is_main_process`. The reductions that
layers differentiate through (``all_reduce_sum``, ``all_reduce_mean``, the ND++ moments) live
in :mod:`norm_det.layers.distributed`, which imports nothing of norm_det but torch; they are
re-exported here.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

from norm_det.layers.distributed import (
    all_reduce_mean,
    all_reduce_mean_moments,
    all_reduce_sum,
    get_world_size,
)

T = TypeVar("T")

__all__ = [
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_mean_moments",
    "all_reduce_sum",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "synchronize",
]


def get_rank() -> int:
    """Rank of this process in the default group; 0 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank()


def is_main_process() -> bool:
    """Whether this process computes and returns the metrics (rank 0)."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier over all processes; nothing to wait for in a single process."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """``obj`` from every process, in rank order (``[obj]`` in a single process).

    Any picklable object travels (numpy arrays, lists of dicts); with NCCL the pickled bytes pass
    through the current CUDA device, as ``torch.distributed.all_gather_object`` documents.
    """
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    """Process ``src``'s ``obj`` on every process (``obj`` itself in a single process)."""
    if get_world_size() == 1:
        return obj
    holder: list[Any] = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
