"""Cross-iteration BN against the paper's formulas (Yao et al., CVPR 2021, eq. 4-8) in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from norm_det.engine.precise_statistics import layers_with_running_statistics
from norm_det.layers.cbn import CrossIterationBatchNorm2d
from norm_det.layers.weight_std import WSConv2d
from norm_det.surgery import fuse

EPS = 1e-5


def paired(
    in_channels: int = 2, channels: int = 3, *, window: int = 3, burnin: int = 0, conv_cls=None
) -> tuple[nn.Conv2d, CrossIterationBatchNorm2d]:
    conv = (conv_cls or nn.Conv2d)(in_channels, channels, 3, padding=1, bias=False).double()
    norm = CrossIterationBatchNorm2d(channels, window=window, burnin=burnin, eps=EPS).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    norm.pair_with(conv)
    return conv, norm


def statistics_by_unfold(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(mu, nu, dmu/dW, dnu/dW, W)`` of a 3x3 padding-1 convolution without bias, the
    gradients written out: ``dmu_c/dW_c = E[patch]``, ``dnu_c/dW_c = 2 E[y_c patch]``."""
    with torch.no_grad():
        patches = F.unfold(x, 3, padding=1)  # (N, C_in*9, L)
        y = F.conv2d(x, weight, padding=1).flatten(2)  # (N, C, L)
        count = y.shape[0] * y.shape[2]
        mu = y.mean(dim=(0, 2))
        nu = (y * y).mean(dim=(0, 2))
        grad_mu = patches.mean(dim=(0, 2)).expand(weight.shape[0], -1)
        grad_nu = 2 * torch.einsum("ncl,ndl->cd", y, patches) / count
    return mu, nu, grad_mu, grad_nu, weight.detach().flatten(1).clone()


def paper_normalization(
    y: torch.Tensor, past: list, weight_now: torch.Tensor, norm: CrossIterationBatchNorm2d
) -> torch.Tensor:
    """Eq. 4-8: the past statistics moved to ``weight_now`` by their Taylor term, pooled with
    ``max(nu, mu^2)``, and the current ones, through which alone gradients flow."""
    means = [y.mean(dim=(0, 2, 3))]
    second = [(y * y).mean(dim=(0, 2, 3))]
    step_now = weight_now.detach().flatten(1)
    for mu, nu, grad_mu, grad_nu, weight_then in past:
        step = step_now - weight_then
        mu_now = mu + (grad_mu * step).sum(dim=1)
        nu_now = nu + (grad_nu * step).sum(dim=1)
        means.append(mu_now)
        second.append(torch.maximum(nu_now, mu_now * mu_now))
    mu_bar = torch.stack(means).mean(dim=0)
    var_bar = torch.stack(second).mean(dim=0) - mu_bar * mu_bar
    y_hat = (y - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var_bar.view(1, -1, 1, 1) + norm.eps)
    return y_hat * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def test_window_one_is_batchnorm2d() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    norm = CrossIterationBatchNorm2d(4, window=1, burnin=0)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(norm.state_dict())
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5)
        y = conv(x).detach().requires_grad_()
        out, want = norm(y), bn(y)
        assert torch.equal(out, want)
        grad = torch.randn_like(out)
        assert torch.equal(
            torch.autograd.grad(out, y, grad)[0], torch.autograd.grad(want, y, grad)[0]
        )
    for name, value in bn.state_dict().items():
        assert torch.equal(norm.state_dict()[name], value), name
    norm.eval(), bn.eval()
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(norm(x), bn(x))


def test_compensated_statistics_match_the_paper_over_sgd_steps() -> None:
    """Conv + CBN (k = 3) for four SGD steps: each forward, gradient and running statistic
    against eq. 4-8 with the Taylor gradients written out by F.unfold."""
    torch.manual_seed(1)
    conv, norm = paired(window=3)
    optimizer = torch.optim.SGD([*conv.parameters(), *norm.parameters()], lr=0.01)
    history: list = []
    for it in range(4):
        x = (torch.randn(2, 2, 4, 4, dtype=torch.float64) * 1.5 + 0.5).requires_grad_()
        target = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        weight_now = conv.weight.detach().clone().requires_grad_()
        expected = paper_normalization(
            F.conv2d(x, weight_now, padding=1), history, weight_now, norm
        )
        old_mean, old_var = norm.running_mean.clone(), norm.running_var.clone()
        out = norm(conv(x))
        assert torch.allclose(out, expected, atol=1e-10), it
        if it:  # the Taylor term matters at this step size
            stale = [(mu, nu, 0 * gm, 0 * gn, w) for mu, nu, gm, gn, w in history]
            y_now = F.conv2d(x, weight_now, padding=1)
            assert (paper_normalization(y_now, stale, weight_now, norm) - out).abs().max() > 1e-3
        loss, loss_ref = ((out - target) ** 2).sum(), ((expected - target) ** 2).sum()
        got = torch.autograd.grad(loss, [x, conv.weight, norm.weight, norm.bias], retain_graph=True)
        want = torch.autograd.grad(loss_ref, [x, weight_now, norm.weight, norm.bias])
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=1e-9), it
        # Running statistics: the batch's own mean and unbiased variance, momentum 0.1.
        y = F.conv2d(x.detach(), weight_now.detach(), padding=1)
        count = y.numel() // 3
        batch_var = y.var(dim=(0, 2, 3), unbiased=False) * count / (count - 1)
        assert torch.allclose(norm.running_mean, 0.9 * old_mean + 0.1 * y.mean(dim=(0, 2, 3)))
        assert torch.allclose(norm.running_var, 0.9 * old_var + 0.1 * batch_var)
        history.insert(0, statistics_by_unfold(x.detach(), weight_now))
        del history[2:]
        assert len(norm._history) == min(it + 1, 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_negative_compensated_variance_takes_max_nu_mu2() -> None:
    """Flipping the weight's sign (theta_t - theta_{t-1} = -2 theta) on the same input: the
    first-order nu is nu - 4 nu = -3 nu < mu^2, so that iteration counts with variance 0
    (max(nu, mu^2) = mu^2) and the pooled variance is sigma^2 / 2."""
    torch.manual_seed(2)
    conv, norm = paired(window=2)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64) + 1
    norm(conv(x))
    with torch.no_grad():
        conv.weight.neg_()
    y = conv(x)
    out = norm(y)
    var = y.var(dim=(0, 2, 3), unbiased=False).view(1, -1, 1, 1)
    mean = y.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    want = (y - mean) / torch.sqrt(var / 2 + EPS) * norm.weight.view(1, -1, 1, 1)
    assert torch.allclose(out, want + norm.bias.view(1, -1, 1, 1), atol=1e-10)


def _ws_filters(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.flatten(1)
    centered = flat - flat.mean(dim=1, keepdim=True)
    return (centered / (flat.std(dim=1, keepdim=True) + 1e-5)).view_as(weight)


def test_reparametrized_conv_gets_the_taylor_term_in_its_raw_weight() -> None:
    """WSConv2d: the gradients of mu and nu with respect to the raw weight, through the
    standardization, by torch.func.jacrev (each channel's own block)."""
    torch.manual_seed(3)
    conv, norm = paired(window=3, conv_cls=WSConv2d)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.01)
    history: list = []
    for it in range(3):
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64) + 0.3

        def moments(weight, x=x):
            y = F.conv2d(x, _ws_filters(weight), padding=1)
            return torch.stack([y.mean(dim=(0, 2, 3)), (y * y).mean(dim=(0, 2, 3))])

        weight = conv.weight.detach().clone()
        y_ref = F.conv2d(x, _ws_filters(weight), padding=1)
        expected = paper_normalization(y_ref, history, weight, norm)
        out = norm(conv(x))
        assert torch.allclose(out, expected, atol=1e-10), it
        if it:
            stale = [(mu, nu, 0 * gm, 0 * gn, w) for mu, nu, gm, gn, w in history]
            assert (paper_normalization(y_ref, stale, weight, norm) - out).abs().max() > 1e-3
        jac = jacrev(moments)(weight)  # (2, C, C, C_in, 3, 3)
        rows = torch.arange(3)
        grads = jac[:, rows, rows].flatten(2)  # (2, C, C_in*9)
        mu, nu = moments(weight)
        history.insert(0, (mu, nu, grads[0], grads[1], weight.flatten(1)))
        del history[2:]
        optimizer.zero_grad()
        (out - torch.randn_like(out)).square().sum().backward()
        optimizer.step()


def test_burnin_is_batchnorm_and_the_window_fills_afterwards() -> None:
    torch.manual_seed(4)
    conv, norm = paired(window=3, burnin=2)
    bn = nn.BatchNorm2d(3, eps=EPS).double()
    bn.load_state_dict(norm.state_dict())
    for it in range(5):
        y = conv(torch.randn(2, 2, 4, 4, dtype=torch.float64))
        out, want = norm(y), bn(y)
        # The first forward after burn-in has an empty window: BN to rounding.
        if it < 3:
            assert torch.allclose(out, want, atol=1e-12), it
        else:
            assert not torch.allclose(out, want, atol=1e-3), it
        assert len(norm._history) == max(0, min(it - 1, 2))
    assert int(norm.num_batches_tracked) == 5
    assert torch.allclose(norm.running_mean, bn.running_mean)
    assert torch.allclose(norm.running_var, bn.running_var)


def test_frozen_conv_pools_the_statistics_uncompensated() -> None:
    torch.manual_seed(5)
    conv, norm = paired(window=3)
    conv.weight.requires_grad_(False)
    history: list = []
    for it in range(4):
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64) + it
        y = conv(x)
        expected = paper_normalization(y, history, conv.weight, norm)
        assert torch.allclose(norm(y), expected, atol=1e-10), it
        mu, nu, _, _, flat = statistics_by_unfold(x, conv.weight)
        zeros = torch.zeros_like(flat)
        history.insert(0, (mu, nu, zeros, zeros, flat))
        del history[2:]
    assert all(not past.taylor for past in norm._history)


def test_no_grad_training_forward_reads_the_window_without_joining_it() -> None:
    torch.manual_seed(6)
    conv, norm = paired(window=3)
    history: list = []
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.05)
    for _ in range(2):
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        history.insert(0, statistics_by_unfold(x, conv.weight))
        optimizer.zero_grad()
        norm(conv(x)).pow(3).sum().backward()
        optimizer.step()
    kept = list(norm._history)
    old_var = norm.running_var.clone()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
        out = norm(y)
        expected = paper_normalization(y, history, conv.weight, norm)
    assert torch.allclose(out, expected, atol=1e-10)
    assert norm._history == kept
    assert int(norm.num_batches_tracked) == 3
    # Precise statistics run such forwards: the running statistics still take the batch's.
    assert torch.allclose(norm.running_var, old_var.lerp(y.var(dim=(0, 2, 3)), 0.1))


def test_gradcheck_at_a_fixed_history() -> None:
    torch.manual_seed(7)
    conv, norm = paired(window=3)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        norm(conv(torch.randn(2, 2, 4, 4, dtype=torch.float64))).pow(3).sum().backward()
        optimizer.step()
    kept = list(norm._history)
    assert all(past.taylor for past in kept)

    def through_input(x):
        norm._history[:] = kept
        return norm(conv(x))

    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(through_input, (x,))

    # Past statistics without a Taylor term (stored while the conv was frozen) are constants
    # of the current weight too, so the forward is a function of (x, weight) to check.
    conv.weight.requires_grad_(False)
    norm.reset_history()
    for scale in (1.0, 2.0):
        norm(conv(torch.randn(2, 2, 4, 4, dtype=torch.float64) * scale))
    conv.weight.requires_grad_(True)
    frozen = list(norm._history)
    model = nn.Sequential(conv, norm)

    def through_weight(x, weight):
        norm._history[:] = frozen
        return functional_call(model, {"0.weight": weight}, (x,))

    weight = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(through_weight, (x, weight))


def test_pairing_is_required_and_checked() -> None:
    norm = CrossIterationBatchNorm2d(3, window=2, burnin=0)
    with pytest.raises(RuntimeError, match=r"pair_with\(conv\).*build_conv_norm"):
        norm(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="4 output channels; this layer normalizes 3"):
        norm.pair_with(nn.Conv2d(2, 4, 1))
    with pytest.raises(ValueError, match="expected a convolution with a weight"):
        norm.pair_with(nn.ReLU())
    conv, other = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)
    norm.pair_with(conv)
    with pytest.raises(RuntimeError, match="does not depend on the paired Conv2d's weight"):
        norm(other(torch.randn(2, 2, 4, 4)))
    # Eval, and k = 1 (BatchNorm2d), need no convolution.
    CrossIterationBatchNorm2d(3, window=1)(torch.randn(2, 3, 4, 4))
    CrossIterationBatchNorm2d(3).eval()(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window must be an integer >= 1; got 0"),
        ({"window": 2.5}, "window must be an integer >= 1; got 2.5"),
        ({"burnin": -1}, "burnin must be an integer >= 0; got -1"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]; got 1.5"),
        ({"eps": 0.0}, "eps must be > 0; got 0.0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CrossIterationBatchNorm2d(3, **kwargs)


def test_bad_input_shapes() -> None:
    conv, norm = paired(window=2)
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\) input; got \(2, 4, 3, 3\)"):
        norm(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        norm(conv(torch.randn(1, 2, 1, 1, dtype=torch.float64)))
    empty = conv(torch.randn(0, 2, 4, 4, dtype=torch.float64))
    assert norm(empty).shape == (0, 3, 4, 4)
    assert int(norm.num_batches_tracked) == 0


def test_state_dict_is_batchnorm_s_and_the_history_is_rebuilt() -> None:
    torch.manual_seed(8)
    conv, norm = paired(window=3)
    for _ in range(3):
        norm(conv(torch.randn(2, 2, 4, 4, dtype=torch.float64)))
    state = norm.state_dict()
    assert set(state) == set(nn.BatchNorm2d(3).state_dict())
    assert int(state["num_batches_tracked"]) == 3
    model = nn.Sequential(conv, norm)
    assert set(model.state_dict()) == {f"0.{k}" for k in conv.state_dict()} | {
        f"1.{k}" for k in state
    }
    assert [m for m in model.modules() if m is conv] == [conv]
    assert list(norm.children()) == []

    restored = paired(window=3)[1]
    restored.pair_with(conv)
    restored(conv(torch.randn(2, 2, 4, 4, dtype=torch.float64)))
    assert len(restored._history) == 1
    restored.load_state_dict(state)
    assert restored._history == []
    assert int(restored.num_batches_tracked) == 3
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    norm.eval(), restored.eval()
    assert torch.equal(norm(x), restored(x))
    # A BatchNorm2d checkpoint loads as it is.
    bn = nn.BatchNorm2d(3).double()
    bn.running_mean.uniform_()
    restored.load_state_dict(bn.state_dict())
    assert torch.equal(restored.running_mean, bn.running_mean)


def test_deepcopy_pairs_the_copies() -> None:
    conv, norm = paired(window=2)
    model = copy.deepcopy(nn.Sequential(conv, norm))
    assert model[1].paired_conv is model[0]
    model.train()
    model(torch.randn(2, 2, 4, 4, dtype=torch.float64))


def test_eval_folds_into_the_convolution() -> None:
    torch.manual_seed(9)
    conv, norm = paired(window=3)
    for _ in range(4):
        norm(conv(torch.randn(2, 2, 4, 4, dtype=torch.float64)))
    model = nn.Sequential(conv, norm).eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y = conv(x)
    out = model(x)
    want = (y - norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        norm.running_var.view(1, -1, 1, 1) + EPS
    ) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, want, atol=1e-12)
    scale, shift = norm.folded_affine()
    assert torch.allclose(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), out, atol=1e-12)
    bn = norm.fuse()
    assert type(bn) is nn.BatchNorm2d and not bn.training
    assert torch.allclose(bn(y), out, atol=1e-12)
    fused = fuse(copy.deepcopy(model))
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in fused.modules())
    assert torch.allclose(fused(x), out, atol=1e-10)


def test_precise_statistics_find_the_running_statistics() -> None:
    _, norm = paired(window=2)
    found = layers_with_running_statistics(nn.Sequential(norm))
    assert found == [(norm, ("running_mean", "running_var"))]
