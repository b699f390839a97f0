"""Statistics synchronization: 2 gloo processes with b images each train like 1 with 2b.

The workers are started as ``--num-gpus 2`` starts them (:func:`norm_det.engine.launch`) and
train with the config-driven :class:`norm_det.engine.Trainer` (DistributedDataParallel,
per-parameter decay, LR schedule). One launch trains every scheme, to pay for the process start
once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from norm_det.config import get_cfg
from norm_det.engine import HookBase, LRSchedulerHook, Trainer, launch, seed_all_rng
from norm_det.utils.comm import get_rank, get_world_size
from tests.engine.test_accumulation import build_scheme_net, regression_data

IMAGES = 8
ITERATIONS = 2
# (scheme, SOLVER.ACCUMULATE_STEPS). The whitening schemes synchronize their statistics (ND++
# by default, IterNorm with sync=True); GN with two accumulated passes per process checks that
# DistributedDataParallel averages the gradients once, after the last pass. The 10x10 images
# give ND++'s 1x1 convolution (which samples every 25th of the N*H*W positions) 2*5*5 = 50
# positions per process: a multiple of 25, so the two halves sample the whole batch's pixels.
SYNCED = [("SyncBN", 1), ("NDPP", 1), ("IterNorm(sync=True)", 1), ("GN(groups=4)", 2)]
# Per-process statistics: two half batches are not one whole batch.
UNSYNCED = [("BN", 1), ("IterNorm(sync=False)", 1)]


class _Record(HookBase):
    """Loss and parameters after every iteration."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.parameters: list[dict[str, torch.Tensor]] = []

    def after_step(self) -> None:
        self.losses.append(self.trainer.storage.latest()["total_loss"])
        model = self.trainer.model
        model = getattr(model, "module", model)
        self.parameters.append({k: p.detach().clone() for k, p in model.named_parameters()})


class _ShardedLoader:
    """Endless passes over ``IMAGES`` fixed images: each batch is the next ``batch_size *
    world_size`` images of the stream, and this process gets its contiguous share."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __iter__(self):
        images, targets = regression_data(IMAGES)
        rank, world_size = get_rank(), get_world_size()
        step = self.batch_size * world_size
        while True:
            for start in range(0, IMAGES, step):
                mine = slice(start + rank * self.batch_size, start + (rank + 1) * self.batch_size)
                yield list(images[mine]), [{"y": y} for y in targets[mine]]


class SchemeNetTrainer(Trainer):
    """The real Trainer on the scheme test net (scheme from ``MODEL.RESNETS.NORM``)."""

    @classmethod
    def build_model(cls, cfg):
        return build_scheme_net(cfg.MODEL.RESNETS.NORM)

    @classmethod
    def build_train_loader(cls, cfg):
        return _ShardedLoader(cfg.SOLVER.IMS_PER_BATCH // get_world_size())

    def build_hooks(self):
        self.record = _Record()
        return [LRSchedulerHook(self.optimizer, self.scheduler), self.record]


def scheme_cfg(scheme: str, accumulate_steps: int, output_dir: str):
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "MODEL.RESNETS.NORM", scheme,
            "SOLVER.IMS_PER_BATCH", str(IMAGES),
            "SOLVER.ACCUMULATE_STEPS", str(accumulate_steps),
            "SOLVER.BASE_LR", "0.05",
            "SOLVER.MAX_ITER", str(ITERATIONS),
            "SOLVER.STEPS", "(1,)",
            "SOLVER.GAMMA", "0.5",
            "SOLVER.WARMUP_ITERS", "0",
            "SEED", "3",
            "OUTPUT_DIR", output_dir,
        ]
    )  # fmt: skip
    return cfg


def train_schemes(output_dir: str, accumulate: bool = True) -> dict[str, _Record]:
    """Train every scheme; ``accumulate=False``: one pass per iteration for all of them."""
    records = {}
    for scheme, accumulate_steps in SYNCED + UNSYNCED:
        cfg = scheme_cfg(scheme, accumulate_steps if accumulate else 1, output_dir)
        seed_all_rng(cfg.SEED)
        trainer = SchemeNetTrainer(cfg)
        trainer.train()
        records[scheme] = trainer.record
    return records


def _worker(output_dir: str) -> None:
    torch.set_num_threads(1)
    records = train_schemes(output_dir)
    torch.save(
        {name: (r.losses, r.parameters) for name, r in records.items()},
        Path(output_dir) / f"rank{get_rank()}.pt",
    )


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    output_dir = tmp_path_factory.mktemp("large_batch_sync")
    launch(_worker, 2, backend="gloo", args=(str(output_dir),))
    return [torch.load(output_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_process_results(tmp_path_factory) -> dict[str, _Record]:
    # The reference: one process, one pass of all IMAGES per iteration.
    return train_schemes(str(tmp_path_factory.mktemp("large_batch_one")), accumulate=False)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("scheme", [s for s, _ in SYNCED])
def test_two_processes_with_half_the_batch_equal_one_process(
    scheme, two_process_results, one_process_results
):
    reference = one_process_results[scheme]
    for rank_results in two_process_results:
        losses, parameters = rank_results[scheme]
        # The logged loss is the mean over processes of the per-process means.
        assert losses == pytest.approx(reference.losses, abs=1e-5)
        for step in range(ITERATIONS):
            assert _max_difference(parameters[step], reference.parameters[step]) < 1e-5, step


@pytest.mark.parametrize("scheme", [s for s, _ in UNSYNCED])
def test_per_process_statistics_do_not_equal_the_whole_batch(
    scheme, two_process_results, one_process_results
):
    _, parameters = two_process_results[0][scheme]
    reference = one_process_results[scheme]
    assert _max_difference(parameters[0], reference.parameters[0]) > 1e-4
