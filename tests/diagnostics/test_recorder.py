"""ModelDiagnostics on a small network holding one layer of every probed kind."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from norm_det.diagnostics import (
    ModelDiagnostics,
    activation_moments,
    average_gradient_shift,
    condition_number,
    deconv_covariance,
    filter_magnitudes,
    filter_mean_shift,
    filter_variance_change,
)
from norm_det.layers import CZMConv2d, DeconvConv2d, IterNorm, PWSConv2d


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(8),
            relu=nn.ReLU(),
            pws=PWSConv2d(8, 8, 3, padding=1),
            nd=DeconvConv2d(
                8, 8, 3, padding=1, block=8, sampling_stride=1, scale_invariance="layernorm"
            ),
            czm=CZMConv2d(8, 8, 3, padding=1),
            conv2=nn.Conv2d(8, 8, 1, bias=False),
            iternorm=IterNorm(8, group_channels=4),
        )
    )


def train_step(model, optimizer, x) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()


def test_scalars_equal_the_probes_on_the_same_tensors():
    # In float64, so that BN's output has mean 0 to ~1e-16 (not float32's ~1e-7 rounding).
    model = small_net().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    inputs = {}

    def keep_input(module, args) -> None:
        inputs[module] = args[0].detach().clone()

    model.nd.register_forward_pre_hook(keep_input)
    diagnostics = ModelDiagnostics(model, snd_set_size=64, snd_examples=16)
    diagnostics.set_reference()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        channel_var = model.conv1(x).var(dim=(0, 2, 3), unbiased=False)
    diagnostics.start(optimizer, iteration=1)
    train_step(model, optimizer, x)
    scalars = diagnostics.finish()

    # Activations: a norm's output stands for the conv before it (BN in training, weight 1 and
    # bias 0 at initialisation: mean 0 and variance mean_c Var_c / (Var_c + eps)).
    assert scalars["diag_act_mean/bn"] == pytest.approx(0.0, abs=1e-12)
    expected_var = float((channel_var / (channel_var + model.bn.eps)).mean())
    assert scalars["diag_act_var/bn"] == pytest.approx(expected_var, rel=1e-12)
    with torch.no_grad():
        pws_out = model.pws(model.relu(model.bn(model.conv1(x))))
    assert float(activation_moments(pws_out)[1]) > 0
    assert {"diag_act_mean/pws", "diag_act_mean/nd", "diag_act_mean/czm"} <= set(scalars)
    assert "diag_act_mean/iternorm" in scalars and "diag_act_mean/conv2" not in scalars

    # Gradient shift with the step's LR and the weights before the step.
    for name in ("conv1", "pws", "conv2"):
        weight = getattr(model, name).weight
        assert scalars[f"diag_grad_shift/{name}"] == pytest.approx(
            float(average_gradient_shift(weight.grad, 0.05)), rel=1e-6
        )
        assert scalars[f"diag_filter_var_change/{name}"] == pytest.approx(
            float(filter_variance_change(before[f"{name}.weight"], weight.grad, 0.05)), rel=1e-6
        )
        assert scalars[f"diag_filter_mean_shift/{name}"] == pytest.approx(
            float(filter_mean_shift(weight)), rel=1e-6
        )
    # CZM is probed on V, the tensor LUMA anchors.
    assert scalars["diag_filter_norm/czm"] == pytest.approx(
        float(filter_magnitudes(model.czm.v).mean()), rel=1e-6
    )
    assert scalars["diag_deflated/all"] == 0.0

    # ND++ condition numbers of the batch the layer saw.
    cov = deconv_covariance(model.nd, inputs[model.nd])
    assert scalars["diag_cond_cov/nd"] == pytest.approx(float(condition_number(cov)), rel=1e-12)
    assert 1.0 <= scalars["diag_cond_whitened/nd"] < scalars["diag_cond_cov/nd"]

    # SND: positive for the two batch-statistics norms, none for the others.
    assert scalars["diag_snd/bn"] > 0 and scalars["diag_snd/iternorm"] > 0
    assert not any(
        k.startswith("diag_snd/") for k in scalars if k not in ("diag_snd/bn", "diag_snd/iternorm")
    )

    # Nothing stays attached.
    assert all(
        not m._forward_hooks
        for m in model.modules()
        if m is not model.nd and m is not model.iternorm
    )
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_probing_changes_nothing_in_training():
    model = small_net()
    twin = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    diagnostics = ModelDiagnostics(model)
    x = torch.randn(2, 3, 12, 12)
    torch.manual_seed(5)
    for iteration in range(3):
        diagnostics.start(optimizers[0], iteration)
        train_step(model, optimizers[0], x)
        assert diagnostics.finish()
    after_probes = torch.rand(())
    torch.manual_seed(5)
    for _ in range(3):
        train_step(twin, optimizers[1], x)
    assert torch.equal(torch.rand(()), after_probes)  # the global generator was not used
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_layer_filter_and_probe_choice():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    diagnostics = ModelDiagnostics(
        model, probes=["activations", "filter_magnitude"], layers="^(bn|pws)$"
    )
    diagnostics.start(optimizer)
    train_step(model, optimizer, torch.randn(2, 3, 8, 8))
    scalars = diagnostics.finish()
    assert set(scalars) == {
        "diag_act_mean/bn",
        "diag_act_var/bn",
        "diag_act_mean/pws",
        "diag_act_var/pws",
        "diag_filter_norm/pws",
        "diag_deflated/pws",
        "diag_deflated/all",
    }


def test_deflated_share_against_the_reference():
    model = small_net()
    diagnostics = ModelDiagnostics(model, probes=["filter_magnitude"], deflation_ratio=0.5)
    diagnostics.set_reference()
    with torch.no_grad():
        model.conv2.weight[:2] *= 0.1  # 2 of 8 filters deflate
    diagnostics.start()
    scalars = diagnostics.finish()
    assert scalars["diag_deflated/conv2"] == 0.25
    filters = sum(getattr(model, n).out_channels for n in ("conv1", "pws", "nd", "czm", "conv2"))
    assert scalars["diag_deflated/all"] == pytest.approx(2 / filters)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match=r"DIAGNOSTICS\.PROBES.*'snr'"):
        ModelDiagnostics(nn.Conv2d(1, 1, 1), probes=["snr"])
    with pytest.raises(ValueError, match=r"DIAGNOSTICS\.LAYERS"):
        ModelDiagnostics(nn.Conv2d(1, 1, 1), layers="(")


@pytest.mark.parametrize("scheme", ["IterNorm", "NDPP"])
def test_every_whitening_layer_of_a_detector_is_probed(scheme):
    from norm_det.modeling import build_model
    from norm_det.solver import build_optimizer
    from tests.modeling.tiny import tiny_batch, tiny_cfg

    cfg = tiny_cfg("MaskRCNN", scheme)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    images, targets = tiny_batch()
    diagnostics = ModelDiagnostics(model, probes=["snd", "whitened_condition"])
    diagnostics.start(optimizer, iteration=1)
    optimizer.zero_grad()
    sum(model(images, targets).values()).backward()
    optimizer.step()
    scalars = diagnostics.finish()
    if scheme == "IterNorm":
        layers = {p for p, m in model.named_modules() if isinstance(m, IterNorm)}
        assert {k.split("/", 1)[1] for k in scalars} == layers
        assert all(0 < v < 10 for v in scalars.values())
        return
    layers = {p: m for p, m in model.named_modules() if isinstance(m, DeconvConv2d)}
    assert {k.split("/", 1)[1] for k in scalars if k.startswith("diag_cond_cov/")} == set(layers)
    for path, layer in layers.items():
        # T = 5 Newton steps improve the conditioning: on an eigenvalue m of Cov / ||Cov||_F a
        # step maps m to h(m) = m (3 - m)^2 / 4, increasing with h(m) / m decreasing on (0, 1],
        # so kappa(D Cov D) <= kappa(Cov), equal where all eigenvalues are (a covariance of one
        # sampled patch, at the tiny res5 shortcut, is eps * I: 1 before and after). Both are
        # float64 eigenvalue ratios of positive definite matrices (finite, >= 1 by construction);
        # each eigenvalue errs by ~F * 2^-53 of the largest, kappa by ~F * 2^-53 * kappa.
        cond_cov = scalars[f"diag_cond_cov/{path}"]
        cond_whitened = scalars[f"diag_cond_whitened/{path}"]
        rounding = 4 * layer.features * 2.0**-53 * cond_cov
        assert 1.0 <= cond_whitened <= cond_cov * (1 + rounding), path
    assert max(v for k, v in scalars.items() if k.startswith("diag_cond_cov/")) > 1e3


def test_snd_of_an_iternorm_on_features():
    """IterNorm on (N, C) features: the rows are SND's population, in float64."""
    from norm_det.diagnostics import group_whitening, stochastic_normalization_disturbance

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(6, 8), norm=IterNorm(8, group_channels=4)))
    x = torch.randn(40, 6)
    diagnostics = ModelDiagnostics(model, probes=["snd"], snd_set_size=16, snd_examples=8)
    diagnostics.start(iteration=3)
    model(x)
    scalars = diagnostics.finish()
    with torch.no_grad():
        population = model.fc(x).double()
    expected = stochastic_normalization_disturbance(
        group_whitening(4, model.norm.iters, model.norm.eps, model.norm.isqrt_backend),
        population,
        num_sets=8,
        set_size=16,
        num_examples=8,
        generator=torch.Generator().manual_seed(3),  # seed 0 * 1_000_003 + iteration 3
    )
    assert set(scalars) == {"diag_snd/norm"}
    assert scalars["diag_snd/norm"] == pytest.approx(float(expected), rel=1e-12)
    assert scalars["diag_snd/norm"] > 0
