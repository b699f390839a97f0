"""What Pascal VOC evaluation refuses to score: predictions with a NaN or inf box or score."""

import math
import re

import pytest
import torch

from norm_det.evaluation import PascalVOCEvaluator

CLASSES = ["cat", "dog"]
# Per image id: ground truth (XYXY box, label) and predictions (XYXY box, score, label).
GROUND_TRUTH = {
    2: [([10.0, 10.0, 50.0, 50.0], 1), ([60.0, 10.0, 100.0, 50.0], 2)],
    5: [([0.0, 0.0, 30.0, 40.0], 1)],
}
PREDICTIONS = {
    2: [([11.0, 10.0, 50.0, 52.0], 0.9, 1), ([60.0, 12.0, 98.0, 50.0], 0.6, 2)],
    5: [
        ([0.0, 0.0, 30.0, 38.0], 0.8, 1),
        ([40.0, 40.0, 60.0, 60.0], 0.7, 1),
        ([0, 0, 9, 9], 0.2, 2),
    ],
}


def _batch(poison: list[tuple[int, str, int, float]] = ()) -> tuple[list[dict], list[dict]]:
    """Targets and outputs of both images; ``poison``: (image id, key, prediction, value)."""
    targets, outputs = [], []
    for image_id, objects in GROUND_TRUTH.items():
        targets.append(
            {
                "image_id": image_id,
                "boxes": torch.tensor([box for box, _ in objects]),
                "labels": torch.tensor([label for _, label in objects]),
            }
        )
        predictions = PREDICTIONS[image_id]
        outputs.append(
            {
                "boxes": torch.tensor([p[0] for p in predictions], dtype=torch.float32),
                "scores": torch.tensor([p[1] for p in predictions], dtype=torch.float32),
                "labels": torch.tensor([p[2] for p in predictions]),
            }
        )
    for image_id, key, prediction, value in poison:
        output = outputs[list(GROUND_TRUTH).index(image_id)]
        if key == "boxes":
            output[key][prediction, 2] = value
        else:
            output[key][prediction] = value
    return targets, outputs


def _clean_metrics() -> dict:
    evaluator = PascalVOCEvaluator(CLASSES)
    evaluator.process(*_batch())
    return evaluator.evaluate()["bbox"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_box_or_score_names_the_images_and_counts(value):
    evaluator = PascalVOCEvaluator(CLASSES)
    poison = [(2, "boxes", 1, value), (5, "scores", 0, value), (5, "boxes", 2, value)]
    with pytest.raises(ValueError) as info:
        evaluator.process(*_batch(poison))
    message = str(info.value)
    assert message.startswith("refusing to score model outputs with NaN or inf boxes, scores")
    assert "3 prediction(s) in 2 image(s) are not finite" in message
    assert "image 2: 1 of 2 (boxes)" in message
    assert "image 5: 2 of 3 (boxes, scores)" in message


def test_a_refused_batch_records_nothing_and_clean_batches_score_as_before():
    clean = _clean_metrics()
    # Image 2 detects both its objects, image 5 its cat and one false positive.
    assert clean["AP50-dog"] == pytest.approx(100.0)
    assert clean["AP50-cat"] == pytest.approx(100.0)
    evaluator = PascalVOCEvaluator(CLASSES)
    targets, outputs = _batch()
    evaluator.process(targets[:1], outputs[:1])
    bad_targets, bad_outputs = _batch([(5, "scores", 1, math.nan)])
    with pytest.raises(ValueError, match=re.escape("image 5: 1 of 3 (scores)")):
        evaluator.process(bad_targets, bad_outputs)
    evaluator.process(targets[1:], outputs[1:])
    assert evaluator.evaluate()["bbox"] == clean


def test_outputs_that_disagree_on_the_number_of_predictions_are_refused():
    targets, outputs = _batch()
    outputs[1]["scores"] = outputs[1]["scores"][:2]
    with pytest.raises(ValueError, match=r"image 5: the outputs disagree .*boxes: 3, scores: 2"):
        PascalVOCEvaluator(CLASSES).process(targets, outputs)


def test_large_finite_float16_outputs_are_scored():
    # A sum over them would overflow float16; the min/max check does not.
    targets, outputs = _batch()
    for output in outputs:
        output["scores"] = (output["scores"] * 60000).half()
    evaluator = PascalVOCEvaluator(CLASSES)
    evaluator.process(targets, outputs)
    assert evaluator.evaluate()["bbox"] == _clean_metrics()
