"""The probes of a forward pass: what a hook on one module records in a probed iteration.

Each ``*_recorder(path, scalars, ...)`` returns ``record(module, inputs, output)``, which writes
the probe's tags for the module at ``path`` into ``scalars``:

- :func:`activation_recorder`: ``diag_act_mean/L``, ``diag_act_var/L`` of the module's output;
- :func:`snd_recorder`: ``diag_snd/L`` of a BN, SyncBN or IterNorm layer in training;
- :func:`condition_recorder`: ``diag_cond_cov/L``, ``diag_cond_whitened/L`` of an ND / ND++
  convolution in training.

:class:`ForwardHooks` installs them for one iteration, each recording at its module's first
call only (an RPN head over the FPN levels, accumulated passes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from norm_det.diagnostics.activations import activation_moments
from norm_det.diagnostics.conditioning import (
    condition_number,
    deconv_covariance,
    deconv_whitening,
    whitened_covariance,
)
from norm_det.diagnostics.snd import (
    Normalizer,
    batch_standardization,
    group_whitening,
    stochastic_normalization_disturbance,
)
from norm_det.layers import IterNorm

__all__ = [
    "ForwardHooks",
    "activation_recorder",
    "condition_recorder",
    "snd_normalizer",
    "snd_recorder",
]

Recorder = Callable[[nn.Module, tuple, object], None]


def snd_normalizer(module: nn.Module) -> Normalizer | None:
    """The batch-statistics arithmetic of a norm (BN, SyncBN, IterNorm), or None."""
    if isinstance(module, IterNorm):
        return group_whitening(
            module.group_channels, module.iters, module.eps, module.isqrt_backend
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return batch_standardization(module.eps)
    return None


def activation_recorder(path: str, scalars: dict[str, float]) -> Recorder:
    """The mean and variance of the module's output (a non-empty tensor)."""

    def record(module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor) or output.numel() == 0:
            return
        mean, var = activation_moments(output)
        scalars[f"diag_act_mean/{path}"] = float(mean)
        scalars[f"diag_act_var/{path}"] = float(var)

    return record


def snd_recorder(
    path: str,
    scalars: dict[str, float],
    num_sets: int,
    set_size: int,
    num_examples: int,
    generator: torch.Generator,
) -> Recorder:
    """SND of the norm's batch statistics over its input's positions: ``num_sets`` sets of
    ``set_size`` positions drawn by ``generator``, ``num_examples`` example positions
    (:func:`norm_det.diagnostics.snd.stochastic_normalization_disturbance`)."""

    def record(module, inputs, output) -> None:
        normalize = snd_normalizer(module)
        x = inputs[0]
        # In eval (or a BN tracking no batch statistics) the statistics are fixed: no SND.
        if not module.training or x.dim() not in (2, 4):
            return
        # The positions are the population ((N, C) input: the rows), in float64 like every
        # probe, so that the whitening's Newton steps do not add float32 rounding.
        population = x.detach().double()
        if x.dim() == 4:
            population = population.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        if population.shape[0] < 2:
            return
        value = stochastic_normalization_disturbance(
            normalize,
            population,
            num_sets=num_sets,
            set_size=set_size,
            num_examples=num_examples,
            generator=generator,
        )
        scalars[f"diag_snd/{path}"] = float(value)

    return record


def condition_recorder(path: str, scalars: dict[str, float]) -> Recorder:
    """The largest condition numbers of an ND / ND++ conv's covariance, before and after its
    whitening."""

    def record(module, inputs, output) -> None:
        x = inputs[0]
        if not module.training or x.dim() != 4 or x.shape[0] == 0:
            return
        cov = deconv_covariance(module, x.detach())
        whitened = whitened_covariance(cov, deconv_whitening(module, cov))
        scalars[f"diag_cond_cov/{path}"] = float(condition_number(cov).max())
        scalars[f"diag_cond_whitened/{path}"] = float(condition_number(whitened).max())

    return record


class ForwardHooks:
    """Forward hooks for one probed iteration; each records at its module's first call."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: set[tuple[str, str]] = set()

    def _first_call(self, probe: str, path: str) -> bool:
        key = (probe, path)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def add(self, module: nn.Module, probe: str, path: str, record: Recorder) -> None:
        """Hook ``record`` (without gradients) on ``module``'s forward, as probe ``probe``."""

        def hook(mod: nn.Module, inputs: tuple, output) -> None:
            if self._first_call(probe, path):
                with torch.no_grad():
                    record(mod, inputs, output)

        self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove every hook installed (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
