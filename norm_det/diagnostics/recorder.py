"""Run the probes on a model during chosen training iterations.

:class:`ModelDiagnostics` attaches forward hooks to the model for one iteration only
(:meth:`~ModelDiagnostics.start` before the step, :meth:`~ModelDiagnostics.finish` after the
optimizer step), so iterations that are not probed run exactly as without diagnostics. Probes
and the layers they watch (``L`` in a tag is the module's path):

- ``activations``: each convolution's output after its norm (the norm's output when a norm
  follows the convolution, else the convolution's): ``diag_act_mean/L``, ``diag_act_var/L``;
- ``snd``: BN, SyncBN and IterNorm layers in training: ``diag_snd/L``;
- ``gradient_shift``: convolutions with trainable filters (CZM's ``v``): ``diag_grad_shift/L``,
  ``diag_filter_mean_shift/L``, ``diag_filter_var_change/L``;
- ``filter_magnitude``: the same convolutions: ``diag_filter_norm/L`` (mean over filters),
  ``diag_deflated/L`` and ``diag_deflated/all`` (share of deflated filters);
- ``whitened_condition``: ND / ND++ convolutions in training: ``diag_cond_cov/L``,
  ``diag_cond_whitened/L``.

A module called several times in one iteration (an RPN head over the FPN levels, accumulated
passes) is probed at its first call. Random draws (SND's sample sets) come from a private
generator, so the training's random stream is untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from norm_det.diagnostics.activations import activation_moments
from norm_det.diagnostics.conditioning import (
    condition_number,
    deconv_covariance,
    deconv_whitening,
    whitened_covariance,
)
from norm_det.diagnostics.filter_magnitude import deflated_fraction, filter_magnitudes
from norm_det.diagnostics.gradient_shift import (
    average_gradient_shift,
    filter_mean_shift,
    filter_variance_change,
)
from norm_det.diagnostics.snd import (
    Normalizer,
    batch_standardization,
    group_whitening,
    stochastic_normalization_disturbance,
)
from norm_det.layers import DeconvConv2d, IterNorm
from norm_det.surgery import is_conv, is_norm

PROBES = ("activations", "snd", "gradient_shift", "filter_magnitude", "whitened_condition")

__all__ = ["PROBES", "ModelDiagnostics"]


def probed_weight(module: nn.Module) -> nn.Parameter | None:
    """The trainable filter tensor of a convolution: CZM's ``v``, else ``weight``; or None."""
    parameter = module._parameters.get("v", module._parameters.get("weight"))
    if parameter is None or not parameter.requires_grad:
        return None
    return parameter


def _snd_normalizer(module: nn.Module) -> Normalizer | None:
    """The batch-statistics arithmetic of a norm (BN, SyncBN, IterNorm), or None."""
    if isinstance(module, IterNorm):
        return group_whitening(
            module.group_channels, module.iters, module.eps, module.isqrt_backend
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return batch_standardization(module.eps)
    return None


class ModelDiagnostics:
    """The papers' probes on a model, for the iterations a caller chooses.

    Args:
        model: the (unwrapped) model being trained.
        probes: names from :data:`PROBES`.
        layers: a regular expression; only modules whose path it matches (``re.search``) are
            probed. Empty: all.
        snd_sets, snd_set_size, snd_examples: SND's ``s`` sets of ``B`` positions, and the
            number of example positions (``norm_det.diagnostics.snd``).
        deflation_ratio: a filter is deflated below this fraction of its magnitude at
            :meth:`set_reference` (or at its first probe).
        seed: of the private generator (mixed with the iteration).

    Usage per probed iteration: ``start(optimizer, iteration)``, the training step,
    ``scalars = finish()`` (``{tag: value}``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        probes: Sequence[str] = PROBES,
        layers: str = "",
        snd_sets: int = 8,
        snd_set_size: int = 1024,
        snd_examples: int = 64,
        deflation_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        unknown = sorted(set(probes) - set(PROBES))
        if unknown:
            raise ValueError(
                f"DIAGNOSTICS.PROBES: unknown probe(s) {unknown}; expected some of {list(PROBES)}"
            )
        try:
            self._pattern = re.compile(layers) if layers else None
        except re.error as error:
            raise ValueError(
                f"DIAGNOSTICS.LAYERS: {layers!r} is not a regular expression ({error})"
            ) from None
        if min(snd_sets, snd_set_size, snd_examples) < 1 or snd_sets < 2:
            raise ValueError(
                "DIAGNOSTICS.SND: SETS must be >= 2 and SET_SIZE, EXAMPLES >= 1; got "
                f"{snd_sets}, {snd_set_size}, {snd_examples}"
            )
        self.model = model
        self.probes = tuple(probes)
        self.snd_sets = snd_sets
        self.snd_set_size = snd_set_size
        self.snd_examples = snd_examples
        self.deflation_ratio = deflation_ratio
        self.seed = seed
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._scalars: dict[str, float] = {}
        self._seen: set[tuple[str, str]] = set()
        self._weights_before: dict[str, torch.Tensor] = {}
        self._lrs: dict[int, float] = {}
        self._reference: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator()

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> ModelDiagnostics:
        """From the ``DIAGNOSTICS`` section of ``cfg``."""
        node = cfg.DIAGNOSTICS
        return cls(
            model,
            probes=list(node.PROBES),
            layers=node.LAYERS,
            snd_sets=node.SND.SETS,
            snd_set_size=node.SND.SET_SIZE,
            snd_examples=node.SND.EXAMPLES,
            deflation_ratio=node.DEFLATION_RATIO,
            seed=max(cfg.SEED, 0),
        )

    # Which modules -------------------------------------------------------------------------

    def _selected(self, path: str) -> bool:
        return self._pattern is None or self._pattern.search(path) is not None

    def output_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(path, module)`` whose output is a layer's: a conv's norm when one follows it as
        the next sibling, else the conv."""
        for parent_path, parent in self.model.named_modules():
            children = list(parent.named_children())
            for index, (name, child) in enumerate(children):
                if not is_conv(child):
                    continue
                following = children[index + 1] if index + 1 < len(children) else None
                if following is not None and is_norm(following[1]):
                    name, child = following
                path = f"{parent_path}.{name}" if parent_path else name
                if self._selected(path):
                    yield path, child

    def weight_layers(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(path, filters)`` of every selected convolution with trainable filters."""
        for path, module in self.model.named_modules():
            if is_conv(module) and self._selected(path):
                parameter = probed_weight(module)
                if parameter is not None:
                    yield path, parameter

    def _modules_of(self, kind: Callable[[nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
        for path, module in self.model.named_modules():
            if kind(module) and self._selected(path):
                yield path, module

    # Forward hooks ---------------------------------------------------------------------------

    def _first_call(self, probe: str, path: str) -> bool:
        key = (probe, path)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _hook(self, module: nn.Module, probe: str, path: str, record) -> None:
        def hook(mod: nn.Module, inputs: tuple, output) -> None:
            if self._first_call(probe, path):
                with torch.no_grad():
                    record(mod, inputs, output)

        self._handles.append(module.register_forward_hook(hook))

    def _record_activations(self, path: str):
        def record(module, inputs, output) -> None:
            if not isinstance(output, torch.Tensor) or output.numel() == 0:
                return
            mean, var = activation_moments(output)
            self._scalars[f"diag_act_mean/{path}"] = float(mean)
            self._scalars[f"diag_act_var/{path}"] = float(var)

        return record

    def _record_snd(self, path: str):
        def record(module, inputs, output) -> None:
            normalize = _snd_normalizer(module)
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
                num_sets=self.snd_sets,
                set_size=self.snd_set_size,
                num_examples=self.snd_examples,
                generator=self._generator,
            )
            self._scalars[f"diag_snd/{path}"] = float(value)

        return record

    def _record_condition(self, path: str):
        def record(module, inputs, output) -> None:
            x = inputs[0]
            if not module.training or x.dim() != 4 or x.shape[0] == 0:
                return
            cov = deconv_covariance(module, x.detach())
            whitened = whitened_covariance(cov, deconv_whitening(module, cov))
            self._scalars[f"diag_cond_cov/{path}"] = float(condition_number(cov).max())
            self._scalars[f"diag_cond_whitened/{path}"] = float(condition_number(whitened).max())

        return record

    # The iteration -----------------------------------------------------------------------

    @torch.no_grad()
    def set_reference(self) -> None:
        """Record every probed filter's magnitude now, the reference of deflation."""
        self._reference = {
            path: filter_magnitudes(weight).clone() for path, weight in self.weight_layers()
        }

    def start(self, optimizer: torch.optim.Optimizer | None = None, iteration: int = 0) -> None:
        """Before a probed training step: install the forward hooks, note weights and LRs.

        Without ``optimizer`` the gradient probes are skipped (they need the LR).
        """
        self.detach()
        self._scalars, self._seen = {}, set()
        self._generator.manual_seed(self.seed * 1_000_003 + iteration)
        if "activations" in self.probes:
            for path, module in self.output_layers():
                self._hook(module, "activations", path, self._record_activations(path))
        if "snd" in self.probes:
            for path, module in self._modules_of(lambda m: _snd_normalizer(m) is not None):
                self._hook(module, "snd", path, self._record_snd(path))
        if "whitened_condition" in self.probes:
            for path, module in self._modules_of(lambda m: isinstance(m, DeconvConv2d)):
                self._hook(module, "whitened_condition", path, self._record_condition(path))
        self._weights_before, self._lrs = {}, {}
        if "gradient_shift" in self.probes and optimizer is not None:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    self._lrs[id(parameter)] = float(group["lr"])
            with torch.no_grad():
                for path, weight in self.weight_layers():
                    if id(weight) in self._lrs:
                        self._weights_before[path] = weight.detach().clone()

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        """After the optimizer step: remove the hooks; ``{tag: value}`` of this iteration."""
        self.detach()
        scalars = self._scalars
        weights = dict(self.weight_layers())
        for path, before in self._weights_before.items():
            weight = weights.get(path)
            if weight is None or weight.grad is None:
                continue
            lr = self._lrs[id(weight)]
            scalars[f"diag_grad_shift/{path}"] = float(average_gradient_shift(weight.grad, lr))
            scalars[f"diag_filter_mean_shift/{path}"] = float(filter_mean_shift(weight))
            scalars[f"diag_filter_var_change/{path}"] = float(
                filter_variance_change(before, weight.grad, lr)
            )
        self._weights_before = {}
        if "filter_magnitude" in self.probes:
            deflated = total = 0
            for path, weight in weights.items():
                magnitudes = filter_magnitudes(weight)
                reference = self._reference.setdefault(path, magnitudes.clone())
                share = deflated_fraction(magnitudes, reference, self.deflation_ratio)
                scalars[f"diag_filter_norm/{path}"] = float(magnitudes.mean())
                scalars[f"diag_deflated/{path}"] = float(share)
                deflated += float(share) * magnitudes.numel()
                total += magnitudes.numel()
            if total:
                scalars["diag_deflated/all"] = deflated / total
        self._scalars = {}
        return scalars

    def detach(self) -> None:
        """Remove every forward hook this object installed (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
