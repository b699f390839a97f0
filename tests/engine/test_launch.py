import pytest
import torch

from norm_det.engine import MetricsWriter, ProgressBar, launch, seed_all_rng
from norm_det.utils.comm import get_rank, get_world_size
from tests.engine.toys import ToyTrainer, toy_cfg

OPTS = (
    "SOLVER.MAX_ITER",
    "5",
    "SOLVER.IMS_PER_BATCH",
    "4",
    "SOLVER.CLIP_GRADIENTS.ENABLED",
    "True",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
    "norm",
)


class _QuietToyTrainer(ToyTrainer):
    # Writers are tested elsewhere; importing TensorBoard in each worker costs seconds.
    def build_hooks(self):
        hooks = super().build_hooks()
        return [h for h in hooks if not isinstance(h, MetricsWriter | ProgressBar)]


def _train(output_dir: str) -> dict:
    cfg = toy_cfg(output_dir, *OPTS)
    seed_all_rng(cfg.SEED)  # the same initial weights on every process
    trainer = _QuietToyTrainer(cfg)
    trainer.train()
    model = getattr(trainer.model, "module", trainer.model)  # unwrap DistributedDataParallel
    return {k: v.clone() for k, v in model.state_dict().items()}


def _train_and_save(output_dir: str) -> None:
    state = _train(output_dir)
    torch.save(
        {"world_size": get_world_size(), "state": state},
        f"{output_dir}/state_rank{get_rank()}.pth",
    )


def test_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    single = _train(str(tmp_path / "single"))
    (tmp_path / "dual").mkdir()
    launch(_train_and_save, 2, backend="gloo", args=(str(tmp_path / "dual"),))
    for rank in (0, 1):
        saved = torch.load(tmp_path / "dual" / f"state_rank{rank}.pth", weights_only=True)
        assert saved["world_size"] == 2
        for name, value in single.items():
            torch.testing.assert_close(saved["state"][name], value, atol=1e-5, rtol=0, msg=name)
    # Rank 0 wrote the final checkpoint with the same weights.
    final = torch.load(tmp_path / "dual" / "model_final.pth", weights_only=True)
    assert len(final["rng_states"]) == 2
    torch.testing.assert_close(
        final["model"]["head.weight"], single["head.weight"], atol=1e-5, rtol=0
    )


def test_single_process_runs_in_place():
    assert launch(lambda x: x + 1, 1, args=(41,)) == 42


def test_torchrun_environment_with_num_gpus_is_refused(monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="torchrun already starts the workers"):
        launch(print, 2)


def test_torchrun_world_of_one_runs_in_place(monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert launch(lambda: get_world_size(), 1) == 1
