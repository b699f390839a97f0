"""Batch normalization synchronized across processes, safe in a single process.

Ioffe & Szegedy, "Batch Normalization", ICML 2015; cross-GPU statistics as in Peng et al.,
"MegDet: A Large Mini-Batch Object Detector", CVPR 2018.

``torch.nn.SyncBatchNorm`` refuses CPU tensors and needs an initialized process group, so
single-process runs and CPU (gloo) runs of a SyncBN config crash in several frameworks. This
version reduces (count, sum, sum of squares) with a differentiable all-reduce on any backend and
is exactly ``BatchNorm2d`` when there is only one process.
"""

from __future__ import annotations

import torch
from torch import nn

from norm_det.layers.distributed import all_reduce_sum, get_world_size

STATS_MODES = ("N", "default")


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all processes.

    In eval mode, or with one process, it is ``nn.BatchNorm2d``.

    Args:
        num_features: channels ``C`` of the input ``(N, C, H, W)``.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
        stats_mode: how the processes' statistics combine. ``"N"`` (the default): each
            process's values count by number, so the result is the statistics of the union of
            the batches, and a process with an empty batch (a head that got no boxes) counts
            for nothing. ``"default"``: each process's mean and mean square count equally,
            whatever its batch (detectron2's ``NaiveSyncBatchNorm`` ``stats_mode=""``, mmcv's
            ``"default"``); every process must then have a non-empty batch.
    """

    _abbr_ = "bn"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        stats_mode: str = "N",
        **factory_kwargs,
    ) -> None:
        if stats_mode not in STATS_MODES:
            raise ValueError(
                f"SyncBatchNorm: stats_mode is {stats_mode!r}; expected one of {STATS_MODES}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory_kwargs)
        self.stats_mode = stats_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, 2, 3]
        local = x.numel() // max(channels, 1)
        count = torch.full((1,), local, dtype=x.dtype, device=x.device)
        if self.stats_mode == "N":
            stats = all_reduce_sum(torch.cat([count, x.sum(dims), (x * x).sum(dims)]))
            total = stats[0].clamp(min=1)
            weight = total
        else:
            # An empty process still joins the all-reduce (so no process waits for it) and
            # says so; then every process raises alike.
            empty = torch.full((1,), float(local == 0), dtype=x.dtype, device=x.device)
            means = [x.sum(dims) / max(local, 1), (x * x).sum(dims) / max(local, 1)]
            stats = all_reduce_sum(torch.cat([count, empty, *means]))
            if stats[1] > 0:
                raise ValueError(
                    f"SyncBatchNorm(stats_mode='default'): {int(stats[1])} process(es) had an "
                    "empty batch; their statistics would count as much as the others'. Use "
                    "stats_mode='N', which weights each process by its batch."
                )
            stats = torch.cat([stats[:1], stats[2:]])
            total = stats[0]
            weight = float(get_world_size())
        mean = stats[1 : 1 + channels] / weight
        var = (stats[1 + channels :] / weight - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
                self.num_batches_tracked.add_(1)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def fuse(self) -> nn.BatchNorm2d:
        """A plain ``nn.BatchNorm2d`` (eval) with the same parameters and statistics."""
        bn = nn.BatchNorm2d(
            self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats
        ).to(self.running_mean if self.running_mean is not None else self.weight)
        bn.load_state_dict(self.state_dict())
        return bn.eval()
