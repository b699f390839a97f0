"""Malformed ground truth is caught when a dataset is loaded (or, for a truncated image, when it
is read), with a message naming the file and the image or annotation id."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from norm_det.data import (
    DatasetWarning,
    DetectionDataset,
    SemSegDataset,
    load_cityscapes_semantic,
    load_coco_json,
    load_voc_instances,
)
from norm_det.data.image_io import read_label_png
from tests.data.fixtures import square, write_cityscapes, write_coco, write_voc

CATEGORIES = [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}]
IMAGES = [{"id": 5, "file_name": "a.png", "height": 40, "width": 50}]


def _ann(ann_id, bbox, **extra):
    return {"id": ann_id, "image_id": 5, "category_id": 3, "bbox": bbox, **extra}


def _coco(tmp_path, annotations, images=IMAGES, categories=CATEGORIES):
    return write_coco(tmp_path, images=images, annotations=annotations, categories=categories)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "12", None])
def test_a_non_finite_or_non_numeric_box_coordinate_is_rejected_at_load(tmp_path, bad):
    json_file, image_root = _coco(tmp_path, [_ann(1, [0, 0, 10, 10]), _ann(7, [2, bad, 4, 4])])
    with pytest.raises(ValueError) as err:
        load_coco_json(json_file, image_root)
    message = str(err.value)
    assert str(json_file) in message
    assert "non-finite or non-numeric bbox coordinate" in message
    assert re.search(r"annotation id 7 \(image id 5, 'a\.png'\)", message)
    assert repr(bad) in message and "annotation id 1 " not in message


def test_a_non_finite_polygon_coordinate_is_rejected_at_load(tmp_path):
    polygon = square(2, 2, 4)
    polygon[3] = math.nan
    json_file, image_root = _coco(tmp_path, [_ann(4, [2, 2, 4, 4], segmentation=[polygon])])
    with pytest.raises(ValueError, match=r"polygon coordinate: annotation id 4 \(image id 5.*nan"):
        load_coco_json(json_file, image_root)


def test_a_duplicate_annotation_id_is_rejected_at_load(tmp_path):
    images = [*IMAGES, {"id": 6, "file_name": "b.png", "height": 40, "width": 50}]
    anns = [_ann(3, [0, 0, 10, 10]), {**_ann(3, [5, 5, 10, 10]), "image_id": 6}]
    json_file, image_root = _coco(tmp_path, anns, images=images)
    with pytest.raises(ValueError) as err:
        load_coco_json(json_file, image_root)
    message = str(err.value)
    assert str(json_file) in message and "1 duplicate annotation ids" in message
    assert "annotation id 3 (in image id 5 and again in image id 6)" in message


def test_a_missing_annotation_id_is_rejected_at_load(tmp_path):
    ann = _ann(1, [0, 0, 10, 10])
    del ann["id"]
    json_file, image_root = _coco(tmp_path, [_ann(2, [0, 0, 5, 5]), ann])
    with pytest.raises(ValueError, match=r"without an integer id.*annotation 1 \(image id 5\)"):
        load_coco_json(json_file, image_root)


def test_a_truncated_json_names_the_file_and_the_position(tmp_path):
    json_file, image_root = _coco(tmp_path, [_ann(1, [0, 0, 10, 10])])
    text = json_file.read_text()
    json_file.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError) as err:
        load_coco_json(json_file, image_root)
    message = str(err.value)
    assert f"'{json_file}' is not valid JSON" in message
    assert re.search(r"\(line 1, column \d+, character \d+ of \d+ bytes\)", message)
    assert "truncated" in message


def test_a_json_list_names_the_file_and_what_is_expected(tmp_path):
    json_file, image_root = _coco(tmp_path, [])
    json_file.write_text(json.dumps([{"image_id": 5, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    with pytest.raises(ValueError) as err:
        load_coco_json(json_file, image_root)
    message = str(err.value)
    assert f"'{json_file}' holds a list at its top level" in message
    assert "['images', 'annotations', 'categories']" in message and "results" in message


def test_a_crowd_rle_of_another_size_than_its_image_is_rejected_at_load(tmp_path):
    rle = {"size": [30, 50], "counts": [30 * 50]}  # the image is 40 x 50
    json_file, image_root = _coco(tmp_path, [_ann(2, [0, 0, 10, 10], iscrowd=1, segmentation=rle)])
    with pytest.raises(ValueError) as err:
        load_coco_json(json_file, image_root)
    message = str(err.value)
    assert str(json_file) in message
    assert "annotation id 2 (image id 5, 'a.png')" in message
    assert "RLE size [30, 50] (H, W) differs from its image's [40, 50]" in message


def test_rle_counts_that_do_not_cover_the_image_are_rejected_at_load(tmp_path):
    rle = {"size": [40, 50], "counts": [100, 20]}
    json_file, image_root = _coco(tmp_path, [_ann(2, [0, 0, 10, 10], iscrowd=1, segmentation=rle)])
    with pytest.raises(ValueError, match=r"annotation id 2 .*add up to 120 pixels.* has 2000"):
        load_coco_json(json_file, image_root)


@pytest.mark.parametrize("category_id", ["10", 10.5, None])
def test_a_category_id_that_is_not_an_integer_is_rejected_with_its_type(tmp_path, category_id):
    json_file, image_root = _coco(tmp_path, [_ann(9, [0, 0, 10, 10], category_id=category_id)])
    with pytest.raises(ValueError) as err:
        load_coco_json(json_file, image_root)
    message = str(err.value)
    assert str(json_file) in message and "annotation id 9 (image id 5" in message
    assert f"category id {category_id!r} (a {type(category_id).__name__})" in message


def test_an_unknown_integer_category_is_still_skipped_with_a_warning(tmp_path):
    json_file, image_root = _coco(
        tmp_path, [_ann(1, [0, 0, 10, 10]), _ann(9, [0, 0, 10, 10], category_id=42)]
    )
    with pytest.warns(DatasetWarning, match=r"annotation id 9 .*category id 42"):
        records, _ = load_coco_json(json_file, image_root)
    assert [a["id"] for a in records[0]["annotations"]] == [1]


def test_a_string_image_id_is_rejected_naming_the_entry(tmp_path):
    images = [{**IMAGES[0], "id": "5"}]
    json_file, image_root = _coco(tmp_path, [], images=images)
    with pytest.raises(ValueError, match=r"entry 0 of 'images' has id '5' \(a str\)"):
        load_coco_json(json_file, image_root)


def test_an_iscrowd_other_than_0_or_1_is_rejected(tmp_path):
    json_file, image_root = _coco(tmp_path, [_ann(4, [0, 0, 10, 10], iscrowd="yes")])
    with pytest.raises(ValueError, match=r"annotation id 4 \(image id 5.*iscrowd 'yes' \(a str\)"):
        load_coco_json(json_file, image_root)


def test_every_bad_annotation_of_a_file_is_listed_at_once(tmp_path):
    anns = [_ann(1, [0, math.nan, 1, 1]), _ann(2, [0, 0, 1, 1], category_id="3")]
    json_file, image_root = _coco(tmp_path, [*anns, _ann(1, [0, 0, 2, 2])])
    with pytest.raises(ValueError) as err:
        load_coco_json(json_file, image_root)
    message = str(err.value)
    assert "annotation id 1 " in message and "annotation id 2 " in message
    assert "duplicate annotation ids" in message


def test_an_empty_image_file_is_found_at_load(tmp_path):
    json_file, image_root = _coco(tmp_path, [_ann(1, [0, 0, 10, 10])])
    (image_root / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes.*a\.png' \(image id 5\)"):
        load_coco_json(json_file, image_root)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_names_the_file_and_the_image_id(tmp_path):
    noisy = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    json_file, image_root = _coco(tmp_path, [_ann(1, [0, 0, 10, 10])])
    Image.fromarray(noisy).save(image_root / "a.png")
    _truncate(image_root / "a.png")
    dataset = DetectionDataset(*load_coco_json(json_file, image_root))
    with pytest.raises(ValueError) as err:
        dataset[0]
    message = str(err.value)
    assert f"image file '{image_root / 'a.png'}' (image id 5) cannot be read" in message
    assert "truncated" in message


def test_a_truncated_label_png_names_the_file_and_the_image_id(tmp_path):
    labels = np.random.default_rng(0).integers(0, 34, (32, 48), dtype=np.uint8)
    write_cityscapes(tmp_path, "val", {"lindau_000000_000019": labels})
    records, metadata = load_cityscapes_semantic(
        tmp_path / "leftImg8bit" / "val", tmp_path / "gtFine" / "val"
    )
    label_file = records[0]["sem_seg_file_name"]
    Image.fromarray(labels).save(label_file)
    _truncate(Path(label_file))
    with pytest.raises(ValueError, match=re.escape(f"label file '{label_file}' (image id 0)")):
        SemSegDataset(records, metadata)[0]
    with pytest.raises(ValueError, match=r"\(image id 3\) cannot be read"):
        read_label_png(label_file, image_id=3)


def test_a_cityscapes_label_of_another_size_than_its_image_is_found_at_load(tmp_path):
    write_cityscapes(tmp_path, "val", {"bonn_000000_000007": np.zeros((8, 12), np.uint8)})
    gt = tmp_path / "gtFine" / "val" / "bonn" / "bonn_000000_000007_gtFine_instanceIds.png"
    Image.fromarray(np.zeros((8, 13), np.uint16)).save(gt)
    with pytest.raises(ValueError) as err:
        load_cityscapes_semantic(tmp_path / "leftImg8bit" / "val", tmp_path / "gtFine" / "val")
    message = str(err.value)
    assert f"image id 0: '{gt}' is 8x13 (HxW)" in message
    assert "bonn_000000_000007_leftImg8bit.png' is 8x12" in message


@pytest.mark.parametrize("text", ["4a8", "nan", "inf"])
def test_a_voc_coordinate_that_is_not_a_finite_number_names_xml_object_and_tag(tmp_path, text):
    objects = {
        "000001": [
            {"name": "dog", "difficult": 0, "bbox": (1, 1, 10, 10)},
            {"name": "cat", "difficult": 0, "bbox": (text, 2, 9, 9)},
        ]
    }
    write_voc(tmp_path / "VOC2007", objects, "test")
    with pytest.raises(ValueError) as err:
        load_voc_instances(tmp_path / "VOC2007", "test")
    xml_file = tmp_path / "VOC2007" / "Annotations" / "000001.xml"
    assert str(err.value) == (
        f"VOC annotation '{xml_file}' object 1 ('cat') <bndbox>: <xmin> is '{text}'; expected a "
        "finite number"
    )


def test_a_voc_split_listing_an_image_twice_is_rejected(tmp_path):
    write_voc(tmp_path / "VOC2007", {"000001": [], "000002": []}, "test")
    split = tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    split.write_text("000001\n000002\n000001\n")
    with pytest.raises(ValueError, match=re.escape(f"'{split}' lists images ['000001'] more")):
        load_voc_instances(tmp_path / "VOC2007", "test")
