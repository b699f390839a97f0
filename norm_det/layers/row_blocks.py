"""Per-sample norms' kernels, run through blocks of rows.

:mod:`norm_det.layers.frn` and :mod:`norm_det.layers.evonorm` view their input as rows (one per
sample and channel, or group) and work through blocks of them: on CPU blocks small enough for
their temporaries to stay in cache, where each fresh full-size tensor costs more (page faults)
than the arithmetic on it; elsewhere the whole tensor at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements of one block of rows on CPU (1 MiB of float32 per block-sized array): measured
# fastest between 2^16 and 2^20 on (2, 256, 200, 200) and (2, 1024, 50, 50) inputs.
CPU_BLOCK_NUMEL = 1 << 18


def rows_per_block(rows: torch.Tensor) -> int:
    """Rows of ``rows: (R, ...)`` processed together: about :data:`CPU_BLOCK_NUMEL` elements
    (at least one row) on CPU, all of them on other devices (one kernel per step)."""
    if rows.device.type != "cpu":
        return max(len(rows), 1)
    return max(1, CPU_BLOCK_NUMEL // max(rows[0].numel() if len(rows) else 1, 1))


def blocks(per_block: int, *tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The successive blocks of ``per_block`` rows (dim 0) of each tensor, side by side."""
    return zip(*(t.split(per_block) for t in tensors))


def block_scratch(rows: torch.Tensor, per_block: int) -> torch.Tensor:
    """An uninitialised array of one block of ``rows``; slice it to a block's length."""
    return rows.new_empty((min(per_block, len(rows)), *rows.shape[1:]))


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-row statistics: at least float32, so half inputs sum without overflow."""
    return torch.promote_types(dtype, torch.float32)


def channel_rows(per_channel: torch.Tensor, n: int) -> torch.Tensor:
    """A ``(C,)`` tensor as one value per (sample, channel) row: ``(N * C, 1)``."""
    return per_channel.expand(n, -1).reshape(-1, 1)


def forward_mode(x: torch.Tensor, *params: torch.Tensor | None) -> str:
    """How a layer built on these helpers runs its forward.

    Returns:
        ``"reference"`` (plain differentiable ops) for tracers, exporters, ``torch.compile``
        (which fuses them into fewer kernels than the blocks take) and empty inputs;
        ``"autograd"`` (the autograd function) when a gradient is wanted; ``"forward"`` (the
        function's forward alone, nothing kept) otherwise.
    """
    exporting = torch.jit.is_tracing() or torch.jit.is_scripting()
    if exporting or torch.compiler.is_compiling() or x.numel() == 0:
        return "reference"
    tracked = x.requires_grad or any(p is not None and p.requires_grad for p in params)
    return "autograd" if torch.is_grad_enabled() and tracked else "forward"
