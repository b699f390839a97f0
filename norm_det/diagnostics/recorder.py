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

What the forward hooks record is in :mod:`norm_det.diagnostics.forward_probes`, what is
measured after the step in :mod:`norm_det.diagnostics.step_probes`, which modules are probed in
:class:`ProbedLayers`. A module called several times in one iteration (an RPN head over the FPN
levels, accumulated passes) is probed at its first call. Random draws (SND's sample sets) come
from a private generator, so the training's random stream is untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from norm_det.diagnostics.filter_magnitude import filter_magnitudes
from norm_det.diagnostics.forward_probes import (
    ForwardHooks,
    activation_recorder,
    condition_recorder,
    snd_normalizer,
    snd_recorder,
)
from norm_det.diagnostics.step_probes import (
    filter_magnitude_scalars,
    filters_before_step,
    gradient_shift_scalars,
    learning_rates,
    probed_weight,
)
from norm_det.layers import DeconvConv2d
from norm_det.surgery import is_conv, is_norm

PROBES = ("activations", "snd", "gradient_shift", "filter_magnitude", "whitened_condition")

__all__ = ["PROBES", "ModelDiagnostics", "ProbedLayers"]


def _check_options(
    probes: Sequence[str], layers: str, snd_sets: int, snd_set_size: int, snd_examples: int
) -> re.Pattern | None:
    """The compiled ``layers`` expression (None when empty), after refusing bad options."""
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(
            f"DIAGNOSTICS.PROBES: unknown probe(s) {unknown}; expected some of {list(PROBES)}"
        )
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as error:
        raise ValueError(
            f"DIAGNOSTICS.LAYERS: {layers!r} is not a regular expression ({error})"
        ) from None
    if min(snd_sets, snd_set_size, snd_examples) < 1 or snd_sets < 2:
        raise ValueError(
            "DIAGNOSTICS.SND: SETS must be >= 2 and SET_SIZE, EXAMPLES >= 1; got "
            f"{snd_sets}, {snd_set_size}, {snd_examples}"
        )
    return pattern


class ProbedLayers:
    """The modules of ``model`` whose path ``pattern`` matches (``re.search``; None: all)."""

    def __init__(self, model: nn.Module, pattern: re.Pattern | None) -> None:
        self.model = model
        self.pattern = pattern

    def selected(self, path: str) -> bool:
        return self.pattern is None or self.pattern.search(path) is not None

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
                if self.selected(path):
                    yield path, child

    def weight_layers(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(path, filters)`` of every selected convolution with trainable filters."""
        for path, module in self.model.named_modules():
            if is_conv(module) and self.selected(path):
                parameter = probed_weight(module)
                if parameter is not None:
                    yield path, parameter

    def modules_of(self, kind: Callable[[nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
        """``(path, module)`` of every selected module ``kind`` accepts."""
        for path, module in self.model.named_modules():
            if kind(module) and self.selected(path):
                yield path, module


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
        pattern = _check_options(probes, layers, snd_sets, snd_set_size, snd_examples)
        self.model = model
        self.probes = tuple(probes)
        self.snd_sets = snd_sets
        self.snd_set_size = snd_set_size
        self.snd_examples = snd_examples
        self.deflation_ratio = deflation_ratio
        self.seed = seed
        self._layers = ProbedLayers(model, pattern)
        self._hooks = ForwardHooks()
        self._scalars: dict[str, float] = {}
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

    def output_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """See :meth:`ProbedLayers.output_layers`."""
        return self._layers.output_layers()

    def weight_layers(self) -> Iterator[tuple[str, nn.Parameter]]:
        """See :meth:`ProbedLayers.weight_layers`."""
        return self._layers.weight_layers()

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
        self._scalars, self._hooks = {}, ForwardHooks()
        self._generator.manual_seed(self.seed * 1_000_003 + iteration)
        self._install_hooks()
        self._weights_before, self._lrs = {}, {}
        if "gradient_shift" in self.probes and optimizer is not None:
            self._lrs = learning_rates(optimizer)
            self._weights_before = filters_before_step(self.weight_layers(), self._lrs)

    def _install_hooks(self) -> None:
        scalars, add = self._scalars, self._hooks.add
        if "activations" in self.probes:
            for path, module in self.output_layers():
                add(module, "activations", path, activation_recorder(path, scalars))
        if "snd" in self.probes:
            snd = (self.snd_sets, self.snd_set_size, self.snd_examples, self._generator)
            for path, module in self._layers.modules_of(lambda m: snd_normalizer(m) is not None):
                add(module, "snd", path, snd_recorder(path, scalars, *snd))
        if "whitened_condition" in self.probes:
            for path, module in self._layers.modules_of(lambda m: isinstance(m, DeconvConv2d)):
                add(module, "whitened_condition", path, condition_recorder(path, scalars))

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        """After the optimizer step: remove the hooks; ``{tag: value}`` of this iteration."""
        self.detach()
        scalars = self._scalars
        weights = dict(self.weight_layers())
        scalars.update(gradient_shift_scalars(weights, self._weights_before, self._lrs))
        self._weights_before = {}
        if "filter_magnitude" in self.probes:
            scalars.update(filter_magnitude_scalars(weights, self._reference, self.deflation_ratio))
        self._scalars = {}
        return scalars

    def detach(self) -> None:
        """Remove every forward hook this object installed (idempotent)."""
        self._hooks.remove()
