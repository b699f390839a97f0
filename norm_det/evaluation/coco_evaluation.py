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

import numpy as np
import pycocotools.mask as mask_util
import torch

from norm_det.data.postprocess import rescale_to_original
from norm_det.evaluation.coco_backend import (
    COCO_BACKENDS,
    COCO_METRICS,
    coco_metrics,
    load_coco_gt,
    per_category_ap,
    run_coco_eval,
)
from norm_det.evaluation.evaluator import (
    DatasetEvaluator,
    Results,
    image_id_of,
    to_numpy,
    unique_by_image_id,
)
from norm_det.evaluation.guards import check_finite_outputs, check_ground_truth_for_task
from norm_det.utils.comm import all_gather_object, is_main_process

__all__ = ["COCOEvaluator", "instances_to_coco_results"]

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
        if not os.path.isfile(self.json_file):
            raise FileNotFoundError(
                f"COCO ground-truth json file '{self.json_file}' (metadata 'json_file') does not "
                "exist"
            )
        if backend not in COCO_BACKENDS:
            raise ValueError(f"COCO backend '{backend}' is not one of {COCO_BACKENDS}")
        if tasks is not None:
            unknown = [t for t in tasks if t not in _TASKS]
            if unknown:
                raise ValueError(f"COCO tasks {unknown} are not among {_TASKS}")
        if max_dets_per_image < 1:
            raise ValueError(f"max_dets_per_image must be >= 1, got {max_dets_per_image}")
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
        if "json_file" not in metadata:
            raise ValueError(
                f"dataset metadata has no 'json_file' (keys: {sorted(metadata)}); COCO "
                "evaluation needs the ground-truth json"
            )
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
            record: dict[str, Any] = {
                "image_id": image_id,
                "boxes": to_numpy(output["boxes"]).astype(np.float64).reshape(-1, 4),
                "scores": to_numpy(output["scores"]).astype(np.float64).reshape(-1),
                "labels": to_numpy(output["labels"]).astype(np.int64).reshape(-1),
            }
            if "masks" in output:
                record["rles"] = encode_masks(output["masks"])
            self._predictions.append(record)

    def evaluate(self) -> Results:
        gathered = all_gather_object(self._predictions)
        if not is_main_process():
            return {}
        records = unique_by_image_id(gathered)
        coco_gt = self._ground_truth()
        records = self._drop_unknown_images(records, coco_gt)
        tasks = self.tasks or (("bbox", "segm") if any("rles" in r for r in records) else ("bbox",))
        for task in tasks:
            # Before any task is scored: a json without masks fails at once, not after bbox.
            check_ground_truth_for_task(coco_gt.dataset, task, self.json_file)
        contiguous_to_dataset_id = self._contiguous_to_dataset_id(coco_gt)
        self._check_mask_sizes(records, coco_gt, tasks)

        results_per_task = {
            task: instances_to_coco_results(records, contiguous_to_dataset_id, task)
            for task in tasks
        }
        if self.output_dir is not None:
            self._write_results(records, contiguous_to_dataset_id)
        img_ids = sorted(r["image_id"] for r in records)
        return {
            task: self._evaluate_task(coco_gt, results, task, img_ids, contiguous_to_dataset_id)
            for task, results in results_per_task.items()
        }

    def _ground_truth(self) -> Any:
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self.json_file, self.backend)
        return self._coco_gt

    def _drop_unknown_images(self, records: list[dict], coco_gt: Any) -> list[dict]:
        known = set(coco_gt.getImgIds())
        unknown = sorted(r["image_id"] for r in records if r["image_id"] not in known)
        if unknown:
            logger.warning(
                "%d predicted image ids are not in '%s' and are ignored: %s%s",
                len(unknown),
                self.json_file,
                unknown[:10],
                " ..." if len(unknown) > 10 else "",
            )
        return [r for r in records if r["image_id"] in known]

    def _contiguous_to_dataset_id(self, coco_gt: Any) -> dict[int, int]:
        gt_cat_ids = sorted(int(c) for c in coco_gt.getCatIds())
        if self.dataset_id_to_contiguous is None:
            return {i + 1: cat_id for i, cat_id in enumerate(gt_cat_ids)}
        missing = sorted(set(self.dataset_id_to_contiguous) - set(gt_cat_ids))
        if missing:
            raise ValueError(
                f"thing_dataset_id_to_contiguous_id names category ids {missing} that "
                f"'{self.json_file}' does not define (its ids: {gt_cat_ids})"
            )
        return {v: k for k, v in self.dataset_id_to_contiguous.items()}

    def _check_mask_sizes(self, records: list[dict], coco_gt: Any, tasks: Sequence[str]) -> None:
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
                        f"'{self.json_file}' says the image is {expected}; predict masks at the "
                        "dataset image's size"
                    )

    def _evaluate_task(
        self,
        coco_gt: Any,
        results: list[dict[str, Any]],
        task: str,
        img_ids: list[int],
        contiguous_to_dataset_id: dict[int, int],
    ) -> dict[str, float]:
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
            self.backend,
            img_ids=img_ids,
            max_dets_per_image=self.max_dets_per_image,
        )
        metrics = coco_metrics(coco_eval)
        ap_per_category = per_category_ap(coco_eval)
        names = self._class_names(coco_gt, contiguous_to_dataset_id)
        for cat_id, ap in ap_per_category.items():
            metrics[f"AP-{names.get(cat_id, str(cat_id))}"] = ap
        logger.info(
            "COCO %s (%s): %s",
            task,
            self.backend,
            ", ".join(f"{k}={metrics[k]:.3f}" for k, _, _ in COCO_METRICS),
        )
        return metrics

    def _class_names(self, coco_gt: Any, contiguous_to_dataset_id: dict[int, int]) -> dict:
        if self.thing_classes is None:
            return {
                int(c["id"]): str(c.get("name", c["id"]))
                for c in coco_gt.loadCats(coco_gt.getCatIds())
            }
        return {
            contiguous_to_dataset_id[i + 1]: name
            for i, name in enumerate(self.thing_classes)
            if i + 1 in contiguous_to_dataset_id
        }

    def _write_results(self, records: list[dict], contiguous_to_dataset_id: dict) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "coco_instances_results.json")
        with_masks = all("rles" in r for r in records) and bool(records)
        results = instances_to_coco_results(
            records, contiguous_to_dataset_id, "segm" if with_masks else "bbox", keep_boxes=True
        )
        with open(path, "w") as f:
            json.dump(results, f)
        logger.info("wrote %d COCO results to %s", len(results), path)


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Compressed RLEs of mask probabilities cut at 0.5.

    Args:
        masks: ``(M, 1, H, W)`` (or ``(M, H, W)``) probabilities.

    Returns:
        M dicts ``{"size": [H, W], "counts": str}``.
    """
    masks = to_numpy(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"'masks' must be (M, 1, H, W) or (M, H, W), got shape {masks.shape}")
    binary = np.asfortranarray((masks > 0.5).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_util.encode(binary) if len(masks) else []
    for rle in rles:
        # str counts are json-serializable and accepted by both COCO backends.
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def instances_to_coco_results(
    records: Sequence[dict[str, Any]],
    contiguous_to_dataset_id: Mapping[int, int],
    task: str,
    *,
    keep_boxes: bool = False,
) -> list[dict[str, Any]]:
    """COCO result dicts of the stored per-image predictions.

    Args:
        records: ``{"image_id", "boxes" (M, 4) XYXY, "scores" (M,), "labels" (M,), "rles"}``.
        contiguous_to_dataset_id: contiguous label -> dataset category id.
        task: ``"bbox"`` (boxes as XYWH) or ``"segm"`` (RLE, without the box, so that
            COCOeval takes the area from the mask as it does for ground truth).
        keep_boxes: also keep the box in segm results (for the results file).
    """
    results = []
    for record in records:
        labels = record["labels"]
        unknown = sorted(set(labels.tolist()) - set(contiguous_to_dataset_id))
        if unknown:
            raise ValueError(
                f"image {record['image_id']}: predicted labels {unknown} have no dataset category "
                f"(known contiguous labels: {sorted(contiguous_to_dataset_id)})"
            )
        boxes = record["boxes"].copy()
        boxes[:, 2:] -= boxes[:, :2]
        category_ids = [contiguous_to_dataset_id[label] for label in labels.tolist()]
        for i, (box, score, category_id) in enumerate(
            zip(boxes.tolist(), record["scores"].tolist(), category_ids)
        ):
            result = {"image_id": record["image_id"], "category_id": category_id, "score": score}
            if task == "bbox" or keep_boxes:
                result["bbox"] = box
            if task == "segm":
                result["segmentation"] = dict(record["rles"][i])
            results.append(result)
    return results
