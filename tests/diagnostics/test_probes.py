"""Each probe against a hand computation or a property of its math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from norm_det.diagnostics import (
    activation_moments,
    average_gradient_shift,
    batch_standardization,
    condition_number,
    deflated_fraction,
    disturbance_of_outputs,
    filter_magnitudes,
    filter_mean_shift,
    filter_variance_change,
    group_whitening,
    stochastic_normalization_disturbance,
    whitened_covariance,
)

# --- activations ---------------------------------------------------------------------------


def test_activation_moments_by_hand():
    mean, var = activation_moments(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert mean.dtype == var.dtype == torch.float64
    assert float(mean) == 2.5
    assert float(var) == 1.25  # ((1.5^2 + 0.5^2) * 2) / 4, exact in binary


def test_activation_moments_resolve_a_small_spread_under_a_large_mean(monkeypatch):
    """Float32 values ``2^12 +- 2^-8``: the float64 two-pass variance is exact, 2^-16.

    Float32 moments cannot resolve it (the float32 spacing at ``E[x^2] ~ 2^24`` is 2); the
    chunked passes must give the same as one pass.
    """
    from norm_det.diagnostics import activations

    signs = torch.tensor([1.0, -1.0]).repeat(3000)
    x = (4096.0 + signs * 2.0**-8).float().view(2, 3, 1000)
    assert torch.equal(x.double().unique(), torch.tensor([4096 - 2**-8, 4096 + 2**-8]).double())
    mean, var = activation_moments(x)
    assert float(mean) == 4096.0 and float(var) == 2.0**-16
    monkeypatch.setattr(activations, "_CHUNK", 7)  # many chunks, the last one short
    assert [float(v) for v in activation_moments(x)] == [4096.0, 2.0**-16]


# --- PWS: shift of the average gradient ----------------------------------------------------


def test_filter_mean_shift_by_hand():
    # Filters (n = 2 elements): means 2 and 3, so n E[W_o] = 4 and 6, variance 1.
    weight = torch.tensor([[1.0, 3.0], [2.0, 4.0]]).view(2, 1, 1, 2)
    assert float(filter_mean_shift(weight)) == pytest.approx(1.0)
    # Equal means: no shift, whatever the spread.
    assert float(filter_mean_shift(torch.tensor([[1.0, 3.0], [2.0, 2.0]]).view(2, 1, 1, 2))) == 0


def test_average_gradient_shift_by_hand():
    grad = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).view(2, 1, 1, 2)
    # LR 0.5: n E[dW_o] = 2 * 0.5 = 1 and -1; population variance 1.
    assert float(average_gradient_shift(grad, lr=0.5)) == pytest.approx(1.0)
    # A zero-mean gradient per filter (what PWS guarantees, eq. 13) has no shift.
    centred = torch.tensor([[1.0, -1.0], [3.0, -3.0]]).view(2, 1, 1, 2)
    assert float(average_gradient_shift(centred, lr=1.0)) == 0.0


def test_filter_variance_change_by_hand():
    weight = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(2, 1, 1, 2)  # Var: 1 and 4
    grad = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    # After the step filter 0 is [-1, 3] (Var 4, ratio 4); filter 1 is unchanged (ratio 1).
    assert float(filter_variance_change(weight, grad, lr=1.0)) == pytest.approx(2.5)


def test_pws_layer_gradient_has_no_shift():
    """PWS paper eq. 13: the gradient of the raw weight of a PWS conv has zero filter means."""
    from norm_det.layers import PWSConv2d

    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) + 1.0
    conv = PWSConv2d(4, 6, 3, padding=1).double()
    conv(x).square().sum().backward()
    plain = torch.nn.Conv2d(4, 6, 3, padding=1).double()
    plain(x).square().sum().backward()
    shift = float(average_gradient_shift(conv.weight.grad, lr=1.0))
    assert shift < 1e-20 * float(average_gradient_shift(plain.weight.grad, lr=1.0))


# --- mean-shift rejection: magnitudes and deflation ----------------------------------------


def test_filter_magnitudes_and_deflation_by_hand():
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.5], [1.0, 0.0]]).view(3, 2, 1, 1)
    magnitudes = filter_magnitudes(weight)
    assert magnitudes.tolist() == [5.0, 0.5, 1.0]
    # Against per-filter references 5, 10, 1 at ratio 0.1: only the second fell below (0.5 < 1).
    reference = torch.tensor([5.0, 10.0, 1.0])
    assert float(deflated_fraction(magnitudes, reference, 0.1)) == pytest.approx(1 / 3)
    assert float(deflated_fraction(magnitudes, 2.0, 0.6)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        deflated_fraction(magnitudes, 1.0, 0.0)


# --- IterNorm: stochastic normalization disturbance ----------------------------------------


def test_disturbance_of_outputs_by_hand():
    # Example 0 over two sets: [0, 0] and [2, 0] (mean [1, 0], both at distance 1);
    # example 1: [0, 0], [0, 4] (distance 2 each). Mean over examples: 1.5.
    outputs = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 4.0]]])
    assert float(disturbance_of_outputs(outputs)) == pytest.approx(1.5)


def test_batch_standardization_by_hand():
    normalize = batch_standardization(eps=0.0)
    batch = torch.tensor([[1.0, 10.0], [3.0, 10.0 + 4.0]])  # means 2, 12; variances 1, 4
    x = torch.tensor([[4.0, 8.0]])
    assert normalize(batch, x).tolist() == [[2.0, -2.0]]


def _newton_schulz_whitening(batch: np.ndarray, x: np.ndarray, iters: int, eps: float):
    """IterNorm's Algorithm 1 written out in float64 numpy, one group."""
    mean = batch.mean(0)
    centred = batch - mean
    sigma = centred.T @ centred / len(batch) + eps * np.eye(batch.shape[1])
    trace = np.trace(sigma)
    sigma_n = sigma / trace
    p = np.eye(batch.shape[1])
    for _ in range(iters):
        p = 1.5 * p - 0.5 * p @ p @ p @ sigma_n
    return (x - mean) @ (p / np.sqrt(trace)).T


def test_group_whitening_matches_algorithm_1():
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    batch[:, 1] += 0.8 * batch[:, 0]
    x = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    out = group_whitening(3, iters=5, eps=1e-5)(batch, x)
    for group in range(2):
        dims = slice(3 * group, 3 * group + 3)
        expected = _newton_schulz_whitening(batch[:, dims].numpy(), x[:, dims].numpy(), 5, 1e-5)
        np.testing.assert_allclose(out[:, dims].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_group_whitening_converges_to_identity_covariance():
    generator = torch.Generator().manual_seed(2)
    batch = torch.randn(400, 4, generator=generator, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 2.0, 0.1], [0.0, 0.0, 0.0, 0.5]],
        dtype=torch.float64,
    )
    out = group_whitening(4, iters=40, eps=0.0)(batch, batch)
    cov = out.T @ out / len(out)
    torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)


def test_snd_equals_eq_10_with_the_same_draws():
    # Float64 (the recorder's dtype): the two orders of summation agree to ~1e-15.
    generator = torch.Generator().manual_seed(3)
    population = torch.randn(300, 3, generator=generator, dtype=torch.float64)
    normalize = batch_standardization()
    value = stochastic_normalization_disturbance(
        normalize,
        population,
        num_sets=5,
        set_size=32,
        num_examples=7,
        generator=torch.Generator().manual_seed(11),
    )
    # The same draws by hand, then eq. 10 written out.
    generator = torch.Generator().manual_seed(11)
    examples = population[torch.randperm(300, generator=generator)[:7]]
    sets = torch.randint(0, 300, (5, 32), generator=generator)
    total = 0.0
    for example in examples:
        outputs = [normalize(population[s], example[None])[0] for s in sets]
        mean = sum(outputs) / len(outputs)
        total += sum(float(torch.linalg.norm(o - mean)) for o in outputs) / len(outputs)
    assert float(value) == pytest.approx(total / 7, rel=1e-12)


def test_snd_shrinks_with_the_batch_size():
    """IterNorm paper, Figure 2: the larger the sample set, the smaller the disturbance."""
    generator = torch.Generator().manual_seed(4)
    population = torch.randn(4000, 8, generator=generator, dtype=torch.float64)
    values = [
        float(
            stochastic_normalization_disturbance(
                batch_standardization(),
                population,
                num_sets=20,
                set_size=size,
                num_examples=50,
                generator=torch.Generator().manual_seed(0),
            )
        )
        for size in (16, 64, 256)
    ]
    assert values[0] > values[1] > values[2] > 0
    # Standardization noise falls as 1/sqrt(B): a 16x larger set, about 4x less SND.
    assert values[0] / values[2] == pytest.approx(4.0, rel=0.35)


# --- ND++: conditioning --------------------------------------------------------------------


def test_condition_number_by_hand():
    matrices = torch.stack(
        [torch.diag(torch.tensor([1.0, 4.0])), torch.tensor([[2.0, 1.0], [1.0, 2.0]])]
    )
    # Eigenvalues 1, 4 and 1, 3; the ratios are float64 whatever the input's dtype.
    kappa = condition_number(matrices)
    assert kappa.dtype == torch.float64
    torch.testing.assert_close(kappa, torch.tensor([4.0, 3.0], dtype=torch.float64))
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert float(condition_number(singular)) == float("inf")


def test_whitened_covariance_of_the_exact_inverse_root_is_identity():
    cov = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(cov)
    root = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    torch.testing.assert_close(whitened_covariance(cov, root), torch.eye(2, dtype=torch.float64))
    assert float(condition_number(whitened_covariance(cov, root))) == pytest.approx(1.0)
