"""Evaluation on COCO, Pascal VOC and Cityscapes with the official protocols.

``build_evaluator(cfg, dataset_name, output_dir)`` picks the evaluator from the dataset's
metadata; ``inference_on_dataset(model, loader, evaluator)`` runs a model over a test loader and
returns ``{task: {metric: value}}`` on rank 0, after gathering every process's predictions.
What evaluation refuses to score is checked in :mod:`norm_det.evaluation.guards`.
"""

from norm_det.evaluation.build import EVALUATOR_TYPES, build_evaluator, evaluator_from_metadata
from norm_det.evaluation.cityscapes_evaluation import (
    CityscapesSemSegEvaluator,
    evaluate_cityscapes_files,
)
from norm_det.evaluation.coco_backend import COCO_BACKENDS, load_coco_gt, run_coco_eval
from norm_det.evaluation.coco_evaluation import COCOEvaluator, instances_to_coco_results
from norm_det.evaluation.evaluator import DatasetEvaluator, DatasetEvaluators
from norm_det.evaluation.guards import (
    check_coco_results,
    check_finite_outputs,
    check_finite_sem_seg,
)
from norm_det.evaluation.inference import inference_on_dataset
from norm_det.evaluation.pascal_voc_evaluation import PascalVOCEvaluator, voc_ap
from norm_det.evaluation.sem_seg_evaluation import SemSegEvaluator
from norm_det.utils.comm import (
    all_gather_object,
    get_rank,
    get_world_size,
    is_main_process,
    synchronize,
)

__all__ = [
    "COCO_BACKENDS",
    "EVALUATOR_TYPES",
    "COCOEvaluator",
    "CityscapesSemSegEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "PascalVOCEvaluator",
    "SemSegEvaluator",
    "all_gather_object",
    "build_evaluator",
    "check_coco_results",
    "check_finite_outputs",
    "check_finite_sem_seg",
    "evaluate_cityscapes_files",
    "evaluator_from_metadata",
    "get_rank",
    "get_world_size",
    "inference_on_dataset",
    "instances_to_coco_results",
    "is_main_process",
    "load_coco_gt",
    "run_coco_eval",
    "synchronize",
    "voc_ap",
]
