"""The training loop: iterations with hooks around them, and one optimizer step per iteration.

:class:`TrainerBase` runs ``before_train``, then for every iteration ``before_step``,
``run_step``, ``after_step``, then ``after_train`` (also when an iteration raised) on its hooks.
:class:`SimpleTrainer` implements ``run_step`` for a model that returns a dict of losses; it knows
no normalization scheme: layers take part through the protocol of :mod:`norm_det.layers` (work
at every optimizer step, which any loop runs; extra loss terms and after-backward hooks, which
only this loop runs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from norm_det.engine.checkpointer import restore_rng_state
from norm_det.engine.distributed_model import unwrap_model
from norm_det.engine.metrics import MetricStorage
from norm_det.engine.training_batches import TrainingBatches
from norm_det.layers import (
    prepare_optimizer_step,
)
from norm_det.layers.distributed import get_world_size

__all__ = ["HookBase", "NonFiniteLossError", "SimpleTrainer", "TrainerBase", "move_to_device"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term was NaN or infinite; training stopped before the update."""


class HookBase:
    """Called by :class:`TrainerBase` around training and every iteration.

    ``self.trainer`` is set on registration. ``trainer.iter`` is the index of the current
    iteration in ``before_step``/``after_step`` (so ``trainer.iter + 1`` iterations are done after
    it) and, in ``after_train``, the number of iterations done (``trainer.max_iter`` when training
    completed).
    """

    trainer: TrainerBase

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


class TrainerBase:
    """Iterations from ``start_iter`` to ``max_iter`` with hooks; subclasses define ``run_step``."""

    def __init__(self) -> None:
        self.hooks: list[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.storage = MetricStorage()

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        """Append ``hooks`` (``None`` entries are skipped); they run in registration order."""
        for hook in hooks:
            if hook is not None:
                hook.trainer = self
                self.hooks.append(hook)

    @property
    def completed(self) -> bool:
        """Whether all ``max_iter`` iterations have run."""
        return self.iter >= self.max_iter

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``."""
        logger.info("training from iteration %d to %d", start_iter, max_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        raised: BaseException | None = None
        try:
            for hook in self.hooks:
                hook.before_train()
            for self.iter in range(start_iter, max_iter):
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                for hook in self.hooks:
                    hook.after_step()
            self.iter = max_iter
        except BaseException as error:
            raised = error
            raise
        finally:
            self._after_train(raised)

    def _after_train(self, raised: BaseException | None) -> None:
        """Every hook's ``after_train``, even when one raises; training's own error wins.

        A hook's error is logged; it is raised (the first one) only when training itself
        succeeded, else noted on training's error, which propagates unmasked.
        """
        failures: list[tuple[HookBase, Exception]] = []
        for hook in self.hooks:
            try:
                hook.after_train()
            except Exception as error:  # every hook gets its turn
                logger.exception("%s.after_train failed", type(hook).__name__)
                failures.append((hook, error))
        if not failures:
            return
        if raised is None:
            raise failures[0][1]
        for hook, error in failures:
            raised.add_note(f"then {type(hook).__name__}.after_train failed too: {error!r}")

    def run_step(self) -> None:
        raise NotImplementedError


def move_to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside lists, tuples and dicts moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def mean_over_processes(loss_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The loss terms as floats, averaged over processes (in sorted name order)."""
    # The logged numbers, and one NaN anywhere stops every process.
    names = sorted(loss_dict)
    values = torch.stack([loss_dict[n].detach().float().reshape(()) for n in names])
    if get_world_size() > 1:
        dist.all_reduce(values)
        values /= get_world_size()
    return dict(zip(names, values.tolist()))


def check_finite_losses(
    values: Mapping[str, float],
    iteration: int,
    pass_index: int,
    passes: int,
    checkpoint_hint: Callable[[], str],
) -> None:
    """Stop with :class:`NonFiniteLossError` when a loss term of ``values`` is NaN or inf.

    Args:
        iteration: the iteration (counted from 1) the message names.
        pass_index, passes: which of the accumulated passes it was, of how many.
        checkpoint_hint: ``() -> str``, where the last good checkpoint is (asked only on error).
    """
    bad = {n: v for n, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    good = ", ".join(f"{n}={v:.4g}" for n, v in values.items() if math.isfinite(v))
    where = f"iteration {iteration}"
    if passes > 1:
        where += f" (accumulated pass {pass_index + 1} of {passes})"
    raise NonFiniteLossError(
        f"non-finite loss at {where}: "
        + ", ".join(f"{n}={v}" for n, v in bad.items())
        + (f" (finite: {good})" if good else "")
        + f". Training stopped before updating the model; {checkpoint_hint()}. "
        "Lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or enable "
        "SOLVER.CLIP_GRADIENTS, then --resume."
    )


def gradient_sync(model: nn.Module, last_pass: bool) -> contextlib.AbstractContextManager:
    """DistributedDataParallel averages gradients over processes in the last pass only."""
    if last_pass or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    grad_clipper: Callable | None,
    model: nn.Module,
    values: dict[str, float],
) -> Any:
    """The layers' step work, gradient clipping and the step, on the accumulated gradient.

    The penalties the layers apply at the step are added to ``values``.

    Returns:
        What ``grad_clipper`` returns (the total gradient norm), or None without one.
    """
    # Before clipping, so that the clipped norm is that of the gradient the step uses.
    for name, value in prepare_optimizer_step(optimizer).items():
        values[name] = values.get(name, 0.0) + value.item()
    grad_norm = None
    if grad_clipper is not None:
        grad_norm = grad_clipper(model.parameters())
    optimizer.step()
    return grad_norm


def record_step(
    storage: MetricStorage,
    done: int,
    values: Mapping[str, float],
    grad_norm: Any,
    data_time: float,
    start: float,
) -> None:
    """The step's losses, their total, the gradient norm (when known) and the times, recorded
    as of ``done`` iterations; ``start`` is the step's ``time.perf_counter()``."""
    for name, value in values.items():
        storage.put_scalar(name, value, done)
    storage.put_scalar("total_loss", sum(values.values()), done)
    if grad_norm is not None:
        storage.put_scalar("grad_norm", grad_norm, done)
    storage.put_scalar("data_time", data_time, done)
    storage.put_scalar("time", time.perf_counter() - start, done)


class SimpleTrainer(TrainerBase):
    """One optimizer step per iteration on ``accumulate_steps`` batches from an infinite loader.

    Per iteration, for each of the ``accumulate_steps`` passes: draw ``(images, targets)``;
    ``loss_dict = model(images, targets)``; stop with :class:`NonFiniteLossError` if any
    term is NaN or infinite on any process; backward of the sum divided by ``accumulate_steps``
    (so the gradients add up to the mean over the passes; under DistributedDataParallel only the
    last pass averages them over processes). Then, once, on the accumulated gradient: the
    layers' optimizer-step work (:func:`norm_det.layers.prepare_optimizer_step`: CZM's LUMA
    gradient and CZMG, which the step would otherwise run itself, after the clipping), gradient
    clipping and the optimizer step. The recorded losses are means over the passes and
    processes, with the penalties the layers applied at the step (``loss_luma``) added.

    Layers with batch statistics (BN, SyncBN, ND/ND++, IterNorm) normalize each pass with its
    own statistics and update their running averages once per pass (docs/large_batch.md).

    Args:
        model: returns ``dict[str, scalar Tensor]`` of losses in training mode; may be wrapped in
            DistributedDataParallel.
        data_loader: an iterable yielding ``(images: list[Tensor], targets: list[dict])``
            forever. If it has ``set_start_iter(n)``, resuming calls it to continue at batch
            ``n``; otherwise the first ``n`` batches are drawn and dropped.
        optimizer: steps the model's parameters.
        grad_clipper: called with the parameters after the hooks, before the step; may return
            the total gradient norm, which is recorded as ``grad_norm``.
        accumulate_steps: forward/backward passes (loader batches) per optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        grad_clipper=None,
        accumulate_steps: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(accumulate_steps, int) or accumulate_steps < 1:
            raise ValueError(
                f"accumulate_steps (SOLVER.ACCUMULATE_STEPS) is {accumulate_steps!r}; "
                "expected an integer >= 1"
            )
        model.train()
        self.model = model
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.grad_clipper = grad_clipper
        self.accumulate_steps = accumulate_steps
        self._batches: TrainingBatches | None = None

    @property
    def device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def train(
        self, start_iter: int, max_iter: int, *, rng_state: Mapping[str, Any] | None = None
    ) -> None:
        """Run iterations ``start_iter .. max_iter - 1``.

        Args:
            rng_state: the random generator states saved with the checkpoint of ``start_iter``;
                restored after the loader is positioned, so that the run continues exactly as an
                uninterrupted one (which had drawn the same batches from the same generators).
        """
        start_batch = start_iter * self.accumulate_steps
        self._batches = TrainingBatches(self.data_loader, start_batch, lambda: self.iter + 1)
        if rng_state is not None:
            restore_rng_state(rng_state)
        super().train(start_iter, max_iter)

    def last_checkpoint_hint(self) -> str:
        """Where the last good checkpoint is, for the non-finite loss message."""
        return "no checkpointer is attached"

    def losses(self, images: Sequence[torch.Tensor], targets: Sequence[dict]) -> dict:
        """The model's loss dict for a batch."""
        loss_dict = self.model(images, targets)
        if not isinstance(loss_dict, Mapping):
            raise ValueError(
                f"{type(unwrap_model(self.model)).__name__} returned {type(loss_dict).__name__} in "
                "training mode; expected a dict of scalar loss tensors"
            )
        return dict(loss_dict)

    def run_step(self) -> None:
        start = time.perf_counter()
        steps = self.accumulate_steps
        data_time = 0.0
        values: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for index in range(steps):
            fetch = time.perf_counter()
            images, targets = move_to_device(self._batches.next(), self.device)
            data_time += time.perf_counter() - fetch
            with gradient_sync(self.model, last_pass=index == steps - 1):
                loss_dict = self.losses(images, targets)
                pass_values = mean_over_processes(loss_dict)
                hint = self.last_checkpoint_hint
                check_finite_losses(pass_values, self.iter + 1, index, steps, hint)
                total = sum(loss_dict.values())
                (total / steps if steps > 1 else total).backward()
            for name, value in pass_values.items():
                values[name] = values.get(name, 0.0) + value / steps
        grad_norm = optimizer_step(self.optimizer, self.grad_clipper, self.model, values)
        record_step(self.storage, self.iter + 1, values, grad_norm, data_time, start)
