"""norm_det.studies.comparison: a run's records read into final values, series and step times,
and the package's names (one module per part, every name importable from the package)."""

from __future__ import annotations

import math

import pytest

from norm_det.studies import comparison
from norm_det.studies.comparison import plans, plots, records, runs, tables

RECORDS = [
    {"iteration": 10, "total_loss": 2.0, "time": 0.5, "diag_shift/conv1": 1.0},
    {"iteration": 20, "total_loss": 1.5, "time": 0.25, "diag_shift/conv1": 3.0},
    {"iteration": 20, "coco_val/bbox/AP": 12.5, "diag_shift/conv2": math.nan},
    {"iteration": 30, "total_loss": math.inf, "time": 0.5, "other": 7.0},
]


def test_final_values_of_headline_metrics_layer_means_and_plain_keys():
    assert comparison.final_value(RECORDS, "bbox/AP") == 12.5
    # The loss curve keeps finite values only: the last finite loss.
    assert comparison.final_value(RECORDS, "total_loss") == 1.5
    assert comparison.final_value(RECORDS, "other") == 7.0
    assert comparison.final_value(RECORDS, "missing") is None
    # KEY/*: the mean over the layers of the last record that has them (a NaN layer included).
    assert math.isnan(comparison.final_value(RECORDS, "diag_shift/*"))
    assert comparison.final_value(RECORDS[:2], "diag_shift/*") == 3.0


def test_series_keep_finite_values_and_time_counts_the_iterations_a_line_covers():
    assert comparison.metric_series(RECORDS, "total_loss") == [(10, 2.0), (20, 1.5)]
    # Per record, the mean over the finite layer values.
    assert comparison.metric_series(RECORDS, "diag_shift/*") == [(10, 1.0), (20, 3.0)]
    assert comparison.training_seconds(RECORDS) == pytest.approx(10 * 0.5 + 10 * 0.25 + 10 * 0.5)
    assert comparison.training_seconds([{"iteration": 5}]) is None


def test_every_name_is_the_one_its_module_defines():
    modules = (plans, plots, records, runs, tables)
    for name in comparison.__all__:
        owners = [m for m in modules if getattr(m, name, None) is getattr(comparison, name)]
        assert owners, f"{name} is not any part's own"
    assert runs.TRAIN_NET.is_file() and runs.TRAIN_NET.name == "train_net.py"
