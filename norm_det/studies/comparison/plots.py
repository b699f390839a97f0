"""The pictures of a comparison: one-seed curves, curves averaged over seeds with their 95%
bands, and a metric against a swept value (PNG files, matplotlib's Agg backend).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from norm_det.evaluation.statistics import interval
from norm_det.studies.comparison.plans import Run
from norm_det.studies.comparison.records import (
    HEADLINE_METRICS,
    METRIC_TITLES,
    curves,
    metric_series,
    read_metrics,
)
from norm_det.studies.comparison.runs import run_state


def plot_curves(
    runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, title: str = ""
) -> list[str]:
    """Draw every run's total loss and headline metrics into one PNG; returns the panels.

    Args:
        runs: label -> the run's metrics records.
        path: the PNG to write (its folder is created).
    """
    plt = _pyplot()
    import matplotlib.ticker

    all_series = {label: curves(records) for label, records in runs.items()}
    panels = ["total_loss"] + [
        m for m in HEADLINE_METRICS if any(m in s for s in all_series.values())
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, series in all_series.items():
            points = series.get(panel)
            if not points:
                continue
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="o" if panel != "total_loss" else ".", ms=3, label=label)
        axis.set_title(METRIC_TITLES[panel])
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if panel == "total_loss":
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0][0].legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)
    return panels


def plot_sweep(
    groups: Mapping[tuple[str | None, str], dict],
    metric: str,
    sweep_key: str,
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """The metric against the swept value, one line per scheme with its 95% band."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.6, 4.0))
    labels = list(dict.fromkeys(label for _, label in groups))
    values = list(dict.fromkeys(value for value, _ in groups))
    numeric = all(_is_number(v) for v in values)
    xs_all = [float(v) if numeric else i for i, v in enumerate(values)]
    for label in labels:
        xs, means, lows, highs = [], [], [], []
        for x, value in zip(xs_all, values):
            found = groups.get((value, label), {}).get("values", {}).get(metric, {})
            if not found:
                continue
            summary = interval(list(found.values()))
            xs.append(x)
            means.append(summary.mean)
            lows.append(summary.low if summary.n > 1 else summary.mean)
            highs.append(summary.high if summary.n > 1 else summary.mean)
        if xs:
            (line,) = axis.plot(xs, means, marker="o", label=label)
            axis.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
    if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        axis.set_xscale("log", base=2)
    axis.set_xticks(xs_all, [str(v) for v in values])
    axis.set_xlabel(sweep_key)
    axis.set_ylabel(f"final {METRIC_TITLES.get(metric, metric)} (mean, 95% CI band)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=9)
    _save(figure, path)


def plot_mean_curves(
    runs: Sequence[Run],
    states: Mapping[Run, dict],
    path: str | os.PathLike,
    title: str = "",
    metrics: Sequence[str] = (),
) -> None:
    """Per scheme, the mean over seeds of each curve (loss, ``metrics``) with its 95% band; a
    metric measured once (at the end) is drawn as a point with its interval."""
    plt = _pyplot()
    panels = ["total_loss", *[m for m in metrics if m != "total_loss"]]
    by_label: dict[str, list[dict[str, list[tuple[int, float]]]]] = {}
    for run in runs:
        state = states.get(run) or run_state(run)
        if state is None or state["status"] != "done" or state["diverged"]:
            continue
        records = read_metrics(run.directory / "metrics.jsonl")
        by_label.setdefault(run.label, []).append({m: metric_series(records, m) for m in panels})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for label, all_curves in by_label.items():
            points: dict[int, list[float]] = {}
            for series in all_curves:
                for iteration, value in series.get(panel, []):
                    points.setdefault(iteration, []).append(value)
            xs = sorted(points)
            if not xs:
                continue
            summaries = [interval(points[x]) for x in xs]
            means = [s.mean for s in summaries]
            name = f"{label} ({len(all_curves)} seeds)"
            if len(xs) == 1:
                spread = 0.0 if summaries[0].n < 2 else summaries[0].high - summaries[0].mean
                axis.errorbar(
                    [len(axis.lines) + len(axis.containers)], means, yerr=[spread],
                    fmt="o", capsize=4, label=name,
                )  # fmt: skip
                axis.set_xlabel("run (final value, 95% CI)")
                axis.set_xticks([])
                continue
            (line,) = axis.plot(xs, means, label=name)
            if all(s.n > 1 for s in summaries):
                axis.fill_between(
                    xs, [s.low for s in summaries], [s.high for s in summaries],
                    color=line.get_color(), alpha=0.15,
                )  # fmt: skip
        axis.set_title(METRIC_TITLES.get(panel, panel))
        if not axis.get_xlabel():
            axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if panel == "total_loss":
            axis.set_yscale("log")
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _pyplot() -> Any:
    """``matplotlib.pyplot`` drawing into files only (the Agg backend), imported when needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str | os.PathLike) -> None:
    """Write ``figure`` as a PNG at ``path`` (its folder created) and close it."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)


def _is_number(value: str | None) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
