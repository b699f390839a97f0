"""kill -9 anywhere, then --resume: the same model, optimizer state and log as without the kill.

A toy training of 8 iterations (checkpoints every 2, metrics every 3, noise drawn from the global
generator) runs in a process of its own (:mod:`tests.engine.crash_driver`), is killed with SIGKILL
at one point, and is resumed; the final checkpoint must equal an uninterrupted run's bit for bit,
and the logged losses too. Points: two iterations drawn at random (seeded), halfway through two
checkpoint writes, between a checkpoint and its pointer, and halfway through a metrics line.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = sorted(random.Random(0).sample(range(1, 8), 2))
KILLS = [
    f"step:{STEPS[0]}",
    f"step:{STEPS[1]}",
    "checkpoint:1",
    "checkpoint:3",
    "pointer:2",
    "metrics:2",
]


def _run(output_dir: Path, *args: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.engine.crash_driver", str(output_dir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode not in (0, -9):
        raise AssertionError(f"driver failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.returncode


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["iteration"], r["total_loss"]) for r in map(json.loads, lines) if "total_loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("whole")
    assert _run(output_dir) == 0
    return output_dir


@pytest.mark.parametrize("kill", KILLS)
def test_a_run_killed_anywhere_resumes_to_the_same_state(kill, uninterrupted, tmp_path):
    assert _run(tmp_path, "--kill", kill) == -9
    assert _run(tmp_path, "--resume") == 0
    expected = torch.load(uninterrupted / "model_final.pth", weights_only=True)
    resumed = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert resumed["iteration"] == expected["iteration"] == 8
    for key, value in expected["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][index][name], value), (index, name)
    assert _losses(tmp_path) == _losses(uninterrupted)
    assert not list(tmp_path.glob(".*.tmp"))  # the killed write's temporary file is gone
