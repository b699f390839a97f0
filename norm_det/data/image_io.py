"""Reading images and label PNGs from disk, checked against what the annotations promise.

A file PIL cannot decode (truncated by an interrupted download, or not an image) is a ValueError
naming the file and its image id, where PIL's own error names neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["image_size", "read_image", "read_label_png"]


def _of(image_id: int | str | None) -> str:
    return "" if image_id is None else f" (image id {image_id})"


@contextlib.contextmanager
def _decoding(path: str | Path, what: str, image_id: int | str | None) -> Iterator[None]:
    """Turn PIL's errors while reading ``path`` into a ValueError naming it and ``image_id``."""
    try:
        yield
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL reports a truncated or corrupt file as OSError (UnidentifiedImageError is one) and
        # some broken headers as SyntaxError; a missing file was ruled out before.
        raise ValueError(
            f"{what} '{path}'{_of(image_id)} cannot be read: {err} (the file is truncated or "
            "not an image; download or extract it again)"
        ) from err


def image_size(path: str | Path, *, image_id: int | str | None = None) -> tuple[int, int]:
    """(height, width) of an image file from its header only (no decoding; fast).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an image PIL can identify.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file '{path}'{_of(image_id)} not found")
    with _decoding(path, "image file", image_id), Image.open(path) as img:
        width, height = img.size
    return height, width


def read_image(
    path: str | Path, *, image_id: int | str, expected_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor.

    The EXIF orientation is applied, as the annotation tools showed the image upright (detectron2
    does the same).

    Args:
        path: the image file.
        image_id: named in errors.
        expected_size: (height, width) the annotations were made for; a different size is an
            error, because boxes and masks would no longer line up.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded, or its size is not ``expected_size``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file '{path}' of image id {image_id} not found")
    with _decoding(path, "image file", image_id), Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        array = np.asarray(img)
    if expected_size is not None and tuple(array.shape[:2]) != tuple(expected_size):
        raise ValueError(
            f"image file '{path}' (image id {image_id}) is {array.shape[0]}x{array.shape[1]} "
            f"(HxW) but its annotations say {expected_size[0]}x{expected_size[1]}"
        )
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_label_png(path: str | Path, *, image_id: int | str | None = None) -> np.ndarray:
    """A single-channel label image (8- or 16-bit PNG) as an (H, W) int64 array.

    Args:
        path: the label file.
        image_id: the image it labels, named in errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded or has more than one channel.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"label file '{path}'{_of(image_id)} not found")
    with _decoding(path, "label file", image_id), Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(
                f"label file '{path}'{_of(image_id)} has PIL mode '{img.mode}'; expected a "
                "single-channel label image (mode L, P, I or I;16)"
            )
        return np.asarray(img).astype(np.int64)
