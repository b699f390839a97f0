"""VOC evaluation scores against the boxes as written in the XML files, as the devkit does, while
training targets stay clipped to the image.

The fixture images are 60 x 40 pixels (width x height). One dog box is written (41, 11, 100, 30):
it runs 40 pixels past the right edge. The loader clips it to [40, 10, 60, 30] for training; a
detector that learned that box answers with it, written for the devkit as (41, 11, 60, 30).
"""

import warnings

import numpy as np
import pytest
import torch

from norm_det.data import DatasetWarning, DetectionDataset, load_voc_instances
from norm_det.evaluation import evaluator_from_metadata
from tests.data.fixtures import write_voc

INSIDE = (11, 11, 30, 30)  # 1-based inclusive, well inside the 60 x 40 image
PAST_EDGE = (41, 11, 100, 30)
DOG = 12  # label of "dog" in VOC order


def _devkit_iou(gt, det):
    """py-faster-rcnn voc_eval.py's overlap of two boxes in 1-based inclusive pixel indices."""
    iw = max(min(gt[2], det[2]) - max(gt[0], det[0]) + 1.0, 0.0)
    ih = max(min(gt[3], det[3]) - max(gt[1], det[1]) + 1.0, 0.0)
    inter = iw * ih
    area = lambda b: (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)  # noqa: E731
    return inter / (area(gt) + area(det) - inter)


def _load(tmp_path, objects, year=2012):
    write_voc(tmp_path / "VOC", objects, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        return load_voc_instances(tmp_path / "VOC", "test", year=year)


def _evaluate(records, metadata, scale=1.0):
    """Detections = each image's training (clipped) boxes, scores falling in split order; given
    at ``scale`` times the file's size, as a model on a resized input answers."""
    evaluator = evaluator_from_metadata(None, metadata)
    evaluator.reset()
    dataset = DetectionDataset(records, metadata)
    score = 1.0
    for i in range(len(dataset)):
        _, target = dataset[i]
        n = len(target["boxes"])
        target["size"] = (target["orig_size"].double() * scale).round().long()
        output = {
            "boxes": target["boxes"] * scale,
            "scores": torch.tensor([score - 0.01 * k for k in range(n)]),
            "labels": target["labels"],
        }
        score -= 0.05
        evaluator.process([target], [output])
    return evaluator.evaluate()["bbox"]


def test_the_clipped_detection_misses_the_box_as_written():
    clipped_as_written = (41, 11, 60, 30)
    assert _devkit_iou(PAST_EDGE, clipped_as_written) == pytest.approx(1.0 / 3.0)
    assert _devkit_iou(INSIDE, INSIDE) == 1.0


def test_training_targets_are_clipped_and_the_box_as_written_is_kept(tmp_path):
    records, metadata = _load(tmp_path, {"000001": [{"name": "dog", "bbox": PAST_EDGE}]})
    (ann,) = records[0]["annotations"]
    assert ann["bbox"] == [40.0, 10.0, 60.0, 30.0]
    assert ann["bbox_as_written"] == [40.0, 10.0, 100.0, 30.0]
    train = DetectionDataset(records, metadata, drop_difficult=True, filter_empty=True)
    _, target = train[0]
    assert target["boxes"].tolist() == [[40.0, 10.0, 60.0, 30.0]]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_box_past_the_edge_is_scored_as_written(tmp_path, scale):
    # Ten images with one dog each; the last (lowest-scored) box runs past the edge. Devkit:
    # nine true positives, then a false positive (IoU 1/3 with the box as written), the tenth
    # dog missed: recall 0.9 at precision 1, so AP = 0.9 (VOC2010+ area), 10/11 (VOC2007).
    # Scored against the clipped box, as before, every detection would match: AP 100.
    objects = {f"{i:06d}": [{"name": "dog", "bbox": INSIDE}] for i in range(1, 10)}
    objects["000010"] = [{"name": "dog", "bbox": PAST_EDGE}]
    records, metadata = _load(tmp_path, objects)
    results = _evaluate(records, metadata, scale)
    assert results["AP50-dog"] == pytest.approx(90.0, abs=1e-9)
    assert results["AP50"] == pytest.approx(90.0, abs=1e-9)

    records, metadata = _load(tmp_path, objects, year=2007)
    assert _evaluate(records, metadata, scale)["AP50"] == pytest.approx(100 * 10 / 11, abs=1e-9)


def test_an_object_outside_the_image_is_left_out_of_training_but_counted_in_evaluation(tmp_path):
    outside = (70, 11, 90, 30)  # entirely right of the 60-pixel-wide image
    objects = {"000001": [{"name": "dog", "bbox": INSIDE}, {"name": "dog", "bbox": outside}]}
    write_voc(tmp_path / "VOC", objects, "test")
    with pytest.warns(
        DatasetWarning, match=r"'000001\.xml' object 1 \('dog'\).*70.0, 11.0, 90.0, 30.0"
    ):
        records, metadata = load_voc_instances(tmp_path / "VOC", "test", year=2012)
    assert len(records[0]["annotations"]) == 1
    # One true positive of two dogs: recall 0.5 at precision 1.
    assert _evaluate(records, metadata)["AP50-dog"] == pytest.approx(50.0, abs=1e-9)


def test_the_evaluator_reads_the_split_it_is_given(tmp_path):
    _, metadata = _load(tmp_path, {"000001": [{"name": "dog", "bbox": INSIDE}]})
    evaluator = evaluator_from_metadata(None, metadata)
    gt = evaluator.ground_truth[1]
    np.testing.assert_array_equal(gt["boxes"], [[10.0, 10.0, 30.0, 30.0]])
    assert gt["labels"].tolist() == [DOG] and gt["difficult"].tolist() == [False]
    output = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    with pytest.raises(ValueError, match=r"image id 7 \('x\.jpg'\) is not in the VOC split"):
        evaluator.process([{"image_id": 7, "file_name": "x.jpg"}], [output])
    with pytest.raises(ValueError, match=r"image id 1 is 'x\.jpg' in the loader's target"):
        evaluator.process([{"image_id": 1, "file_name": "x.jpg"}], [output])
