"""Precise running statistics: the plain mean of per-forward statistics at fixed weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from norm_det.engine.precise_statistics import (
    layers_with_running_statistics,
    recompute_running_statistics,
)
from norm_det.layers import DeconvConv2d, FrozenBatchNorm2d, GroupNorm, IterNorm
from tests.engine.toys import ToyDetector, ToyTrainer, toy_cfg


def _batches(count: int, channels: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, channels, 5, 5, generator=generator, dtype=torch.float64) * (i + 1) + i
        for i in range(count)
    ]


class _SharedBN(nn.Module):
    """One BN applied twice per forward, like an RPN head on two FPN levels."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.bn(2 * x + 1)


def _forward(model: nn.Module, batch: torch.Tensor) -> None:
    model(batch)


def test_batch_norm_gets_the_mean_of_its_per_forward_statistics() -> None:
    batches = _batches(5)
    bn = nn.BatchNorm2d(4, momentum=0.1).double()
    tracked = int(bn.num_batches_tracked)
    assert recompute_running_statistics(bn, iter(batches), _forward, 5) == 1
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).reshape(4, -1).var(dim=1) for b in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(bn.running_var, variances.mean(0), atol=1e-12, rtol=0)
    # The pass leaves the layer's settings and step counter as they were.
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == tracked and bn.training


def test_a_layer_called_twice_per_forward_counts_every_call() -> None:
    batches = _batches(3)
    model = _SharedBN()
    recompute_running_statistics(model, iter(batches), _forward, 3)
    calls = [x for b in batches for x in (b, 2 * b + 1)]
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in calls]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, expected, atol=1e-12, rtol=0)


def test_frozen_deconv_estimates_at_every_batch_and_keeps_its_schedule() -> None:
    batches = _batches(4, channels=8)
    layer = DeconvConv2d(8, 6, 3, padding=1, block=4, sampling_stride=1, freeze=True).double()
    layer(batches[0])  # one training step: the freeze schedule's counter is at 1
    reference = DeconvConv2d(8, 6, 3, padding=1, block=4, sampling_stride=1, momentum=1.0)
    reference = reference.double()
    reference.load_state_dict(layer.state_dict())
    means, deconvs = [], []
    for batch in batches:
        reference(batch)
        means.append(reference.running_mean.clone())
        deconvs.append(reference.running_deconv.clone())

    recompute_running_statistics(layer, iter(batches), _forward, 4)
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        layer.running_deconv, torch.stack(deconvs).mean(0), atol=1e-12, rtol=0
    )
    assert layer.freeze is True and layer.momentum == 0.1
    assert int(layer.num_batches_tracked) == 1


def test_only_layers_with_moving_averages_take_part() -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(4),
        FrozenBatchNorm2d(4),
        GroupNorm(4, num_groups=2),
        IterNorm(4, group_channels=2),
        DeconvConv2d(4, 4, 1, block=2),
    )
    found = {type(m).__name__: names for m, names in layers_with_running_statistics(model)}
    assert found == {
        "BatchNorm2d": ("running_mean", "running_var"),
        "IterNorm": ("running_mean", "running_wm"),
        "DeconvConv2d": ("running_mean", "running_deconv"),
    }
    # Nothing to recompute: no batch is drawn.
    no_statistics = nn.Sequential(nn.GroupNorm(2, 4))
    assert recompute_running_statistics(no_statistics, iter(()), _forward, 3) == 0


def test_too_few_batches_is_an_error_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"gave 2 batches, 3 were asked for.*NUM_ITER"):
        recompute_running_statistics(nn.BatchNorm2d(4).double(), iter(_batches(2)), _forward, 3)
    with pytest.raises(ValueError, match=r"TEST.PRECISE_BN.NUM_ITER\) is 0"):
        recompute_running_statistics(nn.BatchNorm2d(4), iter(()), _forward, 0)


class _BNToyDetector(ToyDetector):
    def __init__(self, noise: float = 0.0) -> None:
        super().__init__(noise)
        self.norm = nn.BatchNorm2d(8)


class _BNToyTrainer(ToyTrainer):
    noise = 0.5  # training draws from the global generator, which the pass must not move

    @classmethod
    def build_model(cls, cfg) -> nn.Module:
        return _BNToyDetector(noise=cls.noise)


def _train(output_dir, *opts) -> tuple[_BNToyTrainer, dict]:
    cfg = toy_cfg(output_dir, "DATASETS.TEST", "('toy_val',)", "TEST.EVAL_PERIOD", "3", *opts)
    torch.manual_seed(0)
    trainer = _BNToyTrainer(cfg)
    trainer.train()
    return trainer, trainer.model.state_dict()


def test_trainer_recomputes_before_evaluating_and_training_is_unchanged(tmp_path) -> None:
    _, plain_state = _train(tmp_path / "plain")
    precise, precise_state = _train(
        tmp_path / "precise", "TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.NUM_ITER", "4"
    )
    # Parameters and the generators are as without the pass (it ran at iterations 3 and 6).
    for name, value in plain_state.items():
        if "running" not in name:
            torch.testing.assert_close(precise_state[name], value, atol=0, rtol=0, msg=name)

    # The final checkpoint holds the mean of the batch means of 4 fresh training batches.
    model = _BNToyDetector()
    model.load_state_dict(precise_state)
    model.train()
    loader = iter(_BNToyTrainer.build_train_loader(precise.cfg))
    means = []
    for _ in range(4):
        images, _ = next(loader)
        means.append(model.conv(torch.stack(images)).mean(dim=(0, 2, 3)))
    expected = torch.stack(means).mean(0).detach()
    saved = torch.load(tmp_path / "precise" / "model_final.pth", weights_only=True)["model"]
    # float32 means of 4·6·6 = 144 values below 4 in magnitude: apart by at most 144·2^-24·4.
    torch.testing.assert_close(saved["norm.running_mean"], expected, atol=4e-5, rtol=0)
    assert not torch.allclose(plain_state["norm.running_mean"], expected, atol=1e-3)


def _field_layers() -> dict[str, tuple[nn.Module, object]]:
    """The new BN-like layers, with the per-forward statistic their running average holds."""
    from norm_det.layers import (
        BatchChannelNorm2d,
        CrossIterationBatchNorm2d,
        EvoNormB0,
        MovingAverageBatchNorm2d,
    )

    def unbiased(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1)

    def second_moment(x: torch.Tensor) -> torch.Tensor:
        return x.square().mean(dim=(0, 2, 3))

    return {
        "CBN": (CrossIterationBatchNorm2d(4, burnin=0).double(), ("running_var", unbiased)),
        "EvoNorm-B0": (EvoNormB0(4).double(), ("running_var", unbiased)),
        "MABN": (
            MovingAverageBatchNorm2d(4, warmup_iters=0).double(),
            ("running_var", second_moment),
        ),
        "BCN": (BatchChannelNorm2d(4, groups=2).double(), ("running_var", unbiased)),
        # The micro-batch variant normalizes by its estimates in training: the biased variance.
        "BCN estimate": (
            BatchChannelNorm2d(4, groups=2, estimate=True).double(),
            ("running_var", lambda x: x.var(dim=(0, 2, 3), unbiased=False)),
        ),
    }


@pytest.mark.parametrize("name", sorted(_field_layers()))
def test_the_field_s_batch_statistics_layers_take_part(name: str) -> None:
    layer, (buffer, statistic) = _field_layers()[name]
    if hasattr(layer, "pair_with"):  # CBN normalizes a convolution's output
        conv = nn.Conv2d(4, 4, 1).double()
        layer.pair_with(conv)
        model: nn.Module = nn.Sequential(conv, layer)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            conv.bias.zero_()
    else:
        model = layer
    batches = _batches(4)
    before = {k: v.clone() for k, v in layer.state_dict().items() if not k.startswith("running_")}
    assert recompute_running_statistics(model, iter(batches), _forward, 4) == 1
    expected = torch.stack([statistic(b) for b in batches]).mean(0)
    torch.testing.assert_close(getattr(layer, buffer), expected, atol=1e-12, rtol=0)
    # Everything but the running averages is as before the pass (MABN's history included).
    after = {k: v for k, v in layer.state_dict().items() if not k.startswith("running_")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
