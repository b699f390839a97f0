"""Cityscapes fine semantic segmentation (also the synthetic set) as records, and the mapping of
Cityscapes label ids to the 19 train ids.

Layout: ``leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png`` and
``gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png``. The label ids (0..33) are
mapped to train ids 0..18 by cityscapesscripts' own label table; ids that do not count in
evaluation map to 255 (ignore). A label PNG holding an id outside the table is an error naming
the file and the ids (see docs/datasets.md).

When the split is loaded, the headers of every image, labelIds and (where present) instanceIds
PNG are read (not decoded; well under a second for the 2975 training images): a file that is
not an image, or a labelIds / instanceIds PNG of another size than its image, raises naming the
files, the image id and both sizes, rather than failing inside a training step or inside
cityscapesscripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from norm_det.data.image_io import image_size
from norm_det.data.paths import check_files_exist, require_dir

__all__ = [
    "CITYSCAPES_STUFF_CLASSES",
    "check_same_size",
    "cityscapes_label_id_to_train_id",
    "instance_file",
    "load_cityscapes_semantic",
]

Record = dict[str, Any]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def _labels() -> list[Any]:
    from cityscapesscripts.helpers.labels import labels

    return labels


def cityscapes_label_id_to_train_id() -> dict[int, int]:
    """Every Cityscapes label id that can appear in a label PNG (0..33) -> its train id (or 255).

    The license plate (id -1) cannot be stored in a PNG and is left out.
    """
    return {
        label.id: (label.trainId if 0 <= label.trainId < 255 else 255)
        for label in _labels()
        if label.id >= 0
    }


def _stuff_classes() -> list[str]:
    by_train_id = {label.trainId: label.name for label in _labels() if 0 <= label.trainId < 255}
    return [by_train_id[i] for i in range(len(by_train_id))]


# The 19 evaluated classes, indexed by train id (road, sidewalk, ..., bicycle).
CITYSCAPES_STUFF_CLASSES = tuple(_stuff_classes())


def instance_file(label_file: str | Path) -> str:
    """The ``*_gtFine_instanceIds.png`` beside a ``*_gtFine_labelIds.png`` (cityscapesscripts
    derives it by this very replacement)."""
    return str(label_file).replace("labelIds", "instanceIds")


def check_same_size(files: Sequence[str | Path], *, image_id: Any) -> None:
    """Raise when the image files ``files`` (an image, its labelIds and instanceIds PNGs, a
    prediction) do not all have the size of the first; only the files' headers are read.

    Args:
        files: the paths, the reference first.
        image_id: named in the message.

    Raises:
        ValueError: naming the two files, the image id and both (height, width).
    """
    reference = image_size(files[0], image_id=image_id)
    for other in files[1:]:
        size = image_size(other, image_id=image_id)
        if size != reference:
            raise ValueError(
                f"image id {image_id}: '{other}' is {size[0]}x{size[1]} (HxW) but "
                f"'{files[0]}' is {reference[0]}x{reference[1]}; the label files of an image "
                "must have its size"
            )


def load_cityscapes_semantic(
    image_dir: str | Path, gt_dir: str | Path, *, dataset_name: str = ""
) -> tuple[list[Record], dict[str, Any]]:
    """Pair every ``*_leftImg8bit.png`` under ``image_dir/{city}`` with its labelIds PNG.

    Args:
        image_dir: ``leftImg8bit/{split}``.
        gt_dir: ``gtFine/{split}``.
        dataset_name: named in messages and stored in the metadata.

    Returns:
        (records sorted by file name, each with ``file_name``, ``sem_seg_file_name``,
        ``image_id`` (position) and ``file_id``; metadata with ``stuff_classes`` (19, by train id),
        ``label_id_to_train_id``, ``ignore_label`` 255, ``image_dir``, ``gt_dir``,
        ``evaluator_type`` "cityscapes_sem_seg", ``name``)
    """
    what = f"dataset '{dataset_name}'" if dataset_name else "Cityscapes dataset"
    image_dir = require_dir(image_dir, f"image folder of {what}")
    gt_dir = require_dir(gt_dir, f"ground-truth folder of {what}")
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise ValueError(f"no '*{IMAGE_SUFFIX}' files under '{image_dir}/<city>/': {what} is empty")
    records = []
    for image_id, image in enumerate(images):
        stem = image.name[: -len(IMAGE_SUFFIX)]
        records.append(
            {
                "file_name": str(image),
                "sem_seg_file_name": str(gt_dir / image.parent.name / f"{stem}{LABEL_SUFFIX}"),
                "file_id": stem,
                "image_id": image_id,
            }
        )
    check_files_exist(records, "sem_seg_file_name", f"ground truth of {what} in '{gt_dir}'")
    for record in records:
        files = [record["file_name"], record["sem_seg_file_name"]]
        if Path(instance_file(files[1])).is_file():
            files.append(instance_file(files[1]))
        check_same_size(files, image_id=record["image_id"])
    metadata = {
        "name": dataset_name,
        "stuff_classes": list(CITYSCAPES_STUFF_CLASSES),
        "label_id_to_train_id": cityscapes_label_id_to_train_id(),
        "ignore_label": 255,
        "image_dir": str(image_dir),
        "gt_dir": str(gt_dir),
        "evaluator_type": "cityscapes_sem_seg",
    }
    return records, metadata
