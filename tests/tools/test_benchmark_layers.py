"""norm_det.benchmarks.layers (tools/benchmark_layers.py): the time budget attributes a step's
profiled time to components."""

from __future__ import annotations

import torch

import norm_det.benchmarks.layers as benchmark_layers


def budget_of(scheme: str | None) -> dict[str, float]:
    torch.manual_seed(0)
    module = benchmark_layers.build_candidate(scheme, 16, 3).train()
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    step = benchmark_layers.step_fn(module, x, torch.randn(2, 16, 12, 12))
    step()
    return benchmark_layers.time_budget(step, 2)


def test_time_budget_components_sum_to_the_total() -> None:
    plain, ndpp = budget_of(None), budget_of("NDPP")
    for budget in (plain, ndpp):
        parts = sum(budget[c] for c in benchmark_layers.BUDGET_COLUMNS)
        assert budget["total"] > 0 and abs(parts - budget["total"]) < 1e-9
    # A plain convolution is convolution kernels (and a little glue); ND++ adds the
    # eigendecomposition of its 144 x 144 covariance and matrix products.
    assert plain["eigh"] == 0.0 and plain["products"] == 0.0 and plain["conv"] > 0
    assert ndpp["eigh"] > 0 and ndpp["products"] > 0 and ndpp["conv"] > 0
