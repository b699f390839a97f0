"""Run a model over a test loader and hand every batch to an evaluator."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from norm_det.evaluation.evaluator import DatasetEvaluator, Results
from norm_det.utils.comm import get_world_size, is_main_process

__all__ = ["inference_on_dataset"]

logger = logging.getLogger(__name__)


def inference_on_dataset(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, Any]]]],
    evaluator: DatasetEvaluator,
) -> Results:
    """Evaluate ``model`` on every batch of ``loader`` (this process's shard).

    The model runs in eval mode under ``torch.no_grad`` and gets its training mode back after.
    Images move to the device of the model's parameters; outputs go to the evaluator as they are.

    Args:
        model: called as ``model(images)``, returning one output dict per image.
        loader: yields ``(images, targets)``; in a distributed run each process has its shard.
        evaluator: reset here, then fed every batch.

    Returns:
        The evaluator's metrics on rank 0, ``{}`` on other ranks.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    total = len(loader) if hasattr(loader, "__len__") else None
    evaluator.reset()
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    num_images = 0
    try:
        with torch.no_grad():
            for images, targets in tqdm(
                loader, total=total, desc="inference", disable=not is_main_process()
            ):
                outputs = model([image.to(device) for image in images])
                evaluator.process(targets, outputs)
                num_images += len(images)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    logger.info(
        "inference on %d images (this process of %d) took %.1f s (%.3f s / image)",
        num_images,
        get_world_size(),
        seconds,
        seconds / max(num_images, 1),
    )
    return evaluator.evaluate()
