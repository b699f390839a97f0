"""Failures and recovery: bad checkpoints and pointers, torn logs, changed solvers, NaN states.

Each test backs one line of docs/training.md, "Failures and recovery".
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from norm_det.engine import Checkpointer, HookBase, default_setup, seed_all_rng
from norm_det.engine.checkpointer import NonFiniteStateError
from norm_det.files import WeightFileError
from tests.engine.toys import ToyDetector, ToyTrainer, toy_cfg


def _trainer(cfg) -> ToyTrainer:
    seed_all_rng(cfg.SEED)
    return ToyTrainer(cfg)


def _trained(tmp_path, *opts) -> ToyTrainer:
    cfg = toy_cfg(tmp_path, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", *opts)
    trainer = _trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _resumed(tmp_path, *opts) -> ToyTrainer:
    cfg = toy_cfg(tmp_path, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", *opts)
    trainer = _trainer(cfg)
    trainer.resume_or_load(resume=True)
    return trainer


def _cut(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_falls_back_past_an_unreadable_newest_checkpoint(tmp_path, caplog):
    _trained(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    (tmp_path / "model_final.pth").unlink()
    _cut(tmp_path / "model_0000004.pth")
    with caplog.at_level(logging.WARNING, logger="norm_det.engine.checkpointer"):
        trainer = _resumed(tmp_path)
    assert trainer.start_iter == 2
    assert "not resuming from" in caplog.text and "model_0000004.pth" in caplog.text
    assert "truncated or corrupt" in caplog.text


def test_resume_with_no_readable_checkpoint_is_an_error_listing_them(tmp_path):
    _trained(tmp_path)
    for path in tmp_path.glob("model_*.pth"):
        path.write_bytes(b"")
    with pytest.raises(WeightFileError, match=r"no checkpoint in .* can be read") as info:
        _resumed(tmp_path)
    assert str(info.value).count("empty (0 bytes)") == 3


def test_last_checkpoint_never_leaves_the_output_dir(tmp_path, caplog):
    outside = tmp_path / "elsewhere.pth"
    run = tmp_path / "run"
    trained = _trained(run)
    torch.save({"model": trained.model.state_dict(), "iteration": 5}, outside)
    for pointer in (str(outside), "../elsewhere.pth"):
        (run / "last_checkpoint").write_text(pointer)
        with caplog.at_level(logging.WARNING, logger="norm_det.engine.checkpointer"):
            trainer = _resumed(run)
        assert "not a file name inside" in caplog.text
        assert trainer.start_iter == 6  # model_final.pth, the newest inside the directory


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    _trained(tmp_path)
    stale = tmp_path / ".model_0000008.pth.x1y2z3.tmp"
    stale.write_bytes(b"half")
    _resumed(tmp_path)
    assert not stale.exists()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    _trained(tmp_path, "SOLVER.MAX_ITER", "4")
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as file:
        file.write('{"iteration": 5, "total_lo')
    trainer = _resumed(tmp_path, "SOLVER.MAX_ITER", "6")
    trainer.train()
    iterations = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 6


def test_a_bad_metrics_line_that_is_not_the_last_is_named(tmp_path):
    _trained(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    trainer = _resumed(tmp_path)
    with pytest.raises(ValueError, match=r"metrics\.jsonl' line 2 is not JSON"):
        trainer.train()


class _KilledAt(HookBase):
    """Stops training at an iteration, without the writers' after_train (as kill -9 would)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            self.trainer.hooks = [h for h in self.trainer.hooks if h is self]
            raise KeyboardInterrupt


def _lines(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["iteration"], r["total_loss"]) for r in map(json.loads, lines) if "total_loss" in r]


def test_the_first_line_after_a_resume_mid_period_averages_the_whole_period(tmp_path):
    opts = ("SOLVER.MAX_ITER", "9", "SOLVER.CHECKPOINT_PERIOD", "4", "LOG_PERIOD", "3")
    whole = _trainer(toy_cfg(tmp_path / "whole", *opts))
    whole.resume_or_load(resume=False)
    whole.train()
    first = _trainer(toy_cfg(tmp_path / "split", *opts))
    first.resume_or_load(resume=False)
    first.register_hooks([_KilledAt(5)])  # iterations 4 and 5 recorded, line 6 not written
    with pytest.raises(KeyboardInterrupt):
        first.train()
    second = _trainer(toy_cfg(tmp_path / "split", *opts))
    second.resume_or_load(resume=True)
    assert second.start_iter == 4
    second.train()
    assert [i for i, _ in _lines(tmp_path / "split")] == [3, 6, 9]
    assert _lines(tmp_path / "split") == _lines(tmp_path / "whole")


def test_resume_refuses_solver_overrides_the_checkpoint_would_override(tmp_path):
    cfg = toy_cfg(tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
    default_setup(cfg, SimpleNamespace(resume=False, eval_only=False))
    _trainer(cfg).train()
    changed = toy_cfg(tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "0.001")
    with pytest.raises(ValueError, match=r"SOLVER\.BASE_LR: 0\.05 in the run, 0\.001 now"):
        default_setup(changed, SimpleNamespace(resume=True, eval_only=False))
    longer = toy_cfg(tmp_path, "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2")
    default_setup(longer, SimpleNamespace(resume=True, eval_only=False))  # takes effect: fine


def test_no_checkpoint_is_written_from_a_non_finite_state(tmp_path):
    model = ToyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpointer = Checkpointer(model, tmp_path, optimizer=optimizer)
    checkpointer.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"model head\.weight") as info:
        checkpointer.save("model_0000002", iteration=2)
    assert "model_0000001.pth" in str(info.value)  # the newest good one
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"model: resnet50\n", "a text file"),
        (None, "truncated or corrupt"),
    ],
)
def test_model_weights_that_cannot_be_read_name_the_file(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save(ToyDetector().state_dict(), path)
        _cut(path)
    else:
        path.write_bytes(content)
    trainer = _trainer(toy_cfg(tmp_path / "run", "MODEL.WEIGHTS", str(path)))
    with pytest.raises(WeightFileError, match=rf"MODEL\.WEIGHTS: '.*weights\.pth'.*{message}"):
        trainer.resume_or_load(resume=False)


class _Raises(HookBase):
    def __init__(self, name):
        self.name = name

    def after_train(self):
        raise RuntimeError(f"{self.name} failed")


class _Records(HookBase):
    ran = False

    def after_train(self):
        _Records.ran = True


def test_every_after_train_runs_and_the_training_error_is_not_masked(tmp_path):
    trainer = _trainer(toy_cfg(tmp_path))
    trainer.register_hooks([_Raises("first"), _Records(), _Interrupt(2)])
    with pytest.raises(ZeroDivisionError) as info:
        trainer.train()
    assert _Records.ran
    assert any("first failed" in note for note in info.value.__notes__)
    _Records.ran = False
    clean = _trainer(toy_cfg(tmp_path / "clean"))
    clean.register_hooks([_Raises("only"), _Records()])
    with pytest.raises(RuntimeError, match="only failed"):
        clean.train()
    assert _Records.ran


class _Interrupt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise ZeroDivisionError("the training error")
