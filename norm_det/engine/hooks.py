"""Hooks of the training loop: LR schedule, checkpoints, evaluation, metric writers, progress.

Registration order is execution order; :meth:`norm_det.engine.Trainer.build_hooks` registers
them as listed here, so that a checkpoint holds the scheduler state of the iterations it counts
and the writers see the evaluation metrics of the same iteration.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from norm_det.engine.checkpointer import Checkpointer, capture_rng_state, restore_rng_state
from norm_det.engine.precise_statistics import recompute_running_statistics
from norm_det.engine.train_loop import HookBase
from norm_det.files import atomic_write
from norm_det.utils.comm import is_main_process

__all__ = [
    "DiagnosticsHook",
    "EvalHook",
    "LRSchedulerHook",
    "MetricsWriter",
    "PeriodicCheckpointer",
    "PreciseStatisticsHook",
    "ProgressBar",
]

logger = logging.getLogger(__name__)


class LRSchedulerHook(HookBase):
    """Record the LR used by this iteration, then step the per-iteration scheduler.

    Args:
        optimizer: its first parameter group's LR is recorded as ``lr`` (all groups share the
            schedule).
        scheduler: stepped once per iteration.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler

    def after_step(self) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.trainer.storage.put_scalar("lr", lr, self.trainer.iter + 1, summary="last")
        self.scheduler.step()


class PreciseStatisticsHook(HookBase):
    """Re-estimate the running statistics at the current weights before every evaluation
    (every ``period`` iterations) and after the last iteration, before the final checkpoint.

    See :mod:`norm_det.engine.precise_statistics`. The pass draws ``num_batches`` batches from a
    fresh training loader and leaves the global random generators as it found them, so training
    continues (and a resumed run repeats an uninterrupted one) as without the pass.

    Args:
        model: the unwrapped model.
        data_loader: ``() -> iterable of batches``, called for each pass.
        forward: ``forward(model, batch)``, a training-mode forward.
        num_batches: batches per pass.
        period: iterations between passes, the evaluation period (0: only after the last one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Callable[[], Any],
        forward: Callable[[torch.nn.Module, Any], Any],
        num_batches: int,
        period: int,
    ) -> None:
        self.model = model
        self.data_loader = data_loader
        self.forward = forward
        self.num_batches = num_batches
        self.period = period

    def update(self) -> int:
        """One pass; returns the number of layers updated."""
        rng_state = capture_rng_state()
        try:
            return recompute_running_statistics(
                self.model, iter(self.data_loader()), self.forward, self.num_batches
            )
        finally:
            restore_rng_state(rng_state)

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done == self.trainer.max_iter or (self.period > 0 and done % self.period == 0):
            self.update()


class PeriodicCheckpointer(HookBase):
    """Save ``model_<iterations done>.pth`` every ``period`` iterations and ``model_final.pth``
    when training completes (never after an iteration that raised).

    Args:
        checkpointer: writes the files.
        period: iterations between checkpoints (0: only the final one).
    """

    def __init__(self, checkpointer: Checkpointer, period: int) -> None:
        self.checkpointer = checkpointer
        self.period = period

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period > 0 and done % self.period == 0 and done < self.trainer.max_iter:
            # The metrics not yet written: a resumed run's first line averages them too.
            metrics = self.trainer.storage.state_dict()
            self.checkpointer.save(f"model_{done:07d}", iteration=done, extra={"metrics": metrics})

    def after_train(self) -> None:
        if self.trainer.completed:
            self.checkpointer.save("model_final", iteration=self.trainer.max_iter)


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"coco_val": {"bbox": {"AP": 1.0}}}`` -> ``{"coco_val/bbox/AP": 1.0}``."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_results(value, name + "/"))
        else:
            flat[name] = float(value)
    return flat


class EvalHook(HookBase):
    """Evaluate every ``period`` iterations and after the last one.

    The evaluation leaves the global random generators as it found them, so that training draws
    the same numbers whatever the evaluation schedule (and a resumed run repeats an
    uninterrupted one).

    Args:
        period: iterations between evaluations (0: only at the end).
        eval_function: runs the evaluation and returns ``{dataset: {task: {metric: value}}}``
            (filled on rank 0; every process must call it).
    """

    def __init__(self, period: int, eval_function: Callable[[], Mapping[str, Any]]) -> None:
        self.period = period
        self.eval_function = eval_function
        self.latest_results: dict[str, Any] = {}

    def _evaluate(self) -> None:
        rng_state = capture_rng_state()
        try:
            results = dict(self.eval_function())
        finally:
            restore_rng_state(rng_state)
        self.latest_results = results
        done = self.trainer.iter + 1 if not self.trainer.completed else self.trainer.max_iter
        for name, value in flatten_results(results).items():
            self.trainer.storage.put_scalar(name, value, done, summary="all")

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period > 0 and done % self.period == 0 and done < self.trainer.max_iter:
            self._evaluate()

    def after_train(self) -> None:
        if self.trainer.completed:
            self._evaluate()


class MetricsWriter(HookBase):
    """Append the recorded scalars to ``metrics.jsonl`` and TensorBoard events (rank 0).

    One JSON object per line, ``{"iteration": n, name: value, ...}``; losses and timings are
    means over the iterations since the previous line, the LR is the latest (see
    :class:`norm_det.engine.metrics.MetricStorage`). On resume, lines and events after the
    resumed iteration (from the interrupted run) are dropped.

    Args:
        output_dir: where ``metrics.jsonl`` and the ``events.out.tfevents.*`` files go.
        period: iterations between writes; the last iteration is always written.
        tensorboard: also write TensorBoard events.
    """

    def __init__(self, output_dir: str | os.PathLike, period: int, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.period = max(1, period)
        self.tensorboard = tensorboard
        self._json_file = None
        self._tb_writer = None

    @property
    def json_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _drop_lines_after(self, iteration: int) -> int:
        """Keep the lines up to ``iteration``; a torn last line (a kill mid-write) is dropped.

        The file is rewritten atomically. A line that is not JSON before the last is an error
        naming the file and line: that is no torn write, and the file is left as it is.

        Returns:
            The iteration of the last line kept (0: none).
        """
        if not self.json_path.is_file():
            return 0
        lines = self.json_path.read_text().splitlines(keepends=True)
        kept, last = [], 0
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines) and not line.endswith("\n"):
                    logger.warning(
                        "%s: dropping its last line, cut short by an interrupted write: %r",
                        self.json_path,
                        line[:80],
                    )
                    continue
                raise ValueError(
                    f"'{self.json_path}' line {number} is not JSON ({line[:80]!r}); it is not "
                    "a torn last line, so --resume does not touch the file: fix or move it"
                ) from None
            if not isinstance(record, dict) or record.get("iteration", 0) <= iteration:
                kept.append(line)
                if isinstance(record, dict):
                    last = max(last, int(record.get("iteration", 0)))
        if len(kept) != len(lines):
            atomic_write(self.json_path, lambda f: f.write("".join(kept).encode()))
        return last

    def before_train(self) -> None:
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = self.trainer.start_iter
        written = self._drop_lines_after(start)
        # Restored from the checkpoint: what the interrupted run recorded after its last line.
        self.trainer.storage.discard_through(written)
        self._json_file = open(self.json_path, "a")  # noqa: SIM115 (closed in after_train)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_writer = SummaryWriter(
                str(self.output_dir), purge_step=start + 1 if start else None
            )
        if start > written and start % self.period == 0:
            # The checkpoint was taken just before the interrupted run wrote this line.
            self.write()

    def write(self) -> None:
        records = self.trainer.storage.drain()
        if self._json_file is None:
            return
        for iteration, scalars in records.items():
            # JSON has no NaN (COCO reports AP of an empty area range as NaN): write null.
            finite = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
            self._json_file.write(json.dumps({"iteration": iteration, **finite}) + "\n")
            if self._tb_writer is not None:
                for name, value in finite.items():
                    if value is not None:
                        self._tb_writer.add_scalar(name, value, iteration)
        self._json_file.flush()
        if self._tb_writer is not None:
            self._tb_writer.flush()

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done % self.period == 0 or done == self.trainer.max_iter:
            self.write()

    def after_train(self) -> None:
        self.write()
        if self._json_file is not None:
            self._json_file.close()
            self._json_file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None


class DiagnosticsHook(HookBase):
    """Run training diagnostics on the first iteration and every ``period``-th (rank 0).

    On a probed iteration ``diagnostics.start`` installs its forward hooks before the step and
    ``diagnostics.finish`` removes them after the optimizer step and returns the scalars, which
    are recorded at that iteration (summary ``"all"``) for :class:`MetricsWriter`. Register it
    before :class:`EvalHook`, so that no evaluation runs while its hooks are installed.

    Args:
        diagnostics: a :class:`norm_det.diagnostics.ModelDiagnostics` on the unwrapped model.
        period: iterations between probes (>= 1).
    """

    def __init__(self, diagnostics: Any, period: int) -> None:
        if period < 1:
            raise ValueError(f"DIAGNOSTICS.PERIOD must be >= 1; got {period}")
        self.diagnostics = diagnostics
        self.period = period
        self._active = False

    def _probed(self, done: int) -> bool:
        return is_main_process() and (done == 1 or done % self.period == 0)

    def before_train(self) -> None:
        if is_main_process():
            self.diagnostics.set_reference()

    def before_step(self) -> None:
        done = self.trainer.iter + 1
        self._active = self._probed(done)
        if self._active:
            self.diagnostics.start(getattr(self.trainer, "optimizer", None), iteration=done)

    def after_step(self) -> None:
        if not self._active:
            return
        self._active = False
        done = self.trainer.iter + 1
        for name, value in self.diagnostics.finish().items():
            self.trainer.storage.put_scalar(name, value, done, summary="all")

    def after_train(self) -> None:
        self._active = False
        self.diagnostics.detach()


class ProgressBar(HookBase):
    """A tqdm bar over the iterations (rank 0), showing the latest loss and LR."""

    def __init__(self) -> None:
        self._bar = None

    def before_train(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=self.trainer.max_iter,
            initial=self.trainer.start_iter,
            desc="train",
            unit="it",
            dynamic_ncols=True,
            disable=not is_main_process(),
        )

    def after_step(self) -> None:
        latest = self.trainer.storage.latest()
        postfix = {k: f"{latest[k]:.4g}" for k in ("total_loss", "lr") if k in latest}
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
