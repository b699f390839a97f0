import pytest
import torch
from torch import nn

from norm_det.layers import FrozenBatchNorm2d, convert_frozen_batchnorm
from tests.model_utils import U64

# FrozenBatchNorm2d computes BatchNorm2d's eval arithmetic: both run F.batch_norm (eval, which is
# elementwise) on equal buffers, so their outputs are equal bit for bit on any machine.


def _random_bn(channels: int, dtype: torch.dtype = torch.float32) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
    return bn.eval()


def test_frozen_bn_equals_batchnorm_eval():
    bn = _random_bn(16)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(4, 16, 9, 7) * 3 + 1
    assert torch.equal(frozen(x), bn(x))


def test_float64_batchnorm_converts_exactly_in_float64():
    # Values of float64's full precision: a float32 buffer would round them (by ~1e-9 relatively).
    bn = _random_bn(16, dtype=torch.float64)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(frozen, name).dtype == torch.float64
        assert torch.equal(getattr(frozen, name), getattr(bn, name))
    x = torch.randn(4, 16, 9, 7, dtype=torch.float64) * 3 + 1
    assert torch.equal(frozen(x), bn(x))
    # The whole-model route keeps it too.
    converted = convert_frozen_batchnorm(nn.Sequential(bn))
    assert converted[0].running_var.dtype == torch.float64
    assert torch.equal(converted(x), bn(x))


def test_batchnorm_without_running_statistics_is_refused():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(
        ValueError, match=r"BatchNorm2d has no running statistics \(running_mean is None\)"
    ):
        FrozenBatchNorm2d.from_batchnorm(bn)


def test_frozen_bn_has_no_parameters_and_loads_bn_state_dict():
    bn = _random_bn(8)
    frozen = FrozenBatchNorm2d(8)
    assert list(frozen.parameters()) == []
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(frozen(x), bn(x))


def test_folded_affine_matches_forward():
    # Another order of operations (rsqrt, the shift), so compared in float64 (float32 -> float64
    # is exact): scale and shift take <= 6 roundings, x * scale + shift 2, each <= u of the
    # magnitudes |x| |scale| + |bias| + |mean| |scale|; twice that for the two evaluations.
    frozen = FrozenBatchNorm2d.from_batchnorm(_random_bn(6)).double()
    scale, shift = frozen.folded_affine()
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    expected = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    scale_abs, mean_abs, bias_abs = (
        t.abs().view(1, -1, 1, 1) for t in (scale, frozen.running_mean, frozen.bias)
    )
    magnitude = (x.abs() + mean_abs) * scale_abs + bias_abs
    assert ((frozen(x) - expected).abs() <= 16 * U64 * magnitude).all()


def test_convert_frozen_batchnorm_whole_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _random_bn(8), nn.Sequential(_random_bn(8)))
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    converted = convert_frozen_batchnorm(model)
    kinds = [type(m) for m in converted.modules()]
    assert nn.BatchNorm2d not in kinds
    assert kinds.count(FrozenBatchNorm2d) == 2
    assert torch.equal(converted(x), reference)
    # Gradients still flow to the input but nothing in the norm is trainable.
    assert sum(p.numel() for p in converted[1].parameters()) == 0


def test_fuse_returns_plain_batchnorm():
    frozen = FrozenBatchNorm2d.from_batchnorm(_random_bn(5))
    plain = frozen.fuse()
    assert type(plain) is nn.BatchNorm2d and not plain.training
    x = torch.randn(2, 5, 3, 3)
    assert torch.equal(plain(x), frozen(x))
