"""What semantic segmentation evaluation refuses to score: logits with a NaN or inf."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from norm_det.evaluation import SemSegEvaluator
from norm_det.evaluation.guards import check_finite_sem_seg

CLASSES = ["road", "car", "sky"]
H, W = 4, 6


def _batch() -> tuple[list[dict], list[dict]]:
    """Two images (ids 3 and 8): targets and logits whose argmax is right on 20 of 24 pixels."""
    rng = np.random.default_rng(0)
    targets, outputs = [], []
    for image_id in (3, 8):
        gt = rng.integers(0, len(CLASSES), (H, W))
        pred = np.where(rng.random((H, W)) < 0.8, gt, (gt + 1) % len(CLASSES))
        logits = torch.nn.functional.one_hot(torch.as_tensor(pred), len(CLASSES))
        targets.append(
            {"image_id": image_id, "file_name": f"img_{image_id}.png", "sem_seg": torch.tensor(gt)}
        )
        outputs.append({"sem_seg": logits.permute(2, 0, 1).float() * 5})
    return targets, outputs


def _metrics(targets: list[dict], outputs: list[dict]) -> dict:
    evaluator = SemSegEvaluator(CLASSES)
    evaluator.process(targets, outputs)
    return evaluator.evaluate()["sem_seg"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_name_the_images_files_and_pixels(value):
    targets, outputs = _batch()
    outputs[0]["sem_seg"][1, 2, 3] = value
    outputs[1]["sem_seg"][0, 0, 0] = value
    outputs[1]["sem_seg"][2, 0, 0] = value  # the same pixel: counted once
    outputs[1]["sem_seg"][2, H - 1, W - 1] = value  # the last value of the tensor
    with pytest.raises(ValueError) as info:
        SemSegEvaluator(CLASSES).process(targets, outputs)
    message = str(info.value)
    assert message.startswith("refusing to score model outputs with NaN or inf 'sem_seg' logits")
    assert "3 pixel(s) in 2 image(s) are not finite" in message
    assert f"image 3 ('img_3.png'): 1 of {H * W} (sem_seg)" in message
    assert f"image 8 ('img_8.png'): 2 of {H * W} (sem_seg)" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("position", [0, 37, 3 * H * W - 1])
def test_a_single_nan_anywhere_is_caught_in_every_float_dtype(dtype, position):
    logits = torch.randn(3, H, W).to(dtype)
    logits.view(-1)[position] = math.nan
    with pytest.raises(ValueError, match=re.escape(f"image 4: 1 of {H * W}")):
        check_finite_sem_seg([4], [{"sem_seg": logits}])


def test_inf_and_minus_inf_in_one_pixel_are_refused():
    # Their sum is NaN, their mean too; min and max keep both.
    logits = torch.zeros(3, H, W)
    logits[0, 1, 1], logits[1, 1, 1] = math.inf, -math.inf
    with pytest.raises(ValueError, match=re.escape(f"image 4: 1 of {H * W}")):
        check_finite_sem_seg([4], [{"sem_seg": logits}])


def test_large_finite_float16_logits_are_scored_as_float32():
    # A float16 sum of these overflows to inf; they are finite and must be scored.
    targets, outputs = _batch()
    half = [{"sem_seg": (o["sem_seg"] * 12000 - 30000).half()} for o in outputs]
    assert torch.isinf(half[0]["sem_seg"].sum())
    assert _metrics(targets, half) == _metrics(targets, outputs)


def test_a_refused_batch_records_nothing():
    targets, outputs = _batch()
    evaluator = SemSegEvaluator(CLASSES)
    evaluator.process(targets[:1], outputs[:1])
    poisoned = [{"sem_seg": outputs[1]["sem_seg"].clone()}]
    poisoned[0]["sem_seg"][0, 1, 1] = math.nan
    with pytest.raises(ValueError, match=re.escape("image 8 ('img_8.png'): 1 of 24")):
        evaluator.process(targets[1:], poisoned)
    evaluator.process(targets[1:], outputs[1:])
    assert evaluator.evaluate()["sem_seg"] == _metrics(targets, outputs)


def test_without_a_file_name_the_label_file_or_only_the_id_is_named():
    targets, outputs = _batch()
    outputs[0]["sem_seg"][0, 0, 0] = math.nan
    targets[0] = {"image_id": 3, "sem_seg": targets[0]["sem_seg"], "sem_seg_file_name": "l.png"}
    with pytest.raises(ValueError, match=re.escape("image 3 ('l.png'): 1 of 24")):
        SemSegEvaluator(CLASSES).process(targets, outputs)
    targets[0] = {"image_id": 3, "sem_seg": targets[0]["sem_seg"]}
    with pytest.raises(ValueError, match=r"not finite; image 3: 1 of 24 \(sem_seg\)$"):
        SemSegEvaluator(CLASSES).process(targets, outputs)


def test_outputs_without_sem_seg_name_the_image():
    targets, outputs = _batch()
    with pytest.raises(ValueError, match=r"image 8: the outputs have no 'sem_seg' \(keys: \['x'\]"):
        SemSegEvaluator(CLASSES).process(targets, [outputs[0], {"x": 1}])


def test_an_unreadable_label_file_names_the_image(tmp_path):
    path = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    targets, outputs = _batch()
    target = {
        **targets[0],
        "sem_seg_file_name": str(path),
        "size": torch.tensor([H, W]),
        "orig_size": torch.tensor([8, 12]),
    }
    with pytest.raises(ValueError, match=re.escape(f"'{path}' (image id 3) cannot be read")):
        SemSegEvaluator(CLASSES).process([target], outputs[:1])
