"""Training a comparison's runs: one ``tools/train_net.py`` process each, ``jobs`` at a time,
each run's end recorded in its folder (``done.json``: finished or diverged; ``failed.json``), so
that a sweep run again reuses what is finished and resumes what an interruption left half done.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from norm_det.studies.comparison.plans import Run

# The runs train through the checkout's tools/train_net.py, one process each.
TRAIN_NET = Path(__file__).resolve().parents[3] / "tools" / "train_net.py"
DONE, FAILED = "done.json", "failed.json"
# What train_net prints when training stopped on NaN / inf: NonFiniteLossError,
# NonFiniteStateError, and a whitening layer's FloatingPointError on a non-finite input.
DIVERGED_MARKERS = (
    "non-finite loss at iteration",
    "tensors hold NaN or inf",
    "NaN or Inf reached this layer",
)


def train(
    config_path: Path,
    output_dir: Path,
    opts: Sequence[str],
    extra_args: Sequence[str] = (),
    threads: int | None = None,
) -> float:
    """Train one config in a ``tools/train_net.py`` process; returns its wall time (s).

    The process's output (progress bar, log) goes to ``output_dir/stdout.txt`` (appended to when
    the run resumes). ``threads`` sets ``OMP_NUM_THREADS`` of the process (several at once).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(TRAIN_NET),
        "--config-file",
        str(config_path),
        *extra_args,
        *opts,
        "OUTPUT_DIR",
        str(output_dir),
    ]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    mode = "a" if extra_args else "w"
    with open(output_dir / "stdout.txt", mode) as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(
            f"training {config_path} failed (exit code {result.returncode}); "
            f"see {output_dir / 'stdout.txt'}"
        )
    return time.perf_counter() - start


def run_state(run: Run) -> dict | None:
    """``done.json`` or ``failed.json`` of a finished run (``{"diverged": ...}``), else None."""
    for name in (DONE, FAILED):
        path = run.directory / name
        if path.is_file():
            state = json.loads(path.read_text())
            state["status"] = "done" if name == DONE else "failed"
            return state
    return None


def execute(run: Run, opts: Sequence[str], threads: int | None) -> dict:
    """Train ``run`` (resuming a run an interruption left half done); record how it ended.

    A run that stopped on a non-finite loss or state is *diverged*: a result, recorded and not
    retried. Any other failure is recorded in ``failed.json`` and retried by the next sweep.
    """
    resume = ["--resume"] if any(run.directory.glob("model_*.pth")) else []
    start = time.perf_counter()
    try:
        wall = train(run.config, run.directory, [*opts], extra_args=resume, threads=threads)
        state = {"status": "done", "diverged": False, "wall_time_s": wall}
    except RuntimeError as error:
        log = (run.directory / "stdout.txt").read_text(errors="replace")
        diverged = any(marker in log for marker in DIVERGED_MARKERS)
        state = {
            "status": "done" if diverged else "failed",
            "diverged": diverged,
            "wall_time_s": time.perf_counter() - start,
            "error": str(error),
        }
    name = DONE if state["status"] == "done" else FAILED
    (run.directory / FAILED).unlink(missing_ok=True)
    (run.directory / name).write_text(json.dumps(state) + "\n")
    return state


def run_sweep(
    runs: Sequence[Run],
    opts_of: Callable[[Run], list[str]],
    jobs: int = 1,
    sweep_key: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[Run, dict]:
    """Train the runs that are not finished, ``jobs`` at a time; returns every run's state.

    A progress line per run says which it is, of how many, and about how long the rest takes
    (the time elapsed so far per finished run, times the runs left).
    """
    states: dict[Run, dict] = {}
    todo = []
    for run in runs:
        state = run_state(run)
        if state is not None and state["status"] == "done":
            states[run] = state
        else:
            todo.append(run)
    if len(todo) < len(runs):
        log(f"{len(runs) - len(todo)} of {len(runs)} runs already finished: reused")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(execute, run, opts_of(run), threads): run for run in todo}
        for count, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            run = futures[future]
            state = states[run] = future.result()
            left = (len(todo) - count) * (time.perf_counter() - started) / count
            outcome = (
                "diverged" if state["diverged"] else state["status"]
            ) + f" in {state['wall_time_s'] / 60:.1f} min"
            if state["status"] == "failed":
                outcome += f" ({state['error']})"
            log(
                f"[{len(runs) - len(todo) + count}/{len(runs)}] {run.describe(sweep_key)}: "
                f"{outcome}; about {left / 60:.0f} min left"
            )
    return states
