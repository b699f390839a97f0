"""Semantic segmentation metrics from a pixel confusion matrix: mIoU, fwIoU, mACC, pACC.

The per-class IoU is ``TP / (TP + FP + FN)`` over pixels whose ground truth is not the ignore
label; predictions on ignored pixels count nowhere. mIoU averages the classes that occur in the
ground truth or the predictions, which is exactly the Cityscapes script's average over classes
with a non-zero denominator, so on Cityscapes train ids this agrees with
:class:`~norm_det.evaluation.CityscapesSemSegEvaluator`'s ``IoU``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from norm_det.data.image_io import read_label_png
from norm_det.data.postprocess import rescale_to_original
from norm_det.evaluation.evaluator import (
    DatasetEvaluator,
    Results,
    gathered_records,
    image_id_of,
    nanmean,
    require_metadata,
    to_numpy,
)
from norm_det.evaluation.guards import check_finite_sem_seg, sem_seg_logits

__all__ = ["LabelFileReader", "SemSegEvaluator", "confusion_record", "segmentation_metrics"]

logger = logging.getLogger(__name__)


class SemSegEvaluator(DatasetEvaluator):
    """Confusion-matrix metrics of ``outputs["sem_seg"]`` against ``targets["sem_seg"]``.

    Returns ``{"sem_seg": {"mIoU", "fwIoU", "IoU-<class>", "mACC", "pACC", "ACC-<class>"}}`` in
    percent (detectron2's keys). A class absent from both ground truth and predictions has IoU
    NaN; one absent from the ground truth has ACC NaN.

    When the loader resized the image (targets with ``"size"`` != ``"orig_size"``) and names the
    label file (``"sem_seg_file_name"``), the metrics are computed at the file's resolution, as
    the official tools do: the logits are resized bilinearly to it
    (:func:`norm_det.data.rescale_to_original`) and the file is read and mapped to train ids.
    Otherwise the output is compared with ``targets["sem_seg"]`` at the loader's resolution.
    Logits with a NaN or inf are refused, naming the image id and its ``"file_name"`` (else its
    ``"sem_seg_file_name"``) (:func:`norm_det.evaluation.guards.check_finite_sem_seg`).

    Args:
        class_names: ``class_names[k]`` is train id ``k``; the outputs have ``len(class_names)``
            channels.
        ignore_label: ground-truth value of pixels left out of every metric.
        label_id_to_train_id: how label files map to train ids (Cityscapes' label ids); None:
            files hold train ids.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        ignore_label: int = 255,
        label_id_to_train_id: Mapping[int, int] | None = None,
    ) -> None:
        if not class_names:
            raise ValueError("class_names is empty; segmentation evaluation needs the classes")
        self.class_names = list(class_names)
        self.ignore_label = ignore_label
        self._label_files = LabelFileReader(label_id_to_train_id)
        self._records: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: Any, metadata: Mapping[str, Any]) -> SemSegEvaluator:
        """Metadata ``"stuff_classes"``, ``"ignore_label"``, ``"label_id_to_train_id"``."""
        require_metadata(
            metadata, "stuff_classes", "semantic segmentation evaluation needs the class names"
        )
        return cls(
            metadata["stuff_classes"],
            ignore_label=int(metadata.get("ignore_label", 255)),
            label_id_to_train_id=metadata.get("label_id_to_train_id"),
        )

    def reset(self) -> None:
        self._records = []

    def process(self, targets: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> None:
        """Record one batch's confusion counts; NaN or inf logits are a ValueError.

        Checked before the argmax, which would turn a NaN into an arbitrary class and score it.
        """
        num_classes = len(self.class_names)
        image_ids = [image_id_of(target) for target in targets]
        files = [target.get("file_name", target.get("sem_seg_file_name")) for target in targets]
        check_finite_sem_seg(image_ids, outputs, files)
        for image_id, target, output in zip(image_ids, targets, outputs, strict=True):
            expected = f"(K={num_classes}, H, W) logits"
            logits = sem_seg_logits(output, image_id, num_classes, expected)
            if _resized(target) and "sem_seg_file_name" in target:
                logits = rescale_to_original({"sem_seg": logits}, target)["sem_seg"]
                source = f"label file '{target['sem_seg_file_name']}'"
                gt = self._label_files.train_ids(target["sem_seg_file_name"], image_id)
            else:
                source = "targets['sem_seg']"
                gt = to_numpy(target["sem_seg"]).astype(np.int64)
            if tuple(logits.shape[1:]) != gt.shape:
                raise ValueError(
                    f"image {image_id}: outputs['sem_seg'] is {tuple(logits.shape[1:])} (H, W) "
                    f"but {source} is {gt.shape}; predict at the input image's size"
                )
            pred = to_numpy(logits.argmax(0)).astype(np.int64)
            record = confusion_record(image_id, gt, pred, num_classes, self.ignore_label, source)
            self._records.append(record)

    def evaluate(self) -> Results:
        records = gathered_records(self._records)
        if records is None:
            return {}
        num_classes = len(self.class_names)
        confusion = np.zeros(num_classes * num_classes, np.int64)
        for record in records:
            confusion[record["cells"]] += record["counts"]
        confusion = confusion.reshape(num_classes, num_classes)
        if confusion.sum() == 0:
            logger.warning(
                "semantic segmentation evaluation: no labelled pixels were processed; every "
                "metric is NaN"
            )
        return {"sem_seg": segmentation_metrics(confusion, self.class_names)}


class LabelFileReader:
    """Label PNGs read as train ids.

    Args:
        label_id_to_train_id: how the files' label ids map to train ids (Cityscapes' label
            ids); None: the files hold train ids.
    """

    def __init__(self, label_id_to_train_id: Mapping[int, int] | None) -> None:
        self._lut = None
        if label_id_to_train_id is not None:
            mapping = {int(k): int(v) for k, v in label_id_to_train_id.items()}
            # -1 marks ids outside the label set
            self._lut = np.full(max(max(mapping, default=0) + 1, 256), -1, np.int64)
            for label_id, train_id in mapping.items():
                self._lut[label_id] = train_id

    def train_ids(self, path: str, image_id: int) -> np.ndarray:
        """The (H, W) train ids of label file ``path`` (of image ``image_id``, for errors).

        Raises:
            ValueError: the file has ids the mapping does not map.
        """
        labels = read_label_png(path, image_id=image_id)
        if self._lut is None:
            return labels
        inside = (labels >= 0) & (labels < self._lut.size)
        train_ids = np.where(inside, self._lut[np.where(inside, labels, 0)], -1)
        if (train_ids < 0).any():
            unmapped = np.unique(labels[train_ids < 0]).tolist()[:20]
            raise ValueError(
                f"label file '{path}' (image id {image_id}) has ids {unmapped} that "
                "label_id_to_train_id does not map"
            )
        return train_ids


def confusion_record(
    image_id: int,
    gt: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    ignore_label: int,
    source: str,
) -> dict[str, Any]:
    """One image's confusion counts (rows: ``gt``, columns: ``pred``) as sparse cells.

    Per image, so that images a distributed sampler repeated can be dropped before summing.

    Raises:
        ValueError: ``gt`` (from ``source``) has ids outside ``0..num_classes - 1`` other than
            ``ignore_label``.
    """
    valid = gt != ignore_label
    bad = np.unique(gt[valid & ((gt < 0) | (gt >= num_classes))])
    if bad.size:
        raise ValueError(
            f"image {image_id}: {source} has ids {bad.tolist()} outside "
            f"0..{num_classes - 1} and the ignore label {ignore_label}"
        )
    cells = gt[valid] * num_classes + pred[valid]
    counts = np.bincount(cells, minlength=num_classes * num_classes)
    nonzero = np.flatnonzero(counts)
    return {"image_id": image_id, "cells": nonzero.astype(np.int32), "counts": counts[nonzero]}


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Metrics of a confusion matrix, rows = ground truth, columns = prediction.

    Args:
        confusion: ``(K, K)`` pixel counts.
        class_names: K names for the per-class keys.

    Returns:
        mIoU, fwIoU, mACC, pACC, IoU-<class>, ACC-<class>, in percent.
    """
    confusion = confusion.astype(np.float64)
    tp = np.diag(confusion)
    gt_pixels = confusion.sum(axis=1)
    pred_pixels = confusion.sum(axis=0)
    union = gt_pixels + pred_pixels - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
        frequency = gt_pixels / gt_pixels.sum()
    in_gt = gt_pixels > 0
    metrics = {
        "mIoU": nanmean(iou) * 100.0,
        "fwIoU": float(np.sum(frequency[in_gt] * iou[in_gt])) * 100.0 if in_gt.any() else np.nan,
        "mACC": nanmean(acc) * 100.0,
        "pACC": float(tp.sum() / gt_pixels.sum()) * 100.0 if in_gt.any() else np.nan,
    }
    for name, value in zip(class_names, iou):
        metrics[f"IoU-{name}"] = float(value) * 100.0
    for name, value in zip(class_names, acc):
        metrics[f"ACC-{name}"] = float(value) * 100.0
    return {k: float(v) for k, v in metrics.items()}


def _resized(target: Mapping[str, Any]) -> bool:
    if "size" not in target or "orig_size" not in target:
        return False
    return [int(v) for v in target["size"]] != [int(v) for v in target["orig_size"]]
