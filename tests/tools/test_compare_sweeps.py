"""tools/compare_schemes.py and norm_det.studies.comparison over seeds and sweeps: intervals,
paired differences, reuse, failures.

Training is replaced by a fake that writes the files a run leaves, so the sweep logic (which
runs, where, what is reused, what a failure or a divergence does to the table) runs in
milliseconds.
"""

from __future__ import annotations

import json
import math

import pytest

import tools.compare_schemes as compare
from norm_det.config import CONFIGS_DIR
from norm_det.evaluation.statistics import interval, paired_difference, t_quantile
from norm_det.studies import comparison
from norm_det.studies.comparison import runs as comparison_runs

BASE = CONFIGS_DIR / "studies" / "Base-Study.yaml"


def test_intervals_are_student_t_intervals():
    scipy_stats = pytest.importorskip("scipy.stats")  # installed with the mmdet extra
    for df in (1, 2, 4, 9, 29):
        assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3)
    values = [52.0, 41.1, 61.6, 51.4, 42.9]
    result = interval(values)
    low, high = scipy_stats.t.interval(
        0.95, len(values) - 1, loc=result.mean, scale=scipy_stats.sem(values)
    )
    assert (result.low, result.high) == pytest.approx((low, high), abs=1e-2)
    assert result.sd == pytest.approx(scipy_stats.tstd(values))
    one = interval([3.0])
    assert one.n == 1 and math.isnan(one.low) and not one.excludes_zero
    with pytest.raises(ValueError, match="non-finite"):
        interval([1.0, math.nan])


def test_paired_differences_use_the_common_seeds():
    # Large run-to-run variation shared by both schemes; a constant 2-point gain.
    baseline = {1: 10.0, 2: 30.0, 3: 50.0, 4: 70.0}
    better = {1: 12.0, 2: 32.1, 3: 51.9, 5: 99.0}
    difference = paired_difference(better, baseline)
    assert difference.n == 3 and difference.mean == pytest.approx(2.0, abs=0.1)
    assert difference.excludes_zero
    assert not interval(list(better.values())[:3]).excludes_zero  # unpaired, it would not show
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({1: 1.0}, {2: 1.0})


def test_seed_lists():
    assert comparison.seed_list(None, 42) == [42]
    assert comparison.seed_list([3], 42) == [1, 2, 3]
    assert comparison.seed_list([5, 7], 42) == [5, 7]
    with pytest.raises(ValueError, match="repeat"):
        comparison.seed_list([5, 5], 42)
    with pytest.raises(ValueError, match=">= 1"):
        comparison.seed_list([0], 42)


class FakeTraining:
    """Stands for tools/train_net.py: writes metrics.jsonl, or fails as a run can fail."""

    def __init__(self, ap, diverge=(), crash=()):
        self.ap, self.diverge, self.crash = ap, set(diverge), set(crash)
        self.calls = []

    def __call__(self, config, output_dir, opts, extra_args=(), threads=None):
        pairs = dict(zip(opts[::2], opts[1::2]))
        scheme, seed = pairs["MODEL.RESNETS.NORM"], int(pairs["SEED"])
        batch = int(pairs.get("SOLVER.IMS_PER_BATCH", 4))
        self.calls.append((scheme, seed, batch, tuple(extra_args)))
        output_dir.mkdir(parents=True, exist_ok=True)
        if (scheme, seed, batch) in self.diverge:
            (output_dir / "stdout.txt").write_text(
                "NonFiniteLossError: non-finite loss at iteration 3"
            )
            raise RuntimeError("training failed (exit code 1)")
        if (scheme, seed, batch) in self.crash:
            (output_dir / "stdout.txt").write_text("MemoryError")
            raise RuntimeError("training failed (exit code 1)")
        (output_dir / "stdout.txt").write_text("ok")
        records = [
            {"iteration": 10, "total_loss": 1.0, "time": 0.1},
            {"iteration": 10, "synthetic_coco_val/bbox/AP": self.ap(scheme, seed, batch)},
        ]
        (output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return 1.5


def _sweep(tmp_path, *extra):
    return [
        "--base", str(BASE), "--schemes", "BN", "GN", "--seeds", "3",
        "--sweep", "SOLVER.IMS_PER_BATCH", "1", "4", "--baseline", "BN",
        "--output-dir", str(tmp_path), "--json", str(tmp_path / "rows.json"), *extra,
    ]  # fmt: skip


def test_a_sweep_over_seeds_reuses_runs_and_reports_failures(tmp_path, monkeypatch, capsys):
    # BN loses 20 AP at batch 1, GN holds; seed effects of +-5 shared by both schemes.
    def ap(scheme, seed, batch):
        return 40.0 + 5 * (seed - 2) - (20.0 if scheme == "BN" and batch == 1 else 0.0)

    fake = FakeTraining(ap, diverge={("GN", 3, 4)}, crash={("BN", 2, 4)})
    monkeypatch.setattr(comparison_runs, "train", fake)
    assert compare.main(_sweep(tmp_path)) == 1  # a failed run: reported, the others stand
    out = capsys.readouterr().out
    assert len(fake.calls) == 12
    assert "[12/12]" in out and "min left" in out
    assert "failed: BN seed 2 SOLVER.IMS_PER_BATCH=4" in out
    rows = {(r["value"], r["scheme"]): r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows[("1", "BN")]["bbox/AP"]["mean"] == pytest.approx(20.0)
    gain = rows[("1", "GN")]["bbox/AP - BN"]
    assert gain["mean"] == pytest.approx(20.0) and gain["low"] > 0  # paired: excludes zero
    # The diverged run scores 0 and is counted; the failed one is left out and said so.
    assert rows[("4", "GN")]["diverged"] == 1
    assert rows[("4", "GN")]["bbox/AP"]["mean"] == pytest.approx((35.0 + 40.0 + 0.0) / 3)
    assert rows[("4", "BN")]["seeds"] == 2
    assert "| 4 | BN | 2 (+1 failed, 0 missing) | 0 |" in out
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    # Again: the finished runs (the diverged one too) are reused; only the failed one retrains.
    fake.calls.clear()
    fake.crash.clear()
    assert compare.main(_sweep(tmp_path)) == 0
    assert [c[:3] for c in fake.calls] == [("BN", 2, 4)]
    assert "11 of 12 runs already finished: reused" in capsys.readouterr().out

    # --no-train reads what is there and trains nothing.
    fake.calls.clear()
    assert compare.main([*_sweep(tmp_path), "--no-train"]) == 0
    assert fake.calls == []


def test_an_interrupted_run_resumes(tmp_path, monkeypatch):
    fake = FakeTraining(lambda *_: 10.0)
    monkeypatch.setattr(comparison_runs, "train", fake)
    half_done = tmp_path / "Base-Study_bn" / "SOLVER.IMS_PER_BATCH=1" / "seed_1"
    half_done.mkdir(parents=True)
    (half_done / "model_0000100.pth").write_bytes(b"")
    compare.main(_sweep(tmp_path))
    resumed = [c for c in fake.calls if c[:3] == ("BN", 1, 1)]
    assert resumed == [("BN", 1, 1, ("--resume",))]


def test_bad_sweep_arguments(tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--schemes", "BN", "--sweep", "SOLVER.IMS_PER_BATCH"])
    with pytest.raises(ValueError, match=r"SOLVER\.NOT_A_KEY"):
        compare.main(
            ["--base", str(BASE), "--schemes", "BN", "--sweep", "SOLVER.NOT_A_KEY", "1",
             "--output-dir", str(tmp_path)]
        )  # fmt: skip
    with pytest.raises(SystemExit):
        compare.main(["--schemes", "BN", "GN", "--baseline", "PWS", "--seeds", "2"])


def test_images_per_pass_sweeps_the_batch_a_norm_sees_all_else_equal(tmp_path, monkeypatch):
    fake = FakeTraining(lambda *_: 10.0)
    seen = []

    def train(config, output_dir, opts, extra_args=(), threads=None):
        pairs = dict(zip(opts[::2], opts[1::2]))
        seen.append((pairs.get("SOLVER.IMS_PER_BATCH"), pairs["SOLVER.ACCUMULATE_STEPS"]))
        return fake(config, output_dir, opts, extra_args, threads)

    monkeypatch.setattr(comparison_runs, "train", train)
    arguments = ["--base", str(BASE), "--schemes", "BN", "--seeds", "1", "--output-dir",
                 str(tmp_path), "--sweep", "IMAGES_PER_PASS"]  # fmt: skip
    assert compare.main([*arguments, "1", "2", "4"]) == 0
    # The config's 4 images per step, in 4, 2 and 1 passes.
    assert sorted(seen) == [(None, "1"), (None, "2"), (None, "4")]
    with pytest.raises(ValueError, match=r"'3' does not divide the SOLVER\.IMS_PER_BATCH = 4"):
        compare.main([*arguments, "3"])


def test_a_run_without_predictions_scores_zero_and_a_layer_nan_is_a_divergence(
    tmp_path, monkeypatch, capsys
):
    def train(config, output_dir, opts, extra_args=(), threads=None):
        pairs = dict(zip(opts[::2], opts[1::2]))
        seed = int(pairs["SEED"])
        output_dir.mkdir(parents=True, exist_ok=True)
        if seed == 3:  # a whitening layer refuses a NaN input: the run diverged
            (output_dir / "stdout.txt").write_text(
                "FloatingPointError: DeconvConv2d(...): the covariance of the layer's input is "
                "not finite (NaN or Inf reached this layer)"
            )
            raise RuntimeError("training failed (exit code 1)")
        ap = None if seed == 2 else 30.0  # seed 2: evaluated, no prediction at all
        records = [{"iteration": 10, "total_loss": 1.0}, {"iteration": 10, "x/bbox/AP": ap}]
        (output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (output_dir / "stdout.txt").write_text("ok")
        return 1.0

    monkeypatch.setattr(comparison_runs, "train", train)
    arguments = ["--base", str(BASE), "--schemes", "NDPP", "--seeds", "3",
                 "--output-dir", str(tmp_path), "--json", str(tmp_path / "rows.json")]  # fmt: skip
    assert compare.main(arguments) == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["diverged"] == 1 and row["empty"] == 1
    assert row["bbox/AP"]["mean"] == pytest.approx(10.0)  # (30 + 0 + 0) / 3
    assert "1 (+1 without predictions)" in capsys.readouterr().out
