"""Loading mmengine checkpoints under torch's ``weights_only`` unpickler, without an env variable.

torch >= 2.6 reads files with ``torch.load(weights_only=True)`` by default, and mmengine 0.10.7
calls ``torch.load`` without the argument. Besides tensors, the checkpoints mmengine's runner
writes hold the message hub's ``HistoryBuffer`` objects (numpy arrays of the logged scalars),
numpy scalars in ``meta`` (``seed``) and the runtime information of the message hub, so both
``--resume`` and testing from a checkpoint stop with "Weights only load failed".

Rather than turning full unpickling back on (``weights_only=False``, which runs whatever code a
file names), :func:`mmengine_checkpoint_globals` allows exactly the classes those checkpoints are
made of, and :func:`allow_mmengine_checkpoints` allows them for the duration of a ``with`` block
(``torch.serialization.safe_globals``: nothing changes outside it). Any other class in a file is
still refused by torch, with its name in the message.

One entry needs care: a ``HistoryBuffer`` pickles its statistics methods as
``getattr(HistoryBuffer, "mean")``. Allowing ``builtins.getattr`` would let a file fetch any
attribute of any allowed object; instead the name ``builtins.getattr`` is bound, inside the
block, to :func:`history_buffer_method`, which resolves those methods and refuses anything else.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _numpy_reconstructors() -> list[Any]:
    # numpy 2 moved its pickling helpers to numpy._core; pickles name whichever wrote them, and
    # numpy 2 still reads numpy.core.*, so both spellings are allowed where they exist.
    found = []
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["_reconstruct"])
        except ImportError:
            continue
        found += [module._reconstruct, module.scalar]
    return found


# HistoryBuffer's built-in statistics (mmengine registers them on its first instance, so they
# cannot be read from its registry in a fresh process).
_HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")


def history_buffer_method(owner: Any, name: Any) -> Any:
    """``getattr(owner, name)`` as mmengine's checkpoints call it: HistoryBuffer's statistics only.

    Raises:
        pickle.UnpicklingError: any other owner or name (the file asks for more than mmengine
            writes).
    """
    from mmengine.logging import HistoryBuffer

    if owner is HistoryBuffer and isinstance(name, str):
        if name in _HISTORY_BUFFER_STATISTICS:
            return getattr(HistoryBuffer, name)
        # Methods a program registered with HistoryBuffer.register_statistics.
        registered = HistoryBuffer._statistics_methods.get(name)
        if registered is not None:
            return registered
    raise pickle.UnpicklingError(
        f"checkpoint asks for getattr({owner!r}, {name!r}); norm_det's weights-only loading of "
        f"mmengine checkpoints resolves only HistoryBuffer's statistics methods "
        f"({', '.join(_HISTORY_BUFFER_STATISTICS)} and registered ones)"
    )


def mmengine_checkpoint_globals() -> list[Any]:
    """The non-tensor classes and functions found in checkpoints mmengine's runner writes.

    - mmengine's ``HistoryBuffer`` (the message hub's logged scalars, restored field by field);
    - ``builtins.getattr`` bound to :func:`history_buffer_method` (its statistics methods);
    - numpy arrays and scalars: ``ndarray``, ``dtype`` and the concrete dtype classes of numbers
      and booleans, and numpy's array / scalar reconstructors (they rebuild an array or a number
      from its bytes; an object array's elements go through the same restricted unpickler).

    Returns:
        Objects for ``torch.serialization.safe_globals`` / ``add_safe_globals``.
    """
    from mmengine.logging import HistoryBuffer

    number_dtypes = [
        type(np.dtype(code))
        for code in ("?", "b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d", "g")
    ]
    return [
        HistoryBuffer,
        (history_buffer_method, "builtins.getattr"),
        np.ndarray,
        np.dtype,
        *dict.fromkeys(number_dtypes),
        *_numpy_reconstructors(),
    ]


@contextlib.contextmanager
def allow_mmengine_checkpoints() -> Iterator[None]:
    """``with`` block in which ``torch.load(weights_only=True)`` reads mmengine's checkpoints."""
    with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
        yield
