"""norm_det.benchmarks.models and tools/benchmark.py (norm_det.utils.benchmark): ratios, verdicts,
tables, a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import norm_det.benchmarks.models as library
import tools.benchmark as benchmark
from norm_det.utils.benchmark import interleaved_times, ratio_summary
from tests.modeling.tiny import tiny_cfg

CPU = torch.device("cpu")


def test_ratio_summary_takes_medians_of_per_round_ratios():
    times = {
        "FrozenBN": [(1.0, 2.0), (2.0, 2.0), (1.0, 1.0)],
        "NDPP": [(1.5, 2.0), (2.2, 3.0), (1.3, 1.0)],
    }
    summary = ratio_summary(times, "FrozenBN")
    # Wall ratios 1.5, 1.1, 1.3 -> 1.3 (the ratio of the medians would be 1.5 / 1.0); CPU 1, 1.5, 1.
    assert summary["NDPP"] == pytest.approx(
        {"ms": 1500.0, "cpu_ms": 2000.0, "ratio": 1.3, "cpu_ratio": 1.0}
    )
    assert summary["FrozenBN"]["ratio"] == 1.0 and summary["FrozenBN"]["ms"] == 1000.0
    with pytest.raises(ValueError, match="baseline 'BN' is not among"):
        ratio_summary(times, "BN")
    with pytest.raises(ValueError, match="'NDPP' has 2 timed rounds, the baseline 3"):
        ratio_summary({**times, "NDPP": times["NDPP"][:2]}, "FrozenBN")


def test_interleaved_rounds_rotate_the_order():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(steps, repeats=3, warmup=1, device=CPU)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert all(len(rounds) == 3 for rounds in times.values())


WORKLOAD = library.PRESETS["r50"]["mask_rcnn"]


def test_training_rows_and_verdicts():
    timings = {
        name: {"ms": 100.0 * r, "cpu_ms": 100.0 * r, "ratio": r, "cpu_ratio": r}
        for name, r in (("FrozenBN", 1.0), ("NDPP", 1.2), ("PWS", 1.04), ("GN", 1.3))
    }
    memory = {"FrozenBN": 100 * 2**20, "NDPP": 150 * 2**20, "PWS": None}
    rows = {row["scheme"]: row for row in library.training_rows(WORKLOAD, timings, memory)}
    assert rows["NDPP"]["passed"] is False and rows["NDPP"]["target"] == 1.15
    assert rows["PWS"]["passed"] is True and rows["PWS"]["memory_ratio"] is None
    assert rows["GN"]["passed"] is None  # no target: reported only
    assert rows["NDPP"]["peak_mib"] == 150.0 and rows["NDPP"]["memory_ratio"] == 1.5
    table = library.training_markdown(WORKLOAD, list(rows.values()))
    assert "| NDPP | 120 | 1.20× | 1.20× | 150 | 1.50× | FAIL (≤ 1.15×) |" in table
    assert "| PWS | 104 | 1.04× | 1.04× | — | — | pass (≤ 1.05×) |" in table
    assert "| GN | 130 | 1.30× | 1.30× | — | — | — |" in table
    # The same rule on another architecture has no target.
    deeplab = library.PRESETS["r50"]["deeplab"]
    assert library.training_rows(deeplab, {"NDPP": timings["NDPP"]}, {})[0]["passed"] is None


def test_inference_verdict_is_one_within_three_percent():
    timings = {
        name: {"ms": 10.0, "cpu_ms": 10.0, "ratio": r, "cpu_ratio": r, "plain_ms": 10.0}
        for name, r in (("BN", 1.029), ("GN", 1.031), ("CZM", 0.975))
    }
    timings["NDPP"] = {**timings["GN"], "kept": "per-sample input standardization"}
    rows = library.inference_rows(timings)
    verdicts = {row["scheme"]: row["passed"] for row in rows}
    assert verdicts == {"BN": True, "GN": False, "CZM": True, "NDPP": None}
    table = library.inference_markdown(library.PRESETS["quick"]["deeplab"], rows)
    assert "| — (keeps per-sample input standardization) |" in table
    assert table.count("| pass |") == 2 and table.count("| FAIL |") == 1


@pytest.mark.parametrize(
    ("scheme", "kept"),
    [
        ("FrozenBN", None),
        ("PWS", None),
        ("GN", "GroupNorm"),
        ("NDPP", "per-sample input standardization"),
        ("ND", None),
    ],
)
def test_fused_models_that_keep_a_per_sample_normalization(tiny_presets, scheme, kept):
    cfg = library.scheme_config(tiny_presets["deeplab"], scheme, "cpu", inference=True)
    fused = library.fuse(library.build_model(cfg))
    assert library.kept_normalization(fused) == kept


@pytest.fixture
def tiny_presets(tmp_path, monkeypatch):
    presets = {}
    for arch, meta in (("mask_rcnn", "MaskRCNN"), ("deeplab", "DeepLabV3")):
        path = tmp_path / f"{arch}.yaml"
        path.write_text(tiny_cfg(meta).dump())
        presets[arch] = replace(library.PRESETS["quick"][arch], config=path, size=64, images=2)
    monkeypatch.setitem(library.PRESETS, "tiny", presets)
    return presets


def test_fused_model_and_its_plain_twin_compute_the_same(tiny_presets):
    workload = tiny_presets["deeplab"]
    cfg = library.scheme_config(workload, "PWS", "cpu", inference=True)
    model = library.build_model(cfg)
    images, _ = library.synthetic_batch(workload, 4, CPU)
    fused = library.fuse(model)
    twin = library.plain_twin(workload, fused, CPU)
    with torch.no_grad():
        expected, got = fused(images)[0]["sem_seg"], twin(images)[0]["sem_seg"]
    assert not any(type(m).__name__ == "PWSConv2d" for m in twin.modules())
    torch.testing.assert_close(got, expected)


def test_tiny_end_to_end(tiny_presets, tmp_path):
    out = tmp_path / "bench.json"
    code = benchmark.main(
        [
            "--preset",
            "tiny",
            "--schemes",
            "PWS",
            "--repeats",
            "1",
            "--inference-repeats",
            "1",
            "--warmup",
            "0",
            "--no-memory",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "bench.md"),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    mask = results["training"]["mask_rcnn"]
    assert [r["scheme"] for r in mask["rows"]] == ["FrozenBN", "PWS"]
    assert mask["rows"][0]["ratio"] == 1.0 and mask["baseline"] == "FrozenBN"
    assert [r["scheme"] for r in results["training"]["deeplab"]["rows"]] == ["BN", "PWS"]
    inference = results["inference"]["deeplab"]["rows"]
    assert [r["scheme"] for r in inference] == ["BN", "PWS"]
    assert all(r["ratio"] > 0 and r["plain_ms"] > 0 for r in inference)
    assert "relative to FrozenBN" in (tmp_path / "bench.md").read_text()


def test_bad_arguments():
    with pytest.raises(ValueError, match="--archs: unknown architecture 'ssd'"):
        benchmark.main(["--archs", "ssd"])
    with pytest.raises(ValueError, match="unknown normalization scheme 'BatchNrom'"):
        benchmark.main(["--archs", "deeplab", "--schemes", "BatchNrom", "--no-memory"])


def test_memory_is_measured_in_a_fresh_process():
    workload = replace(library.PRESETS["quick"]["deeplab"], size=64, images=2)
    args = benchmark.parse_args(["--preset", "quick", "--threads", "1"])
    peak = benchmark.measure_memory_in_subprocess(workload, "BN", args)
    # A training step of the narrow DeepLab on 2 images of 64x64 holds a few MiB of
    # activations and gradients; the interpreter and torch (hundreds of MiB) are not counted.
    assert peak is not None and 2**20 < peak < 200 * 2**20


def test_gn_twin_keeps_its_own_weights_and_work_is_counted(tiny_presets):
    workload = tiny_presets["mask_rcnn"]
    cfg = library.scheme_config(workload, "GN", "cpu", inference=True)
    fused = library.fuse(library.build_model(cfg))
    twin = library.plain_twin(workload, fused, CPU)
    conv = "backbone.body.stem.conv1.conv.weight"
    assert not torch.equal(twin.state_dict()[conv], fused.state_dict()[conv])
    images, _ = library.synthetic_batch(workload, 3, CPU)
    # No score threshold and no NMS: both return the cap of 100 detections per image.
    assert library.work_done(library.inference_step(fused, images)()) == 200
    assert library.work_done(library.inference_step(twin, images)()) == 200


_PEAK_CHILD = """
import json, torch
from norm_det.utils.benchmark import peak_resident

def step():
    block = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    del block

step()  # warm-up: the allocator's and the interpreter's one-time growth
print(json.dumps({"peak": peak_resident(step), "idle": peak_resident(lambda: None)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_peak_resident_sees_a_step_allocation_in_a_fresh_process():
    # In a fresh process, with large blocks handed back to the system when freed (the memory
    # children's setting), the step's 64 MiB shows in the high-water mark and an empty step
    # shows (almost) nothing; the test process's own heap history cannot leak in.
    env = {**os.environ, **library.MEMORY_CHILD_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD], capture_output=True, text=True, env=env, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert 63 * 2**20 <= measured["peak"] < 72 * 2**20
    assert measured["idle"] < 4 * 2**20
