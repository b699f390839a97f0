"""A tiny regression "detector", its data and evaluator, and a Trainer that builds them.

The model follows the detection interface (``model(images, targets)`` returns a loss dict in
training and per-image dicts in eval) and holds a scheme-like layer with ``before_optimizer_step``
(a penalty's gradient and a gradient rule at every optimizer step), so the layer protocol is
exercised without any real scheme.
"""

from __future__ import annotations

import torch
from torch import nn

from norm_det.config import get_cfg
from norm_det.engine import Trainer
from norm_det.layers import track_step_layers
from norm_det.utils.comm import all_gather_object, get_rank, get_world_size

IMAGE_SIZE = 6


class AnchoredScale(nn.Module):
    """A per-channel scale with a unit-norm anchoring penalty and a gradient centring rule.

    At every optimizer step (``before_optimizer_step``, run by torch's step hook) the penalty's
    gradient is added and the mean of the scale's gradient removed, so under plain SGD the mean
    of ``scale`` never changes: a property the tests check.
    """

    _no_weight_decay = ("scale",)

    def __init__(self, channels: int, weight: float = 0.01) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.weight = weight
        self.step_calls = 0
        track_step_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def penalty(self) -> torch.Tensor:
        return self.weight * (self.scale.norm() - 1.0) ** 2

    def before_optimizer_step(self) -> dict[str, torch.Tensor]:
        self.step_calls += 1
        with torch.enable_grad():
            value = self.penalty()
            (gradient,) = torch.autograd.grad(value, self.scale)
        total = gradient if self.scale.grad is None else self.scale.grad + gradient
        self.scale.grad = total - total.mean()
        return {"loss_toy_anchor": value.detach()}


class ToyDetector(nn.Module):
    """Regress a scalar per image: conv, GroupNorm, pooling, the anchored scale, a linear head.

    Args:
        noise: std of Gaussian noise added to the training predictions (draws from torch's
            global generator, like random sampling in a real detector).
    """

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.anchor = AnchoredScale(8)
        self.head = nn.Linear(8, 1)
        self.noise = noise
        self.poison = False

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        x = torch.relu(self.norm(self.conv(torch.stack(images))))
        pred = self.head(self.anchor(x.mean(dim=(2, 3)))).squeeze(1)
        if not self.training:
            return [{"value": p} for p in pred]
        if self.noise:
            pred = pred + self.noise * torch.randn_like(pred)
        y = torch.stack([t["y"] for t in targets])
        loss_l1 = (pred - y).abs().mean()
        if self.poison:
            loss_l1 = loss_l1 * float("nan")
        return {"loss_mse": ((pred - y) ** 2).mean(), "loss_l1": loss_l1}


def _sample(generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    # A learnable target: the brightness of the red channel's left half.
    y = image[0, :, : IMAGE_SIZE // 2].mean() * 2.0 - 0.5
    return image, {"image_id": 0, "y": y}


class ToyTrainLoader:
    """Infinite batches: each iteration draws ``world_size * batch_size`` samples from a seeded
    generator and yields this rank's slice, like a sharded sampler.

    Args:
        flip: flip each image horizontally with probability 1/2, drawing from torch's global
            generator (like a transform in the main process).
    """

    def __init__(self, batch_size: int, seed: int, flip: bool = False) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        rank, world_size = get_rank(), get_world_size()
        while True:
            samples = [_sample(generator) for _ in range(self.batch_size * world_size)]
            mine = samples[rank * self.batch_size : (rank + 1) * self.batch_size]
            images = [img for img, _ in mine]
            if self.flip:
                images = [img.flip(-1) if torch.rand(()) < 0.5 else img for img in images]
            yield images, [target for _, target in mine]


def toy_test_batches(num_images: int = 8, batch_size: int = 4) -> list:
    """This rank's share of a fixed test set, as a finite list of batches."""
    generator = torch.Generator().manual_seed(1234)
    samples = [_sample(generator) for _ in range(num_images)]
    for index, (_, target) in enumerate(samples):
        target["image_id"] = index
    mine = samples[get_rank() :: get_world_size()]
    return [
        ([img for img, _ in mine[i : i + batch_size]], [t for _, t in mine[i : i + batch_size]])
        for i in range(0, len(mine), batch_size)
    ]


class ToyEvaluator:
    """Mean absolute error of ``"value"`` against ``"y"``, gathered over processes."""

    def reset(self) -> None:
        self.errors: dict[int, float] = {}

    def process(self, targets: list[dict], outputs: list[dict]) -> None:
        for target, output in zip(targets, outputs):
            self.errors[target["image_id"]] = float((output["value"] - target["y"]).abs())

    def evaluate(self) -> dict:
        merged = {}
        for errors in all_gather_object(self.errors):
            merged.update(errors)
        if get_rank() != 0:
            return {}
        return {"toy": {"MAE": sum(merged.values()) / len(merged)}}


class ToyTrainer(Trainer):
    """The real Trainer with the toy model, data and evaluator."""

    noise = 0.0
    flip = False

    @classmethod
    def build_model(cls, cfg) -> nn.Module:
        return ToyDetector(noise=cls.noise)

    @classmethod
    def build_train_loader(cls, cfg):
        return ToyTrainLoader(
            cfg.SOLVER.IMS_PER_BATCH // get_world_size(), seed=cfg.SEED, flip=cls.flip
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        # A torch DataLoader draws its workers' base seed from the global generator.
        torch.empty((), dtype=torch.int64).random_()
        return toy_test_batches()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str | None = None):
        return ToyEvaluator()


def toy_cfg(output_dir, *opts):
    """A small config for the toy trainer, with ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "OUTPUT_DIR",
            str(output_dir),
            "SEED",
            "7",
            "LOG_PERIOD",
            "1",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "SOLVER.BASE_LR",
            "0.05",
            "SOLVER.MAX_ITER",
            "6",
            "SOLVER.WARMUP_ITERS",
            "2",
            "SOLVER.WARMUP_FACTOR",
            "0.1",
            "SOLVER.STEPS",
            "(4,)",
            "SOLVER.CHECKPOINT_PERIOD",
            "100",
            *opts,
        ]
    )
    return cfg
