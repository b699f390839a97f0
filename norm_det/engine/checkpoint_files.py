"""The checkpoints of an output directory: the pointer, and which file to resume from.

``last_checkpoint`` names the newest checkpoint; it may name only a file inside the directory.
``--resume`` tries the pointer's file first, then ``model_<iteration>.pth`` newest first
(``model_final.pth`` first among them), and falls back past a file that cannot be read to the
next one, saying which it skipped and why (docs/training.md, "Failures and recovery").
:class:`norm_det.engine.Checkpointer` writes the files; this module only reads the directory
(and removes the temporary files of killed writes).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from norm_det.files import WeightFileError, remove_stale_temporaries
from norm_det.utils.comm import get_rank

__all__ = ["LAST_CHECKPOINT", "CheckpointDirectory", "checkpoint_iteration"]

# The checkpointer's logger: these lines are part of what it reports when it resumes.
logger = logging.getLogger("norm_det.engine.checkpointer")

LAST_CHECKPOINT = "last_checkpoint"


def checkpoint_iteration(name: str) -> float | None:
    """The iteration a checkpoint's file name says (``model_final.pth``: after all others)."""
    if name == "model_final.pth":
        return math.inf
    match = re.fullmatch(r"model_(\d+)\.pth", name)
    return int(match.group(1)) if match else None


class CheckpointDirectory:
    """The checkpoint files of ``save_dir``: what the pointer names, what to resume from.

    :class:`norm_det.engine.Checkpointer` is one, which also writes and loads them.
    """

    def __init__(self, save_dir: str | os.PathLike) -> None:
        self.save_dir = Path(save_dir)

    @property
    def pointer(self) -> Path:
        """The ``last_checkpoint`` file."""
        return self.save_dir / LAST_CHECKPOINT

    def pointer_target(self) -> Path | None:
        """The file ``last_checkpoint`` names, if it is a plain name inside ``save_dir``."""
        pointer = self.pointer
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
        path = self.pointer_target()
        if path is not None and not path.is_file():
            raise FileNotFoundError(
                f"'{self.pointer}' names checkpoint '{path.name}', which does "
                f"not exist in '{self.save_dir}'; delete the pointer or restore the file"
            )
        return path

    def resume_candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: the pointer's, then the others by iteration.

        The others are ``save_dir``'s ``model_<iteration>.pth`` (newest first) and
        ``model_final.pth`` (first among them).
        """
        target = self.pointer_target()
        found = [target] if target is not None and target.is_file() else []
        numbered = [
            (iteration, path.stat().st_mtime, path)
            for path in self.save_dir.glob("model_*.pth")
            if path.is_file()
            and path not in found
            and (iteration := checkpoint_iteration(path.name)) is not None
        ]
        return found + [path for *_, path in sorted(numbered, reverse=True)]

    def load_newest_readable(self, load: Callable[[Path], Any]) -> Any:
        """``load`` of the best candidate it can read; None when there is no candidate.

        Removes the temporary files of killed writes first (rank 0). A candidate that cannot be
        read (``load`` raises :class:`~norm_det.files.WeightFileError`: truncated, empty, not a
        checkpoint) is skipped with a warning naming it and why, and the next newest is tried;
        any other error (one that does not fit the model) propagates.

        Raises:
            WeightFileError: checkpoints exist and none can be read (each is listed).
        """
        if get_rank() == 0:
            for stale in remove_stale_temporaries(self.save_dir):
                logger.info("removed %s, left by an interrupted checkpoint write", stale)
        target = self.pointer_target()
        if target is not None and not target.is_file():
            logger.warning("'%s' names '%s', which does not exist", self.pointer, target.name)
        skipped: list[str] = []
        for candidate in self.resume_candidates():
            try:
                state = load(candidate)
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
