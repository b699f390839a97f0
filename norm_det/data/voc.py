"""Pascal VOC detection (``VOC2007``/``VOC2012`` layout, also the synthetic set) as records, and
its evaluation ground truth as the devkit reads it.

Layout under ``dirname``: ``ImageSets/Main/{split}.txt`` (one image id per line),
``Annotations/{id}.xml`` and ``JPEGImages/{id}.jpg``. VOC boxes are 1-based inclusive pixel
indices; as detectron2 does, ``xmin``/``ymin`` are shifted by -1 so that a box is XYXY in
0-based continuous coordinates (``[xmin - 1, ymin - 1, xmax, ymax]``). In this convention the
plain IoU equals the devkit's IoU with its ``+1`` on the XML's values. A record annotation's
``bbox`` is that box clipped to the image (for training) and ``bbox_as_written`` the same box
unclipped; :func:`load_voc_ground_truth` gives every object as written, which the VOC evaluator
scores against, as the devkit (``VOCevaldet``) does. Each annotation keeps its ``difficult`` flag.

Bad input (see docs/datasets.md), found when the split is loaded: an object of an unknown class
or without a complete ``<bndbox>`` is skipped with a warning naming the XML file and the object
index; so is, for training only, an object with nothing left inside the image (the evaluation
still counts it, as the devkit does). A coordinate, size or ``<difficult>`` that is not a finite
number, a split listing an image twice, a missing XML or image file, an empty image file or an
empty split raises, naming the file.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from norm_det.data.paths import check_files_exist, require_dir, require_file
from norm_det.data.problems import ProblemReport

__all__ = ["VOC_CLASSES", "load_voc_ground_truth", "load_voc_instances", "parse_voc_xml"]

Record = dict[str, Any]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


def parse_voc_xml(xml_file: str | Path) -> dict[str, Any]:
    """One VOC annotation file, its numbers checked but its content not validated.

    Returns:
        {"width": int | None, "height": int | None, "objects": [{"name", "difficult",
        "bbox": [xmin, ymin, xmax, ymax] as written (1-based inclusive; None where a tag is
        missing)}]}

    Raises:
        ValueError: the file is not XML, or a size, box coordinate or ``<difficult>`` present in
            it is not a finite number (naming the file, the object index, the tag and the text).
    """
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as err:
        raise ValueError(f"VOC annotation '{xml_file}' is not valid XML: {err}") from err

    def number(node: ET.Element | None, tag: str, where: str) -> float | None:
        child = None if node is None else node.find(tag)
        if child is None or child.text is None:
            return None
        try:
            value = float(child.text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(
                f"VOC annotation '{xml_file}' {where}: <{tag}> is {child.text.strip()!r}; "
                "expected a finite number"
            )
        return value

    size = root.find("size")
    width, height = number(size, "width", "<size>"), number(size, "height", "<size>")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name_node = obj.find("name")
        name = "" if name_node is None or name_node.text is None else name_node.text.strip()
        where = f"object {i} ('{name}')"
        box = obj.find("bndbox")
        difficult = number(obj, "difficult", where)
        objects.append(
            {
                "name": name,
                "difficult": int(difficult or 0),
                "bbox": [number(box, tag, f"{where} <bndbox>") for tag in _BOX_TAGS],
            }
        )
    return {
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "objects": objects,
    }


def _image_ids(file_ids: list[str]) -> list[int]:
    """Integer image ids: the digits of VOC ids ("2008_000002" -> 2008000002) when unique, else
    the position in the split file."""
    if all(re.fullmatch(r"\d+(_\d+)?", f) for f in file_ids):
        ids = [int(f.replace("_", "")) for f in file_ids]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(len(file_ids)))


def _read_split(dirname: Path, split: str, what: str) -> tuple[Path, list[tuple[str, int, Path]]]:
    """The split file and its images as (file id, image id, XML file), the XML files checked."""
    split_file = require_file(dirname / "ImageSets" / "Main" / f"{split}.txt", f"split of {what}")
    file_ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not file_ids:
        raise ValueError(f"'{split_file}' lists no images: {what} is empty")
    repeated = sorted(f for f, n in Counter(file_ids).items() if n > 1)
    if repeated:
        # Their objects would count twice in evaluation.
        raise ValueError(f"'{split_file}' lists images {repeated[:10]} more than once")
    images = []
    for file_id, image_id in zip(file_ids, _image_ids(file_ids)):
        xml_file = require_file(
            dirname / "Annotations" / f"{file_id}.xml", f"annotation of image '{file_id}' of {what}"
        )
        images.append((file_id, image_id, xml_file))
    return split_file, images


def _objects_as_written(
    xml_file: Path, class_to_label: dict[str, int], report: ProblemReport
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parsed XML and its objects of known classes with a complete box.

    Returns:
        (the parsed file, objects as {"where" (file and object index, for messages), "label",
        "difficult", "xml_bbox" (as written), "box" ([xmin - 1, ymin - 1, xmax, ymax],
        unclipped)})
    """
    parsed = parse_voc_xml(xml_file)
    if (parsed["width"] or 0) <= 0 or (parsed["height"] or 0) <= 0:
        raise ValueError(f"VOC annotation '{xml_file}' has no positive <size> width/height")
    objects = []
    for i, obj in enumerate(parsed["objects"]):
        where = f"'{xml_file.name}' object {i} ('{obj['name']}')"
        if obj["name"] not in class_to_label:
            report.skip("objects of unknown classes", where)
            continue
        if any(v is None for v in obj["bbox"]):
            report.skip("objects without a complete <bndbox>", where)
            continue
        xmin, ymin, xmax, ymax = obj["bbox"]
        objects.append(
            {
                "where": where,
                "label": class_to_label[obj["name"]],
                "difficult": obj["difficult"],
                "xml_bbox": obj["bbox"],
                "box": [xmin - 1.0, ymin - 1.0, xmax, ymax],
            }
        )
    return parsed, objects


def load_voc_instances(
    dirname: str | Path,
    split: str,
    *,
    class_names: tuple[str, ...] | list[str] = VOC_CLASSES,
    year: int = 2007,
    dataset_name: str = "",
) -> tuple[list[Record], dict[str, Any]]:
    """Read a VOC split into records and metadata.

    Args:
        dirname: the ``VOC2007``-like folder.
        split: ``train``, ``val``, ``trainval`` or ``test`` (a file of ``ImageSets/Main``).
        class_names: the classes; label i+1 is ``class_names[i]``.
        year: 2007 or 2012; the VOC evaluator uses the 11-point metric for 2007.
        dataset_name: named in messages and stored in the metadata.

    Returns:
        (records in split-file order, their annotations with ``bbox`` (clipped to the image),
        ``bbox_as_written`` (unclipped), ``category_id``, ``iscrowd`` 0 and ``difficult``;
        metadata with ``thing_classes``, ``dirname``, ``split``, ``year``, ``evaluator_type``
        "voc", ``ignore_label`` 255, ``name``)

    Raises:
        FileNotFoundError: the folder, the split file, an XML or an image file does not exist.
        ValueError: malformed input (see the module docstring).
    """
    what = f"dataset '{dataset_name}'" if dataset_name else "VOC dataset"
    dirname = require_dir(dirname, f"VOC folder of {what}")
    split_file, images = _read_split(dirname, split, what)
    class_to_label = {name: i + 1 for i, name in enumerate(class_names)}

    report = ProblemReport(str(dirname / "Annotations"))
    records = []
    for file_id, image_id, xml_file in images:
        parsed, objects = _objects_as_written(xml_file, class_to_label, report)
        annotations = []
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            box = [max(x0, 0.0), max(y0, 0.0), min(x1, parsed["width"]), min(y1, parsed["height"])]
            if box[2] <= box[0] or box[3] <= box[1]:
                report.skip(
                    "objects with a box of non-positive size inside the image (left out of "
                    "training; VOC evaluation counts them, as the devkit does)",
                    f"{obj['where']}: xmin, ymin, xmax, ymax = {obj['xml_bbox']}",
                )
                continue
            annotations.append(
                {
                    "bbox": box,
                    "bbox_as_written": list(obj["box"]),
                    "category_id": obj["label"],
                    "iscrowd": 0,
                    "difficult": obj["difficult"],
                }
            )
        records.append(
            {
                "file_name": str(dirname / "JPEGImages" / f"{file_id}.jpg"),
                "file_id": file_id,
                "height": parsed["height"],
                "width": parsed["width"],
                "image_id": image_id,
                "annotations": annotations,
            }
        )
    check_files_exist(records, "file_name", str(split_file))
    report.emit()
    metadata = {
        "name": dataset_name,
        "thing_classes": list(class_names),
        "dirname": str(dirname),
        "split": split,
        "year": int(year),
        "evaluator_type": "voc",
        "ignore_label": 255,
    }
    return records, metadata


def load_voc_ground_truth(
    dirname: str | Path,
    split: str,
    *,
    class_names: tuple[str, ...] | list[str] = VOC_CLASSES,
) -> dict[int, dict[str, Any]]:
    """The ground truth of a VOC split as the devkit evaluates it: every object of a known class
    with a complete box, as written in its XML (not clipped to the image, nothing dropped for
    its size), with its ``difficult`` flag.

    Problems a load would warn about are not repeated here (the dataset was loaded before it is
    evaluated); those that raise, raise.

    Args:
        dirname: the ``VOC2007``-like folder.
        split: the ``ImageSets/Main`` file.
        class_names: label i+1 is ``class_names[i]`` (the dataset's ``thing_classes``).

    Returns:
        image id (as :func:`load_voc_instances` numbers them) -> ``{"file_name": the JPEG,
        "xml_file", "boxes": (N, 4) float64 [xmin - 1, ymin - 1, xmax, ymax], "labels": (N,)
        int64 in 1..K, "difficult": (N,) bool}``
    """
    dirname = require_dir(dirname, "VOC folder")
    _, images = _read_split(dirname, split, f"VOC folder '{dirname}'")
    class_to_label = {name: i + 1 for i, name in enumerate(class_names)}
    report = ProblemReport(str(dirname / "Annotations"))  # warned about when loaded
    ground_truth = {}
    for file_id, image_id, xml_file in images:
        _, objects = _objects_as_written(xml_file, class_to_label, report)
        ground_truth[image_id] = {
            "file_name": str(dirname / "JPEGImages" / f"{file_id}.jpg"),
            "xml_file": str(xml_file),
            "boxes": np.array([o["box"] for o in objects], dtype=np.float64).reshape(-1, 4),
            "labels": np.array([o["label"] for o in objects], dtype=np.int64),
            "difficult": np.array([bool(o["difficult"]) for o in objects], dtype=bool),
        }
    return ground_truth
