"""CZMConv2d, MultiplicativeNoise and the CZMIG properties of the Mean Shift Rejection paper, §3."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from norm_det.layers import (
    CZMConv2d,
    MultiplicativeNoise,
    czm_conv2d,
    czm_param_groups,
    no_weight_decay_parameters,
)
from tests.model_utils import U64, two_conv_bound


def _spatial_means(v: torch.Tensor) -> torch.Tensor:
    return v.detach().mean(dim=(-2, -1))


def _filter_norms(v: torch.Tensor) -> torch.Tensor:
    return v.detach().flatten(1).norm(dim=1)


def _interior_mask(conv: nn.Conv2d, height: int, width: int) -> torch.Tensor:
    """Output positions whose receptive field lies entirely inside the (unpadded) input."""
    ones = torch.ones(1, 1, height, width, dtype=torch.float64)
    kernel = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64)
    covered = F.conv2d(ones, kernel, None, conv.stride, conv.padding, conv.dilation)
    return covered[0, 0] == kernel.numel()


# In float64, for filters of at most 36 elements whose norm before scaling exceeds 1: V's elements,
# slice means (9-term sums) and filter norms are within 40 u of exact arithmetic, in any order.
CZM_INIT_ERROR = 40 * U64


def test_initialisation_is_section_3_2():
    conv = CZMConv2d(6, 10, 3, padding=1, groups=2, dtype=torch.float64)
    torch.manual_seed(5)
    conv.reset_parameters()
    torch.manual_seed(5)
    sample = torch.empty(10, 3, 3, 3, dtype=torch.float64).uniform_(-1, 1)
    sample = sample - sample.mean(dim=(-2, -1), keepdim=True)
    norms = sample.flatten(1).norm(dim=1)
    assert norms.min() > 1  # so that dividing by the norm does not magnify the mean's rounding
    expected = sample / norms.view(-1, 1, 1, 1)
    assert torch.allclose(conv.v, expected, rtol=0, atol=CZM_INIT_ERROR)
    assert _spatial_means(conv.v).abs().max() < CZM_INIT_ERROR
    assert torch.allclose(
        _filter_norms(conv.v), torch.ones(10).double(), rtol=0, atol=CZM_INIT_ERROR
    )
    assert torch.allclose(conv.g.exp(), torch.full((10,), 0.8).double())
    assert torch.equal(conv.bias, torch.zeros(10).double())
    assert {name for name, _ in conv.named_parameters()} == {"v", "g", "bias"}


def test_forward_is_conv_with_exp_g_times_v_in_float64():
    conv = CZMConv2d(4, 7, (3, 5), stride=2, padding=(1, 2), dilation=1, dtype=torch.float64)
    with torch.no_grad():
        conv.g.uniform_(-1.0, 1.0)
        conv.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    w = conv.g.detach().exp().view(-1, 1, 1, 1) * conv.v.detach()
    expected = F.conv2d(x, w, conv.bias.detach(), 2, (1, 2))
    # exp and the product: 2 roundings of each weight on either side.
    bound = two_conv_bound(w, conv.bias, x, weight_roundings=4)
    assert (conv(x) - expected).abs().max() <= bound
    # `weight` reads the effective weight, as code written for nn.Conv2d expects.
    assert torch.allclose(conv.weight, w, rtol=4 * U64, atol=0)


@pytest.mark.parametrize(
    "geometry",
    [dict(padding=1), dict(stride=2, padding=1), dict(dilation=2, padding=2), dict(groups=3)],
)
def test_constant_added_to_an_input_channel_leaves_interior_output_unchanged(geometry):
    conv = CZMConv2d(6, 9, 3, **geometry, dtype=torch.float64)
    with torch.no_grad():
        conv.g.uniform_(0.0, 1.0)  # e^g up to e: immunity must not depend on the scale
    x = torch.randn(2, 6, 13, 13, dtype=torch.float64)
    shifted = x.clone()
    shifted[:, 2] += 7.5
    mask = _interior_mask(conv, 13, 13)
    with torch.no_grad():
        change = (conv(shifted) - conv(x))[..., mask]
        plain = nn.Conv2d(6, 9, 3, **geometry, dtype=torch.float64)
        plain_change = (plain(shifted) - plain(x))[..., mask]
    assert mask.sum() > 0
    # Exactly 0 on the isocline; what remains is the two convolutions' rounding and the shift
    # times a slice's sum, 9 spatial means of at most CZM_INIT_ERROR each (scaled by e^g).
    residual = 7.5 * 9 * CZM_INIT_ERROR * conv.g.detach().exp().max()
    rounding = two_conv_bound(conv.weight, conv.bias, torch.cat([x, shifted]))
    assert change.abs().max() <= rounding + residual
    assert plain_change.abs().max() > 0.1  # a plain conv does see the shift


def _train(conv: nn.Module, steps: int, lr: float, momentum: float = 0.9, weight_decay=0.0):
    """Plain SGD (CZMG and LUMA act at its steps), fitting a teacher conv with unit-norm filters."""
    generator = torch.Generator().manual_seed(1)
    dtype = conv.v.dtype
    x = torch.randn(8, conv.in_channels, 9, 9, generator=generator, dtype=dtype)
    teacher = torch.randn(
        conv.out_channels, conv.in_channels, 3, 3, generator=generator, dtype=dtype
    )
    target = F.conv2d(x, teacher / _filter_norms(teacher).view(-1, 1, 1, 1), padding=1)
    model = nn.Sequential(conv)
    optimizer = torch.optim.SGD(czm_param_groups(model, weight_decay), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        task = F.mse_loss(model(x), target)
        task.backward()
        optimizer.step()
        losses.append(task.item())
    return losses


def test_zmg_one_keeps_every_slice_zero_mean_during_sgd():
    conv = CZMConv2d(5, 6, 3, padding=1, zmg=1.0, dtype=torch.float64)
    correct_gradient = conv.correct_gradient
    sizes = []  # (max|V|, max|grad V| before CZMG, after it) at each step

    def recording_correct_gradient():
        # The step pre-hook calls it on the step's complete gradient, LUMA's term included.
        before = (conv.v.detach().abs().max(), conv.v.grad.abs().max())
        correct_gradient()
        sizes.append((*before, conv.v.grad.abs().max()))

    conv.correct_gradient = recording_correct_gradient
    lr = 0.1
    losses = _train(conv, steps=30, lr=lr)
    assert len(sizes) == 30  # CZMG once per optimizer step
    assert losses[-1] < 0.95 * losses[0]  # it does learn
    # In exact arithmetic the slice means of V keep their start (<= CZM_INIT_ERROR); rounding adds,
    # per step (r: the gradient CZMG gets, p = r - m what it gives, m the 9-term slice mean):
    # - p's slice means are 9 u max|r| (m's error) + u max|p| (the subtraction) off zero;
    # - the momentum buffer b = 0.9 b' + p rounds by u (0.9 max|b'| + max|b|), and
    #   max|b| <= sum_k 0.9^k max|p_k|, so by 20 u sum max|p| over the run;
    # - what enters the buffer moves V by lr / (1 - 0.9) = 10 lr times it over the later steps:
    #   10 lr (9 u max|r| + u max|p|) + 200 u lr max|p|;
    # - V - lr b rounds by u lr max|b| + u max|V - lr b|: u max|V| + 20 u lr max|p| summed.
    # Reading the final means errs by 9 u max|V|.
    drift = sum(U64 * v + lr * U64 * (90 * r + 230 * p) for v, r, p in sizes).item()
    reading = 9 * U64 * conv.v.abs().max().item()
    assert _spatial_means(conv.v).abs().max() <= CZM_INIT_ERROR + drift + reading
    # Without the gradient modification the same run leaves the isocline.
    free = CZMConv2d(5, 6, 3, padding=1, zmg=0.0, dtype=torch.float64)
    _train(free, steps=30, lr=0.1)
    assert _spatial_means(free.v).abs().max() > 1e-3


def test_zmg_shrinks_the_update_normal_to_the_isocline_by_the_papers_factor():
    # Section 3.3: z = 0.85 "reduces by 6.6x the gradient component normal to the CZM
    # isocline". The isocline {V : every slice has zero spatial mean} is a linear subspace; the
    # normal part of a tensor is its spatial mean broadcast over the slice.
    conv = CZMConv2d(4, 5, 3, padding=1, zmg=0.85, luma=0.0).double()
    with torch.no_grad():
        conv.v.add_(torch.randn_like(conv.v) * 0.1)  # off the isocline: must not matter
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    (conv(x) * torch.randn(3, 5, 8, 8, dtype=torch.float64)).sum().backward()
    raw = conv.v.grad.clone()
    before = conv.v.detach().clone()
    torch.optim.SGD([conv.v], lr=0.5).step()  # CZMG acts at the step
    update, raw_update = conv.v.detach() - before, -0.5 * raw

    def normal(t):
        return t.mean(dim=(-2, -1), keepdim=True).expand_as(t)

    ratio = normal(raw_update).norm() / normal(update).norm()
    assert ratio.item() == pytest.approx(1.0 / (1.0 - 0.85), rel=1e-9)
    assert math.floor(ratio.item() * 10) / 10 == 6.6
    # The component along the isocline is untouched.
    assert torch.allclose(update - normal(update), raw_update - normal(raw_update), atol=1e-12)


def test_correct_gradient_is_the_section_3_3_formula_and_skips_missing_gradients():
    conv = CZMConv2d(3, 4, 3, zmg=0.9, dtype=torch.float64)
    conv.correct_gradient()  # no gradient yet: nothing to do
    assert conv.v.grad is None
    grad = torch.randn_like(conv.v)
    conv.v.grad = grad.clone()
    conv.correct_gradient()
    expected = grad - 0.9 * grad.mean(dim=(-2, -1), keepdim=True)
    # Either side: a 9-term mean (9 u) and a scaled subtraction (2 u) of terms <= max|grad|.
    assert torch.allclose(conv.v.grad, expected, rtol=0, atol=24 * U64 * grad.abs().max().item())


def test_luma_loss_value_gradient_and_key():
    first = CZMConv2d(3, 4, 3, luma=5e-4, dtype=torch.float64)
    second = CZMConv2d(4, 2, 3, luma=1e-3, dtype=torch.float64)
    with torch.no_grad():
        first.v.mul_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(-1, 1, 1, 1))
    loss = first.luma_loss() + second.luma_loss()
    expected = 5e-4 * ((0.5 - 1) ** 2 + 0 + 1 + 4)  # second's filters start at unit norm
    # A norm ||V|| <= 3 errs by 40 u ||V||, each (||V|| - 1)^2 (|.| >= 0.5) by 2 * 120 u / 0.5.
    assert loss.item() == pytest.approx(expected, rel=500 * U64)
    loss.backward()
    norms = _filter_norms(first.v).view(-1, 1, 1, 1)
    # d/dV lambda (||V|| - 1)^2 = 2 lambda (||V|| - 1) V / ||V||
    analytic = 2 * 5e-4 * (norms - 1) * first.v.detach() / norms
    # The two (||V|| - 1) differ by <= 2 * 120 u, the rest (<= 2 of V / ||V||, itself <= 1) by
    # 8 u of it: 2 lambda (240 + 16) u.
    atol = 2 * 5e-4 * 256 * U64
    assert torch.allclose(first.v.grad, analytic, rtol=0, atol=atol)
    # At a step the layer logs the value it applied under its key; lr = 0 keeps V as it was.
    torch.optim.SGD(first.parameters(), lr=0.0).step()
    assert set(first.step_losses) == {"loss_luma"}
    assert torch.equal(first.step_losses["loss_luma"], first.luma_loss().detach())
    assert CZMConv2d(3, 4, 3, luma=0.0).luma_loss() is None
    assert CZMConv2d(3, 4, 3).requires_grad_(False).luma_loss() is None  # a frozen stage


def test_luma_keeps_filter_norms_near_one_while_l2_decay_shrinks_them():
    anchored = CZMConv2d(5, 6, 3, padding=1, luma=0.05)
    losses = _train(anchored, steps=150, lr=0.05)
    assert losses[-1] < 0.01 * losses[0]
    assert (_filter_norms(anchored.v) - 1).abs().max() < 0.05
    # Plain L2 weight decay of the same strength on V (the optimizer's decayed group) deflates
    # the filters; with no regularization at all they inflate (section 1 of the paper).
    decayed = CZMConv2d(5, 6, 3, padding=1, luma=0.0)
    decayed._no_weight_decay = ("g", "bias")
    _train(decayed, steps=150, lr=0.05, weight_decay=0.05)
    assert _filter_norms(decayed.v).max() < 0.6
    free = CZMConv2d(5, 6, 3, padding=1, luma=0.0)
    _train(free, steps=150, lr=0.05)
    assert _filter_norms(free.v).min() > 1.1


def test_load_plain_weights_is_exact_and_normalises_v():
    plain = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        plain.weight[2].zero_()  # an all-zero filter must stay finite
    conv = CZMConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    conv.load_plain_weights(plain.weight.detach(), plain.bias.detach())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expected_scale = _filter_norms(plain.weight)
    nonzero = expected_scale > 0
    assert expected_scale[nonzero].min() > math.exp(-2)  # |log ||W||| < 2 below
    # e^g * V = exp(log ||W||) * (W / ||W||) errs relatively by 37 u (the 36-term norm) + u (the
    # division) + (|log ||W||| + 3) u (log, exp) + u (the product) < 44 u.
    with torch.no_grad():
        bound = two_conv_bound(plain.weight, plain.bias, x, weight_roundings=44)
        assert (conv(x) - plain(x)).abs().max() <= bound
    assert torch.allclose(
        _filter_norms(conv.v), torch.ones(6).double(), rtol=0, atol=CZM_INIT_ERROR
    )
    # Two 36-term norms (37 u each) and exp(log(.)) (5 u).
    rtol = (2 * 37 + 5) * U64
    assert torch.allclose(conv.g.exp()[nonzero], expected_scale[nonzero], rtol=rtol, atol=0)
    assert torch.isfinite(conv.g).all() and conv.g.exp()[2] < 1e-30
    conv.load_plain_weights(plain.weight.detach(), None)
    assert torch.equal(conv.bias, torch.zeros(6).double())


def test_fuse_gives_a_plain_conv_with_identical_outputs():
    conv = CZMConv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect", dtype=torch.float64)
    with torch.no_grad():
        conv.g.uniform_(-1.0, 1.0)
        conv.bias.uniform_(-1.0, 1.0)
    fused = conv.fuse()
    assert type(fused) is nn.Conv2d and fused.weight.dtype == torch.float64
    assert fused.padding_mode == "reflect" and fused.stride == (2, 2)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        # The fused weight is e^g * V computed as the layer computes it; only the sums differ.
        assert (fused(x) - conv(x)).abs().max() <= two_conv_bound(conv.weight, conv.bias, x)


def test_conv_factory_keeps_1x1_plain_and_the_class_refuses_it():
    assert type(czm_conv2d(4, 8, 1, bias=False)) is nn.Conv2d
    assert type(czm_conv2d(4, 8, (1, 1))) is nn.Conv2d
    spatial = czm_conv2d(4, 8, (3, 1), padding=(1, 0), zmg=1.0, luma=0.0)
    assert type(spatial) is CZMConv2d and spatial.zmg == 1.0 and spatial.luma == 0.0
    with pytest.raises(ValueError, match="1x1"):
        CZMConv2d(4, 8, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(zmg=1.5), "zmg"), (dict(luma=-1e-4), "luma"), (dict(init_scale=0.0), "init_scale")],
)
def test_invalid_options_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CZMConv2d(3, 3, 3, **kwargs)


def test_no_weight_decay_and_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CZMConv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
    assert no_weight_decay_parameters(model) == {"1.v", "1.g", "1.bias"}
    decayed, undecayed = czm_param_groups(model, weight_decay=5e-4)
    assert decayed["weight_decay"] == 5e-4 and undecayed["weight_decay"] == 0.0
    assert {id(p) for p in undecayed["params"]} == {id(p) for p in model[1].parameters()}
    assert len(decayed["params"]) == 4  # the plain convs' weights and biases


def test_state_dict_dtype_and_deepcopy_round_trip():
    conv = CZMConv2d(3, 4, 3, dtype=torch.float64)
    assert conv.v.dtype == torch.float64 and conv.g.dtype == torch.float64
    copied = copy.deepcopy(conv)
    other = CZMConv2d(3, 4, 3, dtype=torch.float64)
    other.load_state_dict(copied.state_dict())
    assert set(conv.state_dict()) == {"v", "g", "bias"}
    assert torch.equal(other.v, conv.v) and torch.equal(other.g, conv.g)


def test_multiplicative_noise_is_uniform_in_training_and_identity_in_eval():
    noise = MultiplicativeNoise(amplitude=0.1)
    x = torch.full((64, 16, 10, 10), 2.0)
    factor = noise(x) / x
    assert factor.min() >= 0.9 and factor.max() <= 1.1
    assert factor.mean().item() == pytest.approx(1.0, abs=2e-3)
    # U(1 - a, 1 + a) has standard deviation a / sqrt(3).
    assert factor.std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.02)
    noise.eval()
    assert noise(x) is x
    assert type(noise.fuse()) is nn.Identity
    with pytest.raises(ValueError, match="noise amplitude"):
        MultiplicativeNoise(amplitude=1.0)
