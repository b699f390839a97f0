"""Cityscapes pixel-level IoU and instance-weighted iIoU, computed by the official scripts.

Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016, §3.2:
IoU over the 19 evaluated classes and iIoU, where each ground-truth instance's pixels are
weighted by the class's average instance size over the instance's own size. The numbers come
from ``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`` run on PNGs of the
predictions in label ids, against the dataset's ``*_gtFine_labelIds.png`` (and
``*_gtFine_instanceIds.png`` for iIoU), exactly as the benchmark server would compute them.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch.nn.functional as F
from PIL import Image

from norm_det.data.cityscapes import check_same_size, instance_file
from norm_det.data.image_io import image_size
from norm_det.evaluation.evaluator import (
    DatasetEvaluator,
    Results,
    gathered_records,
    image_id_of,
    require_metadata,
    to_numpy,
)
from norm_det.evaluation.guards import check_finite_sem_seg, sem_seg_logits

__all__ = [
    "LABEL_ID_TO_TRAIN_ID",
    "TRAIN_ID_TO_LABEL_ID",
    "CityscapesGroundTruthFiles",
    "CityscapesSemSegEvaluator",
    "evaluate_cityscapes_files",
    "numpy_in1d",
]

logger = logging.getLogger(__name__)


def _label_tables() -> tuple[np.ndarray, np.ndarray]:
    from cityscapesscripts.helpers.labels import labels

    label_to_train = np.full(256, 255, np.uint8)
    train_to_label = np.zeros(19, np.uint8)
    for label in labels:
        if label.id >= 0 and 0 <= label.trainId < 255:
            label_to_train[label.id] = label.trainId
            train_to_label[label.trainId] = label.id
    return label_to_train, train_to_label


# cityscapesscripts' table: the 34 label ids of gtFine *_labelIds.png <-> the 19 train ids.
LABEL_ID_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID = _label_tables()
NUM_TRAIN_IDS = len(TRAIN_ID_TO_LABEL_ID)


class CityscapesSemSegEvaluator(DatasetEvaluator):
    """Cityscapes ``IoU``, ``iIoU``, ``IoU_sup``, ``iIoU_sup`` (categories), in percent.

    Outputs are ``"sem_seg"`` logits over the 19 train ids. Each image's ground-truth file is
    the target's ``"sem_seg_file_name"``, or else
    ``<gt_dir>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` found from its ``"file_name"``
    (the leftImg8bit path), or else entry ``image_id`` of the sorted
    ``<gt_dir>/*/*_gtFine_labelIds.png`` (a dataset that numbers its sorted files). Where
    the prediction has the ground truth's size, the target's ``"sem_seg"`` must equal that file
    mapped to train ids, so a wrong pairing fails loudly; a prediction of another size (a resized
    test input) is upsampled bilinearly, as logits, to the file's size. iIoU is NaN, with a
    warning, when the ``*_gtFine_instanceIds.png`` files are missing. Logits with a NaN or inf
    are refused, naming the image id and its ground-truth file
    (:func:`norm_det.evaluation.guards.check_finite_sem_seg`).

    Args:
        gt_dir: the split's gtFine folder, e.g. ``datasets/cityscapes/gtFine/val``.
    """

    def __init__(self, gt_dir: str | os.PathLike) -> None:
        self.gt_dir = os.fspath(gt_dir)
        if not os.path.isdir(self.gt_dir):
            raise FileNotFoundError(
                f"Cityscapes ground-truth folder '{self.gt_dir}' (metadata 'gt_dir') does not exist"
            )
        self._gt_files = CityscapesGroundTruthFiles(self.gt_dir)
        self._records: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: Any, metadata: Mapping[str, Any]) -> CityscapesSemSegEvaluator:
        """The ground-truth folder from metadata ``"gt_dir"``."""
        require_metadata(metadata, "gt_dir", "Cityscapes evaluation needs the gtFine folder")
        return cls(metadata["gt_dir"])

    def reset(self) -> None:
        self._records = []

    def process(self, targets: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> None:
        """Record one batch as label-id PNGs; NaN or inf logits are a ValueError.

        Checked before the argmax, which would turn a NaN into an arbitrary class and score it.
        """
        image_ids = [image_id_of(target) for target in targets]
        gt_files = [
            self._gt_files.of(target, image_id)
            for target, image_id in zip(targets, image_ids, strict=True)
        ]
        check_finite_sem_seg(image_ids, outputs, gt_files)
        for image_id, gt_file, target, output in zip(
            image_ids, gt_files, targets, outputs, strict=True
        ):
            expected = f"({NUM_TRAIN_IDS}, H, W) logits over the Cityscapes train ids"
            logits = sem_seg_logits(output, image_id, NUM_TRAIN_IDS, expected)
            height, width = image_size(gt_file, image_id=image_id)
            if tuple(logits.shape[1:]) == (height, width):
                check_pairing(target, image_id, gt_file)
            else:
                logits = F.interpolate(
                    logits[None].float(), size=(height, width), mode="bilinear", align_corners=False
                )[0]
            train_ids = to_numpy(logits.argmax(0)).astype(np.int64)
            self._records.append(
                {
                    "image_id": image_id,
                    "gt_file": gt_file,
                    "png": _png_bytes(TRAIN_ID_TO_LABEL_ID[train_ids]),
                }
            )

    def evaluate(self) -> Results:
        records = gathered_records(self._records)
        if records is None:
            return {}
        keys = ("IoU", "iIoU", "IoU_sup", "iIoU_sup")
        if not records:
            logger.warning("Cityscapes evaluation: no images were processed; every metric is NaN")
            return {"sem_seg": dict.fromkeys(keys, float("nan"))}
        gt_files = [r["gt_file"] for r in records]
        missing = [f for f in gt_files if not os.path.isfile(instance_file(f))]
        if missing:
            logger.warning(
                "Cityscapes evaluation: %d ground-truth instance files are missing (e.g. '%s'); "
                "iIoU is NaN",
                len(missing),
                instance_file(missing[0]),
            )
        result = evaluate_cityscapes_records(records, instance_level=not missing)
        metrics = {
            "IoU": 100.0 * result["averageScoreClasses"],
            "iIoU": 100.0 * result["averageScoreInstClasses"] if not missing else float("nan"),
            "IoU_sup": 100.0 * result["averageScoreCategories"],
            "iIoU_sup": (
                100.0 * result["averageScoreInstCategories"] if not missing else float("nan")
            ),
        }
        logger.info("Cityscapes: %s", ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return {"sem_seg": {k: float(v) for k, v in metrics.items()}}


class CityscapesGroundTruthFiles:
    """The ``*_gtFine_labelIds.png`` of each image, under the split's gtFine folder ``gt_dir``.

    A target's ``"sem_seg_file_name"``, else the file its ``"file_name"`` (the leftImg8bit
    path) names, else entry ``image_id`` of the sorted ``<gt_dir>/*/*_gtFine_labelIds.png``.
    """

    def __init__(self, gt_dir: str) -> None:
        self.gt_dir = gt_dir
        self._sorted: list[str] | None = None

    def of(self, target: Mapping[str, Any], image_id: int) -> str:
        """The ground-truth file of ``target``.

        Raises:
            FileNotFoundError: the file it names does not exist.
            ValueError: the target names no file and ``image_id`` is no index into the sorted
                files.
        """
        if "sem_seg_file_name" in target:
            gt_file = os.fspath(target["sem_seg_file_name"])
            if not os.path.isfile(gt_file):
                raise FileNotFoundError(
                    f"image {image_id}: ground-truth file '{gt_file}' does not exist"
                )
            return gt_file
        if "file_name" in target:
            from cityscapesscripts.helpers.csHelpers import getCsFileInfo

            info = getCsFileInfo(os.fspath(target["file_name"]))
            core = f"{info.city}_{info.sequenceNb}_{info.frameNb}"
            gt_file = os.path.join(self.gt_dir, info.city, f"{core}_gtFine_labelIds.png")
            if not os.path.isfile(gt_file):
                raise FileNotFoundError(
                    f"image {image_id} ('{target['file_name']}'): ground-truth file '{gt_file}' "
                    "does not exist"
                )
            return gt_file
        if self._sorted is None:
            pattern = os.path.join(self.gt_dir, "*", "*_gtFine_labelIds.png")
            self._sorted = sorted(glob.glob(pattern))
        if not 0 <= image_id < len(self._sorted):
            raise ValueError(
                f"image {image_id}: the target has no 'file_name' and image_id is not an index "
                f"into the {len(self._sorted)} sorted files "
                f"'{self.gt_dir}/*/*_gtFine_labelIds.png'"
            )
        return self._sorted[image_id]


def check_pairing(target: Mapping[str, Any], image_id: int, gt_file: str) -> None:
    """A target's ``"sem_seg"`` (when it has one) equals ``gt_file`` mapped to train ids.

    Raises:
        ValueError: it differs: the image is paired with the wrong ground-truth file.
    """
    if "sem_seg" not in target:
        return
    with Image.open(gt_file) as gt_image:
        expected = LABEL_ID_TO_TRAIN_ID[np.asarray(gt_image)]
    if not np.array_equal(to_numpy(target["sem_seg"]).astype(np.int64), expected):
        raise ValueError(
            f"image {image_id}: targets['sem_seg'] differs from '{gt_file}' mapped to train "
            "ids; the image is paired with the wrong ground-truth file"
        )


def evaluate_cityscapes_records(
    records: Sequence[Mapping[str, Any]], *, instance_level: bool
) -> dict[str, Any]:
    """:func:`evaluate_cityscapes_files` on the records' prediction PNGs, written to a
    temporary folder, against their ``"gt_file"``."""
    with tempfile.TemporaryDirectory(prefix="cityscapes_pred_") as tmp:
        prediction_files = []
        for record in records:
            path = os.path.join(tmp, f"{record['image_id']}_pred.png")
            with open(path, "wb") as f:
                f.write(record["png"])
            prediction_files.append(path)
        gt_files = [r["gt_file"] for r in records]
        return evaluate_cityscapes_files(prediction_files, gt_files, instance_level=instance_level)


def evaluate_cityscapes_files(
    prediction_files: Sequence[str],
    ground_truth_files: Sequence[str],
    *,
    instance_level: bool = True,
) -> dict[str, Any]:
    """cityscapesscripts' ``evaluateImgLists`` on paired PNG files, quietly.

    Args:
        prediction_files: label-id PNGs, one per ground-truth file.
        ground_truth_files: ``*_gtFine_labelIds.png``; with ``instance_level`` the matching
            ``*_gtFine_instanceIds.png`` must exist.
        instance_level: compute the iIoU scores.

    Returns:
        The script's result dict (``classScores``, ``averageScoreClasses``, ...), scores in [0, 1].

    Raises:
        ValueError: when a prediction, a labelIds file and (with ``instance_level``) its
            instanceIds file differ in size (the script would fail with an IndexError deep
            inside), naming both files and both sizes; or when the script rejects the files (it
            would otherwise exit the process).
    """
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling

    if len(prediction_files) != len(ground_truth_files):
        raise ValueError(
            f"{len(prediction_files)} prediction files for {len(ground_truth_files)} ground-truth "
            "files; they must pair one to one"
        )
    for prediction, ground_truth in zip(prediction_files, ground_truth_files):
        files = [ground_truth, *([instance_file(ground_truth)] if instance_level else [])]
        check_same_size([*files, prediction], image_id=_core_name(ground_truth))

    # A private copy of the script's module-level settings, so nothing global changes.
    args = copy.copy(evalPixelLevelSemanticLabeling.args)
    args.quiet = True
    args.JSONOutput = False
    args.colorized = False
    args.bold = args.nocol = ""
    args.evalInstLevelScore = instance_level
    args.evalPixelAccuracy = False
    printed = io.StringIO()
    with numpy_in1d(), contextlib.redirect_stdout(printed):
        try:
            return evalPixelLevelSemanticLabeling.evaluateImgLists(
                list(prediction_files), list(ground_truth_files), args
            )
        except SystemExit:
            lines = printed.getvalue().strip().splitlines()
            raise ValueError(
                "cityscapesscripts rejected the evaluation input: "
                + (lines[-1] if lines else "(no message)")
                + _unknown_label_report(ground_truth_files)
            ) from None


def _unknown_label_report(ground_truth_files: Sequence[str]) -> str:
    """Where the script's "Unknown label" exit came from: the first file with such ids."""
    from cityscapesscripts.helpers.labels import id2label

    for path in ground_truth_files:
        with Image.open(path) as image:
            unknown = sorted(set(np.unique(np.asarray(image)).tolist()) - set(id2label))
        if unknown:
            return f" ('{path}' has label ids {unknown} that cityscapesscripts does not define)"
    return ""


@contextlib.contextmanager
def numpy_in1d() -> Iterator[None]:
    """Within this block ``np.in1d`` exists, as cityscapesscripts 2.3 needs.

    numpy deprecated ``in1d`` in 2.0 and removed it in 2.4. When it is missing it is provided as
    ``np.isin`` on the flattened input (``in1d``'s documented equivalent) and removed again on
    exit; when it exists only its deprecation warning is silenced. The patch is visible to the
    whole process while the block runs.
    """
    if hasattr(np, "in1d"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*in1d.*", category=DeprecationWarning)
            yield
        return
    np.in1d = _in1d
    try:
        yield
    finally:
        del np.in1d


def _in1d(
    ar1: np.ndarray, ar2: np.ndarray, assume_unique: bool = False, invert: bool = False
) -> np.ndarray:
    return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert)


def _core_name(label_file: str) -> str:
    """``aachen_000000_000019`` of ``.../aachen_000000_000019_gtFine_labelIds.png``."""
    return os.path.basename(label_file).replace("_gtFine_labelIds.png", "")


def _png_bytes(label_ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label_ids.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
