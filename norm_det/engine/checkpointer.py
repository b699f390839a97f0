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
import math
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from norm_det.files import (
    WeightFileError,
    atomic_save,
    atomic_write,
    read_weight_file,
    remove_stale_temporaries,
)
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

LAST_CHECKPOINT = "last_checkpoint"


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _state_dict_of(loaded: Any, source: str) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file: a norm_det checkpoint or a bare state dict."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(
            f"{source} holds neither a state dict (parameter name -> tensor) nor a checkpoint "
            f"with a 'model' state dict; found {type(loaded).__name__}"
        )
    state = dict(loaded)
    # Saved from a DistributedDataParallel wrapper.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_model_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load ``state_dict`` into ``model``, strictly.

    Raises:
        ValueError: keys are missing or unexpected (naming the first of each and the counts), or
            a tensor's shape differs from the model's; ``source`` says where the weights came from.
    """
    model = _unwrap(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]!r})")
        raise ValueError(
            f"{source} does not match {type(model).__name__}: {' and '.join(parts)}. Was it "
            "saved from a model built with a different config (architecture, depth, or norm "
            "scheme)?"
        )
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source} does not match {type(model).__name__}: {key!r} has shape "
                f"{tuple(value.shape)} in the file and {tuple(expected[key].shape)} in the model"
            )
    model.load_state_dict(state_dict)


def _checkpoint_iteration(name: str) -> float | None:
    """The iteration a checkpoint's file name says (``model_final.pth``: after all others)."""
    if name == "model_final.pth":
        return math.inf
    match = re.fullmatch(r"model_(\d+)\.pth", name)
    return int(match.group(1)) if match else None


class NonFiniteStateError(ValueError):
    """A checkpoint was about to be written from parameters or optimizer state with NaN / inf."""


class Checkpointer:
    """Save and restore the full training state in ``save_dir``.

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
        self.model = _unwrap(model)
        self.save_dir = Path(save_dir)
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
        rng_states = all_gather_object(capture_rng_state())
        path = self.save_dir / f"{name}.pth"
        if get_rank() != 0:
            return path
        checkpoint = {
            "model": self.model.state_dict(),
            "iteration": iteration,
            "rng_states": rng_states,
        }
        if self.optimizer is not None:
            checkpoint["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            checkpoint["scheduler"] = self.scheduler.state_dict()
        if extra:
            checkpoint["extra"] = dict(extra)
        atomic_save(checkpoint, path)
        atomic_write(self.save_dir / LAST_CHECKPOINT, lambda f: f.write(path.name.encode()))
        logger.info("saved checkpoint %s (iteration %d)", path, iteration)
        return path

    def check_finite(self, name: str, iteration: int) -> None:
        """Refuse to checkpoint a state with NaN or inf in it (see :meth:`save`)."""
        tensors = [(f"model {k}", v) for k, v in self.model.state_dict().items()]
        if self.optimizer is not None:
            for index, state in self.optimizer.state_dict()["state"].items():
                tensors += [
                    (f"optimizer state {key} of parameter {index}", v) for key, v in state.items()
                ]
        floating = [(k, v) for k, v in tensors if torch.is_tensor(v) and v.is_floating_point()]
        if not floating:
            return
        finite = torch.stack([torch.isfinite(v).all() for _, v in floating])
        if bool(finite.all()):
            return
        bad = [k for (k, _), ok in zip(floating, finite.tolist()) if not ok]
        last = self._pointer_target()
        raise NonFiniteStateError(
            f"refusing to write checkpoint '{self.save_dir / (name + '.pth')}' at iteration "
            f"{iteration}: {len(bad)} tensors hold NaN or inf (first: {bad[0]}). The loss was "
            "finite, so the update itself diverged; "
            + (f"the newest good checkpoint is '{last}'" if last else "no checkpoint was written")
            + ". Lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS, then --resume."
        )

    def _pointer_target(self) -> Path | None:
        """The file ``last_checkpoint`` names, if it is a plain name inside ``save_dir``."""
        pointer = self.save_dir / LAST_CHECKPOINT
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        if not name or Path(name).name != name or name in (".", ".."):
            logger.warning(
                "'%s' names %r, which is not a file name inside '%s'; ignored (a checkpoint "
                "pointer never leaves the output directory)",
                pointer,
                name,
                self.save_dir,
            )
            return None
        return self.save_dir / name

    def last_checkpoint(self) -> Path | None:
        """The checkpoint ``last_checkpoint`` names, or ``None`` when there is none.

        Raises:
            FileNotFoundError: the pointer names a file that does not exist.
        """
        path = self._pointer_target()
        if path is not None and not path.is_file():
            raise FileNotFoundError(
                f"'{self.save_dir / LAST_CHECKPOINT}' names checkpoint '{path.name}', which does "
                f"not exist in '{self.save_dir}'; delete the pointer or restore the file"
            )
        return path

    def resume_candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: the pointer's, then the others by iteration.

        The others are ``save_dir``'s ``model_<iteration>.pth`` (newest first) and
        ``model_final.pth`` (first among them).
        """
        target = self._pointer_target()
        found = [target] if target is not None and target.is_file() else []
        numbered = [
            (iteration, path.stat().st_mtime, path)
            for path in self.save_dir.glob("model_*.pth")
            if path.is_file()
            and path not in found
            and (iteration := _checkpoint_iteration(path.name)) is not None
        ]
        return found + [path for *_, path in sorted(numbered, reverse=True)]

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
            FileNotFoundError: no such file.
            norm_det.files.WeightFileError: the file cannot be read (truncated, empty, text, a
                pickle ...); the message names it.
            ValueError: it does not fit the model (:func:`load_model_weights`).
        """
        path = Path(path)
        source = source or f"'{path}'"
        if not path.is_file():
            raise FileNotFoundError(f"{source}: file does not exist")
        loaded = read_weight_file(path, allow_pickle=allow_pickle)
        load_model_weights(self.model, _state_dict_of(loaded, source), source)
        if not (full and isinstance(loaded, Mapping) and "iteration" in loaded):
            logger.info("loaded model weights from %s", path)
            return {}
        if self.optimizer is not None and "optimizer" in loaded:
            self.optimizer.load_state_dict(loaded["optimizer"])
        if self.scheduler is not None and "scheduler" in loaded:
            self.scheduler.load_state_dict(loaded["scheduler"])
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

    def resume(self) -> dict[str, Any] | None:
        """Restore the newest checkpoint of ``save_dir`` that can be read; None if there is none.

        Removes the temporary files of killed writes first (rank 0). A candidate that cannot be
        read (truncated, empty, not a checkpoint) is skipped with a warning naming it and why,
        and the next newest is tried; one that does not fit the model is an error.

        Raises:
            WeightFileError: checkpoints exist and none can be read (each is listed).
        """
        if get_rank() == 0:
            for stale in remove_stale_temporaries(self.save_dir):
                logger.info("removed %s, left by an interrupted checkpoint write", stale)
        pointer = self.save_dir / LAST_CHECKPOINT
        target = self._pointer_target()
        if target is not None and not target.is_file():
            logger.warning("'%s' names '%s', which does not exist", pointer, target.name)
        skipped: list[str] = []
        for candidate in self.resume_candidates():
            try:
                state = self.load(candidate, full=True)
            except WeightFileError as error:
                logger.warning("not resuming from %s: %s", candidate, error)
                skipped.append(str(error))
                continue
            if skipped:
                logger.warning(
                    "resumed from %s, an older checkpoint: %d newer could not be read",
                    candidate,
                    len(skipped),
                )
            return state
        if skipped:
            raise WeightFileError(
                f"no checkpoint in '{self.save_dir}' can be read, so --resume cannot continue:\n"
                + "\n".join(skipped)
            )
        return None

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
        else load ``weights`` (``MODEL.WEIGHTS``) into the model only, if given.

        ``weights`` may also be a pretrained backbone alone, in any format
        :mod:`norm_det.weights` reads (torchvision, detectron2, mmdet, norm_det): when it does
        not fit the whole model, it is loaded into the model's backbone, warm-started in
        ``backbone_scheme`` (the scheme the backbone was built with); the other layers keep
        their initialization. ``weights_format`` names the backbone file's format (None: from
        its keys; ``MODEL.WEIGHTS_FORMAT``), ``allow_pickle`` lets a pickle be read
        (``MODEL.WEIGHTS_ALLOW_PICKLE``).

        Returns:
            What :meth:`load` returns (``{}`` when nothing or only weights were loaded).
        """
        if resume:
            state = self.resume()
            if state is not None:
                return state
            logger.info("no checkpoint in %s to resume from; starting from scratch", self.save_dir)
        if weights:
            source = f"MODEL.WEIGHTS '{weights}'"
            if weights_format and backbone_scheme is not None:  # a backbone, by its format
                self._load_backbone(
                    weights, backbone_scheme, None, source, weights_format, allow_pickle
                )
                return {}
            try:
                self.load(weights, full=False, source=source, allow_pickle=allow_pickle)
            except WeightFileError as unreadable:
                raise WeightFileError(f"MODEL.WEIGHTS: {unreadable}") from None
            except ValueError as mismatch:
                if backbone_scheme is None:
                    raise
                self._load_backbone(
                    weights, backbone_scheme, mismatch, source, weights_format, allow_pickle
                )
        return {}

    def _load_backbone(
        self,
        weights: str,
        scheme: Any,
        mismatch: ValueError | None,
        source: str,
        weights_format: str | None,
        allow_pickle: bool,
    ) -> None:
        from norm_det.weights import load_pretrained_backbone

        try:
            report = load_pretrained_backbone(
                _unwrap(self.model),
                weights,
                scheme,
                fmt=weights_format,
                allow_pickle=allow_pickle,
            )
        except ValueError as error:
            if mismatch is None:
                raise ValueError(
                    f"{source} (MODEL.WEIGHTS_FORMAT {weights_format}): {error}"
                ) from None
            raise ValueError(
                f"{mismatch}\nNor does it load as a pretrained backbone: {error}"
            ) from None
        logger.info(
            "%s is a pretrained backbone, not a whole model: loaded %d tensors into %s in "
            "scheme %s; the other layers keep their initialization",
            source,
            report["loaded"],
            report["backbone"],
            scheme,
        )
