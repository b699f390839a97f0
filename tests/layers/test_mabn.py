"""MABN against the paper's forward and backward equations (Yan et al., ICLR 2020, sec. 4) in
float64, and its centred convolution."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from norm_det.engine.precise_statistics import layers_with_running_statistics
from norm_det.layers.mabn import CenteredConv2d, MovingAverageBatchNorm2d
from norm_det.surgery import fuse

EPS = 1e-5


def make_layer(**kwargs) -> MovingAverageBatchNorm2d:
    layer = MovingAverageBatchNorm2d(3, eps=EPS, **kwargs).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


class PaperMABN:
    """Sections 4.1-4.2 written out per iteration: SMA of chi over the last m iterations in the
    forward, EMA of Psi in the backward, no mean; with the release's renormalization r."""

    def __init__(self, m: int, warmup: int, momentum: float, alpha: float, clip, renorm_after):
        self.m, self.warmup, self.momentum, self.alpha = m, warmup, momentum, alpha
        self.clip, self.renorm_after = clip, renorm_after
        self.chis: list[torch.Tensor] = []
        self.running = torch.ones(3, dtype=torch.float64)
        self.psi_bar = None
        self.t = 0

    def forward(self, x, gamma, beta):
        """Returns ``(y, saved)``; ``saved`` is what the backward needs."""
        self.t += 1
        chi = (x * x).mean(dim=(0, 2, 3))
        self.chis.append(chi)
        moving = self.t > self.warmup and self.t >= self.m
        chi_bar = torch.stack(self.chis[-self.m :]).mean(dim=0) if moving else chi
        r = torch.ones(3, dtype=torch.float64)
        if self.clip is not None and self.t > self.renorm_after:
            r = torch.sqrt((chi_bar + EPS) / (self.running + EPS)).clamp(1 / self.clip, self.clip)
        self.running = (1 - self.momentum) * self.running + self.momentum * chi
        z = x / torch.sqrt(chi_bar + EPS).view(1, -1, 1, 1)
        x_hat = r.view(1, -1, 1, 1) * z
        y = gamma.view(1, -1, 1, 1) * x_hat + beta.view(1, -1, 1, 1)
        return y, (z, x_hat, chi_bar, r, moving)

    def backward(self, grad_y, gamma, saved):
        """``(dL/dx, dL/dgamma, dL/dbeta)``: dL/dx = (r g - z Psi_bar) / sqrt(chi_bar + eps)."""
        z, x_hat, chi_bar, r, moving = saved
        g = grad_y * gamma.view(1, -1, 1, 1)
        rg = r.view(1, -1, 1, 1) * g
        psi = (rg * z).mean(dim=(0, 2, 3))
        if self.psi_bar is None:
            self.psi_bar = psi
        else:
            self.psi_bar = (1 - self.alpha) * self.psi_bar + self.alpha * psi
        psi_used = self.psi_bar if moving else psi
        grad_x = (rg - z * psi_used.view(1, -1, 1, 1)) / torch.sqrt(chi_bar + EPS).view(1, -1, 1, 1)
        return grad_x, (grad_y * x_hat).sum(dim=(0, 2, 3)), grad_y.sum(dim=(0, 2, 3))


def test_forward_and_backward_match_the_paper_over_iterations() -> None:
    torch.manual_seed(0)
    options = {"buffer_size": 3, "warmup_iters": 2, "renorm_clip": 1.5, "renorm_warmup_iters": 4}
    layer = make_layer(momentum=0.2, backward_momentum=0.3, **options)
    paper = PaperMABN(3, 2, 0.2, 0.3, 1.5, 4)
    clipped = averaged = False
    for it in range(10):
        # Scales that drift make r leave 1 and hit its clip.
        x = (torch.randn(2, 3, 4, 4, dtype=torch.float64) * (1 + 0.4 * it)).requires_grad_()
        gamma, beta = layer.weight.detach(), layer.bias.detach()
        out = layer(x)
        want, saved = paper.forward(x.detach(), gamma, beta)
        assert torch.allclose(out, want, atol=1e-12), it
        assert torch.allclose(layer.running_var, paper.running, atol=1e-12), it
        grad_y = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, layer.weight, layer.bias], grad_y)
        expected = paper.backward(grad_y, gamma, saved)
        for g, w in zip(got, expected):
            assert torch.allclose(g, w, atol=1e-10), it
        assert torch.allclose(layer.psi_average, paper.psi_bar, atol=1e-12)
        clipped |= bool((saved[3] == 1.5).any() or (saved[3] == 1 / 1.5).any())
        averaged |= saved[4]
    assert clipped and averaged


def test_gradient_is_exact_without_moving_averages() -> None:
    """Buffer size 1 and no EMA in the backward (momentum 1), or warm-up: the backward is the
    derivative of y = gamma x / sqrt(E[x^2] + eps) + beta."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    for options in (
        {"buffer_size": 1, "warmup_iters": 0, "backward_momentum": 1.0},
        {"buffer_size": 4, "warmup_iters": 10**9},
    ):
        layer = make_layer(renorm_clip=None, **options)
        params = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}
        params = {k: v.requires_grad_() for k, v in params.items()}

        def normalize(x, weight, bias, layer=layer):
            return functional_call(layer, {"weight": weight, "bias": bias}, (x,))

        assert torch.autograd.gradcheck(normalize, (x, params["weight"], params["bias"]))
        out = normalize(x, params["weight"], params["bias"])
        direct = x / torch.sqrt((x * x).mean(dim=(0, 2, 3), keepdim=True) + EPS)
        direct = direct * params["weight"].view(1, -1, 1, 1) + params["bias"].view(1, -1, 1, 1)
        assert torch.allclose(out, direct, atol=1e-12)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, x, grad)[0]
        assert torch.allclose(got, torch.autograd.grad(direct, x, grad)[0], atol=1e-12)


def test_eval_is_the_running_second_moment_affine_and_folds() -> None:
    torch.manual_seed(2)
    conv = CenteredConv2d(2, 3, 3, padding=1, bias=False).double()
    layer = make_layer(buffer_size=2, warmup_iters=1)
    for _ in range(4):
        layer(conv(torch.randn(2, 2, 5, 5, dtype=torch.float64))).sum().backward()
    model = nn.Sequential(conv, layer).eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y = conv(x)
    out = model(x)
    want = y / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + EPS)
    want = want * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, want, atol=1e-12)
    scale, shift = layer.folded_affine()
    assert torch.allclose(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), out, atol=1e-12)
    bn = layer.fuse()
    assert type(bn) is nn.BatchNorm2d and not bn.training
    assert torch.allclose(bn(y), out, atol=1e-12)
    fused = fuse(copy.deepcopy(model))
    assert [type(m) for m in fused.modules() if not isinstance(m, nn.Sequential)] in (
        [nn.Conv2d, nn.Identity],
        [nn.Conv2d],
    )
    assert torch.allclose(fused(x), out, atol=1e-10)


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(3)
    layer = make_layer(buffer_size=3, warmup_iters=1, renorm_warmup_iters=2)
    for _ in range(4):
        layer(torch.randn(2, 3, 4, 4, dtype=torch.float64)).square().sum().backward()
    resumed = make_layer(buffer_size=3, warmup_iters=1, renorm_warmup_iters=2)
    resumed.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "running_var",
        "chi_history",
        "psi_average",
        "num_batches_tracked",
        "num_backward_tracked",
    }
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    a, b = layer(x), resumed(x)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0])


def test_no_grad_training_forward_and_empty_batches() -> None:
    layer = make_layer(buffer_size=2)
    with torch.no_grad():
        layer(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 1
    assert int(layer.num_backward_tracked) == 0
    out = layer(torch.randn(0, 3, 4, 4, dtype=torch.float64))
    assert out.shape == (0, 3, 4, 4)
    assert int(layer.num_batches_tracked) == 1


def test_precise_statistics_find_the_running_second_moment() -> None:
    layer = make_layer()
    assert layers_with_running_statistics(nn.Sequential(layer)) == [(layer, ("running_var",))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buffer_size": 0}, "buffer_size must be an integer >= 1; got 0"),
        ({"warmup_iters": -1}, "warmup_iters must be an integer >= 0; got -1"),
        ({"renorm_warmup_iters": 1.5}, "renorm_warmup_iters must be an integer >= 0; got 1.5"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\]; got -0.1"),
        ({"backward_momentum": 2}, r"backward_momentum must be in \[0, 1\]; got 2"),
        ({"renorm_clip": 0.5}, "renorm_clip must be >= 1 or None; got 0.5"),
        ({"eps": 0}, "eps must be > 0; got 0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MovingAverageBatchNorm2d(3, **kwargs)


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\) input; got \(2, 3\)"):
        make_layer()(torch.randn(2, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# CenteredConv2d


def test_centered_conv_uses_zero_mean_filters() -> None:
    torch.manual_seed(4)
    conv = CenteredConv2d(4, 6, 3, padding=1, groups=2, bias=True).double()
    weight = conv.centered_weight()
    assert torch.allclose(weight.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    by_hand = conv.weight - conv.weight.flatten(1).mean(dim=1).view(-1, 1, 1, 1)
    want = F.conv2d(x, by_hand, conv.bias, padding=1, groups=2)
    assert torch.allclose(conv(x), want, atol=1e-12)
    fused = conv.fuse()
    assert type(fused) is nn.Conv2d
    assert torch.allclose(fused(x), want, atol=1e-12)
    assert torch.allclose(fused.weight.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64))
    # The gradient of the centring: the raw weight's gradient has zero mean per filter too.
    conv(x).square().sum().backward()
    assert torch.allclose(conv.weight.grad.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64))


def test_centered_conv_loads_plain_weights() -> None:
    torch.manual_seed(5)
    plain = nn.Conv2d(2, 3, 3, bias=True).double()
    with torch.no_grad():
        plain.weight.sub_(plain.weight.mean(dim=(1, 2, 3), keepdim=True))
    conv = CenteredConv2d(2, 3, 3, bias=True).double()
    conv.load_plain_weights(plain.weight, plain.bias)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert torch.allclose(conv(x), plain(x), atol=1e-12)
    with pytest.raises(
        ValueError, match=r"weight of shape \(3, 2, 1, 1\); expected \(3, 2, 3, 3\)"
    ):
        conv.load_plain_weights(torch.zeros(3, 2, 1, 1), None)
    no_bias = CenteredConv2d(2, 3, 3, bias=False)
    with pytest.raises(ValueError, match=r"bias of shape \(3,\); this layer has no bias"):
        no_bias.load_plain_weights(torch.zeros(3, 2, 3, 3), torch.zeros(3))
