"""What COCO evaluation refuses to score, and the two backends agreeing on everything else."""

import copy
import json
import math
from functools import partial

import pytest
import torch

from norm_det.evaluation import COCOEvaluator, coco_evaluation, load_coco_gt, run_coco_eval
from norm_det.evaluation.coco_backend import coco_metrics, per_category_ap
from norm_det.evaluation.coco_evaluation import encode_masks
from norm_det.evaluation.guards import check_finite_outputs
from tests.evaluation.fixtures import box_mask, uncompressed_rle, write_json

H, W = 100, 120
BACKENDS = ("pycocotools", "faster_coco_eval")
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"}]
CONTIGUOUS = {1: 1, 4: 2}  # dataset id -> label

# (image id, category id, XYWH box) of the objects; every image is H x W.
OBJECTS = [
    (1, 1, [10, 10, 40, 40]),
    (1, 4, [60, 20, 30, 50]),
    (2, 1, [5, 50, 50, 40]),
    (5, 4, [20, 30, 60, 40]),
]
CROWD = (2, 4, [60, 0, 60, 60])
# Per image: (XYXY box, score, label): hits, a false positive, a wrong class, one on the crowd.
PREDICTIONS = {
    1: [([12, 10, 50, 52], 0.9, 1), ([60, 22, 90, 70], 0.8, 2), ([70, 60, 100, 90], 0.3, 1)],
    2: [([5, 52, 56, 90], 0.7, 1), ([65, 5, 115, 55], 0.95, 2)],
    5: [([22, 28, 80, 72], 0.85, 2), ([20, 30, 80, 70], 0.4, 1)],
}


def _gt(crowd: bool = False, iscrowd: bool = True, segmentation: bool = True) -> dict:
    annotations = []
    for image_id, category_id, (x, y, w, h) in OBJECTS + ([CROWD] if crowd else []):
        is_crowd = (image_id, category_id, [x, y, w, h]) == CROWD
        ann = {
            "id": 10 + len(annotations),
            "image_id": image_id,
            "category_id": category_id,
            "bbox": [x, y, w, h],
            "area": float(w * h),
        }
        if iscrowd:
            ann["iscrowd"] = int(is_crowd)
        if segmentation:
            ann["segmentation"] = (
                uncompressed_rle(box_mask([x, y, x + w, y + h], H, W))
                if is_crowd
                else [[x, y, x + w, y, x + w, y + h, x, y + h]]
            )
        annotations.append(ann)
    return {
        "images": [{"id": i, "height": H, "width": W} for i in (1, 2, 5)],
        "annotations": annotations,
        "categories": copy.deepcopy(CATEGORIES),
    }


def _outputs(poison: tuple[str, int, int, float] | None = None, empty: bool = False) -> dict:
    """Per image id the model output; ``poison`` = (key, image id, prediction, value)."""
    outputs = {}
    for image_id, predictions in PREDICTIONS.items():
        predictions = [] if empty else predictions
        boxes = torch.tensor([p[0] for p in predictions], dtype=torch.float32).reshape(-1, 4)
        masks = torch.zeros(len(predictions), 1, H, W)
        for i, box in enumerate(boxes.tolist()):
            masks[i, 0][torch.from_numpy(box_mask(box, H, W))] = 0.9
        outputs[image_id] = {
            "boxes": boxes,
            "scores": torch.tensor([p[1] for p in predictions], dtype=torch.float32),
            "labels": torch.tensor([p[2] for p in predictions], dtype=torch.int64),
            "masks": masks,
        }
    if poison is not None:
        key, image_id, index, value = poison
        target = outputs[image_id][key]
        if key == "boxes":
            target[index, 2] = value
        elif key == "masks":
            target[index, 0, 3, 4] = value
        else:
            target[index] = value
    return outputs


def _results(outputs: dict, iou_type: str) -> list[dict]:
    """COCO result dicts written by hand from the outputs (not through the evaluator)."""
    results = []
    for image_id, output in outputs.items():
        rles = encode_masks(output["masks"])
        for i, ((x0, y0, x1, y1), score, label) in enumerate(
            zip(output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist())
        ):
            result = {"image_id": image_id, "category_id": [1, 4][label - 1], "score": score}
            if iou_type == "bbox":
                result["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            else:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


# name: (ground truth, outputs, the iou types whose result dicts are refused). Model outputs with a
# NaN or inf are always refused; result dicts only where the bad value is read: a segm result has
# no box, and its RLE holds no float (cut at 0.5, a NaN mask pixel is a 0).
CASES = {
    "clean": (_gt(), _outputs(), ()),
    "crowd": (_gt(crowd=True), _outputs(), ()),
    "missing_iscrowd": (_gt(iscrowd=False), _outputs(), ()),
    "empty": (_gt(), _outputs(empty=True), ("bbox", "segm")),  # run_coco_eval needs a detection
    "nan_boxes": (_gt(), _outputs(("boxes", 2, 1, math.nan)), ("bbox",)),
    "nan_scores": (_gt(), _outputs(("scores", 1, 0, math.nan)), ("bbox", "segm")),
    "inf_boxes": (_gt(), _outputs(("boxes", 5, 0, math.inf)), ("bbox",)),
    "inf_scores": (_gt(), _outputs(("scores", 5, 1, -math.inf)), ("bbox", "segm")),
    "nan_masks": (_gt(), _outputs(("masks", 1, 2, math.nan)), ()),
}
POISONED = {"nan_boxes", "nan_scores", "inf_boxes", "inf_scores", "nan_masks"}


def _outcome(fn):
    try:
        return fn()
    except Exception as err:  # the test compares what each backend raises
        return err


def _assert_agree(a, b, where: str = "") -> None:
    """Equal to 1e-9 (NaN equals NaN) everywhere, or the same error type on both."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b), f"{where}: {a!r} vs {b!r}"
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_agree(a[key], b[key], f"{where}/{key}")
        return
    assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9, f"{where}: {a} vs {b}"


def _evaluate(json_file: str, outputs: dict, backend: str, **kwargs) -> dict:
    evaluator = COCOEvaluator(
        json_file, thing_dataset_id_to_contiguous_id=CONTIGUOUS, backend=backend, **kwargs
    )
    evaluator.process([{"image_id": i} for i in outputs], list(outputs.values()))
    return evaluator.evaluate()


def _run(gt: dict, results: list[dict], iou_type: str, backend: str) -> dict:
    coco_eval = run_coco_eval(load_coco_gt(gt, backend), copy.deepcopy(results), iou_type, backend)
    return {
        **coco_metrics(coco_eval),
        **{f"AP-{k}": v for k, v in per_category_ap(coco_eval).items()},
    }


@pytest.mark.parametrize("case", list(CASES))
def test_both_backends_agree_or_both_refuse(tmp_path, case):
    gt, outputs, refused_results = CASES[case]
    json_file = write_json(gt, tmp_path / "gt.json")
    # The evaluator on model outputs (tensors): box and mask AP.
    through_evaluator = [_outcome(partial(_evaluate, json_file, outputs, b)) for b in BACKENDS]
    _assert_agree(*through_evaluator, f"{case}: COCOEvaluator")
    # run_coco_eval on result dicts written by hand, which skip the evaluator's own checks.
    for iou_type in ("bbox", "segm"):
        results = _results(outputs, iou_type)
        direct = [_outcome(partial(_run, gt, results, iou_type, b)) for b in BACKENDS]
        _assert_agree(*direct, f"{case}: run_coco_eval {iou_type}")
        expected = ValueError if iou_type in refused_results else dict
        assert isinstance(direct[0], expected), (case, iou_type, direct[0])

    reference = through_evaluator[0]
    if case in POISONED:
        assert isinstance(reference, ValueError), (case, reference)
    elif case == "empty":
        assert all(math.isnan(v) for v in reference["bbox"].values())
    else:
        assert set(reference) == {"bbox", "segm"}
        # neither trivial nor perfect: the matching decides
        assert 20.0 < reference["bbox"]["AP"] < 95.0


def test_missing_iscrowd_is_read_as_zero_without_touching_the_users_data(tmp_path):
    gt = _gt(iscrowd=False)
    json_file = write_json(gt, tmp_path / "gt.json")
    on_disk = (tmp_path / "gt.json").read_bytes()
    given = copy.deepcopy(gt)
    for backend in BACKENDS:
        without = _evaluate(json_file, _outputs(), backend)
        with_zero = _evaluate(write_json(_gt(), tmp_path / "zero.json"), _outputs(), backend)
        _assert_agree(without, with_zero, backend)
        results = _results(_outputs(), "segm")
        _assert_agree(_run(given, results, "segm", backend), _run(_gt(), results, "segm", backend))
    # pycocotools writes RLEs and 'ignore' into the annotations it evaluates: into a copy
    assert given == gt
    assert all("iscrowd" not in ann for ann in given["annotations"])
    assert (tmp_path / "gt.json").read_bytes() == on_disk


def test_crowd_region_ignores_the_detection_on_it(tmp_path):
    with_crowd = _evaluate(
        write_json(_gt(crowd=True), tmp_path / "c.json"), _outputs(), BACKENDS[0]
    )
    without = _evaluate(write_json(_gt(), tmp_path / "n.json"), _outputs(), BACKENDS[0])
    # the dog detection on the crowd region is a false positive only without the crowd
    assert with_crowd["bbox"]["AP-dog"] > without["bbox"]["AP-dog"]
    assert with_crowd["bbox"]["AP-cat"] == without["bbox"]["AP-cat"]


def test_non_finite_outputs_name_the_images_and_counts(tmp_path):
    json_file = write_json(_gt(), tmp_path / "gt.json")
    outputs = _outputs(("boxes", 2, 1, math.nan))
    outputs[5]["scores"][:] = math.inf
    outputs[1]["masks"][0, 0, 0, 0] = -math.inf
    with pytest.raises(ValueError) as info:
        _evaluate(json_file, outputs, "pycocotools")
    message = str(info.value)
    assert "4 prediction(s) in 3 image(s)" in message
    assert "image 1: 1 of 3 (masks)" in message
    assert "image 2: 1 of 2 (boxes)" in message
    assert "image 5: 2 of 2 (scores)" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_outputs_are_found_in_every_float_type(dtype):
    output = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _outputs()[1].items()}
    check_finite_outputs([1], [output])  # finite: accepted
    output["masks"][1, 0, H - 1, W - 1] = math.nan  # the last pixel of the second mask
    with pytest.raises(ValueError, match=r"image 1: 1 of 3 \(masks\)"):
        check_finite_outputs([1], [output])


def test_outputs_disagreeing_on_the_number_of_predictions_are_refused():
    output = _outputs()[2]
    output["scores"] = output["scores"][:1]
    with pytest.raises(ValueError, match=r"image 2: .*boxes: 2, scores: 1"):
        check_finite_outputs([2], [output])


def test_non_finite_results_name_the_images_and_counts():
    results = _results(_outputs(), "bbox")
    results[0]["score"] = math.nan
    results[1]["bbox"][3] = math.inf
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"2 prediction\(s\) in 1 image\(s\).*image 1: 2 of 3"):
            run_coco_eval(load_coco_gt(_gt(), backend), copy.deepcopy(results), "bbox", backend)


def test_malformed_results_name_the_result(tmp_path):
    gt = load_coco_gt(_gt(), "pycocotools")
    results = _results(_outputs(), "bbox")
    del results[2]["score"]
    with pytest.raises(ValueError, match=r"COCO result 2 \(image id 1\) has no \['score'\]"):
        run_coco_eval(gt, results, "bbox", "pycocotools")
    results = _results(_outputs(), "bbox")
    results[4]["bbox"] = [1, 2, 3]
    with pytest.raises(ValueError, match=r"COCO result 4 \(image id 2\).*4 numbers"):
        run_coco_eval(gt, results, "bbox", "pycocotools")
    results = _results(_outputs(), "bbox")
    results[0]["image_id"] = 424242  # both backends: a bare AssertionError
    with pytest.raises(ValueError, match="424242"):
        run_coco_eval(gt, results, "bbox", "pycocotools")


def test_segm_without_ground_truth_masks_names_the_file_before_any_task_is_scored(
    tmp_path, monkeypatch
):
    json_file = write_json(_gt(segmentation=False), tmp_path / "boxes_only.json")
    # bbox alone is fine
    bbox = _evaluate(json_file, _outputs(), "pycocotools", tasks=("bbox",))["bbox"]
    assert 20.0 < bbox["AP"] < 95.0

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluation started")

    monkeypatch.setattr(coco_evaluation, "run_coco_eval", must_not_run)
    for backend in BACKENDS:
        with pytest.raises(ValueError) as info:
            _evaluate(json_file, _outputs(), backend)  # masks in the outputs: bbox and segm
        message = str(info.value)
        assert "boxes_only.json" in message
        assert "4 annotations without 'segmentation'" in message
        assert "annotation id 10; annotation id 11" in message


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda gt: gt["annotations"][1].pop("area"), r"without 'area'.*annotation id 11"),
        (lambda gt: gt["annotations"][2]["bbox"].__setitem__(0, math.nan), r"annotation id 12"),
        (lambda gt: gt["annotations"][3].__setitem__("area", "big"), r"annotation id 13: 'big'"),
        (lambda gt: gt["images"][1].pop("id"), r"image at position 1 \(it has no 'id'\)"),
        (lambda gt: gt.pop("categories"), r"has no 'categories'"),
    ],
)
def test_malformed_ground_truth_names_the_file_and_ids(tmp_path, change, expected):
    gt = _gt()
    change(gt)
    json_file = write_json(gt, tmp_path / "instances_val.json")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=expected) as info:
            _evaluate(json_file, _outputs(), backend, tasks=("bbox",))
        assert "instances_val.json" in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"images": [{"id": 1', r"not valid JSON"),
        (json.dumps([{"id": 1}]), r"holds a list"),
        (
            json.dumps({"images": [{"id": 1}, 3]}),
            r"'images' entries at positions \[1\] are not dicts",
        ),
        (json.dumps({"annotations": {"id": 1}}), r"'annotations' is a dict; expected a list"),
    ],
)
def test_ground_truth_that_is_not_a_coco_dict_names_the_file(tmp_path, text, expected):
    path = tmp_path / "instances_val.json"
    path.write_text(text)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=expected) as info:
            load_coco_gt(path, backend)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=expected):
        _evaluate(str(path), _outputs(), "pycocotools")


def test_a_coco_object_built_elsewhere_without_iscrowd_is_refused_not_a_key_error():
    from pycocotools.coco import COCO

    coco_gt = COCO()
    coco_gt.dataset = _gt(iscrowd=False)
    coco_gt.createIndex()
    with pytest.raises(ValueError, match=r"4 annotations without 'iscrowd'.*load_coco_gt"):
        run_coco_eval(coco_gt, _results(_outputs(), "bbox"), "bbox", "pycocotools")
