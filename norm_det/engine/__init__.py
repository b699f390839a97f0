"""The training loop, its hooks, checkpoints, evaluation runs and process launching.

``tools/train_net.py`` is a thin command line over these: :func:`default_argument_parser`,
:func:`launch`, :func:`default_setup` and :class:`Trainer`.
"""

from norm_det.engine.checkpointer import (
    Checkpointer,
    atomic_save,
    capture_rng_state,
    load_model_weights,
    restore_rng_state,
)
from norm_det.engine.defaults import (
    default_argument_parser,
    default_setup,
    seed_all_rng,
    setup_logger,
)
from norm_det.engine.hooks import (
    EvalHook,
    LRSchedulerHook,
    MetricsWriter,
    PeriodicCheckpointer,
    ProgressBar,
)
from norm_det.engine.launch import get_local_rank, launch
from norm_det.engine.metrics import MetricStorage
from norm_det.engine.train_loop import (
    HookBase,
    NonFiniteLossError,
    SimpleTrainer,
    TrainerBase,
    move_to_device,
)
from norm_det.engine.trainer import Trainer, model_device

# detectron2's name for the config-driven trainer.
DefaultTrainer = Trainer

__all__ = [
    "Checkpointer",
    "DefaultTrainer",
    "EvalHook",
    "HookBase",
    "LRSchedulerHook",
    "MetricStorage",
    "MetricsWriter",
    "NonFiniteLossError",
    "PeriodicCheckpointer",
    "ProgressBar",
    "SimpleTrainer",
    "Trainer",
    "TrainerBase",
    "atomic_save",
    "capture_rng_state",
    "default_argument_parser",
    "default_setup",
    "get_local_rank",
    "launch",
    "load_model_weights",
    "model_device",
    "move_to_device",
    "restore_rng_state",
    "seed_all_rng",
    "setup_logger",
]
