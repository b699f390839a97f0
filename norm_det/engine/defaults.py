"""What every training script shares: its command line and its setup.

``python tools/train_net.py --config-file X.yaml [--num-gpus N] [--resume] [--eval-only]
[KEY VALUE ...]``, as in detectron2.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from norm_det.files import atomic_write
from norm_det.solver import (
    describe_batch,
    describe_scaling,
    describe_schedule,
    images_per_pass,
    scale_to_world_size,
)
from norm_det.utils.comm import all_gather_object, get_rank, get_world_size, synchronize

__all__ = ["default_argument_parser", "default_setup", "seed_all_rng", "setup_logger"]

logger = logging.getLogger(__name__)

_EXAMPLES = """\
examples:
  train on one process:      %(prog)s --config-file mask_rcnn_ndpp.yaml
  train on 8 GPUs:           %(prog)s --config mask_rcnn_ndpp.yaml --num-gpus 8
  with torchrun:             torchrun --nproc-per-node 8 %(prog)s --config mask_rcnn_ndpp.yaml
  change config keys:        %(prog)s --config X.yaml SOLVER.BASE_LR 0.01 OUTPUT_DIR out/x
  continue a stopped run:    %(prog)s --config X.yaml --resume
  evaluate weights:          %(prog)s --config X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
"""


def _positive_seconds(text: str) -> float:
    """The value of ``--dist-timeout``: a positive number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        # argparse prefixes "argument --dist-timeout: ".
        raise argparse.ArgumentTypeError(
            f"got {text!r}; expected a positive, finite number of seconds"
        )
    return seconds


def default_argument_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The arguments of ``tools/train_net.py``."""
    parser = argparse.ArgumentParser(
        description=description or "Train or evaluate a norm_det model.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-file",
        "--config",
        dest="config_file",
        default="",
        metavar="FILE",
        help="a YAML config: a path, or a file name found under configs/",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in OUTPUT_DIR (MODEL.WEIGHTS is then ignored)",
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS on DATASETS.TEST"
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes to start on this machine: one per GPU, or CPU workers with gloo",
    )
    parser.add_argument(
        "--dist-url", default="auto", help="rendezvous of spawned workers (auto: a free port)"
    )
    parser.add_argument(
        "--dist-backend",
        default="auto",
        choices=("auto", "nccl", "gloo"),
        help="torch.distributed backend (auto: NCCL with CUDA, gloo without)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=_positive_seconds,
        default=1800.0,
        metavar="SECONDS",
        help="how long a process waits in a collective for the others before it stops with an "
        "error naming the ranks that did not answer (spawned workers and torchrun alike; "
        "default: %(default)g)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. SOLVER.BASE_LR 0.01 MODEL.RESNETS.NORM GN",
    )
    return parser


def setup_logger(output_dir: str | os.PathLike | None, rank: int = 0) -> logging.Logger:
    """Log ``norm_det.*`` to the console (INFO on rank 0, warnings elsewhere) and to
    ``output_dir/log.txt`` (``log.txt.rank<r>`` for rank ``r > 0``)."""
    root = logging.getLogger("norm_det")
    root.setLevel(logging.INFO)
    root.propagate = False
    # Replace the handlers of an earlier call (a second run in the same process).
    for handler in list(root.handlers):
        if getattr(handler, "_norm_det", False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(
        f"[%(asctime)s {'' if rank == 0 else f'rank{rank} '}%(name)s] %(message)s", "%H:%M:%S"
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    handlers[0].setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if output_dir is not None:
        name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / name))
    for handler in handlers:
        handler._norm_det = True
        handler.setFormatter(formatter)
        root.addHandler(handler)
    return root


def seed_all_rng(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _recorded_seed(output_dir: Path) -> int | None:
    """The non-negative ``SEED`` of ``output_dir/config.yaml``, or None when there is none."""
    saved = output_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:
        seed = (yaml.safe_load(saved.read_text()) or {}).get("SEED", -1)
    except (yaml.YAMLError, AttributeError) as err:
        raise ValueError(
            f"'{saved}' (the config recorded by an earlier run) is not a readable config: {err}"
        ) from err
    return seed if isinstance(seed, int) and seed >= 0 else None


def _resolve_seed(cfg, *, reuse_recorded: bool) -> int:
    """``cfg.SEED``; when negative, the seed recorded in ``OUTPUT_DIR`` (when resuming or
    evaluating), else a fresh one, the same on every process."""
    if cfg.SEED >= 0:
        return cfg.SEED
    recorded = _recorded_seed(Path(cfg.OUTPUT_DIR)) if reuse_recorded else None
    if recorded is not None:
        return recorded
    seed = int.from_bytes(os.urandom(4), "little") % 2**31
    return all_gather_object(seed)[0]


# SOLVER keys a resumed run reads from its config rather than from the checkpoint's optimizer
# and scheduler states: they may change on --resume.
RESUMABLE_SOLVER_KEYS = ("MAX_ITER", "CHECKPOINT_PERIOD")


def _flat(node: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_overrides(cfg, output_dir: Path) -> None:
    """Refuse ``--resume`` with SOLVER settings the checkpoint would silently override.

    A resumed run restores the optimizer's and the LR scheduler's states, which carry the
    learning rate, momentum, weight decay, steps and warmup they were built with: a changed
    ``SOLVER.BASE_LR`` or ``SOLVER.STEPS`` would be printed in the config and not happen. Keys
    in :data:`RESUMABLE_SOLVER_KEYS` take effect and may change.

    Raises:
        ValueError: the resumed run's ``config.yaml`` has other values for such keys; the
            message lists them, with both values.
    """
    saved = output_dir / "config.yaml"
    resumable = (output_dir / "last_checkpoint").is_file() or any(output_dir.glob("model_*.pth"))
    if not (saved.is_file() and resumable):
        return
    recorded = _flat((yaml.safe_load(saved.read_text()) or {}).get("SOLVER", {}), "SOLVER.")
    current = _flat(yaml.safe_load(cfg.dump()).get("SOLVER", {}), "SOLVER.")
    changed = [
        f"{key}: {recorded[key]!r} in the run, {current.get(key)!r} now"
        for key in sorted(recorded)
        if key.split(".")[1] not in RESUMABLE_SOLVER_KEYS and recorded[key] != current.get(key)
    ]
    if changed:
        raise ValueError(
            f"--resume of '{output_dir}' with a changed solver ({'; '.join(changed)}): the "
            "checkpoint's optimizer and LR schedule would override these, so they would not "
            f"take effect. Resume without them (as recorded in '{saved}'), or start a new "
            "OUTPUT_DIR from the checkpoint's weights (MODEL.WEIGHTS <checkpoint>) with them. "
            f"{', '.join('SOLVER.' + k for k in RESUMABLE_SOLVER_KEYS)} may change on --resume."
        )


def default_setup(cfg, args: argparse.Namespace) -> None:
    """Prepare a training or evaluation process.

    Creates ``OUTPUT_DIR``, sets up logging, rescales the schedule when the config declares
    ``SOLVER.REFERENCE_WORLD_SIZE`` (:func:`norm_det.solver.scale_to_world_size`; ``cfg`` is
    updated in place), checks that the batch splits over the processes and accumulated passes,
    fixes ``SEED`` (a negative one is taken from ``OUTPUT_DIR/config.yaml`` when resuming or
    evaluating, else drawn), logs the config and the resolved schedule, writes
    ``OUTPUT_DIR/config.yaml`` (``config_eval.yaml`` with ``--eval-only``, which leaves the
    training run's record alone) and seeds the generators with ``SEED + rank``.
    """
    rank, world_size = get_rank(), get_world_size()
    output_dir = Path(cfg.OUTPUT_DIR)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    synchronize()
    setup_logger(output_dir, rank)
    logger.info(
        "process %d of %d; torch %s; arguments: %s", rank, world_size, torch.__version__, vars(args)
    )
    scaled = scale_to_world_size(cfg, world_size)
    images_per_pass(scaled, world_size)  # raises when the batch does not split
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    if scaled is not cfg:
        logger.info("batch-size scaling: %s", describe_scaling(cfg, scaled))
        cfg.merge_from_other_cfg(scaled)
    resume, eval_only = getattr(args, "resume", False), getattr(args, "eval_only", False)
    cfg.SEED = _resolve_seed(cfg, reuse_recorded=resume or eval_only)
    if was_frozen:
        cfg.freeze()
    if resume and not eval_only:
        check_resume_overrides(cfg, output_dir)
    logger.info("config:\n%s", cfg.dump())
    logger.info("schedule: %s; %s", describe_schedule(cfg), describe_batch(cfg, world_size))
    # config.yaml records how the weights in OUTPUT_DIR were trained; an evaluation writes its
    # own file so that a later --resume still trains on the recorded seed and recipe.
    record = "config_eval.yaml" if eval_only else "config.yaml"
    if rank == 0:
        atomic_write(output_dir / record, lambda f: f.write(cfg.dump().encode()))
    seed_all_rng(cfg.SEED + rank)
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
