"""Reporting of bad annotations found while a dataset loads: skipped ones warn, corrupting ones
raise, each message naming the file and the ids.

Loaders skip a bad annotation (an unknown image or category, a box of non-positive size, a
polygon with fewer than 3 points) rather than fail, because the official evaluation tools ignore
such annotations too; the skip is never silent. Problems that would make a number wrong (a
missing image, an empty dataset, a label id outside the label set, a non-finite or non-numeric
coordinate, a duplicate annotation id, an id of the wrong type, a mask of the wrong size) raise
instead: the official tools would silently score or train on something else than the file says.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

__all__ = ["DatasetWarning", "ProblemReport", "describe", "non_finite_numbers"]

# Enough examples to find the culprits; a dataset with thousands of bad entries should not flood
# the log.
_MAX_EXAMPLES = 10


class DatasetWarning(UserWarning):
    """An annotation was skipped while loading a dataset."""


def describe(value: Any) -> str:
    """``value`` as a message shows it: its repr and, unless it is a plain int, its type.

    ``'10' (a str)`` cannot be mistaken for the integer 10.
    """
    if type(value) is int:
        return repr(value)
    return f"{value!r} (a {type(value).__name__})"


def non_finite_numbers(values: Iterable[Any]) -> list[Any]:
    """The entries of ``values`` that are not finite real numbers (NaN, inf, a str, None, a bool).

    JSON ``true`` is a Python bool, which is an int; a coordinate written ``true`` is still not
    a number.
    """
    return [
        v
        for v in values
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
    ]


class ProblemReport:
    """Collects the problems found while a dataset loads, then reports them once per kind.

    :meth:`skip` records an annotation left out (a :class:`DatasetWarning` per kind),
    :meth:`reject` one that makes the dataset unusable (one ValueError listing every kind), so a
    user sees all the bad entries of a file at once rather than one per run.

    Args:
        source: the file or directory being loaded, named in every message.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._skipped: dict[str, list[str]] = defaultdict(list)
        self._rejected: dict[str, list[str]] = defaultdict(list)

    def skip(self, kind: str, detail: str) -> None:
        """Record one skip; ``kind`` groups the warning, ``detail`` names the ids involved."""
        self._skipped[kind].append(detail)

    def reject(self, kind: str, detail: str) -> None:
        """Record one problem that makes :meth:`emit` raise."""
        self._rejected[kind].append(detail)

    def count(self, kind: str) -> int:
        """How many problems of ``kind`` (skipped or rejected) were recorded."""
        return len(self._skipped.get(kind, [])) + len(self._rejected.get(kind, []))

    def emit(self) -> None:
        """Issue one :class:`DatasetWarning` per kind skipped, then raise if anything was rejected.

        Raises:
            ValueError: naming the source, each rejected kind, its count and the first ids.
        """
        for kind, details in self._skipped.items():
            warnings.warn(
                f"{self.source}: skipped {len(details)} {kind}: {_examples(details)}",
                DatasetWarning,
                stacklevel=3,
            )
        if self._rejected:
            lines = [f"{len(d)} {kind}: {_examples(d)}" for kind, d in self._rejected.items()]
            raise ValueError(
                f"'{self.source}' cannot be used as it is; fix these entries:\n  "
                + "\n  ".join(lines)
            )


def _examples(details: list[str]) -> str:
    shown = "; ".join(details[:_MAX_EXAMPLES])
    more = f"; ... and {len(details) - _MAX_EXAMPLES} more" if len(details) > _MAX_EXAMPLES else ""
    return shown + more
