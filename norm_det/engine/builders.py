"""The parts a :class:`~norm_det.engine.Trainer` builds from a config, by the library builders.

:class:`TrainerBuilders` holds the ``build_*`` classmethods a Trainer inherits, detectron2's
extension points: each imports its library builder when called, so that a subclass with its own
builders needs none of them, and a subclass replaces any of them to train something else with
the same loop, checkpoints and writers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from norm_det.engine.launch import get_local_rank

__all__ = ["TrainerBuilders", "model_device"]

# The trainer's logger: the model summary is part of what it reports when it starts.
logger = logging.getLogger("norm_det.engine.trainer")


def model_device(cfg) -> torch.device:
    """``cfg.MODEL.DEVICE``, with this process's GPU when it names CUDA without an index."""
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", get_local_rank())
    return device


def log_model_size(model: nn.Module) -> None:
    """Log the model's class and its numbers of parameters, all and trainable."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "model %s: %.2fM parameters, %.2fM trainable",
        type(model).__name__,
        total / 1e6,
        trainable / 1e6,
    )


class TrainerBuilders:
    """The config-driven builders of a trainer's parts; override any in a subclass."""

    @classmethod
    def build_model(cls, cfg) -> nn.Module:
        """``norm_det.modeling.build_model(cfg)`` on ``MODEL.DEVICE``."""
        from norm_det.modeling import build_model

        model = build_model(cfg).to(model_device(cfg))
        log_model_size(model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model: nn.Module) -> torch.optim.Optimizer:
        from norm_det.solver import build_optimizer

        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer: torch.optim.Optimizer) -> Any:
        from norm_det.solver import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg) -> Iterable:
        """``norm_det.data.build_detection_train_loader(cfg)``: infinite, per-process batches.

        ``cfg.SOLVER.IMS_PER_BATCH`` here is the images of one pass over all processes (the
        config's ``IMS_PER_BATCH / SOLVER.ACCUMULATE_STEPS``).
        """
        from norm_det.data import build_detection_train_loader

        return build_detection_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str) -> Iterable:
        from norm_det.data import build_detection_test_loader

        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str | None = None) -> Any:
        from norm_det.evaluation import build_evaluator

        if output_dir is None:
            output_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_dir)
