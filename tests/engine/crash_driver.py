"""Train the toy detector in a process of its own and, on request, kill it with SIGKILL.

    python -m tests.engine.crash_driver OUTPUT_DIR [--resume] [--kill WHERE:N]

``WHERE:N`` kills the process without any clean-up (``os.kill(getpid(), SIGKILL)``, as kill -9):
``step:N`` before iteration N runs; ``checkpoint:N`` halfway through writing the N-th checkpoint
file; ``pointer:N`` after the N-th checkpoint file was written but before ``last_checkpoint``
names it; ``metrics:N`` halfway through the N-th write of ``metrics.jsonl``. Used by
``tests/engine/test_kill_resume.py``.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
from types import SimpleNamespace

import torch

import norm_det.engine.checkpointer as checkpoint_module
from norm_det import files
from norm_det.engine import HookBase, default_setup
from norm_det.engine.hooks import MetricsWriter
from tests.engine.toys import ToyTrainer, toy_cfg

OPTS = (
    "SOLVER.MAX_ITER",
    "8",
    "SOLVER.CHECKPOINT_PERIOD",
    "2",
    "LOG_PERIOD",
    "3",
    "SOLVER.LR_SCHEDULER_NAME",
    "WarmupCosineLR",
)


class NoisyToyTrainer(ToyTrainer):
    noise = 0.05  # draws from the global generator: a resumed run must restore it
    flip = True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillBeforeStep(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def before_step(self) -> None:
        if self.trainer.iter == self.iteration:
            _die()


def _install_kill(where: str, count: int, trainer: ToyTrainer) -> None:
    calls = {"n": 0}

    def nth() -> bool:
        calls["n"] += 1
        return calls["n"] == count

    if where == "step":
        trainer.register_hooks([_KillBeforeStep(count)])
    elif where == "checkpoint":

        def save(obj, path):
            if not nth():
                return files.atomic_save(obj, path)
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()

            def half(file):
                file.write(data[: len(data) // 2])
                file.flush()
                _die()

            files.atomic_write(path, half)

        checkpoint_module.atomic_save = save
    elif where == "pointer":
        original = checkpoint_module.atomic_write

        def write(path, writer):
            if path.name == checkpoint_module.LAST_CHECKPOINT and nth():
                _die()
            return original(path, writer)

        checkpoint_module.atomic_write = write
    elif where == "metrics":
        original_write = MetricsWriter.write

        def torn(self):
            if self._json_file is not None and nth():
                self._json_file.write('{"iteration": 99, "total_lo')
                self._json_file.flush()
                _die()
            return original_write(self)

        MetricsWriter.write = torn
    else:
        raise ValueError(f"--kill: unknown place {where!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill", default="")
    args = parser.parse_args()
    cfg = toy_cfg(args.output_dir, *OPTS)
    default_setup(cfg, SimpleNamespace(resume=args.resume, eval_only=False))
    trainer = NoisyToyTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.kill:
        where, count = args.kill.split(":")
        _install_kill(where, int(count), trainer)
    trainer.train()


if __name__ == "__main__":
    main()
