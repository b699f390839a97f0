"""Scalars recorded during training, collected until a writer drains them.

The training step records losses, timings and the LR every iteration; the evaluation hook records
metrics now and then. A writer (JSON lines, TensorBoard) asks for everything recorded since its
last visit, summarised per name as the name was recorded:

- ``"mean"`` (losses, timings): the mean over the window, at the window's last iteration;
- ``"last"`` (the LR): the latest value, at the window's last iteration;
- ``"all"`` (evaluation metrics): every value, at the iteration it was recorded.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

__all__ = ["MetricStorage"]

Summary = Literal["mean", "last", "all"]
SUMMARIES = ("mean", "last", "all")


class MetricStorage:
    """Per-name lists of ``(iteration, value)`` since the last :meth:`drain`."""

    def __init__(self) -> None:
        self._window: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._summary: dict[str, Summary] = {}
        self._latest: dict[str, float] = {}
        self._last_iteration = 0

    def put_scalar(
        self, name: str, value: float, iteration: int, *, summary: Summary = "mean"
    ) -> None:
        """Record ``value`` of ``name`` at ``iteration`` (iterations done so far)."""
        if summary not in SUMMARIES:
            raise ValueError(f"summary of {name!r} is {summary!r}; expected one of {SUMMARIES}")
        value = float(value)
        self._window[name].append((iteration, value))
        self._summary[name] = summary
        self._latest[name] = value
        self._last_iteration = max(self._last_iteration, iteration)

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`drain` has not returned yet, as plain values (saved in checkpoints)."""
        return {
            "window": {name: list(records) for name, records in self._window.items() if records},
            "summary": dict(self._summary),
            "latest": dict(self._latest),
            "last_iteration": self._last_iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: a resumed run averages what the interrupted one
        recorded since its last written line, as an uninterrupted run would."""
        self._window = defaultdict(list)
        for name, records in state.get("window", {}).items():
            self._window[name] = [(int(i), float(v)) for i, v in records]
        self._summary.update(state.get("summary", {}))
        self._latest.update(state.get("latest", {}))
        self._last_iteration = int(state.get("last_iteration", 0))

    def discard_through(self, iteration: int) -> None:
        """Forget the records of iterations up to ``iteration`` (already written)."""
        for name, records in self._window.items():
            self._window[name] = [(i, v) for i, v in records if i > iteration]

    def latest(self) -> dict[str, float]:
        """The most recent value of every name ever recorded."""
        return dict(self._latest)

    def drain(self) -> dict[int, dict[str, float]]:
        """Everything recorded since the last call, as ``{iteration: {name: value}}``."""
        end = self._last_iteration
        by_iteration: dict[int, dict[str, float]] = defaultdict(dict)
        for name, records in self._window.items():
            if not records:
                continue
            summary = self._summary[name]
            if summary == "mean":
                by_iteration[end][name] = sum(v for _, v in records) / len(records)
            elif summary == "last":
                by_iteration[end][name] = records[-1][1]
            else:
                for iteration, value in records:
                    by_iteration[iteration][name] = value
        self._window.clear()
        return dict(sorted(by_iteration.items()))
