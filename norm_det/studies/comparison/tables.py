"""The numbers of a comparison: one run's row (final and best values, step times), and over
seeds, per scheme and swept value, means with 95% intervals and paired differences to a baseline.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from norm_det.evaluation.statistics import interval, paired_difference
from norm_det.studies.comparison.plans import Run
from norm_det.studies.comparison.records import (
    HEADLINE_METRICS,
    METRIC_TITLES,
    curves,
    final_value,
    metric_name,
    read_metrics,
    training_seconds,
)
from norm_det.studies.comparison.runs import run_state


def summarize(label: str, records: Sequence[Mapping], wall_time: float | None = None) -> dict:
    """The table row of one run: final loss and metrics, best metrics, step times.

    ``wall_time`` (seconds, the whole process with evaluations) is kept when known.
    """
    series = curves(records)
    times = [float(r["time"]) for r in records if r.get("time") is not None]
    row: dict = {
        "run": label,
        "iterations": max((int(r["iteration"]) for r in records), default=0),
        "final_loss": series["total_loss"][-1][1] if "total_loss" in series else None,
        "s_per_iter": statistics.median(times) if times else None,
        "train_time_s": training_seconds(records),
        "wall_time_s": wall_time,
    }
    for name in HEADLINE_METRICS:
        if name in series:
            row[f"final {name}"] = series[name][-1][1]
            row[f"best {name}"] = max(v for _, v in series[name])
    return row


def _cell(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of :func:`summarize` rows; metric columns only where a run has them."""
    metrics = [m for m in HEADLINE_METRICS if any(f"final {m}" in row for row in rows)]
    header = ["run", "iterations", "final loss"]
    for name in metrics:
        header += [f"final {METRIC_TITLES[name]}", f"best {METRIC_TITLES[name]}"]
    header += ["s / iter", "training min"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [str(row["run"]), str(row["iterations"]), _cell(row["final_loss"], 3)]
        for name in metrics:
            cells += [_cell(row.get(f"final {name}"), 1), _cell(row.get(f"best {name}"), 1)]
        train = row["train_time_s"]
        cells += [_cell(row["s_per_iter"], 2), _cell(None if train is None else train / 60, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(
    runs: Sequence[Run], states: Mapping[Run, dict], metrics: Sequence[str]
) -> dict[tuple[str | None, str], dict]:
    """``(swept value, label) -> {"seeds": {metric: {seed: value}}, "diverged": n, ...}``.

    A diverged run scores 0 in every headline metric (AP, mIoU): a diverged model has no
    detections worth counting, and leaving it out would flatter its scheme. Its loss and other
    metrics are left out. So does a finished run whose evaluation had no prediction at all (the
    evaluator writes its AP as null), counted in ``"empty"``. A run that failed otherwise, or
    was never trained, is counted apart.
    """
    groups: dict[tuple[str | None, str], dict] = {}
    for run in runs:
        group = groups.setdefault(
            (run.value, run.label),
            {
                "values": {m: {} for m in metrics},
                "diverged": 0,
                "failed": 0,
                "missing": 0,
                "empty": 0,
            },
        )
        state = states.get(run) or run_state(run)
        if state is None:
            group["missing"] += 1
            continue
        if state["status"] == "failed":
            group["failed"] += 1
            continue
        if state["diverged"]:
            group["diverged"] += 1
            for metric in metrics:
                if metric in HEADLINE_METRICS:
                    group["values"][metric][run.seed] = 0.0
            continue
        records = read_metrics(run.directory / "metrics.jsonl")
        empty = False
        for metric in metrics:
            value = final_value(records, metric)
            if value is not None and math.isfinite(value):
                group["values"][metric][run.seed] = value
            elif metric in HEADLINE_METRICS and _evaluated_empty(records, metric):
                # Evaluated, no prediction at all: the evaluator reports NaN; it scores 0.
                group["values"][metric][run.seed] = 0.0
                empty = True
        group["empty"] += empty
    return groups


def _evaluated_empty(records: Sequence[Mapping], metric: str) -> bool:
    """Whether the last evaluation wrote ``metric`` as null (no predictions to score)."""
    for record in reversed(records):
        keys = [k for k in record if k != "iteration" and metric_name(k) == metric]
        if keys:
            return all(record[k] is None for k in keys)
    return False


def interval_table(
    groups: Mapping[tuple[str | None, str], dict],
    metrics: Sequence[str],
    baseline: str | None,
    sweep_key: str | None,
) -> tuple[str, list[dict]]:
    """A markdown table: per group and metric, mean ± sd [95% CI]; against ``baseline`` (on the
    same swept value) the paired difference over seeds [95% CI] and whether it excludes 0."""
    header = ([sweep_key] if sweep_key else []) + ["scheme", "seeds", "diverged"]
    for metric in metrics:
        title = METRIC_TITLES.get(metric, metric)
        header.append(f"{title}: mean ± sd [95% CI]")
        if baseline:
            header.append(f"{title} − {baseline} (paired) [95% CI]")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for (value, label), group in groups.items():
        seeds = max((len(v) for v in group["values"].values()), default=0)
        row = {"value": value, "scheme": label, "seeds": seeds, "diverged": group["diverged"]}
        cells = ([str(value)] if sweep_key else []) + [label, str(seeds), str(group["diverged"])]
        if group["failed"] or group["missing"]:
            cells[-2] += f" (+{group['failed']} failed, {group['missing']} missing)"
        if group["empty"]:
            cells[-1] += f" (+{group['empty']} without predictions)"
            row["empty"] = group["empty"]
        for metric in metrics:
            values = group["values"][metric]
            digits = 3 if metric == "total_loss" else 1
            if values:
                summary = interval(list(values.values()))
                row[metric] = vars(summary)
                cells.append(summary.format(digits))
            else:
                cells.append("—")
            if baseline:
                reference = groups.get((value, baseline), {}).get("values", {}).get(metric, {})
                if label == baseline or not values or not reference:
                    cells.append("")
                    continue
                try:
                    difference = paired_difference(values, reference)
                except ValueError:
                    cells.append("no common seed")
                    continue
                row[f"{metric} - {baseline}"] = vars(difference)
                verdict = "excludes 0" if difference.excludes_zero else "includes 0"
                cells.append(f"{difference.format(digits)}, {verdict}")
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    return "\n".join(lines), rows


def present_metrics(runs: Sequence[Run], states: Mapping[Run, dict]) -> list[str]:
    """The headline metrics some finished run has, else the total loss."""
    found: list[str] = []
    for run in runs:
        state = states.get(run)
        if state and state["status"] == "done" and not state["diverged"]:
            series = curves(read_metrics(run.directory / "metrics.jsonl"))
            found += [m for m in HEADLINE_METRICS if m in series and m not in found]
    return found or ["total_loss"]
