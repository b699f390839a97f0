"""The evaluator protocol (detectron2's DatasetEvaluator) and a combination of evaluators.

An evaluator sees the test set one batch at a time through :meth:`DatasetEvaluator.process`,
keeps what it needs per image, and computes metrics in :meth:`DatasetEvaluator.evaluate`, which
gathers the per-image state of every process and returns the metrics on rank 0 only (``{}``
elsewhere). Metrics are ``{task: {metric: value}}``, e.g. ``{"bbox": {"AP": 37.2, ...}}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from norm_det.utils.comm import all_gather_object, is_main_process

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "gathered_records",
    "image_id_of",
    "nanmean",
    "require_metadata",
    "to_numpy",
    "unique_by_image_id",
]

Results = dict[str, dict[str, float]]


class DatasetEvaluator:
    """Base class: accumulate per-image predictions, then compute metrics once.

    Subclasses override all three methods. ``process`` receives a loader batch's targets and the
    model's eval-mode outputs for the same images, in the same order.
    """

    def reset(self) -> None:
        """Forget everything processed so far; called before a new evaluation."""

    def process(self, targets: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> None:
        """Record one batch.

        Args:
            targets: per image, the dataset's target dict (``"image_id"`` at least).
            outputs: per image, the model's eval-mode output dict.
        """

    def evaluate(self) -> Results:
        """Metrics over everything processed by all processes (rank 0), ``{}`` on other ranks."""
        return {}


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run on the same stream; their results are merged per task.

    Args:
        evaluators: evaluators whose metric names must not collide within a task.
    """

    def __init__(self, evaluators: Iterable[DatasetEvaluator]) -> None:
        self.evaluators = list(evaluators)

    def reset(self) -> None:
        for evaluator in self.evaluators:
            evaluator.reset()

    def process(self, targets: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> None:
        for evaluator in self.evaluators:
            evaluator.process(targets, outputs)

    def evaluate(self) -> Results:
        merged: Results = {}
        for evaluator in self.evaluators:
            for task, metrics in evaluator.evaluate().items():
                task_metrics = merged.setdefault(task, {})
                clash = sorted(set(task_metrics) & set(metrics))
                if clash:
                    raise ValueError(
                        f"{type(evaluator).__name__} reports metrics {clash} of task '{task}' "
                        "that an earlier evaluator already reported; metric names must be unique"
                    )
                task_metrics.update(metrics)
        return merged


def image_id_of(target: dict[str, Any]) -> int:
    """The ``"image_id"`` of a target as a Python int (it may come as a 0-d tensor)."""
    if "image_id" not in target:
        raise ValueError(
            f"a target has no 'image_id' (keys: {sorted(target)}); evaluators need it to match "
            "predictions with ground truth"
        )
    image_id = target["image_id"]
    if isinstance(image_id, torch.Tensor):
        image_id = image_id.item()
    return int(image_id)


def unique_by_image_id(per_process: Iterable[Iterable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Flatten gathered per-image records, keeping the first record of each ``"image_id"``.

    A distributed sampler pads its shards by repeating images so that all processes see the same
    number; counting those twice would bias every metric.
    """
    seen: set[int] = set()
    unique = []
    for records in per_process:
        for record in records:
            if record["image_id"] not in seen:
                seen.add(record["image_id"])
                unique.append(record)
    return unique


def gathered_records(records: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Every process's per-image records, each image once (:func:`unique_by_image_id`), on
    rank 0; None on the other ranks. Every process must call this."""
    gathered = all_gather_object(records)
    if not is_main_process():
        return None
    return unique_by_image_id(gathered)


def require_metadata(metadata: Mapping[str, Any], key: str, needed_for: str) -> None:
    """Raise a ValueError naming the keys the dataset metadata has when it lacks ``key``.

    ``needed_for`` ends the message: what the evaluator needs the key for.
    """
    if key not in metadata:
        raise ValueError(
            f"dataset metadata has no '{key}' (keys: {sorted(metadata)}); {needed_for}"
        )


def to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CPU numpy view of a tensor (detached) or array-like."""
    if isinstance(x, torch.Tensor):
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # numpy has no bfloat16
        return x.detach().cpu().numpy()
    return np.asarray(x)


def nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without numpy's warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
