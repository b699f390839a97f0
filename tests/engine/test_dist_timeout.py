"""``--dist-timeout``: a stalled process stops the others after the timeout, not 30 minutes."""

import importlib
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from norm_det.engine import default_argument_parser, launch

TIMEOUT_S = 5
# The module, not the function that norm_det.engine exports under the same name.
launch_module = importlib.import_module("norm_det.engine.launch")


def _rank_one_stalls(pid_file: str) -> None:
    if dist.get_rank() == 1:
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(120)  # far past the timeout; the launcher kills it once rank 0 fails
        return
    dist.all_reduce(torch.ones(3))


def _kill_if_our_child(pid_file: Path) -> None:
    """SIGKILL the stalled worker when it is still a child of this process."""
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text())
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return
    if parent == os.getpid():
        os.kill(pid, signal.SIGKILL)


def test_a_stalled_rank_fails_the_collective_after_the_timeout(tmp_path):
    pid_file = tmp_path / "rank1.pid"
    start = time.monotonic()
    try:
        with pytest.raises(ProcessRaisedException) as raised:
            launch(
                _rank_one_stalls,
                2,
                dist_url=f"file://{tmp_path / 'rendezvous'}",
                backend="gloo",
                timeout=timedelta(seconds=TIMEOUT_S),
                args=(str(pid_file),),
            )
        elapsed = time.monotonic() - start
    finally:
        _kill_if_our_child(pid_file)
    # Rank 0 waited the whole timeout in all_reduce, then gave up long before 30 minutes.
    assert TIMEOUT_S <= elapsed < 60
    message = str(raised.value)
    assert f"rank 0 of 2: a collective timed out after {TIMEOUT_S} s (--dist-timeout)" in message
    assert f"rank 1 did not join the collective within {TIMEOUT_S} s" in message
    assert "gloo said:" in message  # the original error is kept
    assert not pid_file.is_file() or not Path(f"/proc/{pid_file.read_text()}").exists()


@pytest.fixture
def fake_torchrun(monkeypatch):
    """Pretend to be torchrun's worker ``rank`` of ``world_size``; returns the arguments each
    ``init_process_group`` call received."""
    calls = []

    def start(rank: int, world_size: int) -> list:
        for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", rank)):
            monkeypatch.setenv(name, str(value))
        return calls

    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(launch_module, "_limit_cpu_threads", lambda world_size: None)
    return start


def test_the_timeout_reaches_init_process_group_under_torchrun(fake_torchrun):
    calls = fake_torchrun(rank=1, world_size=2)
    args = default_argument_parser().parse_args(["--dist-timeout", "42"])
    timeout = timedelta(seconds=args.dist_timeout)
    assert launch(lambda: "ran", 1, backend="gloo", timeout=timeout) == "ran"
    expected = {"init_method": "env://", "rank": 1, "world_size": 2, "timeout": timedelta(0, 42)}
    assert calls == [(("gloo",), expected)]


def test_a_collective_timeout_under_torchrun_names_the_other_ranks(fake_torchrun):
    fake_torchrun(rank=3, world_size=8)
    original = RuntimeError("[unbound_buffer.cc:78] Timed out waiting 7000ms for recv operation")

    def collective_times_out():
        raise original

    with pytest.raises(RuntimeError) as raised:
        launch(collective_times_out, 1, backend="gloo", timeout=timedelta(seconds=7))
    assert str(raised.value).startswith(
        "rank 3 of 8: a collective timed out after 7 s (--dist-timeout): a process among "
        "ranks 0..7 other than 3 did not join the collective within 7 s"
    )
    assert raised.value.__cause__ is original


def test_other_errors_pass_through_unchanged(fake_torchrun):
    fake_torchrun(rank=0, world_size=2)

    def fails():
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match=r"^shapes do not match$"):
        launch(fails, 1, backend="gloo")


def test_dist_timeout_defaults_to_30_minutes():
    assert default_argument_parser().parse_args([]).dist_timeout == 1800
    assert default_argument_parser().parse_args(["--dist-timeout", "2.5"]).dist_timeout == 2.5


@pytest.mark.parametrize("value", ["0", "-5", "inf", "soon"])
def test_dist_timeout_must_be_positive(value, capsys):
    with pytest.raises(SystemExit):
        default_argument_parser().parse_args(["--dist-timeout", value])
    assert f"argument --dist-timeout: got '{value}'; expected a positive" in capsys.readouterr().err


def test_launch_refuses_a_non_positive_timeout():
    with pytest.raises(ValueError, match=r"timeout \(--dist-timeout\) is 0 s; expected > 0"):
        launch(print, 1, timeout=timedelta(0))
