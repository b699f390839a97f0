"""IterNorm against a direct implementation of the paper's Algorithm 1."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from norm_det.layers.iternorm import IterNorm
from norm_det.surgery import convert, fuse


def reference_iternorm(layer: IterNorm, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 per group, positions as samples, then the affine transform."""
    n, channels, height, width = x.shape
    c = layer.group_channels
    outputs = []
    for g in range(channels // c):
        data = x[:, g * c : (g + 1) * c].permute(1, 0, 2, 3).reshape(c, -1)  # d x m
        mu = data.mean(1, keepdim=True)
        centered = data - mu
        sigma = layer.eps * torch.eye(c, dtype=x.dtype) + centered @ centered.T / data.shape[1]
        trace = torch.trace(sigma)
        sigma_n = sigma / trace
        p = torch.eye(c, dtype=x.dtype)
        for _ in range(layer.iters):
            p = 0.5 * (3 * p - torch.matrix_power(p, 3) @ sigma_n)
        whitened = (p / trace.sqrt()) @ centered
        outputs.append(whitened.reshape(c, n, height, width).permute(1, 0, 2, 3))
    out = torch.cat(outputs, 1)
    return out * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("backend", ["matrix", "spectral"])
def test_matches_algorithm_1(backend: str) -> None:
    layer = IterNorm(12, group_channels=4, isqrt_backend=backend).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = (torch.randn(3, 12, 5, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    out, expected = layer(x), reference_iternorm(layer, x)
    assert torch.allclose(out, expected, atol=1e-10)
    grad = torch.randn_like(out)
    params = [x, layer.weight, layer.bias]
    got = torch.autograd.grad((out * grad).sum(), params)
    want = torch.autograd.grad((expected * grad).sum(), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-9)


def reference_iternorm_rows(layer: IterNorm, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 on ``(N, C)`` features, written out in float64 numpy: the rows are the
    ``m = N`` samples of each group of ``group_channels`` contiguous features."""
    data = x.detach().numpy()
    c = layer.group_channels
    out = np.empty_like(data)
    for g in range(data.shape[1] // c):
        block = data[:, g * c : (g + 1) * c].T  # d x m
        mu = block.mean(1, keepdims=True)
        centered = block - mu
        sigma = layer.eps * np.eye(c) + centered @ centered.T / block.shape[1]
        trace = np.trace(sigma)
        p = np.eye(c)
        for _ in range(layer.iters):
            p = 1.5 * p - 0.5 * np.linalg.matrix_power(p, 3) @ (sigma / trace)
        out[:, g * c : (g + 1) * c] = ((p / np.sqrt(trace)) @ centered).T
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    return torch.from_numpy(out * gamma + beta)


def test_features_input_matches_algorithm_1_and_the_1x1_map() -> None:
    """(N, C) input, as the release's IterNorm takes with dim=2: the rows are the samples."""
    layer = IterNorm(12, group_channels=4, momentum=0.3).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    twin = copy.deepcopy(layer)
    mixing = torch.randn(12, 12, dtype=torch.float64)
    x = (torch.randn(40, 12, dtype=torch.float64) @ mixing + 2.0).requires_grad_()
    out = layer(x)
    assert out.shape == (40, 12)
    torch.testing.assert_close(out.detach(), reference_iternorm_rows(layer, x), rtol=0, atol=1e-10)
    # (N, C) is (N, C, 1, 1): same output, gradients and running statistics.
    maps = x.detach()[:, :, None, None].requires_grad_()
    out_maps = twin(maps)
    torch.testing.assert_close(out, out_maps.view(40, 12), rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(out_maps, maps, grad.view(40, 12, 1, 1))
    torch.testing.assert_close(got, want.view(40, 12), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, twin.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_wm, twin.running_wm, rtol=0, atol=1e-12)
    layer.eval()
    twin.eval()
    y = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(y), twin(y[:, :, None, None]).view(5, 12), rtol=0, atol=0)


def test_whitens_each_group_with_many_iterations() -> None:
    layer = IterNorm(8, group_channels=4, iters=60, eps=1e-9).double()
    mixing = torch.randn(8, 8, dtype=torch.float64)
    x = torch.einsum("oc,nchw->nohw", mixing, torch.randn(16, 8, 6, 6, dtype=torch.float64))
    out = layer(x)
    for g in range(2):
        data = out[:, 4 * g : 4 * g + 4].permute(1, 0, 2, 3).reshape(4, -1)
        cov = data @ data.T / data.shape[1]
        assert torch.allclose(data.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(cov, torch.eye(4, dtype=torch.float64), atol=1e-6)


def test_running_statistics_drive_eval() -> None:
    layer = IterNorm(8, group_channels=4, momentum=0.25).double()
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64) + 2.0
    layer(x)
    assert torch.allclose(layer.running_mean, 0.25 * x.mean(dim=(0, 2, 3)))
    layer.eval()
    y = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    centered = y - layer.running_mean.view(1, -1, 1, 1)
    blocks = torch.block_diag(*layer.running_wm)
    expected = torch.einsum("oc,nchw->nohw", blocks, centered)
    assert torch.allclose(layer(y), expected, atol=1e-12)


def test_fuse_and_folded_affine_reproduce_eval() -> None:
    # Float64: fused and unfused differ by rounding only, ~1e-15 of outputs of order 1.
    norm = IterNorm(8, group_channels=4).double()
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).double()
    model = nn.Sequential(conv, norm)
    for _ in range(3):
        model(torch.randn(4, 3, 7, 7, dtype=torch.float64))
    model.eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        lone = norm.fuse()
        assert type(lone) is nn.Conv2d
        assert torch.allclose(lone(conv(x)), expected, rtol=0, atol=1e-12)
        folded = fuse(copy.deepcopy(model))
        assert type(folded[0]) is nn.Conv2d and isinstance(folded[1], nn.Identity)
        assert torch.allclose(folded(x), expected, rtol=0, atol=1e-12)


def test_converted_resnet_fuses_exactly() -> None:
    # Float64, so that "exactly" means rounding of ~1e-15 through the 20 layers, not float32's.
    model = convert(torchvision.models.resnet18(num_classes=10), "IterNorm").double()
    assert isinstance(model.bn1, IterNorm) and model.conv1.bias is None
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            model(x + 0.1 * torch.randn_like(x))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        fused = fuse(copy.deepcopy(model))
        got = fused(x)
    assert not any(isinstance(m, IterNorm) for m in fused.modules())
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_group_channels_fall_back_to_gcd_with_one_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = IterNorm(96)
        layer(torch.randn(2, 96, 3, 3))
    assert layer.group_channels == 32 and layer.running_wm.shape == (3, 32, 32)
    assert len(caught) == 1 and caught[0].filename == __file__


def test_bad_input() -> None:
    layer = IterNorm(4, group_channels=2)
    x = torch.randn(2, 4, 3, 3)
    x[1, 2, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="IterNorm"):
        layer(x)
    with pytest.raises(ValueError, match=r"expected \(N, 4, H, W\) or \(N, 4\).*\(2, 3, 3, 3\)"):
        layer(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(2, 4, 3\)"):
        layer(torch.randn(2, 4, 3))
    empty = layer(torch.zeros(0, 4, 3, 3))
    assert empty.shape == (0, 4, 3, 3)
