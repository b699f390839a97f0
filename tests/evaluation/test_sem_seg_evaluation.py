import logging
import math

import numpy as np
import pytest
import torch

from norm_det.evaluation import SemSegEvaluator


def _logits(pred: np.ndarray, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``pred`` (H, W)."""
    return torch.nn.functional.one_hot(torch.as_tensor(pred), num_classes).permute(2, 0, 1).float()


def test_metrics_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 2]])  # the prediction on the ignored pixel counts nowhere
    evaluator = SemSegEvaluator(["a", "b", "c"])
    evaluator.process(
        [{"image_id": 0, "sem_seg": torch.as_tensor(gt)}], [{"sem_seg": _logits(pred, 3)}]
    )
    m = evaluator.evaluate()["sem_seg"]
    # a: TP 1 of 2, predicted once -> 1/2; b: TP 2, 2 true, 4 predicted -> 2/4; c: 0/1
    assert m["IoU-a"] == pytest.approx(50.0)
    assert m["IoU-b"] == pytest.approx(50.0)
    assert m["IoU-c"] == 0.0
    assert m["mIoU"] == pytest.approx(100 / 3)
    assert m["fwIoU"] == pytest.approx(100 * (0.4 * 0.5 + 0.4 * 0.5 + 0.2 * 0.0))
    assert (m["ACC-a"], m["ACC-b"], m["ACC-c"]) == pytest.approx((50.0, 100.0, 0.0))
    assert m["mACC"] == pytest.approx(50.0)
    assert m["pACC"] == pytest.approx(60.0)


def test_a_class_absent_everywhere_is_nan_and_out_of_the_mean():
    gt = np.array([[0, 1]])
    evaluator = SemSegEvaluator(["a", "b", "c"])
    evaluator.process(
        [{"image_id": 0, "sem_seg": torch.as_tensor(gt)}], [{"sem_seg": _logits(gt, 3)}]
    )
    m = evaluator.evaluate()["sem_seg"]
    assert math.isnan(m["IoU-c"]) and math.isnan(m["ACC-c"])
    assert m["mIoU"] == pytest.approx(100.0) and m["mACC"] == pytest.approx(100.0)


def test_many_images_sum_and_a_repeated_image_counts_once():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, (6, 7)) for _ in range(3)]
    preds = [np.where(rng.random(g.shape) < 0.7, g, rng.integers(0, 4, g.shape)) for g in gts]
    names = ["a", "b", "c", "d"]
    per_image = SemSegEvaluator(names)
    for i, (g, p) in enumerate(zip(gts, preds)):
        per_image.process(
            [{"image_id": i, "sem_seg": torch.as_tensor(g)}], [{"sem_seg": _logits(p, 4)}]
        )
    # the last image again, as a padding distributed sampler would send it
    per_image.process(
        [{"image_id": 2, "sem_seg": torch.as_tensor(gts[2])}], [{"sem_seg": _logits(preds[2], 4)}]
    )
    stitched = SemSegEvaluator(names)
    stitched.process(
        [{"image_id": 0, "sem_seg": torch.as_tensor(np.concatenate(gts, axis=1))}],
        [{"sem_seg": _logits(np.concatenate(preds, axis=1), 4)}],
    )
    assert per_image.evaluate() == stitched.evaluate()


def test_bad_inputs_are_value_errors(caplog):
    evaluator = SemSegEvaluator(["a", "b"])
    with pytest.raises(ValueError, match=r"ids \[7\] outside 0..1"):
        evaluator.process(
            [{"image_id": 3, "sem_seg": torch.tensor([[0, 7]])}],
            [{"sem_seg": torch.zeros(2, 1, 2)}],
        )
    with pytest.raises(ValueError, match=r"image 3: outputs\['sem_seg'\] is \(2, 2\)"):
        evaluator.process(
            [{"image_id": 3, "sem_seg": torch.tensor([[0, 1]])}],
            [{"sem_seg": torch.zeros(2, 2, 2)}],
        )
    with caplog.at_level(logging.WARNING):
        metrics = SemSegEvaluator(["a", "b"]).evaluate()["sem_seg"]
    assert "no labelled pixels" in caplog.text and math.isnan(metrics["mIoU"])


def test_a_resized_input_is_scored_against_the_label_file_at_full_size(tmp_path):
    from PIL import Image

    label_ids = np.full((8, 10), 7, np.uint8)  # road ...
    label_ids[:, 4:] = 26  # ... and car, in label ids
    label_ids[0, 0] = 0  # unlabeled: ignored
    path = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(label_ids).save(path)
    half = np.zeros((4, 5), np.int64)
    half[:, 2:] = 1  # the model saw a 4x5 image: car from column 2 on
    logits = _logits(half, 2) * 10
    target = {
        "image_id": 0,
        "sem_seg": torch.zeros(4, 5, dtype=torch.int64),  # the resized labels are not used
        "sem_seg_file_name": str(path),
        "size": torch.tensor([4, 5]),
        "orig_size": torch.tensor([8, 10]),
    }
    evaluator = SemSegEvaluator(["road", "car"], label_id_to_train_id={0: 255, 7: 0, 26: 1})
    evaluator.process([target], [{"sem_seg": logits}])
    m = evaluator.evaluate()["sem_seg"]
    # upsampled 4x5 -> 8x10, the boundary between columns 1 and 2 lands between columns 3 and 4
    assert m["mIoU"] == pytest.approx(100.0)
    assert m["pACC"] == pytest.approx(100.0)
    unmapped = SemSegEvaluator(["road", "car"], label_id_to_train_id={7: 0, 26: 1})
    with pytest.raises(ValueError, match=r"x_gtFine_labelIds\.png' \(image id 0\) has ids \[0\]"):
        unmapped.process([target], [{"sem_seg": logits}])
