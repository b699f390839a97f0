"""Schemes compared alike: the same seeds, schedule and evaluation for every run, each trained in
its own ``tools/train_net.py`` process; curves, final values, intervals over seeds and paired
differences (``tools/compare_schemes.py`` is the command line; docs/compare_schemes.md).

:func:`plan_runs` lays out a sweep (schemes x values of one config key x seeds), :func:`run_sweep`
trains what is missing (reusing finished runs, resuming interrupted ones, counting diverged ones),
:func:`collect` reads the metrics, :func:`interval_table` gives means with 95% intervals and the
paired differences to a baseline, :func:`plot_sweep` / :func:`plot_mean_curves` /
:func:`plot_curves` draw them.

The package: :mod:`.plans` (the configs, schedule and runs of a comparison), :mod:`.runs`
(training them), :mod:`.records` (a run's metrics), :mod:`.tables` (rows, intervals, paired
differences) and :mod:`.plots`. Every name is importable from here.
"""

from __future__ import annotations

from norm_det.studies.comparison.plans import (
    IMAGES_PER_PASS,
    QUICK_DIR,
    Run,
    accumulate_steps,
    plan_runs,
    quick_config_for,
    run_label,
    run_overrides,
    schedule_overrides,
    scheme_slug,
    seed_list,
)
from norm_det.studies.comparison.plots import plot_curves, plot_mean_curves, plot_sweep
from norm_det.studies.comparison.records import (
    HEADLINE_METRICS,
    METRIC_TITLES,
    curves,
    final_value,
    metric_name,
    metric_series,
    read_metrics,
    training_seconds,
)
from norm_det.studies.comparison.runs import (
    DIVERGED_MARKERS,
    DONE,
    FAILED,
    TRAIN_NET,
    execute,
    run_state,
    run_sweep,
    train,
)
from norm_det.studies.comparison.tables import (
    collect,
    interval_table,
    markdown_table,
    present_metrics,
    summarize,
)

__all__ = [
    "DIVERGED_MARKERS",
    "DONE",
    "FAILED",
    "HEADLINE_METRICS",
    "IMAGES_PER_PASS",
    "METRIC_TITLES",
    "QUICK_DIR",
    "TRAIN_NET",
    "Run",
    "accumulate_steps",
    "collect",
    "curves",
    "execute",
    "final_value",
    "interval_table",
    "markdown_table",
    "metric_name",
    "metric_series",
    "plan_runs",
    "plot_curves",
    "plot_mean_curves",
    "plot_sweep",
    "present_metrics",
    "quick_config_for",
    "read_metrics",
    "run_label",
    "run_overrides",
    "run_state",
    "run_sweep",
    "schedule_overrides",
    "scheme_slug",
    "seed_list",
    "summarize",
    "train",
    "training_seconds",
]
