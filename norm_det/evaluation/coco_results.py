"""The COCO result format of per-image predictions: RLE masks, XYWH boxes, dataset category ids.

A prediction record (what :class:`~norm_det.evaluation.COCOEvaluator` keeps per image) holds
``"boxes"`` XYXY in the image file's pixels, ``"scores"``, contiguous ``"labels"`` ``1..K`` and,
for Mask R-CNN, ``"rles"``: the masks cut at 0.5 and run-length encoded
(:func:`encode_masks`). :func:`instances_to_coco_results` turns records into the result dicts
COCOeval and ``coco_instances_results.json`` take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch

from norm_det.evaluation.evaluator import to_numpy

__all__ = ["encode_masks", "instances_to_coco_results", "prediction_record"]


def prediction_record(image_id: int, output: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of one image's output: boxes, scores, labels as arrays; masks as RLEs."""
    record: dict[str, Any] = {
        "image_id": image_id,
        "boxes": to_numpy(output["boxes"]).astype(np.float64).reshape(-1, 4),
        "scores": to_numpy(output["scores"]).astype(np.float64).reshape(-1),
        "labels": to_numpy(output["labels"]).astype(np.int64).reshape(-1),
    }
    if "masks" in output:
        record["rles"] = encode_masks(output["masks"])
    return record


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
