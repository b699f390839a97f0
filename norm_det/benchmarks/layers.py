"""Forward+backward time and peak memory of each scheme's convolution against a plain Conv2d,
and where a step's time goes (``tools/benchmark_layers.py`` is the command line).

:func:`benchmark_shape` times ``C -> C`` ``k x k`` convolutions followed by each scheme's norm
(:func:`build_candidate`) in alternating rounds, each ratio the median over rounds of its time
over the plain convolution's in the same round (:mod:`norm_det.utils.benchmark`);
:func:`time_budget` sums the profiler's self time of a step by component (convolution kernels,
eigendecompositions, matrix products, other operations, Python and autograd).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from norm_det.schemes import build_conv_norm
from norm_det.utils.benchmark import (
    FIELD_SCHEMES,
    interleaved_times,
    peak_allocated,
    ratio_summary,
)

DEFAULT_SHAPES = ("2,256,64,3", "2,64,128,3", "2,256,64,1")
DEFAULT_SCHEMES = (
    "NDPP",
    "ND",
    "IterNorm",
    "BN",
    "GN",
    "GN+WS",
    "PWS",
    *FIELD_SCHEMES,
)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"N,C,H,k"`` -> ``(N, C, H, k)`` (square ``H x H`` input)."""
    try:
        n, c, h, k = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--shapes: expected N,C,H,k such as 2,256,64,3; got {text!r}") from None
    return n, c, h, k


def build_candidate(scheme: str | None, channels: int, kernel: int) -> nn.Module:
    """A scheme's conv (+ norm) ``C -> C``; ``None`` is the plain ``nn.Conv2d`` baseline."""
    if scheme is None:
        return nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
    # activation: a normalization-activation layer (FRN + TLU, EvoNorm, NF's scaled ReLU) is
    # timed with its activation, which the other schemes' norms leave to a ReLU not timed here.
    conv, norm = build_conv_norm(
        scheme, channels, channels, kernel, padding=kernel // 2, activation=True
    )
    return nn.Sequential(conv, norm)


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One training step of ``module`` without the optimizer: forward, backward."""

    def step() -> None:
        x.grad = None
        for parameter in module.parameters():
            parameter.grad = None
        module(x).backward(grad)

    return step


def benchmark_shape(
    shape: tuple[int, int, int, int],
    schemes: list[str],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> list[dict[str, float | str]]:
    n, channels, height, kernel = shape
    torch.manual_seed(0)
    names: list[str | None] = [None, *schemes]
    modules = {name: build_candidate(name, channels, kernel).to(device).train() for name in names}
    x = torch.randn(n, channels, height, height, device=device, requires_grad=True)
    grad = torch.randn(n, channels, height, height, device=device)
    steps = {name: step_fn(module, x, grad) for name, module in modules.items()}
    times = interleaved_times(steps, repeats, warmup, device)
    summary = ratio_summary(times, None)
    rows = []
    for name in names:
        rows.append(
            {
                "shape": f"N={n}, C={channels}, {height}x{height}, {kernel}x{kernel}",
                "scheme": "plain Conv2d" if name is None else name,
                "ms": summary[name]["ms"],
                "ratio": summary[name]["ratio"],
                "cpu_ratio": summary[name]["cpu_ratio"],
                "memory": peak_allocated(steps[name], device) / 2**20,
            }
        )
    return rows


# Time-budget components: profiler operator names (without "aten::") per component; other aten
# operators are "other ops", everything else (autograd nodes' Python, the engine) "Python".
BUDGET_COMPONENTS = {
    "conv": ("mkldnn_convolution", "convolution_backward", "cudnn_convolution", "slow_conv2d"),
    "eigh": ("_linalg_eigh", "linalg_eigh"),
    "products": ("mm", "bmm", "baddbmm", "addmm", "addbmm", "matmul", "mv", "addmv", "dot", "vdot"),
}
BUDGET_COLUMNS = (*BUDGET_COMPONENTS, "other ops", "Python")


def time_budget(step: Callable[[], None], repeats: int) -> dict[str, float]:
    """Profiler self time per step (ms) of each budget component, and their ``"total"``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(repeats):
            step()
    component_of = {op: name for name, ops in BUDGET_COMPONENTS.items() for op in ops}
    budget = dict.fromkeys(BUDGET_COLUMNS, 0.0)
    for event in profile.key_averages():
        if event.key.startswith("aten::"):
            component = component_of.get(event.key.removeprefix("aten::"), "other ops")
        else:
            component = "Python"
        budget[component] += event.self_cpu_time_total / 1e3 / repeats
    budget["total"] = sum(budget.values())
    return budget
