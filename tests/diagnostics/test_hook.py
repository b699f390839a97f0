"""The trainer's diagnostics hook: off by default at no cost, on it writes the probes."""

from __future__ import annotations

import json

import pytest
import torch

from norm_det.config import get_cfg
from norm_det.diagnostics import ModelDiagnostics, filter_magnitudes
from norm_det.engine import HookBase, seed_all_rng
from norm_det.engine.hooks import DiagnosticsHook
from tests.engine.toys import ToyTrainer, toy_cfg


class ForwardHookCounter(HookBase):
    """Counts, at every step boundary, the forward hooks installed on the model."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def _count(self) -> None:
        self.counts.append(sum(len(m._forward_hooks) for m in self.trainer.model.modules()))

    before_step = after_step = _count


def _records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


class _NoisyToyTrainer(ToyTrainer):
    noise = 0.1  # the model draws from the global generator every training step


def _train(tmp_path, name: str, *opts: str) -> tuple[ToyTrainer, list[dict]]:
    cfg = toy_cfg(tmp_path / name, "DATASETS.TEST", "()", *opts)
    seed_all_rng(cfg.SEED)
    trainer = _NoisyToyTrainer(cfg)
    counter = ForwardHookCounter()
    trainer.register_hooks([counter])
    trainer.train()
    trainer.hook_counts = counter.counts
    return trainer, _records(tmp_path / name)


def test_off_by_default_and_free(tmp_path, monkeypatch):
    assert get_cfg().DIAGNOSTICS.ENABLED is False

    def refuse(*args, **kwargs):
        raise AssertionError("ModelDiagnostics built while DIAGNOSTICS.ENABLED is False")

    monkeypatch.setattr(ModelDiagnostics, "__init__", refuse)
    trainer, records = _train(tmp_path, "off")
    assert not any(isinstance(hook, DiagnosticsHook) for hook in trainer.hooks)
    assert trainer.hook_counts == [0] * 12  # 6 iterations, before and after each step
    assert not any(key.startswith("diag_") for record in records for key in record)


def test_on_probes_chosen_iterations_and_leaves_training_unchanged(tmp_path):
    plain, plain_records = _train(tmp_path, "off")
    probed, records = _train(
        tmp_path, "on", "DIAGNOSTICS.ENABLED", "True", "DIAGNOSTICS.PERIOD", "4"
    )
    hooks = [h for h in probed.hooks if isinstance(h, DiagnosticsHook)]
    assert len(hooks) == 1
    # Registered before evaluation and the writers, right after the LR schedule.
    assert type(probed.hooks[1]) is DiagnosticsHook

    # Probed: iterations 1 and 4. The one forward hook (on the GN output) is there during
    # those steps only: installed before the step, gone after it.
    assert probed.hook_counts == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    probed_iterations = sorted(r["iteration"] for r in records if "diag_act_mean/norm" in r)
    assert probed_iterations == [1, 4]

    # Same losses and weights as without diagnostics (the probes draw no global random numbers).
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses == [r["total_loss"] for r in plain_records if "total_loss" in r]
    for a, b in zip(probed.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)

    # The layer of the toy model: conv -> GroupNorm; the norm's output is probed. In the first
    # step GN's affine is still the identity: mean 0, variance the mean of 1 - eps / (Var + eps)
    # over the groups (measured 0.99984). The float32 GN output errs by a few roundings of each
    # value (4 u |y|, with |y| <= sqrt(143) in a group of 4 x 36 standardized values), which
    # bounds the error of its mean; the probe itself sums in float64.
    first = next(r for r in records if r["iteration"] == 1 and "diag_act_mean/norm" in r)
    assert first["diag_act_mean/norm"] == pytest.approx(0.0, abs=4 * 2.0**-24 * 143**0.5)
    assert first["diag_act_var/norm"] == pytest.approx(1.0, abs=1e-3)
    at_4 = next(r for r in records if r["iteration"] == 4 and "diag_act_mean/norm" in r)
    assert {"diag_grad_shift/conv", "diag_filter_var_change/conv", "diag_deflated/all"} <= set(at_4)


def test_filter_norm_is_written_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, records = _train(
        tmp_path, "tb", "DIAGNOSTICS.ENABLED", "True", "DIAGNOSTICS.PERIOD", "6"
    )
    last = next(r for r in records if r["iteration"] == 6 and "diag_filter_norm/conv" in r)
    expected = float(filter_magnitudes(trainer.model.conv.weight).mean())
    assert last["diag_filter_norm/conv"] == pytest.approx(expected, rel=1e-6)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("diag_filter_norm/conv")}
    assert sorted(scalars) == [1, 6]
    assert scalars[6] == pytest.approx(expected, rel=1e-6)
