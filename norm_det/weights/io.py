"""Reading weight files safely, and writing them atomically: :mod:`norm_det.files`.

A file's format is decided by its bytes, never by its name, and nothing a file names is ever
run: torch files are read with ``torch.load(weights_only=True)`` (their other Python objects,
after the ``allow_pickle`` opt-in, as inert placeholders); a pickle (detectron2's and Caffe2's
``.pkl`` model files) only after the opt-in, and even then NumPy arrays and containers only.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from norm_det.files import atomic_save, atomic_write, read_weight_file

PICKLE_SUFFIXES = (".pkl", ".pickle")


def load_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """The object stored in a weight file: :func:`norm_det.files.read_weight_file`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        norm_det.files.WeightFileError: (a ``ValueError``) the file cannot be read safely; the
            message names it and says why.
    """
    return read_weight_file(path, allow_pickle=allow_pickle)


def save_file(obj: Any, path: str | os.PathLike, *, as_pickle: bool = False) -> Path:
    """Write ``obj`` atomically: with ``torch.save``, or as a plain pickle (``as_pickle``).

    A plain pickle holds NumPy arrays where ``obj`` holds tensors, as detectron2's ``.pkl`` model
    files do.
    """
    path = Path(path)
    if as_pickle:
        data = _to_numpy(obj)
        atomic_write(path, lambda file: pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        atomic_save(obj, path)
    return path


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _to_numpy(v)) for k, v in obj.items())
    return obj


def to_tensor(value: Any, key: str, source: str) -> torch.Tensor:
    """A state-dict value as a tensor (NumPy arrays as detectron2's pickles hold them)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        # A copy where the array is not a plain writable C-ordered buffer (a 0-d array stays 0-d).
        if not (value.flags.c_contiguous and value.flags.writeable):
            value = value.copy(order="C")
        return torch.from_numpy(value)
    raise ValueError(
        f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor or array; "
        "a state dict maps parameter names to tensors"
    )
