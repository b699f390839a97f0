"""Which module paths a :func:`norm_det.surgery.convert` call changes: ``include`` / ``exclude``."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence


class _Selection:
    """Which module paths the user asked to convert (glob patterns; a prefix selects a subtree)."""

    def __init__(self, include: Sequence[str] | None, exclude: Sequence[str] | None) -> None:
        self.include = None if include is None else _as_patterns(include, "include")
        self.exclude = _as_patterns(exclude or (), "exclude")

    @staticmethod
    def _matches(path: str, patterns: Iterable[str]) -> bool:
        return any(
            fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns
        )

    def explicitly_included(self, path: str) -> bool:
        return self.include is not None and self._matches(path, self.include)

    def __call__(self, path: str) -> bool:
        if self._matches(path, self.exclude):
            return False
        return self.include is None or self._matches(path, self.include)


def _as_patterns(patterns: str | Sequence[str], argument: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        return (patterns,)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"convert: {argument} must be module-path patterns (strings); got {patterns!r}"
        )
    return tuple(patterns)
