import json

import pytest
import torch

from norm_det.engine import HookBase, NonFiniteLossError, SimpleTrainer, seed_all_rng
from norm_det.solver import build_optimizer
from tests.engine.toys import ToyDetector, ToyTrainer, ToyTrainLoader, toy_cfg


def _read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _make_trainer(cfg, trainer_class=ToyTrainer):
    seed_all_rng(cfg.SEED)  # as default_setup does
    return trainer_class(cfg)


def test_loss_goes_down_and_metrics_are_written(tmp_path):
    cfg = toy_cfg(tmp_path, "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)", "LOG_PERIOD", "10")
    trainer = _make_trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    records = _read_metrics(tmp_path)
    assert [r["iteration"] for r in records if "total_loss" in r] == [10, 20, 30, 40]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    # The LR written with each line is the one of that line's iteration (multistep at 30).
    lrs = {r["iteration"]: r["lr"] for r in records if "lr" in r}
    assert lrs == pytest.approx({10: 0.05, 20: 0.05, 30: 0.05, 40: 0.005})
    # total_loss is the sum of the terms, the penalty a layer applied at the step included.
    last = next(r for r in records if r["iteration"] == 40 and "total_loss" in r)
    assert last["total_loss"] == pytest.approx(
        last["loss_mse"] + last["loss_l1"] + last["loss_toy_anchor"]
    )

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tb_losses = [e.value for e in events.Scalars("total_loss")]
    assert tb_losses == pytest.approx(losses)
    assert (tmp_path / "model_final.pth").is_file()


def test_layers_optimizer_step_work_is_applied_once_per_step_and_logged(tmp_path):
    torch.manual_seed(0)
    model = ToyDetector()
    cfg = toy_cfg(tmp_path, "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0")
    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, ToyTrainLoader(batch_size=4, seed=0), optimizer)

    images, targets = next(iter(ToyTrainLoader(batch_size=4, seed=0)))
    assert set(trainer.losses(images, targets)) == {"loss_mse", "loss_l1"}  # the model's own
    expected_anchor = model.anchor.penalty().item()
    recorder = _Penalties()
    trainer.register_hooks([recorder])

    mean_before = model.anchor.scale.mean().item()
    trainer.train(0, 5)
    # Once per step: by the trainer before clipping; the step hook then finds it done.
    assert model.anchor.step_calls == 5
    assert recorder.penalties[0] == pytest.approx(expected_anchor)
    assert len(recorder.penalties) == 5
    # The hook centred every gradient of `scale` before the step, so its mean did not move,
    # while the scale itself did.
    assert model.anchor.scale.mean().item() == pytest.approx(mean_before, abs=1e-6)
    assert not torch.allclose(model.anchor.scale, torch.linspace(0.5, 1.5, 8))


class _Penalties(HookBase):
    """The penalty the toy layer applied at every step, as the trainer logged it."""

    def __init__(self):
        self.penalties = []

    def after_step(self):
        self.penalties.append(self.trainer.storage.latest()["loss_toy_anchor"])


class _PoisonAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            self.trainer.model.poison = True


class _Snapshot(HookBase):
    def after_step(self):
        self.state = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = toy_cfg(tmp_path, "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.MAX_ITER", "10")
    trainer = _make_trainer(cfg)
    snapshot = _Snapshot()
    trainer.register_hooks([_PoisonAt(4), snapshot])
    with pytest.raises(NonFiniteLossError) as excinfo:
        trainer.train()
    message = str(excinfo.value)
    assert "iteration 5: loss_l1=nan" in message
    assert "(finite: loss_mse=" in message  # the finite terms
    assert str(tmp_path / "model_0000004.pth") in message

    assert not (tmp_path / "model_final.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    checkpoint = torch.load(tmp_path / "model_0000004.pth", weights_only=True)
    assert checkpoint["iteration"] == 4
    for key, value in snapshot.state.items():
        assert torch.equal(checkpoint["model"][key], value), key
    # The model was not updated with the poisoned loss.
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, snapshot.state[key])


class _SimulatedKillError(Exception):
    pass


class _InterruptAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise _SimulatedKillError


class _NoisyToyTrainer(ToyTrainer):
    noise = 0.05
    flip = True


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    opts = [
        "SOLVER.MAX_ITER",
        "8",
        "SOLVER.LR_SCHEDULER_NAME",
        "WarmupCosineLR",
        "SOLVER.CHECKPOINT_PERIOD",
        "4",
        "SOLVER.CLIP_GRADIENTS.ENABLED",
        "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
        "norm",
        "DATASETS.TEST",
        "('toy_val',)",
        # Evaluating right after the checkpoint of iteration 4 must not change what follows.
        "TEST.EVAL_PERIOD",
        "2",
    ]
    whole = toy_cfg(tmp_path / "whole", *opts)
    uninterrupted = _make_trainer(whole, _NoisyToyTrainer)
    uninterrupted.resume_or_load(resume=False)
    uninterrupted.train()

    split = toy_cfg(tmp_path / "split", *opts)
    first = _make_trainer(split, _NoisyToyTrainer)
    first.register_hooks([_InterruptAt(4)])
    with pytest.raises(_SimulatedKillError):
        first.train()
    second = _make_trainer(split, _NoisyToyTrainer)
    second.resume_or_load(resume=True)
    assert second.start_iter == 4
    second.train()

    for (name, a), b in zip(
        uninterrupted.model.state_dict().items(), second.model.state_dict().values()
    ):
        assert torch.equal(a, b), name
    momentum_a = [s["momentum_buffer"] for s in uninterrupted.optimizer.state.values()]
    momentum_b = [s["momentum_buffer"] for s in second.optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum_a, momentum_b))
    # The resumed run's metrics continue the first half's, without repeated iterations.
    iterations = [r["iteration"] for r in _read_metrics(tmp_path / "split") if "total_loss" in r]
    assert iterations == list(range(1, 9))
    whole_losses = [r["total_loss"] for r in _read_metrics(tmp_path / "whole") if "total_loss" in r]
    split_losses = [r["total_loss"] for r in _read_metrics(tmp_path / "split") if "total_loss" in r]
    assert split_losses == whole_losses


def test_periodic_evaluation(tmp_path):
    cfg = toy_cfg(
        tmp_path, "DATASETS.TEST", "('toy_val',)", "SOLVER.MAX_ITER", "5", "TEST.EVAL_PERIOD", "2"
    )
    trainer = _make_trainer(cfg)
    results = trainer.train()

    records = _read_metrics(tmp_path)
    evaluated = {r["iteration"]: r["toy_val/toy/MAE"] for r in records if "toy_val/toy/MAE" in r}
    assert sorted(evaluated) == [2, 4, 5]
    # Linear warmup from 0.1 over 2 iterations: 0.1, 0.55, then 1 times BASE_LR.
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([0.005, 0.0275, 0.05, 0.05, 0.005])
    # The returned results are the final evaluation, equal to evaluating the final model again.
    final = ToyTrainer.test(cfg, trainer.model)
    assert results["toy_val"]["toy"]["MAE"] == pytest.approx(final["toy_val"]["toy"]["MAE"])
    assert evaluated[5] == pytest.approx(final["toy_val"]["toy"]["MAE"])
    # Each evaluation measured the model of its iteration: the model improves.
    assert evaluated[5] < evaluated[2]


def test_weights_are_loaded_into_a_fresh_trainer(tmp_path):
    cfg = toy_cfg(tmp_path / "a")
    trained = _make_trainer(cfg)
    trained.train()
    fresh = _make_trainer(
        toy_cfg(tmp_path / "b", "MODEL.WEIGHTS", str(tmp_path / "a" / "model_final.pth"))
    )
    fresh.resume_or_load(resume=False)
    assert fresh.start_iter == 0
    for a, b in zip(trained.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)


class _PositionedLoader:
    """Records how the trainer positions it; yields the batch index as its "images"."""

    def __init__(self):
        self.start = 0
        self.batches_drawn = 0

    def set_start_iter(self, start_iter):
        self.start = start_iter

    def __iter__(self):
        index = self.start
        while True:
            self.batches_drawn += 1
            yield index, None
            index += 1


def test_a_positionable_loader_is_positioned_not_fast_forwarded():
    loader = _PositionedLoader()
    model = torch.nn.Linear(1, 1)
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train(5, 5)  # resume at 5 of 5: no iteration left to run
    assert loader.start == 5
    assert loader.batches_drawn == 0
