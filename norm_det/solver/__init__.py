"""Optimizers (SGD, LARS, LAMB) with per-parameter weight decay, warmup LR schedules, gradient
clipping (by value, norm, or adaptive per unit), and batch-size scaling rules."""

from norm_det.solver.agc import AdaptiveGradientClipper, adaptive_clip_grad_
from norm_det.solver.grad_clip import GradientClipper, build_gradient_clipper
from norm_det.solver.lamb import LAMB
from norm_det.solver.lars import LARS
from norm_det.solver.lr_scheduler import (
    WarmupCosineLR,
    WarmupLR,
    WarmupMultiStepLR,
    WarmupPolyLR,
    build_lr_scheduler,
    describe_schedule,
)
from norm_det.solver.optimizer import OPTIMIZERS, build_optimizer, get_param_groups
from norm_det.solver.scaling import (
    LR_SCALINGS,
    describe_batch,
    describe_scaling,
    images_per_pass,
    num_workers,
    pass_config,
    scale_to_world_size,
)

__all__ = [
    "LAMB",
    "LARS",
    "LR_SCALINGS",
    "OPTIMIZERS",
    "AdaptiveGradientClipper",
    "GradientClipper",
    "WarmupCosineLR",
    "WarmupLR",
    "WarmupMultiStepLR",
    "WarmupPolyLR",
    "adaptive_clip_grad_",
    "build_gradient_clipper",
    "build_lr_scheduler",
    "build_optimizer",
    "describe_batch",
    "describe_scaling",
    "describe_schedule",
    "get_param_groups",
    "images_per_pass",
    "num_workers",
    "pass_config",
    "scale_to_world_size",
]
