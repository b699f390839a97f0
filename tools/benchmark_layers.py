"""Forward+backward time and peak memory of each scheme's convolution against a plain Conv2d.

For every shape ``(N, C, H, k)`` the script builds ``C -> C`` ``k x k`` convolutions (padding
``k // 2``, stride 1) followed by each scheme's norm, and times ``forward + backward`` (the input
requires grad, as inside a network) on the same input and output gradient. Candidates are
measured in alternation, round after round, so that a shared machine's load drifts over all of
them alike; a candidate's ratio is the median over rounds of its time divided by the plain
convolution's time in the same round. The CPU-time ratio (process time, all threads) is the
same comparison of work done, which waiting for a busy machine's cores does not inflate.

    python tools/benchmark_layers.py [--shapes 2,256,64,3 2,64,128,3] [--schemes NDPP ND]
        [--repeats 15] [--device cpu|cuda] [--threads N] [--markdown] [--budget]

``--budget`` also prints where the time goes: the profiler's self time per step of each
candidate, summed by component (convolution kernels, eigendecompositions, matrix products,
other tensor operations, Python and autograd), in ms and as a fraction of the plain
convolution's step.
"""

from __future__ import annotations

import argparse
import os
import sys

# Between parallel regions idle OpenMP workers spin by default; on a shared machine they steal
# the cores both candidates need and the timings measure the scheduler, not the layers (the
# plain convolution itself ran 2x slower). Passive waiting must be chosen before torch loads;
# set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from norm_det.benchmarks.layers import (
    BUDGET_COLUMNS,
    DEFAULT_SCHEMES,
    DEFAULT_SHAPES,
    benchmark_shape,
    build_candidate,
    parse_shape,
    step_fn,
    time_budget,
)
from norm_det.schemes import available_schemes, get_scheme, normalize_scheme_name, parse_scheme_spec


def print_budget(shape: tuple[int, int, int, int], schemes: list[str], repeats: int) -> None:
    """The time budget of each scheme's step beside the plain convolution's (CPU only)."""
    n, channels, height, kernel = shape
    torch.manual_seed(0)
    x = torch.randn(n, channels, height, height, requires_grad=True)
    grad = torch.randn(n, channels, height, height)
    print(
        f"time budget, N={n}, C={channels}, {height}x{height}, {kernel}x{kernel}: profiler self ms"
    )
    print(f"per step ({repeats} steps; in parentheses: fraction of the plain convolution's step)")
    print(f"{'scheme':<14}" + "".join(f"{c:>19}" for c in (*BUDGET_COLUMNS, "total")))
    plain_total = None
    for name in [None, *schemes]:
        step = step_fn(build_candidate(name, channels, kernel).train(), x, grad)
        for _ in range(2):
            step()
        budget = time_budget(step, repeats)
        plain_total = plain_total or budget["total"]
        cells = (
            f"{budget[c]:8.1f} ({budget[c] / plain_total:5.2f}x)"
            for c in (*BUDGET_COLUMNS, "total")
        )
        print(
            f"{'plain Conv2d' if name is None else name:<14}" + "".join(f"{c:>19}" for c in cells)
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="N,C,H,k")
    parser.add_argument("--schemes", nargs="+", default=None, help="scheme names (options ok)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--budget", action="store_true", help="also print each scheme's time budget (CPU)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    known = {normalize_scheme_name(name) for name in available_schemes()}
    schemes = args.schemes or [
        s for s in DEFAULT_SCHEMES if normalize_scheme_name(parse_scheme_spec(s)[0]) in known
    ]
    for scheme in schemes:
        get_scheme(scheme)  # fail early on an unknown name or option
    shapes = [parse_shape(s) for s in args.shapes]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {load:.1f}, "
        f"{args.repeats} alternating rounds"
    )
    header = ("shape", "scheme", "fwd+bwd ms", "ratio", "CPU-time ratio", "peak MiB")
    widths = (28, 14, 10, 7, 14, 9)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    else:
        print(
            " ".join(
                f"{h:<{w}}" if i < 2 else f"{h:>{w}}"
                for i, (h, w) in enumerate(zip(header, widths))
            )
        )
    for shape in shapes:
        for row in benchmark_shape(shape, schemes, args.repeats, args.warmup, device):
            cells = (
                row["shape"],
                row["scheme"],
                f"{row['ms']:.1f}",
                f"{row['ratio']:.2f}x",
                f"{row['cpu_ratio']:.2f}x",
                f"{row['memory']:.0f}",
            )
            if args.markdown:
                print("| " + " | ".join(cells) + " |")
            else:
                print(
                    " ".join(
                        f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
                        for i, (c, w) in enumerate(zip(cells, widths))
                    )
                )
            sys.stdout.flush()
    if args.budget and device.type == "cpu":
        for shape in shapes:
            print_budget(shape, schemes, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
