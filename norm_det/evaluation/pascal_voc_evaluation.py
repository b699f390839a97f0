"""Pascal VOC detection mAP, matching the official devkit's ``VOCevaldet`` protocol.

Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010, §4.2: per class,
detections sorted by score are each assigned to the ground-truth box of highest overlap; IoU above
the threshold makes a true positive, unless that box was already taken (a false positive) or is
marked *difficult* (the detection is ignored: neither true nor false positive); difficult boxes do
not count as positives. AP is the VOC2007 11-point interpolated precision or, from VOC2010 on, the
area under the monotone precision envelope.

Ground truth is, as in the devkit, every object of the XML files as written: a box that runs past
the image edge is scored as it is, not as the loader clips it for training
(:func:`norm_det.data.voc.load_voc_ground_truth`, read by :meth:`PascalVOCEvaluator.from_config`
from the dataset's ``dirname`` and ``split``); predictions made on a resized input are mapped
back to the file's pixels first. Without such files (a dataset with ``evaluator_type`` "voc" and
no VOC folder), the targets the loader yields (``"boxes"``, ``"labels"``, optional
``"difficult"``) are the ground truth and predictions are compared in the loader's pixels.
Boxes are continuous coordinates and IoU has no ``+1``: the XML's 1-based inclusive pixel indices
become ``(xmin - 1, ymin - 1, xmax, ymax)``, as detectron2 reads them, and plain IoU on those
equals the devkit's ``+1`` IoU on the XML's values and on detections written as
``(x0 + 1, y0 + 1, x1, y1)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from norm_det.data.postprocess import rescale_to_original
from norm_det.data.voc import load_voc_ground_truth
from norm_det.evaluation.evaluator import (
    DatasetEvaluator,
    Results,
    gathered_records,
    image_id_of,
    nanmean,
    require_metadata,
    to_numpy,
)
from norm_det.evaluation.guards import check_finite_outputs

__all__ = ["PascalVOCEvaluator", "voc_ap", "voc_class_recall_precision"]

logger = logging.getLogger(__name__)

# detectron2 reports VOC "AP" as the mean over the COCO thresholds, "AP50" as classical VOC mAP.
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision of one class from its cumulative recall and precision.

    Args:
        recall, precision: ``(D,)`` after each of the D score-sorted detections.
        use_07_metric: VOC2007's mean of the best precision at recall >= 0, 0.1, ..., 1;
            otherwise the area under the precision envelope (VOC2010+).

    Returns:
        AP in [0, 1].
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            reached = recall >= t
            ap += (precision[reached].max() if reached.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    # The envelope: precision at recall r is the best precision at any recall >= r.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _pairwise_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of ``box`` (4,) with each of ``boxes`` (N, 4), XYXY continuous coordinates."""
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = iw * ih
    union = (
        (box[2] - box[0]) * (box[3] - box[1])
        + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        - inter
    )
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def voc_class_recall_precision(
    detections: Sequence[tuple[int, float, np.ndarray]],
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]],
    iou_thresholds: Sequence[float] = (0.5,),
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The devkit's matching for one class at several IoU thresholds.

    Args:
        detections: ``(image_id, score, box XYXY)`` of this class, any order.
        ground_truth: image_id -> ``(boxes (N, 4), difficult (N,) bool)`` of this class.
        iou_thresholds: a detection matches when its best IoU is strictly above the threshold.

    Returns:
        Per threshold ``(recall (D,), precision (D,), number of non-difficult boxes)``; recall is
        NaN when there are no non-difficult boxes.
    """
    num_positives = int(sum((~difficult).sum() for _, difficult in ground_truth.values()))
    # Stable sort: ties keep their input order, so repeated runs give the same AP.
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    # The best-overlapping box of each detection does not depend on the threshold or on which
    # boxes are taken, so it is computed once.
    best = []
    for i in order:
        image_id, _, box = detections[i]
        gt_boxes = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))[0]
        if len(gt_boxes) == 0:
            best.append((image_id, -1, -np.inf))
            continue
        overlaps = _pairwise_iou(gt_boxes, np.asarray(box, dtype=np.float64))
        j = int(np.argmax(overlaps))
        best.append((image_id, j, float(overlaps[j])))

    curves = []
    for threshold in iou_thresholds:
        taken: dict[int, np.ndarray] = {
            image_id: np.zeros(len(difficult), bool)
            for image_id, (_, difficult) in ground_truth.items()
        }
        tp = np.zeros(len(best))
        fp = np.zeros(len(best))
        for d, (image_id, j, overlap) in enumerate(best):
            if overlap > threshold:
                if ground_truth[image_id][1][j]:
                    continue  # difficult: neither true nor false positive
                if taken[image_id][j]:
                    fp[d] = 1.0
                else:
                    tp[d] = 1.0
                    taken[image_id][j] = True
            else:
                fp[d] = 1.0
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / num_positives if num_positives else np.full_like(tp, np.nan)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        curves.append((recall, precision, num_positives))
    return curves


class PascalVOCEvaluator(DatasetEvaluator):
    """VOC mAP of detections, per class and over classes.

    Returns ``{"bbox": {"AP", "AP50", "AP75", "AP-<class>", "AP50-<class>"}}`` in percent, where
    ``AP`` averages the thresholds 0.50:0.95 (detectron2's convention) and ``AP50`` is the
    classical VOC mAP. A class without non-difficult ground truth has AP NaN (with a warning) and
    is left out of the means. Only the processed images are evaluated. Predictions with a NaN or
    inf box or score are refused (:func:`norm_det.evaluation.guards.check_finite_outputs`).

    Args:
        class_names: ``class_names[i]`` is label ``i + 1``.
        use_07_metric: VOC2007's 11-point AP; otherwise the area under the curve (VOC2010+).
        ground_truth: image id -> ``{"boxes": (N, 4) XYXY [xmin - 1, ymin - 1, xmax, ymax] of the
            XML as written, "labels": (N,) in 1..K, "difficult": (N,) bool}`` and optionally
            ``"file_name"`` (checked against the target's) and ``"xml_file"`` (named in errors), in
            the pixels of the image files (:func:`norm_det.data.voc.load_voc_ground_truth`).
            Predictions are mapped to those pixels by the targets' ``"size"``/``"orig_size"``.
            None: the targets' ``"boxes"``, ``"labels"``, ``"difficult"`` are the ground truth,
            in the pixels the loader gave the model.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        use_07_metric: bool = False,
        ground_truth: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        if not class_names:
            raise ValueError("class_names is empty; VOC evaluation needs the dataset's classes")
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.ground_truth = None if ground_truth is None else dict(ground_truth)
        self._records: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: Any, metadata: Mapping[str, Any]) -> PascalVOCEvaluator:
        """Classes from metadata ``"thing_classes"``; the 11-point metric for ``"year"`` 2007; the
        ground truth read from the XML files of ``"dirname"`` / ``"split"`` when the metadata
        names them, as the devkit reads it."""
        require_metadata(metadata, "thing_classes", "VOC evaluation needs the class names")
        year = metadata.get("year")
        ground_truth = None
        if "dirname" in metadata and "split" in metadata:
            ground_truth = load_voc_ground_truth(
                metadata["dirname"], metadata["split"], class_names=metadata["thing_classes"]
            )
        return cls(
            metadata["thing_classes"],
            use_07_metric=year is not None and int(year) == 2007,
            ground_truth=ground_truth,
        )

    def reset(self) -> None:
        self._records = []

    def process(self, targets: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> None:
        """Record one batch; a prediction with a NaN or inf box or score is a ValueError.

        Refused at the first bad batch, as in COCO evaluation: sorted by a NaN score, or matched
        by a NaN IoU, a diverged model's detections would still get an AP.
        """
        image_ids = [image_id_of(target) for target in targets]
        check_finite_outputs(image_ids, outputs)
        for image_id, target, output in zip(image_ids, targets, outputs, strict=True):
            if self.ground_truth is None:
                gt = target_ground_truth(target)
            else:
                gt = file_ground_truth(self.ground_truth, target, image_id)
                if "size" in target and "orig_size" in target:
                    output = rescale_to_original(output, target)
            self._records.append(detection_record(image_id, gt, output))

    def evaluate(self) -> Results:
        records = gathered_records(self._records)
        if records is None:
            return {}
        if not any(len(r["scores"]) for r in records):
            logger.warning(
                "VOC evaluation: no predictions (%d images processed); AP is 0 for every class "
                "with ground truth",
                len(records),
            )
        check_labels(records, len(self.class_names))
        ap = ap_per_class(records, self.class_names, self.use_07_metric)
        metrics = voc_metrics(ap, self.class_names)
        logger.info(
            "VOC%s mAP: AP=%.3f AP50=%.3f AP75=%.3f",
            "2007 11-point" if self.use_07_metric else " area",
            metrics["AP"],
            metrics["AP50"],
            metrics["AP75"],
        )
        return {"bbox": metrics}


def target_ground_truth(target: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The loader target's ``"boxes"``, ``"labels"`` and ``"difficult"`` (default: none is)."""
    gt_boxes = to_numpy(target["boxes"]).astype(np.float64).reshape(-1, 4)
    difficult = target.get("difficult")
    return {
        "boxes": gt_boxes,
        "labels": to_numpy(target["labels"]).astype(np.int64).reshape(-1),
        "difficult": (
            np.zeros(len(gt_boxes), bool)
            if difficult is None
            else to_numpy(difficult).astype(bool).reshape(-1)
        ),
    }


def file_ground_truth(
    ground_truth: Mapping[int, Mapping[str, Any]], target: Mapping[str, Any], image_id: int
) -> Mapping[str, Any]:
    """The files' ground truth of ``image_id``, checked to be the target's image."""
    gt = ground_truth.get(image_id)
    if gt is None:
        raise ValueError(
            f"image id {image_id} ('{target.get('file_name', '?')}') is not in the VOC split "
            f"this evaluator read ({len(ground_truth)} images); the evaluator was built "
            "for another dataset"
        )
    expected = gt.get("file_name")
    found = target.get("file_name")
    if expected is not None and found is not None and str(found) != str(expected):
        raise ValueError(
            f"image id {image_id} is '{found}' in the loader's target but '{expected}' in the "
            f"VOC split the evaluator read ('{gt.get('xml_file')}'); the evaluator was built "
            "for another dataset"
        )
    return gt


def detection_record(
    image_id: int, gt: Mapping[str, Any], output: Mapping[str, Any]
) -> dict[str, Any]:
    """What is kept of one image: its ground truth and its detections, as arrays."""
    return {
        "image_id": image_id,
        "gt_boxes": np.asarray(gt["boxes"], dtype=np.float64).reshape(-1, 4),
        "gt_labels": np.asarray(gt["labels"], dtype=np.int64).reshape(-1),
        "gt_difficult": np.asarray(gt["difficult"], dtype=bool).reshape(-1),
        "boxes": to_numpy(output["boxes"]).astype(np.float64).reshape(-1, 4),
        "scores": to_numpy(output["scores"]).astype(np.float64).reshape(-1),
        "labels": to_numpy(output["labels"]).astype(np.int64).reshape(-1),
    }


def check_labels(records: Sequence[Mapping[str, Any]], num_classes: int) -> None:
    """Every ground-truth and predicted label is in ``1..num_classes``."""
    for r in records:
        for key in ("gt_labels", "labels"):
            bad = sorted({int(x) for x in r[key] if not 1 <= x <= num_classes})
            if bad:
                raise ValueError(
                    f"image {r['image_id']}: {key} {bad} are outside 1..{num_classes} "
                    f"({num_classes} class_names)"
                )


def ap_per_class(
    records: Sequence[Mapping[str, Any]], class_names: Sequence[str], use_07_metric: bool
) -> np.ndarray:
    """``ap[c, t]``: AP in percent of class ``c`` at threshold ``IOU_THRESHOLDS[t]``.

    A class without non-difficult ground truth has NaN, with a warning.
    """
    ap = np.full((len(class_names), len(IOU_THRESHOLDS)), np.nan)
    for c in range(len(class_names)):
        label = c + 1
        ground_truth = {}
        detections = []
        for r in records:
            keep = r["gt_labels"] == label
            ground_truth[r["image_id"]] = (r["gt_boxes"][keep], r["gt_difficult"][keep])
            for k in np.flatnonzero(r["labels"] == label):
                detections.append((r["image_id"], float(r["scores"][k]), r["boxes"][k]))
        curves = voc_class_recall_precision(detections, ground_truth, IOU_THRESHOLDS)
        if curves[0][2] == 0:
            logger.warning(
                "VOC evaluation: class '%s' has no non-difficult ground truth; its AP is NaN "
                "and left out of the mean",
                class_names[c],
            )
            continue
        for t, (recall, precision, _) in enumerate(curves):
            ap[c, t] = 100.0 * voc_ap(recall, precision, use_07_metric)
    return ap


def voc_metrics(ap: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``AP`` (mean over 0.50:0.95), ``AP50``, ``AP75`` and per class ``AP-`` / ``AP50-<class>``
    of the :func:`ap_per_class` matrix; NaN classes are left out of the means."""
    t50, t75 = IOU_THRESHOLDS.index(0.5), IOU_THRESHOLDS.index(0.75)
    metrics = {
        "AP": nanmean(np.array([nanmean(ap[:, t]) for t in range(ap.shape[1])])),
        "AP50": nanmean(ap[:, t50]),
        "AP75": nanmean(ap[:, t75]),
    }
    for c, name in enumerate(class_names):
        metrics[f"AP-{name}"] = nanmean(ap[c])
        metrics[f"AP50-{name}"] = float(ap[c, t50])
    return metrics
