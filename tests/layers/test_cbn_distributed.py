"""CBN inside DistributedDataParallel: its autograd.grad in the forward and DDP's reducer."""

from __future__ import annotations

import torch
from torch import nn

from norm_det.schemes import build_conv_norm
from tests.dist_utils import run_distributed


def _ddp_steps(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    conv, norm = build_conv_norm("CBN(window=3, burnin=1)", 3, 8, 3, padding=1)
    model = nn.Sequential(conv, norm, nn.ReLU(), nn.Conv2d(8, 2, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(4):
        x = torch.randn(2, 3, 6, 6, generator=generator)
        loss = ddp(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "window": len(norm._history),
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def test_cross_iteration_bn_trains_under_ddp_and_stays_in_sync() -> None:
    results = run_distributed(_ddp_steps, 2)
    for result in results:
        assert all(torch.isfinite(torch.tensor(result["losses"])))
        assert result["window"] == 2  # past burn-in: the 2 past iterations of a window of 3
    # DDP averaged every gradient, the CBN-compensated convolution's included.
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        torch.testing.assert_close(a, b)
