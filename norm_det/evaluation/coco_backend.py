"""One call that runs COCO's evaluation through pycocotools or faster-coco-eval.

Both backends implement the same protocol (Lin et al., "Microsoft COCO", ECCV 2014; the
``cocoapi`` ``COCOeval``): per image and category, greedy matching of score-sorted detections to
ground truth at ten IoU thresholds, crowd regions matched without being counted, 101-point
interpolated precision. faster-coco-eval computes the matching and accumulation in C++ and
produces the same ``eval["precision"]`` array; the metrics below are read from that array in the
same way for both, so they agree wherever the two engines do. Where the engines would not agree
(non-finite predictions, ground truth outside the COCO format), :mod:`norm_det.evaluation.guards`
refuses the input, or reads it one way for both, before either runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from norm_det.data.coco import read_coco_json
from norm_det.evaluation.guards import (
    check_coco_results,
    check_ground_truth_for_task,
    coco_ground_truth,
)

__all__ = [
    "COCO_BACKENDS",
    "COCO_METRICS",
    "coco_metrics",
    "ground_truth_source",
    "load_coco_gt",
    "per_category_ap",
    "run_coco_eval",
]

logger = logging.getLogger(__name__)

COCO_BACKENDS = ("pycocotools", "faster_coco_eval")

# How errors name ground truth that was given as a dict rather than a file.
IN_MEMORY_SOURCE = "<in-memory COCO ground truth>"

# (key, IoU threshold or None for the mean over 0.50:0.95, area range label)
COCO_METRICS = (
    ("AP", None, "all"),
    ("AP50", 0.5, "all"),
    ("AP75", 0.75, "all"),
    ("APs", None, "small"),
    ("APm", None, "medium"),
    ("APl", None, "large"),
)


def _check_backend(backend: str) -> None:
    if backend not in COCO_BACKENDS:
        raise ValueError(f"COCO backend '{backend}' is not one of {COCO_BACKENDS}")


def load_coco_gt(annotations: str | os.PathLike | Mapping[str, Any], backend: str) -> Any:
    """The backend's ``COCO`` API object for a ground-truth json file or an in-memory dict.

    Both backends index the same checked copy (:func:`norm_det.evaluation.guards.coco_ground_truth`:
    a missing ``iscrowd`` is read as 0; a given dict is not modified). The object remembers
    where the ground truth came from (``norm_det_source``), so that later errors name the file.

    Raises:
        FileNotFoundError: when ``annotations`` is a path that does not exist.
        ValueError: the file is not JSON or not a COCO dict, or entries lack their ids (naming
            the file and the entries).
    """
    _check_backend(backend)
    if isinstance(annotations, Mapping):
        source, data = IN_MEMORY_SOURCE, annotations
    else:
        source = os.fspath(annotations)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"COCO ground-truth json file '{source}' does not exist")
        data = read_coco_json(source)
    dataset = coco_ground_truth(data, source)
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO

        coco = COCO(dataset, print_function=logger.debug)
    else:
        from pycocotools.coco import COCO

        # pycocotools prints its progress; keep it in the log instead of on stdout.
        with _stdout_to_log():
            coco = COCO()
            coco.dataset = dataset
            coco.createIndex()
    coco.norm_det_source = source
    return coco


def run_coco_eval(
    coco_gt: Any,
    results: list[dict[str, Any]],
    iou_type: str,
    backend: str,
    *,
    img_ids: Sequence[int] | None = None,
    max_dets_per_image: int = 100,
) -> Any:
    """Evaluate and accumulate; returns the backend's ``COCOeval`` object.

    The ground truth and the results pass :mod:`norm_det.evaluation.guards` first, so both
    backends either score the same input or neither does.

    Args:
        coco_gt: from :func:`load_coco_gt` with the same ``backend``.
        results: COCO result dicts (``image_id``, ``category_id``, ``score`` and ``bbox`` XYWH or
            ``segmentation`` RLE). The backends annotate them in place, so pass a fresh list.
            Must not be empty (both backends reject that).
        iou_type: ``"bbox"`` or ``"segm"``.
        img_ids: evaluate only these images (default: every image of ``coco_gt``).
        max_dets_per_image: detections per image kept by the matching, highest scores first.

    Raises:
        ValueError: bad arguments; ground truth without what ``iou_type`` reads; results that
            are incomplete, for unknown images, or hold NaN or inf (see the guards).
    """
    _check_backend(backend)
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type '{iou_type}' is not 'bbox' or 'segm'")
    if not results:
        raise ValueError("run_coco_eval needs at least one detection in 'results'")
    check_ground_truth_for_task(coco_gt.dataset, iou_type, ground_truth_source(coco_gt))
    check_coco_results(results, iou_type, coco_gt.getImgIds())
    with _stdout_to_log():
        coco_dt = coco_gt.loadRes(results)
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCOeval_faster

            coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=logger.debug)
        else:
            from pycocotools.cocoeval import COCOeval

            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.params.maxDets = [1, 10, max_dets_per_image]
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def ground_truth_source(coco_gt: Any) -> str:
    """The file a ``COCO`` object was loaded from by :func:`load_coco_gt`, for messages."""
    return getattr(coco_gt, "norm_det_source", "the COCO ground truth given to run_coco_eval")


def _mean_valid(precision: np.ndarray) -> float:
    """Mean of the entries that exist (COCOeval marks absent ones -1); NaN when none do."""
    valid = precision[precision > -1]
    return float(np.mean(valid)) * 100.0 if valid.size else float("nan")


def coco_metrics(coco_eval: Any) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent, as ``COCOeval.summarize`` computes them.

    NaN where no ground truth exists for the average (summarize's -1).
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # (iou thresholds, recall points, K, areas, max dets)
    metrics = {}
    for key, iou, area in COCO_METRICS:
        p = precision[:, :, :, list(params.areaRngLbl).index(area), -1]
        if iou is not None:
            p = p[np.flatnonzero(np.isclose(params.iouThrs, iou))]
        metrics[key] = _mean_valid(p)
    return metrics


def per_category_ap(coco_eval: Any) -> dict[int, float]:
    """AP (IoU 0.50:0.95, all areas, most detections) in percent per dataset category id."""
    precision = coco_eval.eval["precision"]
    return {
        int(cat_id): _mean_valid(precision[:, :, k, 0, -1])
        for k, cat_id in enumerate(coco_eval.params.catIds)
    }


@contextlib.contextmanager
def _stdout_to_log():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue():
        logger.debug(buffer.getvalue().rstrip())
