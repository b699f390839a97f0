#!/usr/bin/env python
"""The collectives of one training step per scheme on P processes: count, bytes, time.

For each process count P the script spawns P processes (gloo on CPU, NCCL with --device cuda),
builds the R-50 Mask R-CNN of tools/benchmark.py for each scheme inside DistributedDataParallel,
and times training steps on a fixed synthetic batch per process while
:class:`norm_det.utils.collectives.CollectiveCounter` counts the statistics collectives the
layers make (DDP's own gradient all-reduce runs in C++ and is given as the model's gradient
bytes beside them). Rank 0 prints, per step: the collectives, the bytes each process sends into
them, their time and share of the step, and the bytes over the gradient bytes.

    python tools/benchmark_collectives.py --processes 1 2 4 --schemes NDPP SyncBN
    python tools/benchmark_collectives.py --processes 2 --size 320 --steps 3 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from norm_det.benchmarks.models import PRESETS, scheme_config, synthetic_batch, training_step
from norm_det.layers.distributed import send_upper_triangles
from norm_det.modeling import build_model
from norm_det.solver import build_optimizer
from norm_det.utils.collectives import CollectiveCounter, gradient_bytes

MB = 1e6
FULL = "full-exchange"


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        workload = PRESETS["r50"]["mask_rcnn"]
        workload = type(workload)(**{**workload.__dict__, "size": args.size, "images": 1})
        rows = {}
        for candidate in args.schemes:
            scheme, _, exchange = candidate.partition(" ")
            send_upper_triangles(exchange != FULL)
            cfg = scheme_config(workload, scheme, str(device), inference=False)
            torch.manual_seed(0)
            model = build_model(cfg).train()
            optimizer = build_optimizer(cfg, model)
            wrapped = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
            images, targets = synthetic_batch(workload, classes, device, seed=rank)
            step = training_step(wrapped, optimizer, images, targets)
            step()  # warm-up
            times, counts = [], []
            for _ in range(args.steps):
                dist.barrier()
                with CollectiveCounter() as counter:
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                counts.append(counter)
            rows[candidate] = {
                "step_s": statistics.median(times),
                "calls": counts[-1].calls,
                "bytes": counts[-1].bytes,
                "collective_s": statistics.median(c.seconds for c in counts),
                "gradient_bytes": gradient_bytes(model),
            }
        if rank == 0:
            results[world] = rows
    finally:
        dist.destroy_process_group()


def _candidates(args: argparse.Namespace) -> list[str]:
    """The schemes, each also with the whole-matrix exchange when --full-exchange is given."""
    if not args.full_exchange:
        return list(args.schemes)
    return [c for s in args.schemes for c in (s, f"{s} {FULL}")]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(args: argparse.Namespace) -> dict[int, dict[str, dict[str, float]]]:
    """``{P: {scheme: step_s, calls, bytes, collective_s, gradient_bytes}}`` from rank 0."""
    with mp.Manager() as manager:
        results = manager.dict()
        for world in args.processes:
            print(f"P = {world}: {', '.join(args.schemes)}", file=sys.stderr, flush=True)
            mp.spawn(_worker, args=(world, _free_port(), args, results), nprocs=world)
        return dict(results)


def markdown(results: dict[int, dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        f"Mask R-CNN R-50-FPN, 1 image of {args.size}x{args.size} per process, per training "
        f"step (median of {args.steps}), {args.device}:",
        "",
        "| P | scheme | step s | collectives | MB sent in | collective s | share of step "
        "| gradient MB | statistics / gradient bytes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world in sorted(results):
        for scheme, row in results[world].items():
            share = row["collective_s"] / row["step_s"] if row["step_s"] else 0.0
            lines.append(
                f"| {world} | {scheme} | {row['step_s']:.2f} | {row['calls']} | "
                f"{row['bytes'] / MB:.1f} | {row['collective_s']:.2f} | {100 * share:.0f}% | "
                f"{row['gradient_bytes'] / MB:.1f} | "
                f"{row['bytes'] / row['gradient_bytes']:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--schemes", nargs="+", default=["NDPP", "SyncBN", "FrozenBN"])
    parser.add_argument("--size", type=int, default=256, help="image side")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads, shared by all")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument(
        "--full-exchange",
        action="store_true",
        help=f"also time each scheme ('<scheme> {FULL}') sending whole moment matrices",
    )
    args = parser.parse_args(argv)
    args.schemes = _candidates(args)
    if any(p < 1 for p in args.processes):
        parser.error(f"--processes must be >= 1; got {args.processes}")
    if args.device == "cuda" and torch.cuda.device_count() < max(args.processes):
        parser.error(
            f"--device cuda: {max(args.processes)} processes need as many GPUs; "
            f"{torch.cuda.device_count()} available"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(markdown(measure(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
