"""COCO segmentations (polygons or run-length encodings) as binary masks, through pycocotools.

A COCO ``"segmentation"`` is either a list of polygons ``[[x0, y0, x1, y1, ...], ...]`` in
absolute pixel coordinates (non-crowd objects), or a run-length encoding
``{"size": [H, W], "counts": ...}`` whose counts are a list of ints (uncompressed, as COCO's
crowd regions) or a string (compressed).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "is_rle",
    "mask_to_uncompressed_rle",
    "rle_problem",
    "segmentation_to_mask",
    "valid_polygons",
]


def is_rle(segmentation: Any) -> bool:
    """Whether a COCO segmentation is a run-length encoding (a dict) rather than polygons."""
    return isinstance(segmentation, dict)


def rle_problem(segmentation: dict[str, Any], height: int, width: int) -> str | None:
    """What is wrong with an RLE for an image of ``height`` x ``width``, or None.

    An RLE needs ``"size"`` ``[H, W]`` equal to its image's (pycocotools would decode a mask of
    another shape, or read past the counts) and ``"counts"``, a list of ints or a string.
    """
    size = segmentation.get("size")
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or any(type(s) is not int for s in size)
    ):
        return f"RLE 'size' is {size!r}; expected [height, width] as two ints"
    if list(size) != [height, width]:
        return f"RLE size {list(size)} (H, W) differs from its image's {[height, width]}"
    counts = segmentation.get("counts")
    if isinstance(counts, list):
        if any(type(c) is not int or c < 0 for c in counts):
            return "RLE 'counts' is a list holding something other than non-negative ints"
        if sum(counts) != height * width:
            return (
                f"RLE 'counts' add up to {sum(counts)} pixels where its size {list(size)} has "
                f"{height * width}"
            )
    elif not isinstance(counts, str | bytes):
        return f"RLE 'counts' is a {type(counts).__name__}; expected a list of ints or a string"
    return None


def valid_polygons(polygons: list[list[float]]) -> tuple[list[list[float]], list[int]]:
    """Split polygons into usable ones and the indices of those with fewer than 3 points.

    A polygon needs at least 3 (x, y) points, i.e. an even number >= 6 of coordinates; pycocotools
    would otherwise rasterize garbage or crash.

    Returns:
        (the valid polygons as float lists, the indices of the invalid ones)
    """
    kept, bad = [], []
    for i, polygon in enumerate(polygons):
        if len(polygon) >= 6 and len(polygon) % 2 == 0:
            kept.append([float(v) for v in polygon])
        else:
            bad.append(i)
    return kept, bad


def segmentation_to_mask(
    segmentation: Any, height: int, width: int, *, where: str = "an annotation"
) -> np.ndarray:
    """Rasterize a COCO segmentation.

    Args:
        segmentation: polygons (already filtered by :func:`valid_polygons`) or an RLE dict.
        height, width: the image size; an RLE must have this size.
        where: the annotation, for the error message (file, annotation and image id).

    Returns:
        (H, W) uint8 mask with values 0 and 1.

    Raises:
        ValueError: an RLE that :func:`rle_problem` rejects.
    """
    if is_rle(segmentation):
        problem = rle_problem(segmentation, height, width)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        size = [height, width]
        counts = segmentation["counts"]
        rle = (
            mask_util.frPyObjects(segmentation, height, width)
            if isinstance(counts, list)
            else {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        )
    else:
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    with warnings.catch_warnings():
        # pycocotools' compiled decoder trips numpy 2's __array__(copy=...) deprecation; the
        # result is right, the warning is noise in every training log.
        warnings.filterwarnings(
            "ignore", message="__array__ implementation", category=DeprecationWarning
        )
        return mask_util.decode(rle).astype(np.uint8)


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode an (H, W) binary mask as COCO's uncompressed RLE (JSON-friendly list of counts).

    Runs are counted in column-major order and start with a run of zeros, as COCO specifies.
    """
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}
