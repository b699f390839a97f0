import logging
import math
import os

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import trainId2label
from PIL import Image

from norm_det.evaluation import (
    CityscapesSemSegEvaluator,
    SemSegEvaluator,
    evaluate_cityscapes_files,
    evaluator_from_metadata,
)
from norm_det.evaluation.cityscapes_evaluation import (
    LABEL_ID_TO_TRAIN_ID,
    TRAIN_ID_TO_LABEL_ID,
    _png_bytes,
)
from tests.evaluation.fixtures import random_cityscapes_scene, write_cityscapes_gt

CLASSES = [trainId2label[k].name for k in range(19)]
CAR_AVERAGE_SIZE = 12794.0202738185  # cityscapesscripts' average car instance, in pixels


def _logits(train_ids: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(train_ids), 19).permute(2, 0, 1).float()


@pytest.fixture
def scenes(tmp_path):
    """Three images in two cities: targets, noisy outputs, gt_dir."""
    rng = np.random.default_rng(0)
    gt_dir = tmp_path / "gtFine" / "val"
    targets, outputs = [], []
    for image_id, (city, frame) in enumerate([("aachen", 19), ("aachen", 20), ("bonn", 7)]):
        label_ids, instance_ids = random_cityscapes_scene(rng)
        file_name = write_cityscapes_gt(gt_dir, label_ids, instance_ids, city, frame)
        train_ids = LABEL_ID_TO_TRAIN_ID[label_ids].astype(np.int64)
        noisy = rng.random(train_ids.shape) < 0.25
        pred = np.where(noisy | (train_ids == 255), rng.integers(0, 19, train_ids.shape), train_ids)
        targets.append(
            {"image_id": image_id, "file_name": file_name, "sem_seg": torch.as_tensor(train_ids)}
        )
        outputs.append({"sem_seg": _logits(pred)})
    return targets, outputs, gt_dir


def test_official_iou_agrees_with_the_confusion_matrix(scenes, tmp_path):
    targets, outputs, gt_dir = scenes
    metadata = {
        "evaluator_type": "cityscapes_sem_seg",
        "gt_dir": str(gt_dir),
        "stuff_classes": CLASSES,
        "ignore_label": 255,
    }
    evaluator = evaluator_from_metadata(None, metadata)
    evaluator.process(targets[:2], outputs[:2])
    evaluator.process(targets[2:], outputs[2:])
    metrics = evaluator.evaluate()["sem_seg"]
    assert 20.0 < metrics["IoU"] < 95.0
    assert metrics["IoU"] == pytest.approx(metrics["mIoU"], abs=1e-9)
    assert 0.0 < metrics["iIoU"] < 100.0 and 0.0 < metrics["IoU_sup"] <= 100.0

    # class by class, against the script run on files written here
    predictions, ground_truth = [], []
    for target, output in zip(targets, outputs):
        path = tmp_path / f"{target['image_id']}_pred.png"
        path.write_bytes(_png_bytes(TRAIN_ID_TO_LABEL_ID[output["sem_seg"].argmax(0).numpy()]))
        predictions.append(str(path))
        core = os.path.basename(target["file_name"]).replace("_leftImg8bit.png", "")
        city = core.split("_")[0]
        ground_truth.append(str(gt_dir / city / f"{core}_gtFine_labelIds.png"))
    official = evaluate_cityscapes_files(predictions, ground_truth)
    for name in CLASSES:
        ours = metrics[f"IoU-{name}"]
        theirs = official["classScores"][name] * 100
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-9)


def test_iiou_by_hand(tmp_path):
    label_ids = np.full((6, 10), 7)  # road
    label_ids[1:3, 2:7] = 26  # a car of 10 pixels
    instance_ids = label_ids.copy()
    instance_ids[1:3, 2:7] = 26000
    gt_dir = tmp_path / "gtFine" / "val"
    file_name = write_cityscapes_gt(gt_dir, label_ids, instance_ids, "ulm", 1)
    pred = LABEL_ID_TO_TRAIN_ID[label_ids].astype(np.int64)
    pred[4, 0:5] = 13  # 5 road pixels called car
    evaluator = CityscapesSemSegEvaluator(gt_dir)
    gt_train_ids = torch.as_tensor(LABEL_ID_TO_TRAIN_ID[label_ids].astype(np.int64))
    target = {"image_id": 0, "file_name": file_name, "sem_seg": gt_train_ids}
    evaluator.process([target], [{"sem_seg": _logits(pred)}])
    metrics = evaluator.evaluate()["sem_seg"]
    # road: 45 of 50 found; car: 10 found, 5 false positives
    assert metrics["IoU"] == pytest.approx(100 * (45 / 50 + 10 / 15) / 2)
    # the car instance's pixels weigh average size / instance size: TP 10 * w, FP 5 unweighted
    assert metrics["iIoU"] == pytest.approx(100 * CAR_AVERAGE_SIZE / (CAR_AVERAGE_SIZE + 5))


def test_works_without_numpy_in1d(scenes, monkeypatch):
    targets, outputs, gt_dir = scenes
    reference = CityscapesSemSegEvaluator(gt_dir)
    reference.process(targets, outputs)
    expected = reference.evaluate()
    # numpy 2.4 removed in1d, which cityscapesscripts 2.3 calls
    monkeypatch.delattr(np, "in1d")
    evaluator = CityscapesSemSegEvaluator(gt_dir)
    evaluator.process(targets, outputs)
    assert evaluator.evaluate() == expected
    assert not hasattr(np, "in1d")


def test_image_id_indexes_the_sorted_files_when_there_is_no_file_name(scenes):
    targets, outputs, gt_dir = scenes
    with_names = CityscapesSemSegEvaluator(gt_dir)
    with_names.process(targets, outputs)
    by_index = CityscapesSemSegEvaluator(gt_dir)
    by_index.process([{k: v for k, v in t.items() if k != "file_name"} for t in targets], outputs)
    assert by_index.evaluate() == with_names.evaluate()
    # a pairing the target contradicts fails loudly
    wrong = dict(targets[0], image_id=2)
    wrong.pop("file_name")
    with pytest.raises(ValueError, match="wrong ground-truth file"):
        by_index.process([wrong], outputs[:1])


def test_smaller_predictions_are_upsampled_to_the_ground_truth(scenes):
    targets, _, gt_dir = scenes
    road = np.zeros((24, 40), np.int64)
    full = CityscapesSemSegEvaluator(gt_dir)
    full.process(targets, [{"sem_seg": _logits(road)}] * 3)
    half = CityscapesSemSegEvaluator(gt_dir)
    half.process(targets, [{"sem_seg": _logits(road[::2, ::2])}] * 3)
    assert half.evaluate() == full.evaluate()


def test_missing_instance_files_give_nan_iiou_with_a_warning(scenes, caplog):
    targets, outputs, gt_dir = scenes
    complete = SemSegEvaluator(CLASSES)
    complete.process(targets, outputs)
    for path in gt_dir.glob("*/*_instanceIds.png"):
        path.unlink()
    evaluator = CityscapesSemSegEvaluator(gt_dir)
    evaluator.process(targets, outputs)
    with caplog.at_level(logging.WARNING):
        metrics = evaluator.evaluate()["sem_seg"]
    assert "instanceIds.png" in caplog.text
    assert math.isnan(metrics["iIoU"]) and math.isnan(metrics["iIoU_sup"])
    assert metrics["IoU"] == pytest.approx(complete.evaluate()["sem_seg"]["mIoU"], abs=1e-9)


def test_missing_files_name_the_path(tmp_path, scenes):
    targets, outputs, gt_dir = scenes
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CityscapesSemSegEvaluator(tmp_path / "nowhere")
    evaluator = CityscapesSemSegEvaluator(gt_dir)
    stray = dict(targets[0], file_name="leftImg8bit/val/ulm/ulm_000000_000001_leftImg8bit.png")
    with pytest.raises(FileNotFoundError, match=r"ulm_000000_000001_gtFine_labelIds\.png"):
        evaluator.process([stray], outputs[:1])


def test_label_ids_outside_the_cityscapes_set_name_file_and_id(tmp_path):
    label_ids = np.full((4, 5), 7)
    label_ids[0, 0] = 50
    file_name = write_cityscapes_gt(tmp_path, label_ids, label_ids, "ulm", 3)
    gt_file = tmp_path / "ulm" / "ulm_000000_000003_gtFine_labelIds.png"
    prediction = tmp_path / "pred.png"
    prediction.write_bytes(_png_bytes(np.full((4, 5), 7)))
    assert file_name.endswith("ulm_000000_000003_leftImg8bit.png")
    with pytest.raises(ValueError, match=r"Unknown label with id 50.*gtFine_labelIds\.png.*\[50\]"):
        evaluate_cityscapes_files([str(prediction)], [str(gt_file)])


def test_the_label_file_named_by_the_target_is_used(scenes):
    targets, outputs, gt_dir = scenes
    by_file_name = CityscapesSemSegEvaluator(gt_dir)
    by_file_name.process(targets, outputs)
    by_label_file = CityscapesSemSegEvaluator(gt_dir)
    renamed = []
    for t in targets:
        core = os.path.basename(t["file_name"]).replace("_leftImg8bit.png", "")
        label_file = gt_dir / core.split("_")[0] / f"{core}_gtFine_labelIds.png"
        renamed.append({**t, "file_name": "elsewhere.png", "sem_seg_file_name": str(label_file)})
    by_label_file.process(renamed, outputs)
    assert by_label_file.evaluate() == by_file_name.evaluate()


def test_label_and_instance_files_of_different_sizes_name_both_before_the_script(
    scenes, monkeypatch
):
    targets, outputs, gt_dir = scenes
    instance_file = gt_dir / "bonn" / "bonn_000000_000007_gtFine_instanceIds.png"
    Image.fromarray(np.zeros((24, 41), np.uint16)).save(instance_file)  # labelIds are 24 x 40
    evaluator = CityscapesSemSegEvaluator(gt_dir)
    evaluator.process(targets, outputs)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling

    def never(*args):
        raise AssertionError("cityscapesscripts ran on mismatched files")

    monkeypatch.setattr(evalPixelLevelSemanticLabeling, "evaluateImgLists", never)
    with pytest.raises(ValueError) as err:
        evaluator.evaluate()
    label_file = gt_dir / "bonn" / "bonn_000000_000007_gtFine_labelIds.png"
    assert str(err.value) == (
        f"image id bonn_000000_000007: '{instance_file}' is 24x41 (HxW) but '{label_file}' is "
        "24x40; the label files of an image must have its size"
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_name_the_image_and_its_file_before_the_argmax(scenes, value):
    targets, outputs, gt_dir = scenes
    poisoned = [{"sem_seg": o["sem_seg"].clone()} for o in outputs]
    poisoned[1]["sem_seg"][4, 3, 5] = value
    poisoned[1]["sem_seg"][0, 0, 0] = value
    evaluator = CityscapesSemSegEvaluator(gt_dir)
    evaluator.process(targets[:1], outputs[:1])
    with pytest.raises(ValueError) as info:
        evaluator.process(targets[1:], poisoned[1:])
    message = str(info.value)
    gt_file = gt_dir / "aachen" / "aachen_000000_000020_gtFine_labelIds.png"
    assert "refusing to score model outputs with NaN or inf 'sem_seg' logits" in message
    assert "2 pixel(s) in 1 image(s) are not finite" in message
    assert f"image 1 ('{gt_file}'): 2 of {24 * 40} (sem_seg)" in message
    # Nothing of the refused batch was recorded: the rest scores as without it.
    evaluator.process(targets[1:], outputs[1:])
    reference = CityscapesSemSegEvaluator(gt_dir)
    reference.process(targets, outputs)
    assert evaluator.evaluate() == reference.evaluate()
