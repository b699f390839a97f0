"""A run's ``metrics.jsonl``: its records, curves, final values and training time.

Metrics are named by their last two parts (``synthetic_coco_val/bbox/AP`` is ``bbox/AP``); the
headline ones are what the comparison plots and tabulates.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

# Headline metrics, by their name after the dataset prefix, in the order they are plotted.
HEADLINE_METRICS = ("bbox/AP", "segm/AP", "sem_seg/mIoU")
METRIC_TITLES = {
    "bbox/AP": "box AP",
    "segm/AP": "mask AP",
    "sem_seg/mIoU": "mIoU",
    "total_loss": "total loss",
}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in file order.

    Raises:
        FileNotFoundError: no such file (the run has not been trained, or wrote elsewhere).
        ValueError: a line is not a JSON object with an ``"iteration"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}: train the run first (without --no-train)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(record, dict) or "iteration" not in record:
            raise ValueError(f"{path}, line {number}: expected an object with an 'iteration'")
        records.append(record)
    return records


def metric_name(key: str) -> str:
    """``"synthetic_coco_val/bbox/AP"`` -> ``"bbox/AP"`` (the last two parts of a key)."""
    return "/".join(key.split("/")[-2:])


def curves(records: Sequence[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """``{"total_loss": [(iteration, value), ...], "bbox/AP": [...], ...}`` of one run.

    Only finite values are kept; of several datasets with the same metric, the first one is used.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    chosen: dict[str, str] = {}
    for record in records:
        iteration = int(record["iteration"])
        for key, value in record.items():
            if value is None or key == "iteration":
                continue
            name = "total_loss" if key == "total_loss" else metric_name(key)
            if name not in ("total_loss", *HEADLINE_METRICS):
                continue
            if chosen.setdefault(name, key) != key or not math.isfinite(value):
                continue
            series.setdefault(name, []).append((iteration, float(value)))
    return series


def training_seconds(records: Sequence[Mapping]) -> float | None:
    """Seconds spent in training steps: each line's mean step ``time`` times the iterations it
    covers (evaluations and start-up excluded)."""
    total, previous, seen = 0.0, 0, False
    for record in records:
        if record.get("time") is None:
            continue
        iteration = int(record["iteration"])
        total += float(record["time"]) * (iteration - previous)
        previous, seen = iteration, True
    return total if seen else None


def final_value(records: Sequence[Mapping], metric: str) -> float | None:
    """The last value of ``metric`` in a run's records.

    ``metric`` is a headline name (``bbox/AP``), ``total_loss``, or any key of the records,
    where ``KEY/*`` means the mean over the keys ``KEY/<layer>`` of the last record having them
    (the diagnostics: ``diag_filter_mean_shift/*``).
    """
    if metric.endswith("/*"):
        prefix = metric[:-1]
        for record in reversed(records):
            values = [float(v) for k, v in record.items() if k.startswith(prefix) and v is not None]
            if values:
                return statistics.fmean(values)
        return None
    series = curves(records).get(metric)
    if series:
        return series[-1][1]
    for record in reversed(records):
        if record.get(metric) is not None:
            return float(record[metric])
    return None


def metric_series(records: Sequence[Mapping], metric: str) -> list[tuple[int, float]]:
    """``(iteration, value)`` of a metric over a run (``KEY/*``: the mean over its layers)."""
    if not metric.endswith("/*"):
        series = curves(records).get(metric)
        if series:
            return series
    points = []
    for record in records:
        if metric.endswith("/*"):
            found = [
                float(v)
                for k, v in record.items()
                if k.startswith(metric[:-1]) and v is not None and math.isfinite(v)
            ]
            value = statistics.fmean(found) if found else None
        else:
            value = record.get(metric)
        if value is not None and math.isfinite(value):
            points.append((int(record["iteration"]), float(value)))
    return points
