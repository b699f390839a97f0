import pytest
import torch
from torch import nn

from norm_det.layers import SyncBatchNorm
from tests.dist_utils import run_distributed

# Float64's unit roundoff: two processes sum their halves in another order than one process sums
# the whole batch, so the comparison runs in float64 against bounds in units of it.
U64 = 2.0**-53


def _half_batch_step(rank: int, world_size: int, x: torch.Tensor, state: dict) -> dict:
    torch.set_num_threads(1)
    norm = SyncBatchNorm(x.shape[1]).double()
    norm.load_state_dict(state)
    local = x.chunk(world_size)[rank].clone().requires_grad_(True)
    out = norm(local)
    # The loss of the whole batch is the sum of the per-process losses.
    (out * _loss_weights(out)).sum().backward()
    return {
        "out": out.detach(),
        "grad_x": local.grad,
        "grad_w": norm.weight.grad,
        "running_mean": norm.running_mean,
        "running_var": norm.running_var,
    }


def _loss_weights(out: torch.Tensor) -> torch.Tensor:
    """The sine of each element's flat index within its process's output: ``|g| <= 1``."""
    return torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()


def _rounding_bounds(x: torch.Tensor, g: torch.Tensor, bn: nn.BatchNorm2d) -> dict:
    """Bounds on the difference of two float64 evaluations of a training BatchNorm2d step.

    Per channel over ``m = N H W`` values: the sums of ``x`` err by ``(m + 1) u mean|x|``; the
    biased variance, by a two-pass sum, Welford's update or ``E[x^2] - mean^2`` alike, by
    ``3 (m + 2) u kappa var`` (``kappa = E[x^2] / var``), so ``1/sigma`` by ``2 (m + 4) u kappa``
    relatively. Every result is then within ``c (m + 8) u kappa`` of its formula evaluated on
    magnitudes, with ``xt = (|x| + 2 mean|x|) / sigma`` (>= ``|x - mean| / sigma`` and the
    uncentered terms of ``E[x^2] - mean^2``): ``|w| xt + |b|`` for the output,
    ``|w| / sigma (|g| + mean|g| + xt mean(|g| xt))`` for ``dL/dx``, ``sum |g| xt`` for
    ``dL/dw`` (``c = 2`` for the forward, 4 where the backward meets each term up to twice).
    Twice that for two evaluations.

    Args:
        x: ``(N, C, H, W)``; g: ``dL/dout``, like ``x``; bn: the layer (its weight, bias and
            momentum; its running statistics started at 0 and 1).
    """
    channels = x.shape[1]

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).reshape(channels, -1)

    def like_x(t: torch.Tensor) -> torch.Tensor:
        return t.view(channels, x.shape[0], *x.shape[2:]).transpose(0, 1)

    rows, grads = per_channel(x.detach()), per_channel(g.detach()).abs()
    m = rows.shape[1]
    mean_abs = rows.abs().mean(1, keepdim=True)
    var = rows.var(1, unbiased=False, keepdim=True)
    sigma = var.sqrt()
    kappa = rows.square().mean(1, keepdim=True) / var
    weight, bias = (t.detach().abs().view(-1, 1) for t in (bn.weight, bn.bias))
    xt = (rows.abs() + 2 * mean_abs) / sigma
    unit = 2 * (m + 8) * U64 * kappa  # both evaluations, c = 1
    grad_x = (
        weight / sigma * (grads + grads.mean(1, keepdim=True) + xt * (grads * xt).mean(1, True))
    )
    momentum = bn.momentum
    return {
        "out": like_x(2 * unit * (weight * xt + bias)),
        "grad_x": like_x(4 * unit * grad_x),
        "grad_w": (4 * unit * (grads * xt).sum(1, keepdim=True)).view(-1),
        # momentum times the batch mean's (variance's) rounding, plus 3 u for the update itself.
        "running_mean": (2 * (momentum * (m + 4) * mean_abs) * U64).view(-1),
        "running_var": (
            unit * momentum * 3 * var * m / (m - 1) + 6 * U64 * (1 + momentum * var * m / (m - 1))
        ).view(-1),
    }


def test_two_processes_equal_one_process_with_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    state = bn.state_dict()
    results = run_distributed(_half_batch_step, 2, x, state)

    whole = x.clone().requires_grad_(True)
    reference = bn(whole)
    # Each process's loss weights its half with the sine of its own flat index.
    weights = torch.cat([_loss_weights(o) for o in reference.detach().chunk(2)])
    (reference * weights).sum().backward()
    bounds = _rounding_bounds(x, weights, bn)
    out = torch.cat([r["out"] for r in results])
    grad_x = torch.cat([r["grad_x"] for r in results])
    assert ((out - reference.detach()).abs() <= bounds["out"]).all()
    assert ((grad_x - whole.grad).abs() <= bounds["grad_x"]).all()
    # Each process holds the gradient of its own loss; DDP would average them.
    grad_w = sum(r["grad_w"] for r in results)
    assert ((grad_w - bn.weight.grad).abs() <= bounds["grad_w"]).all()
    for r in results:
        assert ((r["running_mean"] - bn.running_mean).abs() <= bounds["running_mean"]).all()
        assert ((r["running_var"] - bn.running_var).abs() <= bounds["running_var"]).all()


def _uneven_step(rank: int, world_size: int, x: torch.Tensor, sizes: list, mode: str) -> dict:
    torch.set_num_threads(1)
    norm = SyncBatchNorm(x.shape[1], stats_mode=mode).double()
    start = sum(sizes[:rank])
    local = x[start : start + sizes[rank]]
    try:
        out = norm(local)
    except ValueError as error:
        return {"error": str(error)}
    return {"out": out.detach(), "running_mean": norm.running_mean}


def test_stats_mode_n_weights_processes_by_their_batch_and_allows_an_empty_one():
    # A head whose boxes all went to one process: 3 images there, 1 and 0 on the others.
    torch.manual_seed(1)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64) * 3 + 2
    results = run_distributed(_uneven_step, 3, x, [3, 1, 0], "N")
    bn = nn.BatchNorm2d(3).double()
    reference = bn(x).detach()
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), reference)
    for r in results:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)


def test_stats_mode_default_counts_each_process_equally_and_refuses_an_empty_one_everywhere():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64) * 3 + 2
    results = run_distributed(_uneven_step, 2, x, [3, 1], "default")
    parts = (x[:3], x[3:])
    mean = sum(p.mean((0, 2, 3)) for p in parts) / 2
    square = sum((p * p).mean((0, 2, 3)) for p in parts) / 2
    var = square - mean * mean
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), expected)
    # An empty process joins the exchange, then every process raises (none waits forever).
    results = run_distributed(_uneven_step, 2, x, [4, 0], "default")
    for r in results:
        assert "1 process(es) had an empty batch" in r["error"]
        assert "stats_mode='N'" in r["error"]


def test_stats_mode_is_checked():
    with pytest.raises(ValueError, match="stats_mode is 'sum'"):
        SyncBatchNorm(3, stats_mode="sum")
