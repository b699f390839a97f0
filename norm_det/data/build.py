"""Data loaders from a config: an infinite training loader and a finite, sharded test loader.

Both yield ``(images: list[Tensor], targets: list[dict])`` (see :mod:`norm_det.data.datasets`).
The process's rank and the number of processes come from ``torch.distributed`` (1 process when
it is not initialized).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import BatchSampler, DataLoader

from norm_det.data.catalog import get_dataset
from norm_det.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler
from norm_det.data.transforms import build_transforms
from norm_det.utils.comm import broadcast_object, get_rank, get_world_size

__all__ = [
    "TrainDataLoader",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "trivial_batch_collator",
]

_SAMPLERS = ("TrainingSampler",)


def _shared_seed(seed: int) -> int:
    """``seed`` if >= 0, else a random seed drawn on rank 0 and shared with every process (the
    training stream must be the same permutation everywhere to be sharded correctly)."""
    if seed >= 0:
        return int(seed)
    return broadcast_object(int(np.random.SeedSequence().generate_state(1)[0] % 2**31))


def trivial_batch_collator(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """A list of (image, target) pairs -> (list of images, list of targets); no stacking, images
    may differ in size."""
    return [image for image, _ in batch], [target for _, target in batch]


def _mask_on(cfg: Any) -> bool | None:
    """Whether the model trains a mask branch (MODEL.MASK_ON, or META_ARCHITECTURE "MaskRCNN");
    None when the config has no MODEL.MASK_ON (then masks are decoded when the dataset has them).
    """
    model = cfg.get("MODEL", None)
    if model is None or "MASK_ON" not in model:
        return None
    return bool(model.MASK_ON) or model.get("META_ARCHITECTURE", "") == "MaskRCNN"


class TrainDataLoader(DataLoader):
    """A DataLoader over a :class:`GroupedBatchSampler` that can be positioned for resuming."""

    def set_start_iter(self, start_iter: int) -> None:
        """Make the next ``iter(self)`` start at batch ``start_iter`` of the stream."""
        self.batch_sampler.start_batch = int(start_iter)


def build_detection_train_loader(cfg: Any, *, start_iter: int = 0) -> TrainDataLoader:
    """The endless training loader of ``cfg.DATASETS.TRAIN``.

    Each process gets batches of ``SOLVER.IMS_PER_BATCH // world_size`` images from its shard of
    one seeded stream (``SEED``; random but shared when negative), grouped by aspect ratio when
    ``DATALOADER.ASPECT_RATIO_GROUPING``. Augmentations are seeded per stream position, so the
    batches do not depend on ``DATALOADER.NUM_WORKERS``, and ``start_iter`` (resuming) skips to
    exactly the batches an uninterrupted run would see next (as does ``set_start_iter``).

    Args:
        cfg: the config (INPUT, DATASETS, DATALOADER, SOLVER.IMS_PER_BATCH, SEED, MODEL.MASK_ON).
        start_iter: number of batches already consumed.
    """
    rank, world_size = get_rank(), get_world_size()
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total < world_size or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of the number of "
            f"processes ({world_size})"
        )
    if cfg.DATALOADER.SAMPLER_TRAIN not in _SAMPLERS:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN '{cfg.DATALOADER.SAMPLER_TRAIN}' is unknown; "
            f"expected one of {list(_SAMPLERS)}"
        )
    dataset = get_dataset(
        list(cfg.DATASETS.TRAIN),
        is_train=True,
        transforms=build_transforms(cfg, is_train=True),
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        with_masks=_mask_on(cfg),
    )
    seed = _shared_seed(int(cfg.SEED))
    groups = (
        dataset.aspect_ratio_groups()
        if cfg.DATALOADER.ASPECT_RATIO_GROUPING
        else [0] * len(dataset)
    )
    batch_sampler = GroupedBatchSampler(
        TrainingSampler(len(dataset), seed=seed, rank=rank, world_size=world_size),
        groups,
        total // world_size,
        seed=seed,
        rank=rank,
        start_batch=start_iter,
    )
    return TrainDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
    )


def build_detection_test_loader(cfg: Any, dataset_name: str, *, batch_size: int = 1) -> DataLoader:
    """The test loader of one dataset: each process gets a disjoint contiguous part, in order.

    Targets keep crowd regions (``"iscrowd"`` 1) and VOC difficult objects (``"difficult"`` 1)
    for the evaluators; images are resized by ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``.

    Args:
        cfg: the config (INPUT, DATALOADER.NUM_WORKERS, MODEL.MASK_ON).
        dataset_name: a registered dataset name.
        batch_size: images per batch on each process.
    """
    rank, world_size = get_rank(), get_world_size()
    mask_on = _mask_on(cfg)
    dataset = get_dataset(
        dataset_name,
        is_train=False,
        transforms=build_transforms(cfg, is_train=False),
        with_masks=None if mask_on else mask_on,
    )
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
    )
