"""The config-driven trainer: builds model, optimizer, data, schedule and hooks from a config.

The ``build_*`` methods are the extension points: the parts' classmethods come from
:class:`norm_det.engine.builders.TrainerBuilders` (the library builders, imported when called, so
that a subclass with its own builders needs none of them), the hooks' are here; a subclass
replaces any of them to train something else with the same loop, checkpoints and writers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from norm_det.engine.builders import TrainerBuilders, model_device
from norm_det.engine.checkpointer import Checkpointer
from norm_det.engine.distributed_model import unwrap_model, wrap_model
from norm_det.engine.hooks import (
    DiagnosticsHook,
    EvalHook,
    LRSchedulerHook,
    MetricsWriter,
    PeriodicCheckpointer,
    PreciseStatisticsHook,
    ProgressBar,
    flatten_results,
)
from norm_det.engine.train_loop import HookBase, SimpleTrainer, move_to_device
from norm_det.solver import (
    build_gradient_clipper,
    describe_scaling,
    pass_config,
    scale_to_world_size,
)
from norm_det.utils.comm import get_world_size, is_main_process

__all__ = ["Trainer", "model_device"]

logger = logging.getLogger(__name__)


def _describe_results(results: dict[str, Any]) -> str:
    return "\n".join(f"  {name}: {value:.4g}" for name, value in flatten_results(results).items())


def scaled_to_world_size(cfg):
    """``cfg`` rescaled to the number of processes when it declares
    ``SOLVER.REFERENCE_WORLD_SIZE`` (logging what changed), else ``cfg`` itself."""
    scaled = scale_to_world_size(cfg, get_world_size())
    if scaled is not cfg:
        logger.info("batch-size scaling: %s", describe_scaling(cfg, scaled))
    return scaled


def backbone_scheme_of(cfg) -> str:
    """The norm scheme the model's backbone is built with (VGG for SSD, else ResNet)."""
    return cfg.MODEL.VGG.NORM if cfg.MODEL.META_ARCHITECTURE == "SSD" else (cfg.MODEL.RESNETS.NORM)


def training_forward(device: torch.device) -> Callable[[nn.Module, Any], None]:
    """``forward(model, batch)``: a training-mode forward of a loader batch on ``device``."""

    def forward(model: nn.Module, batch: Any) -> None:
        images, targets = move_to_device(batch, device)
        model(images, targets)

    return forward


def evaluate_test_sets(
    cfg,
    model: nn.Module,
    build_test_loader: Callable[[Any, str], Iterable],
    build_evaluator: Callable[[Any, str], Any],
) -> dict[str, Any]:
    """``model`` evaluated on every dataset of ``DATASETS.TEST``, by the given builders.

    Every process must call this. Returns ``{dataset: {task: {metric: value}}}`` on rank 0.
    """
    from norm_det.evaluation.inference import inference_on_dataset

    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: there is nothing to evaluate on")
    model = unwrap_model(model)
    results = {}
    for name in cfg.DATASETS.TEST:
        loader = build_test_loader(cfg, name)
        evaluator = build_evaluator(cfg, name)
        results[name] = inference_on_dataset(model, loader, evaluator)
        if is_main_process():
            logger.info("evaluation on %s:\n%s", name, _describe_results(results[name]))
    return results


class Trainer(TrainerBuilders, SimpleTrainer):
    """Train the model ``cfg`` describes, with checkpoints, evaluation and metric writers.

    Usage::

        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()

    The config is first rescaled to the number of processes when it declares
    ``SOLVER.REFERENCE_WORLD_SIZE`` (:func:`norm_det.solver.scale_to_world_size`; a no-op after
    :func:`norm_det.engine.default_setup`, which already did it); ``self.cfg`` is the result.
    With ``SOLVER.ACCUMULATE_STEPS`` = k, :meth:`build_train_loader` receives a config whose
    ``SOLVER.IMS_PER_BATCH`` is the images of one pass (``IMS_PER_BATCH / k``), and each
    iteration draws k batches from it.

    Args:
        cfg: the full config (see :mod:`norm_det.config.defaults`).
    """

    def __init__(self, cfg) -> None:
        cfg = scaled_to_world_size(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(pass_config(cfg))
        # AGC clips per parameter and leaves out the predictors by name: built on the model.
        grad_clipper = build_gradient_clipper(cfg, model)
        model = wrap_model(model)
        super().__init__(
            model,
            data_loader,
            optimizer,
            grad_clipper=grad_clipper,
            accumulate_steps=cfg.SOLVER.ACCUMULATE_STEPS,
        )
        self.cfg = cfg
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Checkpointer(
            model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=self.scheduler
        )
        self.max_iter = cfg.SOLVER.MAX_ITER
        self._resume_rng_state: dict[str, Any] | None = None
        self.eval_hook: EvalHook | None = None
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True) -> None:
        """Continue from the last checkpoint in ``OUTPUT_DIR`` (``resume`` and one exists), or
        load ``MODEL.WEIGHTS`` into the model (if set) and start at iteration 0."""
        cfg = self.cfg
        state = self.checkpointer.resume_or_load(
            cfg.MODEL.WEIGHTS,
            resume=resume,
            backbone_scheme=backbone_scheme_of(cfg),
            weights_format=cfg.MODEL.WEIGHTS_FORMAT or None,
            allow_pickle=cfg.MODEL.WEIGHTS_ALLOW_PICKLE,
        )
        self.start_iter = state.get("iteration", 0)
        self._resume_rng_state = state.get("rng_state")
        metrics = state.get("extra", {}).get("metrics")
        if metrics:
            self.storage.load_state_dict(metrics)

    def build_hooks(self) -> list[HookBase | None]:
        """LR schedule, diagnostics and precise statistics (if enabled), checkpoints, evaluation,
        metric writers, progress bar, in this order."""
        cfg = self.cfg
        if cfg.DATASETS.TEST:
            self.eval_hook = EvalHook(cfg.TEST.EVAL_PERIOD, lambda: self.test(cfg, self.model))
        return [
            LRSchedulerHook(self.optimizer, self.scheduler),
            self.build_diagnostics_hook(cfg) if cfg.DIAGNOSTICS.ENABLED else None,
            self.build_precise_statistics_hook(cfg) if cfg.TEST.PRECISE_BN.ENABLED else None,
            PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD),
            self.eval_hook,
            MetricsWriter(cfg.OUTPUT_DIR, cfg.LOG_PERIOD),
            ProgressBar(),
        ]

    def build_precise_statistics_hook(self, cfg) -> PreciseStatisticsHook:
        """``TEST.PRECISE_BN``: running statistics re-estimated on ``NUM_ITER`` batches of a fresh
        training loader before each evaluation and the final checkpoint."""
        return PreciseStatisticsHook(
            unwrap_model(self.model),
            lambda: self.build_train_loader(pass_config(cfg)),
            training_forward(self.device),
            cfg.TEST.PRECISE_BN.NUM_ITER,
            cfg.TEST.EVAL_PERIOD if cfg.DATASETS.TEST else 0,
        )

    def build_diagnostics_hook(self, cfg) -> DiagnosticsHook:
        """The ``DIAGNOSTICS`` probes on the (unwrapped) model (docs/diagnostics.md)."""
        from norm_det.diagnostics import ModelDiagnostics

        diagnostics = ModelDiagnostics.from_config(cfg, unwrap_model(self.model))
        return DiagnosticsHook(diagnostics, cfg.DIAGNOSTICS.PERIOD)

    def train(self) -> dict[str, Any]:
        """Run from ``start_iter`` to ``SOLVER.MAX_ITER``; returns the final evaluation results
        (``{dataset: {task: {metric: value}}}`` on rank 0; ``{}`` without test datasets)."""
        super().train(self.start_iter, self.max_iter, rng_state=self._resume_rng_state)
        return self.eval_hook.latest_results if self.eval_hook is not None else {}

    def last_checkpoint_hint(self) -> str:
        last = self.checkpointer.last_checkpoint()
        if last is None:
            return (
                "no checkpoint was written yet "
                f"(SOLVER.CHECKPOINT_PERIOD = {self.cfg.SOLVER.CHECKPOINT_PERIOD})"
            )
        return f"the last good checkpoint is '{last}'"

    @classmethod
    def test(cls, cfg, model: nn.Module) -> dict[str, Any]:
        """Evaluate ``model`` on every dataset of ``DATASETS.TEST``.

        Every process must call this. Returns ``{dataset: {task: {metric: value}}}`` on rank 0.
        """
        return evaluate_test_sets(cfg, model, cls.build_test_loader, cls.build_evaluator)
