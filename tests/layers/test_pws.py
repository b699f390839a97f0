"""PWS's ``init_alpha``: the release's data-dependent alpha on the first training forward."""

import copy

import pytest
import torch
import torch.nn.functional as F

from norm_det.layers.pws import INIT_ALPHA_TARGET_VARIANCE, PWSConv2d
from norm_det.schemes import get_scheme


def _layer(init_alpha: bool, **options) -> PWSConv2d:
    torch.manual_seed(1)
    return PWSConv2d(6, 5, 3, padding=1, init_alpha=init_alpha, **options).double().train()


def _batch(seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, 9, 9, generator=generator, dtype=torch.float64) * 1.7 + 0.4


def test_first_training_forward_sets_the_output_variance_to_2() -> None:
    plain, layer = _layer(False), _layer(True)
    x = _batch()
    before = plain(x)  # alpha = 1: the output the release measures
    out = layer(x)
    # As the release measures it: output.var(), unbiased, over all N*C*H*W elements.
    assert INIT_ALPHA_TARGET_VARIANCE == 2.0
    assert float(out.detach().var()) == pytest.approx(2.0, rel=1e-6, abs=0)
    # One number for every channel: sqrt(2 / Var) of the output with alpha = 1.
    expected_alpha = torch.full(
        (5,), (2.0 / float(before.detach().var())) ** 0.5, dtype=torch.float64
    )
    torch.testing.assert_close(layer.alpha.detach(), expected_alpha, rtol=1e-12, atol=0)
    # The first forward already returns the initialized layer's output.
    torch.testing.assert_close(out, F.conv2d(x, layer.standardized_weight(), padding=1))
    assert bool(layer.alpha_initialized)
    assert layer.alpha.requires_grad and layer.alpha.grad is None


def test_only_once_and_only_in_training() -> None:
    layer = _layer(True)
    layer.eval()
    layer(_batch())  # the release warns and gives up here; norm_det waits for training
    assert torch.equal(layer.alpha, torch.ones(5, dtype=torch.float64))
    assert not bool(layer.alpha_initialized)
    layer.train()
    layer(_batch())
    initialized = layer.alpha.detach().clone()
    layer(_batch(seed=3) * 10)
    assert torch.equal(layer.alpha, initialized)


def test_without_the_option_alpha_stays_1_and_the_state_dict_is_unchanged() -> None:
    layer = _layer(False)
    layer(_batch())
    assert torch.equal(layer.alpha, torch.ones(5, dtype=torch.float64))
    assert set(layer.state_dict()) == {"weight", "bias", "alpha"}
    assert "init_alpha" not in repr(layer) and "init_alpha=True" in repr(_layer(True))


def test_the_flag_in_the_state_dict_prevents_a_second_initialization() -> None:
    trained = _layer(True)
    trained(_batch())
    state = trained.state_dict()
    assert set(state) == {"weight", "bias", "alpha", "alpha_initialized"}
    assert bool(state["alpha_initialized"])
    reloaded = _layer(True)
    reloaded.load_state_dict(state)
    reloaded(_batch(seed=4) * 3)
    assert torch.equal(reloaded.alpha, trained.alpha)
    # A copy (as a process spawn pickles it) keeps the state too.
    twin = copy.deepcopy(trained)
    twin(_batch(seed=5) * 3)
    assert torch.equal(twin.alpha, trained.alpha)


def test_state_dicts_load_across_the_option() -> None:
    without = _layer(False)
    with torch.no_grad():
        without.alpha.mul_(0.3)  # a trained alpha
    into_option = _layer(True)
    into_option.load_state_dict(without.state_dict())  # no flag saved: the alpha is kept
    into_option(_batch())
    assert torch.equal(into_option.alpha, without.alpha)
    assert bool(into_option.alpha_initialized)
    option = _layer(True)
    option(_batch())
    into_plain = _layer(False)
    into_plain.load_state_dict(option.state_dict())  # the flag is dropped
    assert torch.equal(into_plain.alpha, option.alpha)


def test_loaded_plain_weights_are_not_initialized_again() -> None:
    layer = _layer(True)
    plain = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    layer.load_plain_weights(plain.weight, plain.bias)
    loaded = layer.alpha.detach().clone()
    layer(_batch())
    assert torch.equal(layer.alpha, loaded)


def test_a_constant_batch_defers_and_a_non_finite_one_is_refused() -> None:
    layer = _layer(True)
    layer(torch.zeros(2, 6, 9, 9, dtype=torch.float64))  # output 0: no scale to measure
    assert not bool(layer.alpha_initialized)
    assert torch.equal(layer.alpha, torch.ones(5, dtype=torch.float64))
    assert float(layer(_batch()).detach().var()) == pytest.approx(2.0, rel=1e-6, abs=0)
    broken = _layer(True)
    x = _batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"PWSConv2d\(6, 5.*init_alpha"):
        broken(x)


def test_scheme_option() -> None:
    # The scheme defaults to the release's data-dependent alpha; the layer to eq. 12's alpha = 1.
    assert get_scheme("PWS").conv(4, 4, 3).init_alpha is True
    assert PWSConv2d(4, 4, 3).init_alpha is False
    conv = get_scheme("PWS(init_alpha=False, gamma=1e-3)").conv(4, 4, 3)
    assert conv.init_alpha is False and conv.gamma == 1e-3
