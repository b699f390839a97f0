"""Batch-Channel Normalization (Qiao et al.): batch stage, channel stage, micro-batch estimates."""

import pytest
import torch
from torch import nn

from norm_det.engine.precise_statistics import layers_with_running_statistics
from norm_det.layers import WSConv2d, no_weight_decay_parameters
from norm_det.layers.bcn import BatchChannelNorm2d

C, G = 6, 3


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def _reference(x, mean, var, layer, eps=1e-5):
    """BCN written out: x_dot = g_b (x - mu) / sqrt(var + eps) + b_b; y = g_c GN(x_dot) + b_c."""
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x_dot = params["batch_weight"][None, :, None, None] * (x - _per_channel(mean))
    x_dot = x_dot / torch.sqrt(_per_channel(var) + eps) + _per_channel(params["batch_bias"])
    n, c, h, w = x.shape
    grouped = x_dot.reshape(n, layer.num_groups, -1)
    group_mean = grouped.mean(dim=-1, keepdim=True)
    group_var = ((grouped - group_mean) ** 2).mean(dim=-1, keepdim=True)
    normalized = ((grouped - group_mean) / torch.sqrt(group_var + eps)).reshape(n, c, h, w)
    return _per_channel(params["weight"]) * normalized + _per_channel(params["bias"])


def _layer(**options) -> BatchChannelNorm2d:
    torch.manual_seed(0)
    layer = BatchChannelNorm2d(C, groups=G, **options).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p is layer.weight else 0.0))
        layer.running_mean.copy_(torch.randn(C) * 0.3)
        layer.running_var.copy_(torch.rand(C) + 0.5)
    return layer


def _batch(n: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shift = torch.arange(C, dtype=torch.float64)[None, :, None, None]
    return torch.randn(n, C, 5, 4, generator=generator, dtype=torch.float64) * 2.0 + shift


def test_training_uses_the_batch_statistics_and_updates_running_ones() -> None:
    layer = _layer().train()
    x = _batch()
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    out = layer(x)
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - _per_channel(mean)) ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(out, _reference(x, mean, var, layer), rtol=1e-10, atol=1e-10)
    # As batch norm: running = 0.9 running + 0.1 batch, the variance unbiased there.
    m = x.numel() / C
    torch.testing.assert_close(layer.running_mean, 0.9 * before_mean + 0.1 * mean)
    torch.testing.assert_close(layer.running_var, 0.9 * before_var + 0.1 * var * m / (m - 1))


def test_eval_uses_the_running_statistics() -> None:
    for estimate in (False, True):
        layer = _layer(estimate=estimate).eval()
        x = _batch()
        expected = _reference(x, layer.running_mean, layer.running_var, layer)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
        assert layer.running_mean.equal(_layer().running_mean)  # not updated in eval


def test_micro_batch_estimates_update_then_normalize_without_gradient() -> None:
    layer = _layer(estimate=True, momentum=0.25).train()
    x = _batch(n=1).requires_grad_()
    old_mean, old_var = layer.running_mean.clone(), layer.running_var.clone()
    out = layer(x)
    data = x.detach()
    new_mean = old_mean + 0.25 * (data.mean(dim=(0, 2, 3)) - old_mean)
    spread = ((data - _per_channel(new_mean)) ** 2).mean(dim=(0, 2, 3))
    new_var = old_var + 0.25 * (spread - old_var)
    torch.testing.assert_close(layer.running_mean, new_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, new_var, rtol=1e-12, atol=1e-12)
    # Normalized by the (updated) estimates, as constants: no gradient through the statistics.
    reference_input = x.detach().clone().requires_grad_()
    expected = _reference(reference_input, new_mean, new_var, layer)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, reference_input.grad, rtol=1e-10, atol=1e-10)


def test_a_layer_shared_by_several_inputs_backpropagates() -> None:
    """An RPN head runs once per FPN level before the backward; each update is in place."""
    for estimate in (False, True):
        layer = _layer(estimate=estimate).train()
        x = _batch().requires_grad_()
        (layer(x) * layer(2 * x + 1)).sum().backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_micro_batch_with_momentum_1_is_the_batch_statistics() -> None:
    """What precise statistics relies on: r = 1 makes the estimates the batch's own."""
    x = _batch()
    estimated = _layer(estimate=True, momentum=1.0).train()
    batch = _layer(estimate=False).train()
    out = estimated(x)
    mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(estimated.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(estimated.running_var, x.var(dim=(0, 2, 3), unbiased=False))
    torch.testing.assert_close(out, batch(x), rtol=1e-10, atol=1e-10)
    assert layers_with_running_statistics(nn.Sequential(estimated)) == [
        (estimated, ("running_mean", "running_var"))
    ]


def test_gradcheck() -> None:
    for estimate in (False, True):
        # momentum 0: the estimates stay fixed across gradcheck's repeated forwards.
        layer = _layer(estimate=estimate, momentum=0.0).train()
        names = [name for name, _ in layer.named_parameters()]

        def function(x, *params, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

        x = _batch(n=2)[:, :, :3, :2].clone().requires_grad_()
        params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
        assert torch.autograd.gradcheck(function, [x, *params])


def test_fuse_gives_torch_layers_with_the_eval_output() -> None:
    layer = _layer().eval()
    fused = layer.fuse()
    assert [type(m) for m in fused] == [nn.BatchNorm2d, nn.GroupNorm] and not fused.training
    x = _batch()
    torch.testing.assert_close(fused(x), layer(x), rtol=1e-12, atol=1e-12)


def test_empty_input_and_state_dict_round_trip() -> None:
    layer = _layer(estimate=True).train()
    before = layer.running_mean.clone()
    assert layer(torch.zeros(0, C, 4, 4, dtype=torch.float64)).shape == (0, C, 4, 4)
    assert layer.running_mean.equal(before)
    state = layer.state_dict()
    assert set(state) == {
        "batch_weight",
        "batch_bias",
        "weight",
        "bias",
        "running_mean",
        "running_var",
    }
    other = BatchChannelNorm2d(C, groups=G, estimate=True).double()
    other.load_state_dict(state)
    x = _batch()
    assert torch.equal(other.eval()(x), layer.eval()(x))
    assert no_weight_decay_parameters(nn.Sequential(layer)) == {
        "0.weight",
        "0.bias",
        "0.batch_weight",
        "0.batch_bias",
    }


def test_groups_and_bad_arguments() -> None:
    with pytest.warns(UserWarning, match="32 groups do not divide 16 channels; using 16 groups"):
        assert BatchChannelNorm2d(16).num_groups == 16
    with pytest.raises(
        ValueError, match=r"4 groups do not divide 6 channels.*'BCN\+WS\(groups=3\)'"
    ):
        BatchChannelNorm2d(6, groups=4)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]; got 1.5"):
        BatchChannelNorm2d(6, groups=3, momentum=1.5)
    with pytest.raises(ValueError, match=r"eps must be > 0; got 0"):
        BatchChannelNorm2d(6, groups=3, eps=0)
    with pytest.raises(ValueError, match=r"expected \(N, 6, H, W\) input; got \(2, 5, 3, 3\)"):
        BatchChannelNorm2d(6, groups=3)(torch.zeros(2, 5, 3, 3))


def test_bcn_ws_pair_is_ws_conv_then_bcn() -> None:
    """The BCN+WS scheme's pair: the standardized convolution, then BCN, in float64."""
    torch.manual_seed(3)
    conv = WSConv2d(4, C, 3, padding=1, bias=False).double()
    norm = _layer().train()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = norm(conv(x))
    w = conv.weight.detach()
    flat = w.flatten(1)
    mean = flat.mean(dim=1)
    std = ((flat - mean[:, None]) ** 2).sum(dim=1).div(flat.shape[1] - 1).sqrt()
    w_hat = (w - mean[:, None, None, None]) / (std[:, None, None, None] + 1e-5)
    y = torch.nn.functional.conv2d(x, w_hat, padding=1)
    y_mean = y.mean(dim=(0, 2, 3))
    y_var = ((y - _per_channel(y_mean)) ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(out, _reference(y, y_mean, y_var, norm), rtol=1e-9, atol=1e-9)
    # WS makes the pair blind to each filter's offset and scale.
    with torch.no_grad():
        conv.weight.mul_(torch.rand(C, 1, 1, 1, dtype=torch.float64) + 0.5).add_(0.7)
    torch.testing.assert_close(norm(conv(x)), out, rtol=1e-6, atol=1e-6)
