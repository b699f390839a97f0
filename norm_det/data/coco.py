"""COCO-format instance annotations (COCO 2017 and the built-in synthetic set) as records.

A record is a detectron2-style dict: ``file_name``, ``height``, ``width``, ``image_id`` and
``annotations``, each annotation with ``bbox`` (XYXY absolute pixels, clipped to the image),
``category_id`` (contiguous 1..K, 0 is background), ``iscrowd``, ``id`` and, when the json has
one, ``segmentation`` (polygons or RLE). Category ids of the json are mapped to 1..K in the order
of increasing id, as detectron2 orders its classes.

Bad input (see docs/datasets.md), all found here, when the file is loaded: an annotation
referencing an unknown image or category, a box of non-positive size or a polygon with fewer than
3 points is skipped with a :class:`~norm_det.data.problems.DatasetWarning` naming the json file
and the ids. What would change a number raises a ValueError naming the file and the ids: a file
that is not JSON or not a COCO dict, an id that is missing, duplicated or not an integer, a
non-finite or non-numeric box or polygon coordinate, an ``iscrowd`` other than 0/1, an RLE of
another size than its image. A missing or empty (0-byte) image file, or an empty dataset, raises.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from norm_det.data.masks import is_rle, rle_problem, valid_polygons
from norm_det.data.paths import check_files_exist, require_dir, require_file
from norm_det.data.problems import ProblemReport, describe, non_finite_numbers

__all__ = ["check_coco_sections", "load_coco_json", "read_coco_json"]

Record = dict[str, Any]

_SECTIONS = ("images", "annotations", "categories")


def read_coco_json(json_file: str | Path) -> dict[str, Any]:
    """A COCO json file as a dict whose ``images``, ``annotations`` and ``categories`` (those
    present) are lists of dicts.

    Raises:
        ValueError: the file is not valid JSON (naming the line, column and character, as a
            truncated download ends mid-way), is not a dict, or a section is not a list of dicts.
    """
    path = Path(json_file)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"'{path}' is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno}, "
            f"character {err.pos} of {path.stat().st_size} bytes); a file that ends early was "
            "probably truncated by an interrupted download or copy"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"'{path}' is not UTF-8 text (byte {err.start}): not a json file"
        ) from None
    if not isinstance(data, dict):
        hint = " (a list is what a COCO *results* file holds)" if isinstance(data, list) else ""
        raise ValueError(
            f"'{path}' holds a {type(data).__name__} at its top level{hint}; a COCO annotation "
            f"file is a dict with {list(_SECTIONS)}"
        )
    check_coco_sections(data, str(path))
    return data


def check_coco_sections(data: Mapping[str, Any], source: str) -> None:
    """Check that the ``images``, ``annotations`` and ``categories`` a COCO dict has are lists of
    dicts, as every reader of the sections indexes them.

    Args:
        data: a COCO dict, read from a file or given in memory.
        source: the file it came from, named in the error.

    Raises:
        ValueError: a section is not a list, or has entries that are not dicts (naming the file,
            the section and the first positions).
    """
    for section in _SECTIONS:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise ValueError(
                f"'{source}': '{section}' is a {type(entries).__name__}; expected a list of dicts"
            )
        not_dicts = [i for i, entry in enumerate(entries) if not isinstance(entry, Mapping)]
        if not_dicts:
            raise ValueError(
                f"'{source}': '{section}' entries at positions {not_dicts[:10]} are not dicts "
                f"(e.g. {entries[not_dicts[0]]!r})"
            )


def load_coco_json(
    json_file: str | Path, image_root: str | Path, *, dataset_name: str = ""
) -> tuple[list[Record], dict[str, Any]]:
    """Read a COCO instances json into records and metadata.

    Args:
        json_file: the annotation file (``instances_*.json``).
        image_root: the folder the images' ``file_name`` are relative to.
        dataset_name: named in messages and stored in the metadata.

    Returns:
        (records sorted by image id, metadata with ``thing_classes``,
        ``thing_dataset_id_to_contiguous_id`` (json category id -> 1..K), ``json_file``,
        ``image_root``, ``evaluator_type`` "coco", ``ignore_label`` 255, ``name``)

    Raises:
        FileNotFoundError: the json, the image folder or an image file does not exist.
        ValueError: the file or an entry is malformed (see the module docstring), an image file
            is empty, or the dataset lists no images.
    """
    what = f"dataset '{dataset_name}'" if dataset_name else "COCO dataset"
    json_file = require_file(json_file, f"annotation file of {what}")
    image_root = require_dir(image_root, f"image folder of {what}")
    data = read_coco_json(json_file)

    categories = data.get("categories", [])
    if not categories:
        raise ValueError(f"'{json_file}' has no 'categories'; a COCO instances file needs them")
    cat_ids = [_entry_id(c, i, "categories", json_file) for i, c in enumerate(categories)]
    if len(set(cat_ids)) != len(cat_ids):
        raise ValueError(f"'{json_file}' has duplicate category ids: {cat_ids}")
    unnamed = [c for c, category in zip(cat_ids, categories) if "name" not in category]
    if unnamed:
        raise ValueError(f"'{json_file}': categories with ids {unnamed} have no 'name'")
    categories = [c for _, c in sorted(zip(cat_ids, categories), key=lambda pair: pair[0])]
    id_map = {cat_id: i + 1 for i, cat_id in enumerate(sorted(cat_ids))}

    images = data.get("images", [])
    if not images:
        raise ValueError(f"'{json_file}' lists no images: {what} is empty")
    records: dict[int, Record] = {}
    for position, image in enumerate(images):
        image_id = _entry_id(image, position, "images", json_file)
        if image_id in records:
            raise ValueError(f"'{json_file}' lists image id {image_id} twice")
        records[image_id] = _image_record(image, image_id, image_root, json_file)
    records = dict(sorted(records.items()))
    check_files_exist(list(records.values()), "file_name", str(json_file))

    report = ProblemReport(str(json_file))
    image_of_annotation: dict[int, Any] = {}
    for position, ann in enumerate(data.get("annotations", [])):
        parsed = _parse_annotation(ann, position, records, id_map, image_of_annotation, report)
        if parsed is not None:
            records[parsed[0]]["annotations"].append(parsed[1])
    report.emit()

    metadata = {
        "name": dataset_name,
        "thing_classes": [str(c["name"]) for c in categories],
        "thing_dataset_id_to_contiguous_id": id_map,
        "json_file": str(json_file),
        "image_root": str(image_root),
        "evaluator_type": "coco",
        "ignore_label": 255,
    }
    return list(records.values()), metadata


def _integer(value: Any) -> int | None:
    """``value`` as an int when it is a JSON integer (``5`` or ``5.0``), else None.

    A string id ("10") is not COCO: pycocotools would index it apart from the integer 10, so the
    annotation would silently drop out of evaluation.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _entry_id(entry: dict[str, Any], position: int, section: str, json_file: Path) -> int:
    """The integer ``"id"`` of an image or category, else a ValueError naming it."""
    value = _integer(entry.get("id"))
    if value is None:
        found = "no 'id'" if "id" not in entry else f"id {describe(entry['id'])}"
        raise ValueError(
            f"'{json_file}': entry {position} of '{section}' has {found}; COCO ids are integers"
        )
    return value


def _image_record(
    image: dict[str, Any], image_id: int, image_root: Path, json_file: Path
) -> Record:
    """The record of one json image, its size and file name checked."""
    where = f"'{json_file}': image id {image_id}"
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"{where} has 'file_name' {describe(file_name)}; expected a path")
    sizes = {}
    for key in ("height", "width"):
        if key not in image:
            raise ValueError(
                f"{where} ('{file_name}') has no height/width; COCO evaluation needs them"
            )
        size = _integer(image[key])
        if size is None or size <= 0:
            raise ValueError(
                f"{where} ('{file_name}') has {key} {describe(image[key])}; expected a positive "
                "integer (pixels)"
            )
        sizes[key] = size
    return {
        "file_name": str(image_root / file_name),
        "height": sizes["height"],
        "width": sizes["width"],
        "image_id": image_id,
        "annotations": [],
    }


def _parse_annotation(
    ann: dict[str, Any],
    position: int,
    records: dict[int, Record],
    id_map: dict[int, int],
    image_of_annotation: dict[int, Any],
    report: ProblemReport,
) -> tuple[int, Record] | None:
    """One json annotation as (image id, record annotation), or None (skipped or rejected, and
    reported).

    Args:
        ann: the json annotation.
        position: its index in ``annotations``, to name an annotation without a usable id.
        records: image id -> record.
        id_map: json category id -> contiguous label.
        image_of_annotation: annotation id -> image id of the annotations seen so far (updated).
        report: where problems go.
    """
    ann_id = _integer(ann.get("id"))
    image_id = _integer(ann.get("image_id"))
    if ann_id is None:
        found = "no 'id'" if "id" not in ann else f"id {describe(ann['id'])}"
        report.reject(
            "annotations without an integer id (COCO evaluation indexes annotations by id)",
            f"annotation {position} (image id {describe(ann.get('image_id'))}): {found}",
        )
        return None
    if ann_id in image_of_annotation:
        report.reject(
            "duplicate annotation ids (pycocotools would keep one of them and evaluate it twice)",
            f"annotation id {ann_id} (in image id {describe(image_of_annotation[ann_id])} and "
            f"again in image id {describe(ann.get('image_id'))})",
        )
        return None
    image_of_annotation[ann_id] = ann.get("image_id")
    if image_id is None:
        report.reject(
            "annotations whose image_id is not an integer",
            f"annotation id {ann_id}: image_id {describe(ann.get('image_id'))}",
        )
        return None
    record = records.get(image_id)
    if record is None:
        report.skip(
            "annotations of unknown images", f"annotation id {ann_id} -> image id {image_id}"
        )
        return None
    where = f"annotation id {ann_id} (image id {image_id}, '{Path(record['file_name']).name}')"
    category_id = ann.get("category_id")
    if _integer(category_id) is None:
        report.reject(
            "annotations whose category_id is not an integer",
            f"{where}: category id {describe(category_id)}",
        )
        return None
    category_id = _integer(category_id)
    if category_id not in id_map:
        report.skip("annotations of unknown categories", f"{where}: category id {category_id}")
        return None
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        report.skip("annotations without a 4-number bbox", f"{where}: bbox {bbox!r}")
        return None
    bad = non_finite_numbers(bbox)
    if bad:
        report.reject(
            "annotations with a non-finite or non-numeric bbox coordinate",
            f"{where}: bbox {bbox!r} has {', '.join(describe(v) for v in bad)}",
        )
        return None
    iscrowd = _integer(ann.get("iscrowd", 0))
    if iscrowd not in (0, 1):
        report.reject(
            "annotations whose iscrowd is not 0 or 1",
            f"{where}: iscrowd {describe(ann.get('iscrowd'))}",
        )
        return None
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(record["width"])), min(y + h, float(record["height"]))
    if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
        report.skip(
            "annotations with a box of non-positive size (inside the image)",
            f"{where}: bbox [x, y, w, h] = {list(bbox)}",
        )
        return None
    parsed: Record = {
        "bbox": [x0, y0, x1, y1],
        "category_id": id_map[category_id],
        "iscrowd": iscrowd,
        "id": ann_id,
    }
    segmentation = ann.get("segmentation")
    if segmentation is None or segmentation == []:
        return image_id, parsed
    if is_rle(segmentation):
        problem = rle_problem(segmentation, record["height"], record["width"])
        if problem is not None:
            report.reject("annotations with an unusable RLE segmentation", f"{where}: {problem}")
            return None
        parsed["segmentation"] = segmentation
        return image_id, parsed
    if not isinstance(segmentation, list) or not all(isinstance(p, list) for p in segmentation):
        report.reject(
            "annotations whose segmentation is neither an RLE dict nor a list of polygons "
            "[[x0, y0, x1, y1, ...], ...]",
            f"{where}: {type(segmentation).__name__} {str(segmentation)[:60]}",
        )
        return None
    bad = [v for polygon in segmentation for v in non_finite_numbers(polygon)]
    if bad:
        report.reject(
            "annotations with a non-finite or non-numeric polygon coordinate",
            f"{where}: {', '.join(describe(v) for v in bad[:5])}",
        )
        return None
    polygons, short = valid_polygons(segmentation)
    if short:
        lengths = [len(segmentation[i]) // 2 for i in short]
        if not polygons:
            report.skip(
                "annotations whose every polygon has fewer than 3 points",
                f"{where}: polygon point counts {lengths}",
            )
            return None
        report.skip(
            "polygons with fewer than 3 points (rest of the annotation kept)",
            f"{where}: polygon indices {short} with point counts {lengths}",
        )
    parsed["segmentation"] = polygons
    return image_id, parsed
