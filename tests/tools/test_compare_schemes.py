"""tools/compare_schemes.py: schedules, metrics files, the table and the plot (fake runs)."""

from __future__ import annotations

import json

import pytest

import tools.compare_schemes as compare
from norm_det.config import CONFIGS_DIR
from norm_det.studies import comparison


def _write_run(directory, losses, box_ap, mask_ap, time=0.5):
    directory.mkdir(parents=True)
    lines = []
    for iteration, loss in losses:
        lines.append({"iteration": iteration, "total_loss": loss, "time": time, "lr": 0.02})
    for iteration, (box, mask) in sorted({**box_ap, **mask_ap}.items()):
        lines.append(
            {
                "iteration": iteration,
                "synthetic_coco_val/bbox/AP": box,
                "synthetic_coco_val/bbox/APl": None,
                "synthetic_coco_val/segm/AP": mask,
            }
        )
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def two_runs(tmp_path):
    _write_run(
        tmp_path / "mask_rcnn_ndpp",
        [(10, 2.0), (20, 1.0), (30, 0.5)],
        {15: (10.0, 12.0), 30: (30.0, 35.0)},
        {},
        time=1.25,
    )
    _write_run(
        tmp_path / "mask_rcnn_gn",
        [(10, 3.0), (20, 2.5), (30, 2.0)],
        {15: (5.0, 6.0), 30: (20.0, 18.0)},
        {},
        time=0.75,
    )
    return tmp_path


def test_curves_and_summary_from_metrics(two_runs):
    records = comparison.read_metrics(two_runs / "mask_rcnn_ndpp" / "metrics.jsonl")
    series = comparison.curves(records)
    assert series["total_loss"] == [(10, 2.0), (20, 1.0), (30, 0.5)]
    assert series["bbox/AP"] == [(15, 10.0), (30, 30.0)]
    assert series["segm/AP"] == [(15, 12.0), (30, 35.0)]
    assert "bbox/APl" not in series  # only headline metrics, and null values are dropped
    row = comparison.summarize("NDPP", records, wall_time=90.0)
    assert row == {
        "run": "NDPP",
        "iterations": 30,
        "final_loss": 0.5,
        "s_per_iter": 1.25,
        "train_time_s": 37.5,  # 30 iterations of 1.25 s
        "wall_time_s": 90.0,
        "final bbox/AP": 30.0,
        "best bbox/AP": 30.0,
        "final segm/AP": 35.0,
        "best segm/AP": 35.0,
    }


def test_markdown_table(two_runs):
    rows = [
        comparison.summarize(
            "NDPP", comparison.read_metrics(two_runs / "mask_rcnn_ndpp/metrics.jsonl"), 90.0
        ),
        comparison.summarize(
            "GN", comparison.read_metrics(two_runs / "mask_rcnn_gn/metrics.jsonl"), None
        ),
    ]
    assert comparison.markdown_table(rows).splitlines() == [
        "| run | iterations | final loss | final box AP | best box AP | final mask AP "
        "| best mask AP | s / iter | training min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| NDPP | 30 | 0.500 | 30.0 | 30.0 | 35.0 | 35.0 | 1.25 | 0.6 |",
        "| GN | 30 | 2.000 | 20.0 | 20.0 | 18.0 | 18.0 | 0.75 | 0.4 |",
    ]


def test_plot_has_a_panel_per_metric(two_runs, tmp_path):
    import matplotlib.image

    runs = {
        label: comparison.read_metrics(two_runs / stem / "metrics.jsonl")
        for label, stem in (("NDPP", "mask_rcnn_ndpp"), ("GN", "mask_rcnn_gn"))
    }
    path = tmp_path / "plots" / "curves.png"
    assert comparison.plot_curves(runs, path) == ["total_loss", "bbox/AP", "segm/AP"]
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 2.5 * height  # three panels side by side


def test_main_without_training_reads_finished_runs(two_runs, capsys):
    code = compare.main(
        [
            "--schemes",
            "NDPP",
            "GN",
            "--no-train",
            "--output-dir",
            str(two_runs),
            "--json",
            str(two_runs / "rows.json"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| NDPP | 30 | 0.500 | 30.0 |" in out and "| GN | 30 | 2.000 | 20.0 |" in out
    assert (two_runs / "curves.png").stat().st_size > 10_000
    rows = json.loads((two_runs / "rows.json").read_text())
    assert [r["run"] for r in rows] == ["NDPP", "GN"]


def test_quick_configs_labels_and_schedule():
    assert comparison.quick_config_for("GN+WS") == CONFIGS_DIR / "quick" / "mask_rcnn_gn_ws.yaml"
    assert comparison.quick_config_for("nd++").name == "mask_rcnn_ndpp.yaml"
    assert comparison.run_label(comparison.quick_config_for("PWS")) == "PWS"
    with pytest.raises(ValueError, match=r"quick mask_rcnn configs exist for: .*gn_ws"):
        comparison.quick_config_for("FrozenBN")
    opts = comparison.schedule_overrides(
        comparison.quick_config_for("BN"), iters=100, eval_period=25, seed=3, log_period=5
    )
    pairs = dict(zip(opts[::2], opts[1::2]))
    # The quick schedule (200 iterations, step at 160, 50 warmup) at half length.
    assert pairs == {
        "SEED": "3",
        "TEST.EVAL_PERIOD": "25",
        "LOG_PERIOD": "5",
        "SOLVER.MAX_ITER": "100",
        "SOLVER.STEPS": "(80,)",
        "SOLVER.WARMUP_ITERS": "25",
        "SOLVER.CHECKPOINT_PERIOD": "100",
    }


def test_bad_metrics_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        comparison.read_metrics(tmp_path / "missing.jsonl")
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"iteration": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        comparison.read_metrics(bad)
