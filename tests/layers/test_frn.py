"""FilterResponseNorm2d against the paper's equations (Singh & Krishnan, CVPR 2020)."""

import pytest
import torch

import norm_det.layers.row_blocks as row_blocks
from norm_det.layers.frn import FilterResponseNorm2d
from norm_det.layers.protocol import no_weight_decay_parameters

# Rows of 12 elements: 13 puts one row in a block, 40 three (the last block short), the default
# everything; the layer must compute the same in all.
BLOCK_SIZES = [13, 40, row_blocks.CPU_BLOCK_NUMEL]


def paper_frn(x, gamma, beta, tau, eps):
    """Section 3 of the paper, in float64: nu^2 = mean over H x W of x^2, then the TLU."""
    nu2 = (x * x).sum(dim=(2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
    y = gamma.view(1, -1, 1, 1) * (x / torch.sqrt(nu2 + eps)) + beta.view(1, -1, 1, 1)
    if tau is None:
        return y
    return torch.where(y > tau.view(1, -1, 1, 1), y, tau.view(1, -1, 1, 1).expand_as(y))


def random_layer(channels=5, **kwargs):
    layer = FilterResponseNorm2d(channels, **kwargs).double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()
    return layer


@pytest.fixture(params=BLOCK_SIZES, ids=lambda b: f"block{b}")
def block_numel(request, monkeypatch):
    monkeypatch.setattr(row_blocks, "CPU_BLOCK_NUMEL", request.param)
    return request.param


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_output_is_the_papers_formula(block_numel, activation, learnable_eps):
    torch.manual_seed(0)
    layer = random_layer(activation=activation, learnable_eps=learnable_eps)
    x = torch.randn(3, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    eps = 1e-6 + layer.learned_eps.detach().abs() if learnable_eps else 1e-6
    tau = layer.tau.detach() if activation else None
    expected = paper_frn(x.detach(), layer.weight.detach(), layer.bias.detach(), tau, eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)
    with torch.no_grad():  # the forward alone, nothing kept for a backward
        torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_gradcheck(block_numel, activation, learnable_eps):
    torch.manual_seed(1)
    layer = random_layer(activation=activation, learnable_eps=learnable_eps)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params))


def test_parameter_gradients_without_an_input_gradient():
    torch.manual_seed(2)
    layer = random_layer(learnable_eps=True)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    layer(x).square().sum().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    for p in layer.parameters():
        p.grad = None
    eps = 1e-6 + layer.learned_eps.abs()
    paper_frn(x, layer.weight, layer.bias, layer.tau, eps).square().sum().backward()
    for mine, expected in zip(got, (p.grad for p in layer.parameters())):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-12)


def test_parameters_start_as_the_paper_says_and_take_no_weight_decay():
    layer = FilterResponseNorm2d(4, learnable_eps=True)
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))
    assert torch.equal(layer.tau, torch.zeros(4))
    assert layer.learned_eps.shape == () and layer.learned_eps.item() == pytest.approx(1e-4)
    assert layer.effective_eps().item() == pytest.approx(1e-6 + 1e-4)
    assert no_weight_decay_parameters(layer) == {"weight", "bias", "tau", "learned_eps"}
    plain = FilterResponseNorm2d(4, activation=False)
    assert [name for name, _ in plain.named_parameters()] == ["weight", "bias"]
    assert no_weight_decay_parameters(plain) == {"weight", "bias"}
    assert list(plain.buffers()) == []


def test_the_learned_eps_never_falls_below_the_bound():
    layer = FilterResponseNorm2d(2, eps=1e-3, learnable_eps=True)
    with torch.no_grad():
        layer.learned_eps.fill_(-0.5)  # its sign is irrelevant: |eps_l|
    assert layer.effective_eps().item() == pytest.approx(1e-3 + 0.5)
    x = torch.zeros(1, 2, 2, 2)
    assert torch.equal(layer(x), torch.zeros_like(x))  # x = 0: no division by zero


def test_same_function_in_training_and_eval():
    torch.manual_seed(3)
    layer = random_layer()
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    trained = layer.train()(x)
    assert torch.equal(layer.eval()(x), trained)


def test_a_samples_output_does_not_depend_on_the_other_samples():
    torch.manual_seed(4)
    layer = random_layer()
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    alone = layer(x[:1])
    other = torch.cat([x[:1], 100 * torch.randn(3, 5, 3, 3, dtype=torch.float64)])
    torch.testing.assert_close(layer(other)[:1], alone, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer(x)[:1], alone, rtol=1e-14, atol=1e-14)


def test_it_does_not_fold():
    assert FilterResponseNorm2d(3).folded_affine() is None
    assert not hasattr(FilterResponseNorm2d(3), "fuse")


def test_state_dict_round_trip():
    torch.manual_seed(5)
    layer = random_layer(learnable_eps=True)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "tau", "learned_eps"}
    copy = FilterResponseNorm2d(5, learnable_eps=True).double()
    copy.load_state_dict(state)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    assert torch.equal(copy(x), layer(x))


def test_low_precision_input_keeps_its_dtype():
    torch.manual_seed(6)
    layer = FilterResponseNorm2d(4)
    x = 30 * torch.randn(2, 4, 16, 16)  # nu^2 ~ 900: sum(x^2) ~ 2e5 would overflow fp16
    expected = layer(x)
    for dtype in (torch.bfloat16, torch.float16):
        out = layer(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_traced_module_computes_the_same():
    torch.manual_seed(7)
    layer = random_layer()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x), rtol=1e-13, atol=1e-13)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"FilterResponseNorm2d: eps must be > 0; got 0"):
        FilterResponseNorm2d(4, eps=0)
    with pytest.raises(ValueError, match=r"num_channels must be an integer >= 1; got 0"):
        FilterResponseNorm2d(0)
    with pytest.raises(ValueError, match=r"expected \(N, 4, H, W\) input; got \(2, 3, 5, 5\)"):
        FilterResponseNorm2d(4)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"expected \(N, 4, H, W\) input; got \(2, 4\)"):
        FilterResponseNorm2d(4)(torch.randn(2, 4))


def test_empty_batch():
    layer = FilterResponseNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_an_in_place_relu_may_follow_frn_without_tlu() -> None:
    """A model whose forward applies its own in-place ReLU after the norm (torchvision's)."""
    torch.manual_seed(0)
    layer = FilterResponseNorm2d(4, activation=False).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.relu_(layer(x)).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    nu2 = reference.square().mean(dim=(2, 3), keepdim=True)
    torch.relu(reference * torch.rsqrt(nu2 + layer.eps)).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
