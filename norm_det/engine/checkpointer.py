"""Checkpoints that survive a crash mid-write, and exact resumption.

A checkpoint holds the model, optimizer and LR scheduler states, the number of iterations done
and the random number generator states of every process, so that ``--resume`` continues with
the same numbers an uninterrupted run would produce. Files are written atomically: to a
temporary file in the same directory, flushed to disk, then renamed over the target, so a
killed process never leaves a truncated checkpoint. ``last_checkpoint`` names the newest one.

Loading weights into a model is strict: a file that does not fit the model fails with the first
missing and unexpected keys rather than leaving layers silently at their initialization.

What survives a bad file (docs/training.md, "Failures and recovery"): every file is read with
:func:`norm_det.files.read_weight_file` (never running code; errors name the file and what is
wrong); ``last_checkpoint`` may name only a file inside the output directory; ``--resume`` falls
back past a newest checkpoint that cannot be read to the newest one that can, saying which it
skipped and why; temporary files of killed writes are removed; and no checkpoint is written from
a model or optimizer state holding NaN or inf.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from norm_det.engine.checkpoint_files import LAST_CHECKPOINT, CheckpointDirectory
from norm_det.engine.distributed_model import unwrap_model
from norm_det.engine.model_weights import (
    load_initial_weights,
    load_model_weights,
    read_model_weights,
)
from norm_det.files import atomic_save, atomic_write
from norm_det.utils.comm import all_gather_object, get_rank, get_world_size

__all__ = [
    "Checkpointer",
    "NonFiniteStateError",
    "atomic_save",
    "capture_rng_state",
    "load_model_weights",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's and CUDA's global generators.

    Only tensors and plain Python values, so that ``torch.load(weights_only=True)`` reads it.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global generators to a state from :func:`capture_rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteStateError(ValueError):
    """A checkpoint was about to be written from parameters or optimizer state with NaN / inf."""

    @classmethod
    def refusing(
        cls, path: Path, iteration: int, bad: list[str], last: Path | None
    ) -> NonFiniteStateError:
        """The error for checkpoint ``path``, naming the ``bad`` tensors and the ``last`` good
        checkpoint."""
        return cls(
            f"refusing to write checkpoint '{path}' at iteration "
            f"{iteration}: {len(bad)} tensors hold NaN or inf (first: {bad[0]}). The loss was "
            "finite, so the update itself diverged; "
            + (f"the newest good checkpoint is '{last}'" if last else "no checkpoint was written")
            + ". Lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS, then --resume."
        )


def non_finite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[str]:
    """The names of the model's and the optimizer state's floating tensors with NaN or inf."""
    tensors = [(f"model {k}", v) for k, v in model.state_dict().items()]
    if optimizer is not None:
        for index, state in optimizer.state_dict()["state"].items():
            tensors += [
                (f"optimizer state {key} of parameter {index}", v) for key, v in state.items()
            ]
    floating = [(k, v) for k, v in tensors if torch.is_tensor(v) and v.is_floating_point()]
    if not floating:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floating])
    if bool(finite.all()):
        return []
    return [k for (k, _), ok in zip(floating, finite.tolist()) if not ok]


def save_training_state(
    save_dir: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    *,
    iteration: int,
    extra: Mapping[str, Any] | None,
) -> Path:
    """Write ``<save_dir>/<name>.pth`` atomically and point ``last_checkpoint`` at it.

    Every process must call this: each contributes its random generator states; rank 0 writes
    the model, optimizer and scheduler states, the iterations done, every process's generator
    states and the ``extra`` state (when given).

    Returns:
        The checkpoint's path.
    """
    rng_states = all_gather_object(capture_rng_state())
    path = save_dir / f"{name}.pth"
    if get_rank() != 0:
        return path
    checkpoint = {"model": model.state_dict(), "iteration": iteration, "rng_states": rng_states}
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        checkpoint["scheduler"] = scheduler.state_dict()
    if extra:
        checkpoint["extra"] = dict(extra)
    atomic_save(checkpoint, path)
    atomic_write(save_dir / LAST_CHECKPOINT, lambda f: f.write(path.name.encode()))
    logger.info("saved checkpoint %s (iteration %d)", path, iteration)
    return path


def restore_training_state(
    loaded: Mapping[str, Any],
    path: Path,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
) -> dict[str, Any]:
    """Restore the optimizer and scheduler of a loaded checkpoint (when it has them).

    Returns:
        ``{"iteration", "rng_state", "extra"}``; ``rng_state`` is this process's generator
        states, None (with a warning) when the checkpoint was saved by another number of
        processes.
    """
    if optimizer is not None and "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    rng_states = loaded.get("rng_states") or []
    rng_state = None
    if len(rng_states) == get_world_size():
        rng_state = rng_states[get_rank()]
    else:
        logger.warning(
            "%s was saved by %d processes and is resumed by %d: random generator states are "
            "not restored, so the run will not repeat an uninterrupted one exactly",
            path,
            len(rng_states),
            get_world_size(),
        )
    logger.info("resumed from %s at iteration %d", path, loaded["iteration"])
    return {
        "iteration": int(loaded["iteration"]),
        "rng_state": rng_state,
        "extra": dict(loaded.get("extra") or {}),
    }


class Checkpointer(CheckpointDirectory):
    """Save and restore the full training state in ``save_dir``.

    Which checkpoint to resume from is :class:`CheckpointDirectory`'s part.

    Args:
        model: the model (unwrapped from DistributedDataParallel if needed).
        save_dir: where checkpoints and the ``last_checkpoint`` pointer live.
        optimizer, scheduler: saved and restored with the model when given.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str | os.PathLike,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
    ) -> None:
        super().__init__(save_dir)
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.scheduler = scheduler

    def save(self, name: str, *, iteration: int, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``<save_dir>/<name>.pth`` and point ``last_checkpoint`` at it.

        Every process must call this: each contributes its random generator states. Rank 0
        writes the file.

        Args:
            iteration: the number of iterations done; training resumes with the next one.
            extra: more training state of plain values (the metrics not yet written), which
                :meth:`load` returns.

        Raises:
            NonFiniteStateError: a parameter, buffer or optimizer state holds NaN or inf (every
                process checks, so all stop together); nothing is written.
        """
        self.check_finite(name, iteration)
        parts = (self.model, self.optimizer, self.scheduler)
        return save_training_state(self.save_dir, name, *parts, iteration=iteration, extra=extra)

    def check_finite(self, name: str, iteration: int) -> None:
        """Refuse to checkpoint a state with NaN or inf in it (see :meth:`save`)."""
        bad = non_finite_tensors(self.model, self.optimizer)
        if bad:
            path = self.save_dir / (name + ".pth")
            raise NonFiniteStateError.refusing(path, iteration, bad, self.pointer_target())

    def load(
        self,
        path: str | os.PathLike,
        *,
        full: bool = True,
        source: str | None = None,
        allow_pickle: bool = False,
    ) -> dict[str, Any]:
        """Load a checkpoint or a weights file.

        Args:
            full: also restore the optimizer and scheduler (when the file has them).
            source: how error messages name the file (default: its path).
            allow_pickle: read a pickle or a torch file's other objects (see
                :func:`norm_det.files.read_weight_file`).

        Returns:
            ``{"iteration": int, "rng_state": dict | None, "extra": dict}`` for a full
            checkpoint with an iteration count, ``{}`` for weights only.

        Raises:
            FileNotFoundError, norm_det.files.WeightFileError, ValueError: see
                :func:`~norm_det.engine.model_weights.read_model_weights`.
        """
        path = Path(path)
        loaded = read_model_weights(
            self.model, path, source or f"'{path}'", allow_pickle=allow_pickle
        )
        if not (full and isinstance(loaded, Mapping) and "iteration" in loaded):
            logger.info("loaded model weights from %s", path)
            return {}
        return restore_training_state(loaded, path, self.optimizer, self.scheduler)

    def resume(self) -> dict[str, Any] | None:
        """Restore the newest checkpoint of ``save_dir`` that can be read; None if there is none.

        Unreadable newer ones are skipped with a warning (:meth:`load_newest_readable`).

        Raises:
            WeightFileError: checkpoints exist and none can be read (each is listed).
        """
        return self.load_newest_readable(lambda path: self.load(path, full=True))

    def resume_or_load(
        self,
        weights: str,
        *,
        resume: bool,
        backbone_scheme: Any = None,
        weights_format: str | None = None,
        allow_pickle: bool = False,
    ) -> dict[str, Any]:
        """With ``resume`` and a checkpoint in ``save_dir``, restore it fully (:meth:`resume`);
        else load ``weights`` (``MODEL.WEIGHTS``) into the model only, if given: a whole model's
        weights or a pretrained backbone alone, warm-started in ``backbone_scheme``
        (:func:`~norm_det.engine.model_weights.load_initial_weights`, which the other arguments
        go to).

        Returns:
            What :meth:`load` returns (``{}`` when nothing or only weights were loaded).
        """
        if resume:
            state = self.resume()
            if state is not None:
                return state
            logger.info("no checkpoint in %s to resume from; starting from scratch", self.save_dir)
        if weights:
            load_initial_weights(self.model, weights, backbone_scheme, weights_format, allow_pickle)
        return {}
