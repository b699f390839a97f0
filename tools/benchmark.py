#!/usr/bin/env python
"""Training-step time and peak memory of every scheme, and inference time of its fused model.

For each architecture (Mask R-CNN, DeepLabv3) the script builds one model per scheme — every
norm key of the architecture set to that scheme — on a fixed synthetic batch, and times one
training step (forward, the layers' extra losses, backward, the layers' after-backward hooks,
the optimizer step) of all of them in alternating rounds. A scheme's ratio is the median over
rounds of its time divided by the baseline's time in the same round (FrozenBN for Mask R-CNN,
BN for DeepLab), for wall-clock and for process CPU time (:mod:`norm_det.utils.benchmark`).

Peak memory is measured in a fresh process per (architecture, scheme): after one warm-up step,
the growth of the resident-set high-water mark during one step (glibc's mmap threshold fixed
so that freed blocks leave the process), or ``torch.cuda.max_memory_allocated`` on CUDA.

Inference: every scheme's model is fused (:func:`norm_det.surgery.fuse`) and timed in eval mode
against its plain twin, the model built with plain convolutions everywhere (scheme ``none``)
holding the fused weights; Mask R-CNN's score threshold and NMS are switched off so that every
model carries the same number of proposals and detections (100 per image) through its heads.
Target: ratio 1.00 within 0.03, for the schemes that fold into plain layers; a fused model that
keeps a per-sample normalization (GroupNorm, ND++'s input standardization) is reported without
a verdict (:func:`kept_normalization`).

    python tools/benchmark.py                              # both architectures, all schemes
    python tools/benchmark.py --archs mask_rcnn --schemes FrozenBN NDPP PWS --repeats 7
    python tools/benchmark.py --preset quick --json out.json --markdown out.md
    python tools/benchmark.py --device cuda                # GPU: CUDA peak memory

The measurements are library code, :mod:`norm_det.benchmarks.models`; docs/benchmarks.md holds
the measured tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# Spinning OpenMP workers measure the shared machine's scheduler, not the models
# (tools/benchmark_layers.py); this must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from norm_det.benchmarks.models import (
    AGC_SUFFIX,
    MEMORY_CHILD_ENV,
    Workload,
    candidate_schemes,
    describe_machine,
    inference_markdown,
    inference_rows,
    measure_inference,
    measure_training,
    memory_of_step,
    select_workloads,
    training_markdown,
    training_rows,
)


def measure_memory_in_subprocess(
    workload: Workload, scheme: str, args: argparse.Namespace
) -> float | None:
    """:func:`memory_of_step` in a fresh Python process; ``None`` (with a warning) on failure."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        workload.arch,
        scheme,
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--size",
        str(workload.size),
        "--images",
        str(workload.images),
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, **MEMORY_CHILD_ENV}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        print(
            f"warning: memory of {workload.arch} / {scheme} not measured "
            f"(exit code {result.returncode}): {result.stderr.strip()[-500:]}",
            file=sys.stderr,
        )
        return None
    return float(json.loads(lines[-1])["peak_bytes"])


def _workloads(args: argparse.Namespace) -> list[Workload]:
    return select_workloads(args.preset, args.archs, args.size, args.images)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["mask_rcnn", "deeplab"])
    parser.add_argument("--schemes", nargs="+", default=None, help="default: all registered")
    parser.add_argument("--preset", default="r50", help="r50 (default) or quick")
    parser.add_argument("--size", type=int, default=None, help="image side (preset's default)")
    parser.add_argument("--images", type=int, default=None, help="images per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed training rounds")
    parser.add_argument(
        "--inference-repeats", type=int, default=9, help="timed inference rounds (cheaper)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument(
        "--agc",
        action="store_true",
        help="also time every scheme's training step with adaptive gradient clipping "
        f"(candidates '<scheme>{AGC_SUFFIX}', lambda 0.01)",
    )
    parser.add_argument("--no-inference", action="store_true", help="skip fused inference")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the tables as markdown here")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("ARCH", "SCHEME"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build or machine")
    if args.memory_child:
        arch, scheme = args.memory_child
        args.archs = [arch]
        workload = _workloads(args)[0]
        print(json.dumps({"peak_bytes": memory_of_step(workload, scheme, device)}))
        return 0

    results: dict = {"machine": describe_machine(device), "training": {}, "inference": {}}
    tables = []
    for workload in _workloads(args):
        schemes = candidate_schemes(args.schemes, workload, args.agc)
        info = {"title": workload.title, "size": workload.size, "images": workload.images}
        print(f"{workload.title}: training steps of {', '.join(schemes)}", file=sys.stderr)
        timings = measure_training(workload, schemes, args.repeats, args.warmup, device)
        memory: dict[str, float | None] = {}
        if not args.no_memory:
            for scheme in (n for n in schemes if not n.endswith(AGC_SUFFIX)):
                print(f"  memory: {scheme}", file=sys.stderr, flush=True)
                memory[scheme] = measure_memory_in_subprocess(workload, scheme, args)
        rows = training_rows(workload, timings, memory)
        results["training"][workload.arch] = {**info, "baseline": workload.baseline, "rows": rows}
        tables.append(training_markdown(workload, rows))
        print(tables[-1] + "\n", flush=True)
        if not args.no_inference:
            # "none" against itself: the measurement's noise floor.
            # Clipping changes training only.
            plain = [n for n in schemes if not n.endswith(AGC_SUFFIX)]
            timings = measure_inference(
                workload, plain, args.inference_repeats, args.warmup, device
            )
            rows = inference_rows(timings)
            results["inference"][workload.arch] = {**info, "rows": rows}
            tables.append(inference_markdown(workload, rows))
            print(tables[-1] + "\n", flush=True)
    results["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
