"""Count and time the collectives a training step makes from Python.

Layers that synchronize their statistics (SyncBN, ND / ND++, IterNorm) call
``torch.distributed.all_reduce`` from Python, in forward and again in backward;
DistributedDataParallel's gradient all-reduce runs in its C++ reducer and is not seen here. So
:class:`CollectiveCounter` measures exactly the statistics traffic, and
:func:`gradient_bytes` gives the traffic DDP adds (each trainable parameter's gradient, once per
step), to set beside it.

    with CollectiveCounter() as counter:
        step()
    counter.calls, counter.bytes, counter.seconds
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["COUNTED", "CollectiveCounter", "gradient_bytes"]

# The torch.distributed functions counted; the first tensor argument is what travels.
COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class CollectiveCounter:
    """Within the ``with`` block, count the calls, bytes and seconds of :data:`COUNTED`.

    The functions are wrapped in ``torch.distributed`` itself, so every caller that looks them
    up there at call time (norm_det's layers do) is counted. Bytes are those of the tensor each
    process sends in (an all-reduce of ``n`` float32 numbers: ``4 n``), not the network's
    traffic, which the algorithm decides (a ring all-reduce sends about twice that).

    Attributes:
        calls, bytes, seconds: totals since the block began.
        by_size: ``{bytes of one call: number of such calls}``.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0
        self.by_size: dict[int, int] = {}
        self._originals: dict[str, Callable[..., Any]] = {}

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            size = _tensor_bytes(args[0] if args else next(iter(kwargs.values()), None))
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.bytes += size
            self.by_size[size] = self.by_size.get(size, 0) + 1
            return result

        return counted

    def __enter__(self) -> CollectiveCounter:
        for name in COUNTED:
            function = getattr(dist, name, None)
            if function is not None:
                self._originals[name] = function
                setattr(dist, name, self._wrap(name, function))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, function in self._originals.items():
            setattr(dist, name, function)
        self._originals.clear()


def gradient_bytes(model: nn.Module) -> int:
    """Bytes DDP all-reduces per step: every trainable parameter's gradient, once."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
