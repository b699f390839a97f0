"""What evaluation refuses to score, checked before a metric or a COCO backend sees the input.

pycocotools and faster-coco-eval disagree outside the COCO format: predictions with NaN boxes
score AP 100 on the first and lower on the second, NaN scores AP 100 on the first and an error on
the second, ground truth without ``iscrowd`` or ``area`` is a KeyError on the first and metrics on
the second. Both backends go through these checks first, so they either give the same numbers or
norm_det raises one clear ValueError (docs/evaluation.md, "What norm_det refuses to score"):

- a prediction with a NaN or inf box, score or mask, as model outputs
  (:func:`check_finite_outputs`, also for Pascal VOC) or as COCO result dicts
  (:func:`check_coco_results`), and semantic segmentation logits with a NaN or inf
  (:func:`check_finite_sem_seg`, before an argmax would pick an arbitrary class): a diverged
  model must never score. The error names the images and how many predictions (pixels) are bad.
- ground truth that lacks what the task reads (``bbox`` and ``area``; for ``segm`` the
  ``segmentation`` and the images' sizes) or has a non-finite box or area
  (:func:`check_ground_truth_for_task`), naming the file and the first ids.
- ground truth without ``iscrowd`` (older mmdet-style files) is read as not crowd, in a copy
  (:func:`coco_ground_truth`); the user's dict and file are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from norm_det.data.coco import check_coco_sections
from norm_det.data.problems import ProblemReport, describe, non_finite_numbers

__all__ = [
    "check_coco_results",
    "check_finite_outputs",
    "check_finite_sem_seg",
    "check_ground_truth_for_task",
    "coco_ground_truth",
    "sem_seg_logits",
]

# Instance outputs: every key holds one entry per prediction; the float ones must be finite.
_COUNTED_OUTPUTS = ("boxes", "scores", "labels", "masks")
_FLOAT_OUTPUTS = ("boxes", "scores", "masks")

# Keys without which the backends' index (createIndex) fails, per section of a COCO dict.
_INDEX_KEYS = {
    "images": ("id",),
    "annotations": ("id", "image_id", "category_id"),
    "categories": ("id",),
}

_MAX_SHOWN = 10


def check_finite_outputs(image_ids: Sequence[int], outputs: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a batch of instance outputs when any prediction holds a NaN or inf.

    Vectorized per tensor, on the tensor's device; only per-image verdicts come back.

    Args:
        image_ids: the image of each output, in the same order.
        outputs: per image ``"boxes"`` (M, 4), ``"scores"`` (M,), ``"labels"`` (M,) and
            optionally ``"masks"`` (M, 1, H, W); tensors or arrays.

    Raises:
        ValueError: an image's outputs disagree on M (naming the image and the counts), or
            predictions hold NaN or inf (naming the images, how many of their predictions are
            bad and in which outputs).
    """
    bad_images: dict[int, tuple[int, int, list[str]]] = {}
    for image_id, output in zip(image_ids, outputs, strict=True):
        rows = {
            key: _prediction_rows(output[key], key, image_id)
            for key in _COUNTED_OUTPUTS
            if key in output
        }
        counts = {key: int(r.shape[0]) for key, r in rows.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"image {image_id}: the outputs disagree on the number of predictions "
                f"({', '.join(f'{k}: {n}' for k, n in counts.items())}); each needs one entry "
                "per prediction"
            )
        bad, fields = None, []
        for key in _FLOAT_OUTPUTS:
            if key not in rows or not rows[key].is_floating_point():
                continue
            nonfinite = _nonfinite_rows(rows[key])
            if nonfinite.any():
                fields.append(key)
                bad = nonfinite if bad is None else bad | nonfinite
        if bad is not None:
            bad_images[image_id] = (int(bad.sum()), int(bad.shape[0]), fields)
    if bad_images:
        raise _nonfinite_error("model outputs", bad_images, "boxes, scores or masks")


def sem_seg_logits(
    output: Mapping[str, Any], image_id: int, num_classes: int, expected: str
) -> torch.Tensor:
    """``output["sem_seg"]`` as a tensor, refused unless it is (``num_classes``, H, W).

    Raises:
        ValueError: of another shape; ``expected`` says what it must be, e.g.
            ``"(K=19, H, W) logits"``.
    """
    logits = torch.as_tensor(output["sem_seg"])
    if logits.ndim != 3 or logits.shape[0] != num_classes:
        raise ValueError(
            f"image {image_id}: outputs['sem_seg'] must be {expected}, got shape "
            f"{tuple(logits.shape)}"
        )
    return logits


def check_finite_sem_seg(
    image_ids: Sequence[int],
    outputs: Sequence[Mapping[str, Any]],
    files: Sequence[str | None] | None = None,
) -> None:
    """Refuse a batch of semantic segmentation outputs when any logit is NaN or inf.

    Called before the argmax, which turns a NaN into an arbitrary class that would be scored.
    One min/max pass per image, on the tensor's device (a sum could overflow to inf on large
    finite float16 logits); the bad pixels are counted only for an image that fails.

    Args:
        image_ids: the image of each output, in the same order.
        outputs: per image ``"sem_seg"`` (K, H, W) logits, a tensor or an array.
        files: per image a file named with its id in the error (None entries: the id only).

    Raises:
        ValueError: an output has no ``"sem_seg"`` (naming the image and the keys it has), or
            logits hold NaN or inf (naming the images, their files, and how many of their pixels
            have a non-finite logit).
    """
    files = [None] * len(image_ids) if files is None else files
    bad_images: dict[int, tuple[int, int, list[str]]] = {}
    names: dict[int, str] = {}
    for image_id, output, file in zip(image_ids, outputs, files, strict=True):
        if "sem_seg" not in output:
            raise ValueError(
                f"image {image_id}: the outputs have no 'sem_seg' (keys: {sorted(output)}); "
                "semantic segmentation evaluation needs (K, H, W) logits"
            )
        logits = torch.as_tensor(output["sem_seg"])
        if not logits.is_floating_point() or logits.numel() == 0 or _finite_along(logits):
            continue
        # (K, pixels): a pixel is bad when any of its K logits is.
        per_pixel = logits.reshape(logits.shape[0], -1) if logits.ndim > 1 else logits[None]
        bad = ~_finite_along(per_pixel, dim=0)
        bad_images[image_id] = (int(bad.sum()), int(bad.numel()), ["sem_seg"])
        if file is not None:
            names[image_id] = str(file)
    if bad_images:
        raise _nonfinite_error(
            "model outputs", bad_images, "'sem_seg' logits", unit="pixel(s)", files=names
        )


def check_coco_results(
    results: Sequence[Mapping[str, Any]], iou_type: str, known_image_ids: Iterable[int]
) -> None:
    """Refuse COCO result dicts that are incomplete, for unknown images, or not finite.

    Args:
        results: ``{"image_id", "category_id", "score", "bbox" (XYWH) or "segmentation"}``.
        iou_type: ``"bbox"`` (the box is read) or ``"segm"`` (the RLE is).
        known_image_ids: the ground truth's image ids.

    Raises:
        ValueError: a result lacks a key or holds a value that is not a number (naming its
            position and image), names images the ground truth lacks (naming them), or has a NaN
            or inf score or box (naming the images and how many results are bad).
    """
    needed = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    n = len(results)
    try:
        image_ids = np.fromiter((r["image_id"] for r in results), np.int64, count=n)
        np.fromiter((r["category_id"] for r in results), np.int64, count=n)
        scores = np.fromiter((r["score"] for r in results), np.float64, count=n)
        if iou_type == "bbox":
            boxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(n, 4)
        elif not all("segmentation" in r for r in results):
            raise KeyError("segmentation")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(_malformed_result(results, needed, err)) from None

    unknown = np.setdiff1d(image_ids, np.fromiter(known_image_ids, np.int64))
    if unknown.size:
        raise ValueError(
            f"COCO results name {unknown.size} image id(s) that the ground truth does not "
            f"contain: {_first(unknown.tolist())}"
        )

    bad_score = ~np.isfinite(scores)
    # A segm result's score is all that can be non-finite: its RLE counts are integers.
    bad_box = ~np.isfinite(boxes).all(axis=1) if iou_type == "bbox" else np.zeros(n, bool)
    bad = bad_score | bad_box
    if not bad.any():
        return
    bad_images = {}
    for image_id in np.unique(image_ids[bad]).tolist():
        in_image = image_ids == image_id
        fields = [
            name
            for name, flags in (("bbox", bad_box), ("score", bad_score))
            if flags[in_image].any()
        ]
        bad_images[image_id] = (int(bad[in_image].sum()), int(in_image.sum()), fields)
    raise _nonfinite_error("COCO results", bad_images, "scores or boxes")


def coco_ground_truth(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A copy of a COCO ground-truth dict that both backends index and read alike.

    Every annotation is copied (the backends write into annotation dicts: pycocotools replaces
    polygons by RLEs and adds ``ignore``), and one without ``iscrowd`` gets ``iscrowd: 0`` in its
    copy, as faster-coco-eval reads it (COCO's format requires the key; older mmdet-style files
    omit it for non-crowd objects).

    Args:
        data: the json's dict, e.g. from :func:`norm_det.data.coco.read_coco_json`.
        source: the file it came from, named in errors.

    Raises:
        ValueError: ``images`` or ``categories`` is missing, a section is not a list of dicts, or
            entries lack the ids the backends index by (naming the file and the entries).
    """
    check_coco_sections(data, source)
    report = ProblemReport(source)
    for section, keys in _INDEX_KEYS.items():
        entries = data.get(section, [])
        if section != "annotations" and section not in data:
            raise ValueError(f"'{source}' has no '{section}'; a COCO ground truth needs them")
        for key in keys:
            for position in _positions_without(entries, key):
                report.reject(
                    f"{section} without '{key}'", _describe_entry(entries, position, section)
                )
    report.emit()
    annotations = [dict(ann) for ann in data.get("annotations", [])]
    for ann in annotations:
        ann.setdefault("iscrowd", 0)
    return {**data, "annotations": annotations}


def check_ground_truth_for_task(dataset: Mapping[str, Any], iou_type: str, source: str) -> None:
    """Refuse ground truth that lacks what COCOeval reads for ``iou_type``, or is not finite.

    Both tasks read ``iscrowd`` and ``area`` (the APs/APm/APl ranges), ``bbox`` reads the box,
    ``segm`` the ``segmentation`` and each image's ``height`` and ``width``. Without this,
    pycocotools stops with a KeyError and faster-coco-eval goes on with its own defaults.

    Args:
        dataset: a COCO dict (``coco_gt.dataset``).
        iou_type: ``"bbox"`` or ``"segm"``.
        source: the file it came from, named in the error.

    Raises:
        ValueError: naming the file, each problem, how many entries have it and the first ids.
    """
    annotations = dataset.get("annotations", [])
    report = ProblemReport(source)
    needed = {
        "iscrowd": "norm_det.evaluation.load_coco_gt reads a missing one as 0; load it with that",
        "area": "the area ranges of APs/APm/APl need it",
    }
    if iou_type == "bbox":
        needed["bbox"] = "bbox evaluation needs it"
    else:
        needed["segmentation"] = (
            "segm evaluation needs every object's mask; evaluate tasks=('bbox',) for box AP only"
        )
    for key, why in needed.items():
        for position in _positions_without(annotations, key):
            report.reject(
                f"annotations without '{key}' ({why})",
                _describe_entry(annotations, position, "annotations"),
            )
    if iou_type == "segm":
        images = dataset.get("images", [])
        for key in ("height", "width"):
            for position in _positions_without(images, key):
                report.reject(
                    f"images without '{key}' (segm evaluation rasterizes polygons at the "
                    "image's size)",
                    _describe_entry(images, position, "images"),
                )
    report.emit()  # the finite checks below read keys that are now known to be there

    _reject_non_finite(annotations, "area", 1, report)
    if iou_type == "bbox":
        _reject_non_finite(annotations, "bbox", 4, report)
    report.emit()


def _prediction_rows(values: Any, key: str, image_id: int) -> torch.Tensor:
    """``values`` as a (M, F) tensor, one row per prediction (numpy arrays are not copied)."""
    rows = torch.as_tensor(values)
    if key == "boxes":
        if rows.numel() % 4:
            raise ValueError(
                f"image {image_id}: 'boxes' has shape {tuple(rows.shape)}; expected (M, 4) XYXY"
            )
        return rows.reshape(-1, 4)
    return rows.flatten(1) if rows.ndim > 1 else rows.reshape(-1, 1)


def _nonfinite_rows(rows: torch.Tensor) -> torch.Tensor:
    """(M,) bool: which rows of a float (M, F) tensor hold a NaN or an inf."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    return ~_finite_along(rows, dim=1)


def _finite_along(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Whether every value reduced over ``dim`` (None: all of them) is finite; non-empty input.

    The minimum and maximum propagate a NaN and keep an inf, so the values are finite exactly
    when both are, where isfinite over every pixel of full-size masks or logits costs 20 to 40x
    as much and a sum can overflow to inf on large finite float16 values.
    """
    if dim is None:
        low, high = torch.aminmax(values)  # one pass
    else:
        # Along a dim, on CPU, aminmax is 4 to 7x slower than these two vectorized passes.
        low, high = values.amin(dim=dim), values.amax(dim=dim)
    return torch.isfinite(low) & torch.isfinite(high)


def _nonfinite_error(
    what: str,
    bad_images: dict[int, tuple[int, int, list[str]]],
    fields: str,
    *,
    unit: str = "prediction(s)",
    files: Mapping[int, str] | None = None,
) -> ValueError:
    """The error for non-finite predictions, per image id: (bad, predictions, fields); ``files``
    names an image's file next to its id."""
    files = files or {}
    num_bad = sum(bad for bad, _, _ in bad_images.values())
    per_image = []
    for image_id, (bad, total, names) in sorted(bad_images.items()):
        where = (
            f"image {image_id} ('{files[image_id]}')" if image_id in files else f"image {image_id}"
        )
        per_image.append(f"{where}: {bad} of {total} ({', '.join(names)})")
    return ValueError(
        f"refusing to score {what} with NaN or inf {fields} (a diverged model?): {num_bad} "
        f"{unit} in {len(bad_images)} image(s) are not finite; {_first(per_image)}"
    )


def _malformed_result(
    results: Sequence[Mapping[str, Any]], needed: tuple[str, ...], err: Exception
) -> str:
    """What is wrong with the first malformed result (a loop, run only once reading failed)."""
    for position, result in enumerate(results):
        if not isinstance(result, Mapping):
            return f"COCO result {position} is {describe(result)}; expected a dict with {needed}"
        where = f"COCO result {position} (image id {describe(result.get('image_id'))})"
        missing = [key for key in needed if key not in result]
        if missing:
            return f"{where} has no {missing}; results need {list(needed)}"
        # The conversions of the vectorized read, one result at a time.
        try:
            np.array([result["image_id"], result["category_id"]], dtype=np.int64)
            np.float64(result["score"])
            if "bbox" in needed:
                np.array(result["bbox"], dtype=np.float64).reshape(4)
        except (TypeError, ValueError):
            shown = ", ".join(
                f"{key} {describe(result[key])}" for key in needed if key != "segmentation"
            )
            return (
                f"{where}: expected integer ids, a number score and, for bbox, 4 numbers "
                f"[x, y, w, h]; got {shown}"
            )
    return f"COCO results cannot be read as numbers: {err}"


def _reject_non_finite(
    entries: list[Mapping[str, Any]], key: str, width: int, report: ProblemReport
) -> None:
    """Reject entries whose ``key`` is not ``width`` finite numbers: vectorized, a loop on error."""
    if not entries:
        return
    try:
        values = np.array([e[key] for e in entries], dtype=np.float64).reshape(len(entries), -1)
        if values.shape[1] == width and np.isfinite(values).all():
            return
    except (TypeError, ValueError):
        pass  # ragged or non-numeric: the loop below names the entries
    for position, entry in enumerate(entries):
        value = entry[key]
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if len(numbers) != width or non_finite_numbers(numbers):
            expected = "a finite number" if width == 1 else f"{width} finite numbers"
            report.reject(
                f"annotations whose '{key}' is not {expected}",
                f"{_describe_entry(entries, position, 'annotations')}: {describe(value)}",
            )


def _positions_without(entries: Iterable[Mapping[str, Any]], key: str) -> list[int]:
    return [i for i, entry in enumerate(entries) if key not in entry]


_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}


def _describe_entry(entries: Sequence[Mapping[str, Any]], position: int, section: str) -> str:
    """``annotation id 7``, or the position of an entry that has no id."""
    entry_id = entries[position].get("id")
    if entry_id is None:
        return f"{_SINGULAR[section]} at position {position} (it has no 'id')"
    return f"{_SINGULAR[section]} id {describe(entry_id)}"


def _first(items: list[Any]) -> str:
    more = f" and {len(items) - _MAX_SHOWN} more" if len(items) > _MAX_SHOWN else ""
    return ", ".join(str(item) for item in items[:_MAX_SHOWN]) + more
