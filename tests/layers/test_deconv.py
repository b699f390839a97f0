"""Network deconvolution layers (ND / ND++) against a direct implementation of the paper."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from norm_det.layers.deconv import (
    DeconvConv2d,
    DeconvConvTranspose2d,
    DeconvLinear,
    computes_statistics_at,
    sample_standardization,
    standardize,
)
from norm_det.layers.deconv import standardization as deconv_module
from norm_det.schemes import get_scheme
from norm_det.surgery import convert, fuse

# Float32's unit roundoff.
U32 = 2.0**-24


def float32_sum_error(terms: int) -> float:
    """Relative error of a float32 sum (or dot product) of ``terms`` terms, as a fraction of the
    sum of the terms' magnitudes: Higham & Mary's probabilistic bound ``lambda sqrt(n) u`` with
    ``lambda = 4`` (exceeded with probability < 1e-3), where the worst case ``n u`` is rare."""
    return 4 * math.sqrt(terms) * U32


def newton_isqrt(cov: torch.Tensor, iters: int) -> torch.Tensor:
    """ND++'s coupled inverse Newton iteration, written out (batched)."""
    norm = torch.linalg.matrix_norm(cov)[..., None, None]
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
    x, m = eye, cov / norm
    for _ in range(iters):
        t = (3 * eye - m) / 2
        x, m = x @ t, t @ t @ m
    return x / norm.sqrt()


def reference_standardize(x: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    view = (-1,) + (1,) * (x.dim() - 1)
    if mode == "layernorm":
        return (x - flat.mean(1).view(view)) / (flat.std(1).view(view) + eps)
    if mode == "l1norm":
        return x / (flat.abs().mean(1).view(view) + eps)
    return x


def reference_conv(layer: DeconvConv2d, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 step by step: standardize, im2col rows, covariance, D, conv(S x, W D)."""
    x = reference_standardize(x, layer.scale_invariance, layer.eps)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    channels = x.shape[1]
    (kh, kw), groups = layer.kernel_size, layer.groups
    strides = (layer.sampling_stride * layer.stride[0], layer.sampling_stride * layer.stride[1])
    if (kh, kw) == (1, 1):
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)[:: strides[0] * strides[1]]
    else:
        cols = F.unfold(x, (kh, kw), layer.dilation, 0, strides)
        rows = cols.transpose(1, 2).reshape(-1, channels * kh * kw)
    features = layer.features
    weight = layer.weight.reshape(layer.out_channels, -1)
    if groups == 1:
        per_group = channels // layer.block
        # Column j belongs to group j mod (C / B); the groups are stacked as samples.
        data = rows.reshape(-1, features, per_group).transpose(1, 2).reshape(1, -1, features)
        stack = weight.reshape(-1, features, per_group).transpose(1, 2).reshape(1, -1, features)
    else:
        data = rows.reshape(-1, groups, features).transpose(0, 1)
        stack = weight.reshape(groups, -1, features)
    mean = data.mean(1, keepdim=True)
    centered = data - mean
    cov = centered.transpose(1, 2) @ centered / data.shape[1]
    cov = cov + layer.eps * torch.eye(features, dtype=x.dtype)
    whitened = stack @ newton_isqrt(cov, layer.iters)
    shift = (whitened @ mean.transpose(1, 2)).reshape(layer.out_channels, -1).sum(1)
    bias = (0 if layer.bias is None else layer.bias) - shift
    if groups == 1:
        whitened = whitened.reshape(layer.out_channels, per_group, features).transpose(1, 2)
    return F.conv2d(
        x, whitened.reshape(layer.weight.shape), bias, layer.stride, 0, layer.dilation, groups
    )


CONV_CASES = {
    "3x3": dict(in_channels=8, out_channels=6, kernel_size=3, padding=1),
    "1x1": dict(in_channels=8, out_channels=5, kernel_size=1),
    "stride2": dict(in_channels=12, out_channels=4, kernel_size=3, stride=2, padding=1),
    "valid": dict(in_channels=8, out_channels=4, kernel_size=3),
    "dilated": dict(in_channels=8, out_channels=4, kernel_size=3, padding=2, dilation=2),
    "grouped": dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2),
    "no-bias": dict(in_channels=8, out_channels=4, kernel_size=3, padding=1, bias=False),
    "reflect": dict(
        in_channels=8, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"
    ),
    "same": dict(in_channels=8, out_channels=4, kernel_size=(3, 2), padding="same"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("mode", ["none", "layernorm", "l1norm"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_direct_algorithm(case: str, mode: str) -> None:
    layer = DeconvConv2d(
        **CONV_CASES[case], block=4, sampling_stride=2, scale_invariance=mode
    ).double()
    x = (torch.randn(3, layer.in_channels, 11, 11, dtype=torch.float64) * 2 + 1).requires_grad_()
    out, expected = layer(x), reference_conv(layer, x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-10)
    grad = torch.randn_like(out)
    params = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    got = torch.autograd.grad((out * grad).sum(), params)
    want = torch.autograd.grad((expected * grad).sum(), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-9)


def assert_matches_direct_algorithm(layer: DeconvConv2d, x: torch.Tensor) -> None:
    out, expected = layer(x), reference_conv(layer, x)
    assert torch.allclose(out, expected, atol=1e-10)
    grad = torch.randn_like(out)
    params = [layer.weight, layer.bias] + ([x] if x.requires_grad else [])
    got = torch.autograd.grad((out * grad).sum(), params)
    want = torch.autograd.grad((expected * grad).sum(), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-9)


@pytest.mark.parametrize("mode", ["none", "layernorm"])
def test_large_whitening_matrix_matches_direct_algorithm(mode: str) -> None:
    # F = 9 * 24 = 216: the covariance, D and the isqrt backward take the blocked symmetric
    # products; detection layers have F = 576.
    layer = DeconvConv2d(24, 8, 3, padding=1, block=24, sampling_stride=1, scale_invariance=mode)
    x = (torch.randn(2, 24, 10, 10, dtype=torch.float64) + 0.5).requires_grad_()
    assert_matches_direct_algorithm(layer.double(), x)


@pytest.mark.parametrize("mode", ["layernorm", "l1norm"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_many_samples_match_direct_algorithm(mode: str, kernel: int) -> None:
    # 20 samples: the weight gradient in one batched backward (not per sample) and the
    # broadcast per-sample affine maps.
    layer = DeconvConv2d(
        8, 6, kernel, padding=kernel // 2, block=4, sampling_stride=2, scale_invariance=mode
    )
    x = (torch.randn(20, 8, 6, 6, dtype=torch.float64) * 2 + 1).requires_grad_()
    assert_matches_direct_algorithm(layer.double(), x)


@pytest.mark.parametrize("mode", ["none", "layernorm"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_channels_last_input_matches_direct_algorithm(mode: str, kernel: int) -> None:
    # Gradients are written into strided views of the input's gradient: any memory layout.
    layer = DeconvConv2d(
        8, 6, kernel, padding=kernel // 2, block=4, sampling_stride=2, scale_invariance=mode
    )
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64) * 2 + 1
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    assert_matches_direct_algorithm(layer.double(), x)


@pytest.mark.parametrize("mode", ["none", "layernorm"])
def test_input_without_gradient(mode: str) -> None:
    # An image fed to the first layer: the input gradient that the convolution hands to the
    # statistics' backward is not computed, the weight gradient still is.
    layer = DeconvConv2d(8, 6, 3, padding=1, block=4, sampling_stride=2, scale_invariance=mode)
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64) * 2 + 1
    assert_matches_direct_algorithm(layer.double(), x)


def test_backward_twice_through_a_retained_graph() -> None:
    layer = DeconvConv2d(8, 6, 3, padding=1, block=4, scale_invariance="layernorm").double()
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, [x, layer.weight], grad, retain_graph=True)
    second = torch.autograd.grad(out, [x, layer.weight], grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_whitened_patches_have_identity_covariance() -> None:
    # Strongly correlated input (smooth images, correlated channels); with many iterations the
    # sampled im2col rows times the layer's D have covariance I within each group.
    layer = DeconvConv2d(
        8, 4, 3, padding=1, block=4, sampling_stride=1, iters=40, eps=1e-9, momentum=1.0
    ).double()
    base = torch.randn(16, 3, 24, 24, dtype=torch.float64)
    smooth = F.avg_pool2d(base, 5, stride=1, padding=2)
    x = torch.einsum("oc,nchw->nohw", torch.randn(8, 3, dtype=torch.float64), smooth)
    x = x + 0.05 * torch.randn_like(x)
    layer(x)  # momentum 1: the running statistics are this batch's
    columns = layer._sampled_data(x)[0]  # (F, S)
    centered = columns - columns.mean(1, keepdim=True)
    assert torch.allclose(layer.running_mean[0], columns.mean(1))
    before = centered @ centered.T / centered.shape[1]
    eye = torch.eye(layer.features, dtype=torch.float64)
    assert (before - eye).abs().max() > 0.5
    whitened = layer.running_deconv[0] @ centered
    after = whitened @ whitened.T / whitened.shape[1]
    assert (after - eye).abs().max() < 1e-4


def test_linear_reaches_least_squares_in_one_step() -> None:
    """ND++ paper, Proposition 1: decorrelated, standardized features + learning rate 1.0."""
    samples, features = 256, 6
    mixing = torch.randn(features, features, dtype=torch.float64)
    x = torch.randn(samples, features, dtype=torch.float64) @ mixing + 3.0
    target = x @ torch.randn(features, 1, dtype=torch.float64) + 0.3 * torch.randn(samples, 1)
    design = torch.cat([x, torch.ones(samples, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target).solution
    best = 0.5 * ((design @ solution - target) ** 2).mean()

    def loss_after_one_step(layer: nn.Module) -> torch.Tensor:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
        optimizer.zero_grad()
        (0.5 * ((layer(x) - target) ** 2).mean()).backward()
        optimizer.step()
        with torch.no_grad():
            return 0.5 * ((layer(x) - target) ** 2).mean()

    deconv = DeconvLinear(features, 1, block=features, iters=40, eps=1e-12).double()
    assert loss_after_one_step(deconv).item() == pytest.approx(best.item(), rel=1e-6)
    plain = nn.Linear(features, 1).double()
    assert loss_after_one_step(plain).item() > 2 * best.item()


@pytest.mark.parametrize("mode", ["layernorm", "l1norm"])
def test_scale_invariance(mode: str) -> None:
    # Exact up to eps (sigma + eps), so eps is tiny here.
    options = dict(scale_invariance=mode, eps=1e-12, block=4)
    conv = DeconvConv2d(8, 4, 3, padding=1, sampling_stride=2, **options)
    linear = DeconvLinear(16, 4, **options)
    transposed = DeconvConvTranspose2d(8, 4, 2, stride=2, **options)
    for layer, shape in ((conv, (3, 8, 9, 9)), (linear, (5, 16)), (transposed, (3, 8, 5, 5))):
        layer = layer.double()
        x = torch.randn(*shape, dtype=torch.float64)
        for training in (True, False):
            layer.train(training)
            assert torch.allclose(layer(7.5 * x), layer(x), atol=1e-9)
    plain_nd = DeconvConv2d(8, 4, 3, padding=1, block=4).double()
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    assert not torch.allclose(plain_nd(7.5 * x), plain_nd(x))


def test_standardize_matches_layernorm_definition() -> None:
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 2
    expected = reference_standardize(x, "layernorm", 1e-5)
    assert torch.allclose(standardize(x, "layernorm", 1e-5), expected, atol=1e-12)
    x.requires_grad_()
    weight = torch.randn_like(x)
    (got,) = torch.autograd.grad((standardize(x, "layernorm", 1e-5) * weight).sum(), x)
    (want,) = torch.autograd.grad((reference_standardize(x, "layernorm", 1e-5) * weight).sum(), x)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("offset", [0.0, 5.0, 1e4])
def test_float32_sample_std_resolves_large_means(offset: float) -> None:
    # float32 sums of squares cannot resolve a spread 1e4 times below the mean; the layer
    # recomputes those centred, so the scale S stays accurate.
    x = torch.randn(2, 16, 24, 24) * 3 + offset
    scale, shift = sample_standardization(x, "layernorm", 0.0)
    exact = x.double().reshape(2, -1)
    mean, var = exact.mean(1), exact.var(1)
    # The float32 sums run over one channel's 576 values (merged in float64). Sums of squares
    # err by float32_sum_error(576) of E[x^2], the variance by that times E[x^2] / Var, except
    # where the layer recomputes it centred (E[x^2] > 1e3 Var): then relative to Var alone.
    # The standard deviation halves the relative error; scale and shift are float32 (+u each).
    amplification = (mean.square() + var) / var
    amplification = torch.where(amplification > deconv_module._CANCELLATION, 1.0, amplification)
    rtol = 0.5 * float32_sum_error(576) * amplification + 2 * U32
    assert ((scale.double() * exact.std(1) - 1).abs() <= rtol).all()
    # The mean: a float32 sum per channel, then -shift / scale: three float32 roundings.
    atol = float32_sum_error(576) * exact.abs().mean(1) + 3 * U32 * mean.abs()
    assert (((-shift / scale).double() - mean).abs() <= atol).all()


def reference_linear(layer: DeconvLinear, x: torch.Tensor) -> torch.Tensor:
    x = reference_standardize(x, layer.scale_invariance, layer.eps)
    chunks = x.reshape(-1, layer.block)
    mean = chunks.mean(0)
    centered = chunks - mean
    cov = centered.T @ centered / chunks.shape[0] + layer.eps * torch.eye(layer.block).double()
    whitened = layer.weight.reshape(-1, layer.block) @ newton_isqrt(cov, layer.iters)
    bias = layer.bias - (whitened @ mean).reshape(layer.out_features, -1).sum(1)
    return F.linear(x, whitened.reshape(layer.weight.shape), bias)


@pytest.mark.parametrize("mode", ["none", "layernorm"])
def test_linear_matches_direct_algorithm(mode: str) -> None:
    layer = DeconvLinear(24, 5, block=8, scale_invariance=mode).double()
    x = torch.randn(10, 24, dtype=torch.float64, requires_grad=True)
    out, expected = layer(x), reference_linear(layer, x)
    assert torch.allclose(out, expected, atol=1e-10)
    got = torch.autograd.grad(out.sum(), [x, layer.weight])
    want = torch.autograd.grad(expected.sum(), [x, layer.weight])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-9)


def test_transposed_weight_is_the_whitened_correlation_kernel() -> None:
    layer = DeconvConvTranspose2d(8, 6, 3, padding=1, block=4, sampling_stride=1).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    layer(x)
    # D whitens the correlation's (full-padded) patches of the input.
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 72)
    data = cols.reshape(-1, 36, 2).transpose(1, 2).reshape(-1, 36)
    centered = data - data.mean(0)
    cov = centered.T @ centered / data.shape[0] + layer.eps * torch.eye(36).double()
    expected_d = newton_isqrt(cov, layer.iters)
    assert torch.allclose(layer.running_deconv[0], 0.9 * torch.eye(36).double() + 0.1 * expected_d)
    # At stride 1 a transposed convolution is a convolution with the flipped, transposed
    # kernel and padding k - 1 - p; W' must be the whitened kernel in that sense.
    layer.eval()
    weight, bias = layer.whitened_weight()
    kernel = weight.flip(-1, -2).transpose(0, 1)
    flat = kernel.reshape(6, 36, 2).transpose(1, 2).reshape(12, 36)
    raw = layer.weight.flip(-1, -2).transpose(0, 1).reshape(6, 36, 2).transpose(1, 2)
    assert torch.allclose(flat, raw.reshape(12, 36) @ layer.running_deconv[0], atol=1e-12)
    assert torch.allclose(layer(x), F.conv2d(x, kernel, bias, padding=1), atol=1e-10)


@pytest.mark.parametrize("mode", ["none", "layernorm"])
def test_fuse_equals_running_statistics_output(mode: str) -> None:
    layers = [
        (DeconvConv2d(8, 6, 3, padding=1, block=4, scale_invariance=mode), (4, 8, 9, 9)),
        (DeconvConv2d(8, 6, 3, padding=1, groups=2, scale_invariance=mode), (4, 8, 9, 9)),
        (DeconvConv2d(8, 6, 1, stride=2, block=4, scale_invariance=mode), (4, 8, 9, 9)),
        (DeconvLinear(16, 5, block=8, scale_invariance=mode), (6, 16)),
        (DeconvConvTranspose2d(8, 6, 2, stride=2, block=4, scale_invariance=mode), (4, 8, 5, 5)),
    ]
    # In float64: the fused and the unfused layer compute the same function in different
    # orders, equal to ~1e-15 of the outputs' scale on any processor.
    for layer, shape in layers:
        layer = layer.double()
        x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
        layer.train()
        for _ in range(3):
            layer(torch.randn(*shape, dtype=torch.float64) * 2 + 0.5)
        layer.eval()
        with torch.no_grad():
            expected = layer(x)
            fused = layer.fuse()
            got = fused(x)
        assert type(fused) in (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
        assert got.dtype == torch.float64
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-12


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_fused_ndpp_conv_exports_to_onnx(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    layer = DeconvConv2d(8, 6, 3, padding=1, block=4, scale_invariance="layernorm")
    layer(torch.randn(4, 8, 9, 9) * 2 + 1)
    fused = layer.eval().fuse()
    x = torch.randn(2, 8, 9, 9) * 3 - 1
    path = tmp_path / "ndpp_conv.onnx"
    torch.onnx.export(fused, (x,), str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # Both are float32 (onnxruntime's Conv has no float64): each output is a dot product of
    # 72 weights with standardized inputs, |S x| <= |x| / sigma + |mu| / sigma, so the two differ
    # by at most twice float32_sum_error(73) of |x| conv |W'| / sigma + |mu / sigma| conv(1, |W'|)
    # + |b'| (measured: below 3 u of it).
    with torch.no_grad():
        expected = layer(x).double()
        weight, bias = (t.double() for t in layer.whitened_weight())
        flat = x.double().reshape(x.shape[0], -1)
        mu = flat.mean(1).view(-1, 1, 1, 1)
        sigma = flat.std(1).view(-1, 1, 1, 1) + layer.eps
        ones = torch.ones(1, 1, *x.shape[2:], dtype=torch.float64)
        summed = F.conv2d(ones, weight.abs().sum(1, keepdim=True), padding=1)
        magnitude = (
            F.conv2d(x.double().abs(), weight.abs(), padding=1) / sigma
            + (mu / sigma).abs() * summed
            + bias.abs().view(1, -1, 1, 1)
        )
    error = (torch.from_numpy(out).double() - expected).abs()
    assert (error <= 2 * float32_sum_error(73) * magnitude).all()


def test_load_plain_weights_reproduces_plain_layer() -> None:
    layer = DeconvConv2d(8, 6, 3, padding=1, block=4).double()
    for _ in range(2):
        layer(torch.randn(4, 8, 9, 9, dtype=torch.float64))
    plain = nn.Conv2d(8, 6, 3, padding=1).double()
    layer.load_plain_weights(plain.weight, plain.bias)
    layer.eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert torch.allclose(layer(x), plain(x), atol=1e-10)


@pytest.mark.parametrize("scheme", ["NDPP", "ND"])
def test_converted_resnet_fuses_exactly(scheme: str) -> None:
    # Float64, so that "exactly" means rounding of ~1e-15 through the 20 layers, not float32's.
    model = convert(torchvision.models.resnet18(num_classes=10), scheme).double()
    assert isinstance(model.conv1, DeconvConv2d) and isinstance(model.fc, DeconvLinear)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        model(x + 0.1 * torch.randn_like(x))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        fused = fuse(copy.deepcopy(model))
        got = fused(x)
    assert not any(isinstance(m, (DeconvConv2d, DeconvLinear)) for m in fused.modules())
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_block_that_does_not_divide_falls_back_to_gcd_with_one_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = DeconvConv2d(96, 8, 3, padding=1, block=64)
        layer(torch.randn(2, 96, 6, 6))
        layer(torch.randn(2, 96, 6, 6))
    assert layer.block == 32 and layer.features == 9 * 32
    assert len(caught) == 1 and "gcd" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the code that built the layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DeconvConv2d(3, 8, 3, block=64).block == 3  # fewer channels than a block


def test_non_finite_covariance_names_the_layer() -> None:
    layer = DeconvConv2d(8, 4, 3, padding=1, block=4)
    x = torch.randn(2, 8, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"DeconvConv2d\(8, 4"):
        layer(x)
    with pytest.raises(FloatingPointError, match="DeconvLinear"):
        DeconvLinear(4, 2)(torch.tensor([[1.0, float("inf"), 0.0, 1.0]] * 3))


def test_empty_input_gives_empty_output() -> None:
    conv = DeconvConv2d(8, 6, 3, stride=2, padding=1, block=4, scale_invariance="layernorm")
    x = torch.zeros(0, 8, 9, 9, requires_grad=True)
    out = conv(x)
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) == 0.0
    assert DeconvLinear(16, 3, block=8)(torch.zeros(0, 16)).shape == (0, 3)
    transposed = DeconvConvTranspose2d(8, 6, 2, stride=2, block=4)
    assert transposed(torch.zeros(0, 8, 7, 7)).shape == (0, 6, 14, 14)
    assert int(conv.num_batches_tracked) == 0


def test_running_statistics_momentum() -> None:
    fresh = DeconvConv2d(4, 2, 1, block=4, momentum=0.5).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    fresh(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 4)[::9]
    assert torch.allclose(fresh.running_mean[0], 0.5 * rows.mean(0), rtol=0, atol=1e-15)


# The training steps (the first training forward is step 1) on which the releases estimate
# statistics with freeze=True, read off their code:
# - ND++ (NormalizedDeconv.forward): `self.counter += 1`, then frozen when
#   `self.counter % (self.freeze_iter * 10) > self.freeze_iter`;
# - ICLR 2020 (FastDeconv.forward in yechengxi/deconvolution models/deconv.py): frozen when
#   `self.counter > self.freeze_iter`, then `self.counter += 1; self.counter %= freeze_iter * 10`.
RELEASE_STATISTICS_STEPS = {
    ("ndpp", 1): [1, 10, 11, 20, 21, 30, 31, 40, 41],
    ("ndpp", 2): [1, 2, 20, 21, 22, 40, 41, 42],
    ("iclr2020", 1): [1, 2, 11, 12, 21, 22, 31, 32, 41, 42],
    ("iclr2020", 2): [1, 2, 3, 21, 22, 23, 41, 42, 43],
}


def _statistics_steps(layer: nn.Module, steps: int, shape: tuple[int, ...]) -> list[int]:
    """The training steps (from 1) on which ``layer`` updated its running mean."""
    updated = []
    for step in range(1, steps + 1):
        before = layer.running_mean.clone()
        layer(torch.randn(*shape, dtype=torch.float64))
        if not torch.equal(layer.running_mean, before):
            updated.append(step)
        if step == 5:
            # Neither an eval forward nor an empty batch is a training step.
            layer.eval()
            layer(torch.randn(*shape, dtype=torch.float64))
            layer.train()
            layer(torch.zeros(0, *shape[1:], dtype=torch.float64))
    return updated


@pytest.mark.parametrize(("schedule", "freeze_iter"), sorted(RELEASE_STATISTICS_STEPS))
def test_freeze_schedule_steps_match_the_release(schedule: str, freeze_iter: int) -> None:
    expected = RELEASE_STATISTICS_STEPS[schedule, freeze_iter]
    assert [s for s in range(1, 46) if computes_statistics_at(s, freeze_iter, schedule)] == (
        expected
    )
    layers = [
        (DeconvConv2d(4, 2, 3, padding=1, block=4), (2, 4, 5, 5)),
        (DeconvLinear(8, 3, block=4), (6, 8)),
        (DeconvConvTranspose2d(4, 2, 2, stride=2, block=4), (2, 4, 3, 3)),
    ]
    for layer, shape in layers:
        layer.freeze, layer.freeze_iter, layer.freeze_schedule = True, freeze_iter, schedule
        assert _statistics_steps(layer.double().train(), 45, shape) == expected
    # The step counter is a buffer: a reloaded layer continues the schedule where it stopped.
    layer = DeconvConv2d(4, 2, 1, block=4, freeze=True, freeze_iter=freeze_iter).double()
    layer.freeze_schedule = schedule
    _statistics_steps(layer, 15, (2, 4, 3, 3))
    resumed = DeconvConv2d(4, 2, 1, block=4, freeze=True, freeze_iter=freeze_iter).double()
    resumed.freeze_schedule = schedule
    resumed.load_state_dict(layer.state_dict())
    later = [15 + s for s in _statistics_steps(resumed, 30, (2, 4, 3, 3))]
    assert later == [s for s in expected if s > 15]


def test_a_layer_called_several_times_a_step_mixes_frozen_and_fresh_calls() -> None:
    """A head shared by the FPN levels: within one step a call that reuses the running
    statistics may come before one that updates them; the first call's backward still works
    and sees the statistics as they were when it ran."""
    torch.manual_seed(0)
    layers = [
        (DeconvConv2d(4, 2, 3, padding=1, block=4, freeze=True, freeze_iter=1), (2, 4, 5, 5)),
        (DeconvLinear(8, 3, block=4, freeze=True, freeze_iter=1), (6, 8)),
        (
            DeconvConvTranspose2d(4, 2, 2, stride=2, block=4, freeze=True, freeze_iter=1),
            (2, 4, 3, 3),
        ),
    ]
    for layer, shape in layers:
        layer.double().train()
        for _ in range(12):  # 3 calls a step: steps 10 and 11 of the schedule fall mid-step
            inputs = [torch.randn(shape, dtype=torch.double, requires_grad=True) for _ in range(3)]
            sum(layer(x).square().sum() for x in inputs).backward()
        assert int(layer.num_batches_tracked) == 36


def test_ndpp_schedule_is_the_default_and_a_scheme_option() -> None:
    assert DeconvConv2d(4, 2, 1, freeze=True).freeze_schedule == "ndpp"
    for name in ("ND", "NDPP"):
        default = get_scheme(f"{name}(freeze=True, freeze_iter=1)")
        assert default.conv(8, 4, 3).freeze_schedule == "ndpp"
        iclr = get_scheme(f"{name}(freeze=True, freeze_iter=1, freeze_schedule='iclr2020')")
        for layer in (iclr.conv(8, 4, 3), iclr.linear(8, 4), iclr.conv_transpose(8, 4, 2)):
            assert layer.freeze and layer.freeze_iter == 1
            assert layer.freeze_schedule == "iclr2020"
    with pytest.raises(ValueError, match=r"DeconvConv2d: freeze_schedule.*'ndpp'.*'iclr'"):
        DeconvConv2d(4, 2, 1, freeze=True, freeze_schedule="iclr")
    with pytest.raises(ValueError, match="freeze_schedule"):
        computes_statistics_at(1, 1, "authors")


def test_invalid_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="scale_invariance"):
        DeconvConv2d(4, 4, 3, scale_invariance="batchnorm")
    with pytest.raises(ValueError, match="block"):
        DeconvLinear(4, 4, block=0)
    with pytest.raises(ValueError, match="isqrt_backend"):
        DeconvConv2d(4, 4, 3, isqrt_backend="eig")


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (20, 3, 4, 4), (3, 40)])
def test_inference_standardization_fast_path_matches_plain_operations(shape):
    """The fused layer's eager pre-hook (no autograd) equals the exportable plain formula."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3.0 + 50.0
    expected_flat = x.reshape(shape[0], -1)
    expected = (expected_flat - expected_flat.mean(1, keepdim=True)) / (
        expected_flat.std(1, keepdim=True) + 1e-5
    )
    with torch.inference_mode():
        fast = deconv_module._standardize_for_inference(x, "layernorm", 1e-5)
    with torch.enable_grad():
        tracked = deconv_module._standardize_for_inference(
            x.clone().requires_grad_(), "layernorm", 1e-5
        )
    assert torch.allclose(fast, expected.view(shape), rtol=0, atol=1e-12)
    assert torch.allclose(tracked, expected.view(shape), rtol=0, atol=1e-12)
    assert tracked.requires_grad  # the autograd path still differentiates
