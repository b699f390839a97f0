"""COCO instance evaluation: box AP and mask AP with the official COCOeval protocol.

Predictions follow the model interface (``"boxes"`` XYXY pixels, ``"scores"``, ``"labels"``
contiguous ``1..K`` and, for Mask R-CNN, ``"masks"`` ``(M, 1, H, W)`` probabilities). Boxes become
XYWH, masks are cut at 0.5 and run-length encoded, labels map back to the dataset's category ids,
and the metrics come from :mod:`norm_det.evaluation.coco_backend` (pycocotools or
faster-coco-eval). Keys and units are detectron2's: ``AP, AP50, AP75, APs, APm, APl`` and
``AP-<class>``, in percent.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from norm_det.data.postprocess import rescale_to_original
from norm_det.evaluation.coco_backend import (
    COCO_BACKENDS,
    COCO_METRICS,
    coco_metrics,
    load_coco_gt,
    per_category_ap,
    run_coco_eval,
)
from norm_det.evaluation.coco_results import (
    encode_masks,
    instances_to_coco_results,
    prediction_record,
)
from norm_det.evaluation.evaluator import (
    DatasetEvaluator,
    Results,
    gathered_records,
    image_id_of,
    require_metadata,
)
from norm_det.evaluation.guards import check_finite_outputs, check_ground_truth_for_task

__all__ = ["COCOEvaluator", "encode_masks", "instances_to_coco_results"]

logger = logging.getLogger(__name__)

_TASKS = ("bbox", "segm")


class COCOEvaluator(DatasetEvaluator):
    """Box and mask AP of detections against a COCO-format ground-truth json.

    Outputs of a resized input (targets with ``"size"`` != ``"orig_size"``) are mapped back to
    the image file's pixels (:func:`norm_det.data.rescale_to_original`), where the json's boxes
    and masks are. Only the images that were processed are evaluated (so a partial test run
    gives the AP of that subset); predictions for images the json does not contain are dropped
    with a warning. With no detections at all every metric is NaN, with a warning, as in
    detectron2. What it refuses to score (docs/evaluation.md): predictions with a NaN or inf box,
    score or mask (in :meth:`process`), ground truth without what a task reads (in
    :meth:`evaluate`, before any task is scored); ground truth without ``iscrowd`` is read as 0.

    Args:
        json_file: the ground-truth annotations (images, annotations with ``iscrowd``,
            categories).
        thing_dataset_id_to_contiguous_id: dataset category id -> contiguous label ``1..K``
            (dataset metadata). Default: the json's category ids in ascending order.
        thing_classes: class names, ``thing_classes[i]`` for label ``i + 1``. Default: the json's
            category names.
        tasks: ``("bbox",)``, ``("bbox", "segm")``...; default: ``"bbox"``, plus ``"segm"`` when
            the outputs carry ``"masks"``.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"`` (same numbers, faster).
        max_dets_per_image: COCOeval's largest ``maxDets``, the one the APs use.
        output_dir: where ``coco_instances_results.json`` is written; ``None``: not written.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        ValueError: in :meth:`process` and :meth:`evaluate`, naming the images or the json file
            and its ids (see :mod:`norm_det.evaluation.guards`).
    """

    def __init__(
        self,
        json_file: str | os.PathLike,
        *,
        thing_dataset_id_to_contiguous_id: Mapping[int, int] | None = None,
        thing_classes: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None,
        backend: str = "pycocotools",
        max_dets_per_image: int = 100,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        self.json_file = os.fspath(json_file)
        check_arguments(self.json_file, backend, tasks, max_dets_per_image)
        self.dataset_id_to_contiguous = (
            None
            if thing_dataset_id_to_contiguous_id is None
            else {int(k): int(v) for k, v in thing_dataset_id_to_contiguous_id.items()}
        )
        self.thing_classes = None if thing_classes is None else list(thing_classes)
        self.tasks = None if tasks is None else tuple(tasks)
        self.backend = backend
        self.max_dets_per_image = max_dets_per_image
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self._coco_gt = None
        self._predictions: list[dict[str, Any]] = []

    @classmethod
    def from_config(
        cls, cfg: Any, metadata: Mapping[str, Any], output_dir: str | None = None
    ) -> COCOEvaluator:
        """Arguments from ``cfg.TEST`` and the dataset metadata."""
        require_metadata(metadata, "json_file", "COCO evaluation needs the ground-truth json")
        return cls(
            metadata["json_file"],
            thing_dataset_id_to_contiguous_id=metadata.get("thing_dataset_id_to_contiguous_id"),
            thing_classes=metadata.get("thing_classes"),
            backend=cfg.TEST.COCO_BACKEND,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            output_dir=output_dir,
        )

    def reset(self) -> None:
        self._predictions = []

    def process(self, targets: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> None:
        """Record one batch; a prediction with a NaN or inf box, score or mask is a ValueError.

        Refusing here, at the first bad batch, stops a diverged model before the rest of the
        test set is run, and before a NaN mask probability becomes an empty mask (``> 0.5``).
        """
        image_ids = [image_id_of(target) for target in targets]
        check_finite_outputs(image_ids, outputs)
        for image_id, target, output in zip(image_ids, targets, outputs, strict=True):
            if "size" in target and "orig_size" in target:
                # The ground truth is in the pixels of the image file, not of the resized input.
                output = rescale_to_original(output, target)
            self._predictions.append(prediction_record(image_id, output))

    def evaluate(self) -> Results:
        records = gathered_records(self._predictions)
        if records is None:
            return {}
        coco_gt = self._ground_truth()
        records = drop_unknown_images(records, coco_gt, self.json_file)
        tasks = tasks_to_score(self.tasks, records, coco_gt, self.json_file)
        contiguous_to_dataset_id = contiguous_to_dataset_ids(
            coco_gt, self.dataset_id_to_contiguous, self.json_file
        )
        check_mask_sizes(records, coco_gt, tasks, self.json_file)

        results_per_task = {
            task: instances_to_coco_results(records, contiguous_to_dataset_id, task)
            for task in tasks
        }
        if self.output_dir is not None:
            write_coco_results(records, contiguous_to_dataset_id, self.output_dir)
        img_ids = sorted(r["image_id"] for r in records)
        names = category_names(coco_gt, self.thing_classes, contiguous_to_dataset_id)
        scoring = {"backend": self.backend, "max_dets_per_image": self.max_dets_per_image}
        return {
            task: score_task(coco_gt, results, task, img_ids, names, **scoring)
            for task, results in results_per_task.items()
        }

    def _ground_truth(self) -> Any:
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self.json_file, self.backend)
        return self._coco_gt


def check_arguments(
    json_file: str, backend: str, tasks: Sequence[str] | None, max_dets_per_image: int
) -> None:
    """The :class:`COCOEvaluator` arguments that are errors, refused with what is expected."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"COCO ground-truth json file '{json_file}' (metadata 'json_file') does not exist"
        )
    if backend not in COCO_BACKENDS:
        raise ValueError(f"COCO backend '{backend}' is not one of {COCO_BACKENDS}")
    if tasks is not None:
        unknown = [t for t in tasks if t not in _TASKS]
        if unknown:
            raise ValueError(f"COCO tasks {unknown} are not among {_TASKS}")
    if max_dets_per_image < 1:
        raise ValueError(f"max_dets_per_image must be >= 1, got {max_dets_per_image}")


def tasks_to_score(
    tasks: Sequence[str] | None, records: list[dict], coco_gt: Any, json_file: str
) -> Sequence[str]:
    """``tasks``, by default ``bbox`` and ``segm`` when a record has masks, each checked to
    have the ground truth it reads."""
    tasks = tasks or (("bbox", "segm") if any("rles" in r for r in records) else ("bbox",))
    for task in tasks:
        # Before any task is scored: a json without masks fails at once, not after bbox.
        check_ground_truth_for_task(coco_gt.dataset, task, json_file)
    return tasks


def drop_unknown_images(records: list[dict], coco_gt: Any, json_file: str) -> list[dict]:
    """The records of images the ground truth has; the others are dropped with a warning."""
    known = set(coco_gt.getImgIds())
    unknown = sorted(r["image_id"] for r in records if r["image_id"] not in known)
    if unknown:
        logger.warning(
            "%d predicted image ids are not in '%s' and are ignored: %s%s",
            len(unknown),
            json_file,
            unknown[:10],
            " ..." if len(unknown) > 10 else "",
        )
    return [r for r in records if r["image_id"] in known]


def contiguous_to_dataset_ids(
    coco_gt: Any, dataset_id_to_contiguous: Mapping[int, int] | None, json_file: str
) -> dict[int, int]:
    """Contiguous label -> the json's category id (default: the ids in ascending order).

    Raises:
        ValueError: ``dataset_id_to_contiguous`` names ids the json does not define.
    """
    gt_cat_ids = sorted(int(c) for c in coco_gt.getCatIds())
    if dataset_id_to_contiguous is None:
        return {i + 1: cat_id for i, cat_id in enumerate(gt_cat_ids)}
    missing = sorted(set(dataset_id_to_contiguous) - set(gt_cat_ids))
    if missing:
        raise ValueError(
            f"thing_dataset_id_to_contiguous_id names category ids {missing} that "
            f"'{json_file}' does not define (its ids: {gt_cat_ids})"
        )
    return {v: k for k, v in dataset_id_to_contiguous.items()}


def check_mask_sizes(
    records: list[dict], coco_gt: Any, tasks: Sequence[str], json_file: str
) -> None:
    """For task ``segm``: every record has masks, at the size the json gives its image."""
    if "segm" not in tasks:
        return
    for record in records:
        if "rles" not in record:
            raise ValueError(
                f"task 'segm' needs 'masks' in the outputs; image {record['image_id']} has none"
            )
        image = coco_gt.imgs[record["image_id"]]
        expected = [int(image["height"]), int(image["width"])]
        for rle in record["rles"][:1]:
            if list(rle["size"]) != expected:
                raise ValueError(
                    f"masks of image {record['image_id']} are {list(rle['size'])} (H, W) but "
                    f"'{json_file}' says the image is {expected}; predict masks at the "
                    "dataset image's size"
                )


def category_names(
    coco_gt: Any, thing_classes: Sequence[str] | None, contiguous_to_dataset_id: dict[int, int]
) -> dict[int, str]:
    """Dataset category id -> the name its ``AP-<class>`` metric has (default: the json's)."""
    if thing_classes is None:
        return {
            int(c["id"]): str(c.get("name", c["id"])) for c in coco_gt.loadCats(coco_gt.getCatIds())
        }
    return {
        contiguous_to_dataset_id[i + 1]: name
        for i, name in enumerate(thing_classes)
        if i + 1 in contiguous_to_dataset_id
    }


def score_task(
    coco_gt: Any,
    results: list[dict[str, Any]],
    task: str,
    img_ids: list[int],
    names: Mapping[int, str],
    *,
    backend: str,
    max_dets_per_image: int,
) -> dict[str, float]:
    """The COCOeval metrics of one task's results, and ``AP-<class>`` per category.

    Args:
        names: category id -> the name in ``AP-<class>`` (:func:`category_names`).

    Returns:
        Every metric NaN, with a warning, when there are no results.
    """
    if not results:
        logger.warning(
            "COCO %s evaluation: no predictions to evaluate (%d images processed); every "
            "metric is NaN",
            task,
            len(img_ids),
        )
        return {key: float("nan") for key, _, _ in COCO_METRICS}
    coco_eval = run_coco_eval(
        coco_gt,
        results,
        task,
        backend,
        img_ids=img_ids,
        max_dets_per_image=max_dets_per_image,
    )
    metrics = coco_metrics(coco_eval)
    ap_per_category = per_category_ap(coco_eval)
    for cat_id, ap in ap_per_category.items():
        metrics[f"AP-{names.get(cat_id, str(cat_id))}"] = ap
    logger.info(
        "COCO %s (%s): %s",
        task,
        backend,
        ", ".join(f"{k}={metrics[k]:.3f}" for k, _, _ in COCO_METRICS),
    )
    return metrics


def write_coco_results(
    records: list[dict], contiguous_to_dataset_id: dict, output_dir: str
) -> None:
    """``<output_dir>/coco_instances_results.json``: the results with masks when every record
    has them (boxes kept), else the boxes."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "coco_instances_results.json")
    with_masks = all("rles" in r for r in records) and bool(records)
    results = instances_to_coco_results(
        records, contiguous_to_dataset_id, "segm" if with_masks else "bbox", keep_boxes=True
    )
    with open(path, "w") as f:
        json.dump(results, f)
    logger.info("wrote %d COCO results to %s", len(results), path)
