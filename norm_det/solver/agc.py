"""Adaptive gradient clipping (AGC).

Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021, section 4. For every unit ``i`` of a parameter ``W`` (a row of the
weight: one output channel of a convolution, one output feature of a linear layer), with ``G``
its gradient and Frobenius norms taken over the unit,

    ||W_i||* = max(||W_i||, eps),
    G_i <- lambda * ||W_i||* / ||G_i|| * G_i    if ||G_i|| / ||W_i||* > lambda,   else G_i,

so that no step changes a unit by more than the fraction ``lambda`` of its size (times the
learning rate). ``eps`` keeps zero-initialised units from being frozen.

Choices, from the paper and its release (``nfnets/agc_optax.py`` and ``experiment_nfnets.py`` of
github.com/google-deepmind/deepmind-research):

- ``lambda = 0.01`` and ``eps = 1e-3``: the release's NFNet configuration (``SGD_AGC``,
  ``clipping=0.01, eps=1e-3``), at a batch of 4096. The paper's ablation (section 4.1) finds that
  the best ``lambda`` shrinks as the batch grows: smaller batches train with larger thresholds.
  Detection batches (16 images) are far below 4096, so ``lambda`` is worth tuning upwards.
- Units. A tensor that has at most one dimension larger than 1 (a bias, a norm's or NF gain
  vector, a scalar) is one unit, its whole norm, as the release's ``unitwise_norm`` does. Any
  other tensor has one unit per index of its output dimension: dimension 0 for torch's
  convolution ``(O, I, kh, kw)`` and linear ``(O, I)`` weights, dimension 1 for transposed
  convolutions ``(I, O/g, kh, kw)`` (the release's HWIO and IO layouts reduce over all but the
  output axis).
- The final classifier is not clipped (the paper: clipping it hurts). Here parameters are
  excluded by regular expressions on their names (``re.search``), by default every predictor of
  norm_det's models, weight and bias (the release excludes the final linear weight and still
  clips its bias, in the gains-and-biases group; a clipped zero-initialised predictor bias could
  barely move, since its ``||W||*`` is ``eps``).
- ``||G_i||`` is floored at 1e-6 before dividing, as in the release, only for the division.

The cost is two norms per parameter (on views, one reduction each) and one multiply of every
clipped gradient, as for norm clipping; the ratio test and the scale of every unit of every
parameter are computed in one vectorized pass, with no host synchronization.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from norm_det.config import get_cfg

__all__ = [
    "DEFAULT_EXCLUDE",
    "AGCStats",
    "AdaptiveGradientClipper",
    "adaptive_clip_grad_",
    "output_unit_dims",
]

logger = logging.getLogger(__name__)

# The predictors of norm_det's models, whatever prefix (DDP's ``module.``) the names carry: the
# config's default, defined once there.
DEFAULT_EXCLUDE: tuple[str, ...] = tuple(get_cfg().SOLVER.CLIP_GRADIENTS.AGC_EXCLUDE)

# The release's guard on ||G_i|| in the division ("should be impossible to engage").
_GRAD_NORM_FLOOR = 1e-6

_KEYS = {
    "clipping": "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
    "eps": "SOLVER.CLIP_GRADIENTS.AGC_EPS",
    "exclude": "SOLVER.CLIP_GRADIENTS.AGC_EXCLUDE",
}


class AGCStats(NamedTuple):
    """What one clipping did, as 0-dim tensors on the gradients' device (no host sync).

    Attributes:
        total_norm: the 2-norm of all gradients given, excluded ones included, before clipping.
        clipped_units: how many units were rescaled.
        max_ratio: the largest ``||G_i|| / ||W_i||*`` over the clipped (not excluded) units.
    """

    total_norm: torch.Tensor
    clipped_units: torch.Tensor
    max_ratio: torch.Tensor


def _check_options(clipping: float, eps: float) -> None:
    if not clipping > 0:
        raise ValueError(
            f"clipping ({_KEYS['clipping']}, AGC's lambda) is {clipping}; expected > 0 "
            "(the paper's 0.01 at batch 4096, larger for smaller batches)"
        )
    if not eps >= 0:
        raise ValueError(f"eps ({_KEYS['eps']}) is {eps}; expected >= 0 (the paper's 1e-3)")


def _compile(exclude: Sequence[str | re.Pattern]) -> list[re.Pattern]:
    if isinstance(exclude, (str, re.Pattern)):
        exclude = [exclude]
    patterns = []
    for pattern in exclude:
        try:
            patterns.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(
                f"exclude ({_KEYS['exclude']}): {pattern!r} is not a regular expression "
                f"({error}); expected patterns searched in parameter names, "
                r"e.g. 'roi_heads\.box_predictor\.'"
            ) from None
    return patterns


def _unit_axis(shape: torch.Size, output_dim: int) -> int | None:
    """The dimension indexing a tensor's units; None when the whole tensor is one unit."""
    if sum(1 for size in shape if size > 1) <= 1:
        return None
    return output_dim


def output_unit_dims(model: nn.Module) -> dict[str, int]:
    """``{name: 1}`` for the weights of ``model``'s transposed convolutions (others: 0)."""
    dims = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            dims[f"{module_name}.weight" if module_name else "weight"] = 1
    return dims


def _clip_units_(
    units: Sequence[tuple[torch.Tensor, int | None]],
    others: Sequence[torch.Tensor],
    clipping: float,
    eps: float,
) -> AGCStats:
    """Clip the gradients of ``units``, ``(parameter, unit axis)`` pairs; ``others`` (excluded
    gradients) count in the total norm only. Every parameter has a gradient, all on one device."""
    grads = [param.grad for param, _ in units]
    device = (grads[0] if grads else others[0]).device
    whole = [param for param, axis in units if axis is None]
    if whole:
        # One multi-tensor kernel each for all single-unit parameters.
        whole_weights = iter(torch._foreach_norm([param.detach() for param in whole]))
        whole_grads = iter(torch._foreach_norm([param.grad for param in whole]))
    weight_norms, grad_norms, scale_shapes = [], [], []
    for param, axis in units:
        shape = [1] * param.dim()
        dtype = torch.promote_types(param.dtype, torch.float32)
        if axis is None:
            weight_norms.append(next(whole_weights).reshape(1).to(dtype))
            grad_norms.append(next(whole_grads).reshape(1).to(dtype))
        else:
            dims = tuple(dim for dim in range(param.dim()) if dim != axis)
            weight_norms.append(torch.linalg.vector_norm(param.detach(), dim=dims, dtype=dtype))
            grad_norms.append(torch.linalg.vector_norm(param.grad, dim=dims, dtype=dtype))
            shape[axis] = param.shape[axis]
        scale_shapes.append(shape)
    squares = [torch.stack(torch._foreach_norm(list(others))).square().sum()] if others else []
    if not units:
        zero = torch.zeros((), device=device)
        return AGCStats(squares[0].sqrt(), zero.long(), zero)

    weight_norm = torch.cat(weight_norms)
    grad_norm = torch.cat(grad_norms)
    floored = weight_norm.clamp_min(eps)
    max_norm = floored * clipping
    clipped = grad_norm > max_norm
    # Exactly 1 where not clipped, so those gradients stay bit for bit.
    scale = torch.where(clipped, max_norm / grad_norm.clamp_min(_GRAD_NORM_FLOOR), 1.0)
    total = torch.stack([grad_norm.square().sum(), *squares]).sum().sqrt()
    parts = scale.split([norm.numel() for norm in grad_norms])
    views = [
        part.view(shape).to(grad.dtype) for part, shape, grad in zip(parts, scale_shapes, grads)
    ]
    torch._foreach_mul_(grads, views)
    return AGCStats(total, clipped.sum(), (grad_norm / floored).max())


def adaptive_clip_grad_(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    clipping: float = 0.01,
    eps: float = 1e-3,
    exclude: Sequence[str | re.Pattern] = (),
    *,
    output_dims: Mapping[str, int] | None = None,
) -> AGCStats:
    """Clip gradients unit-wise, in place (see the module docstring).

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``;
            parameters without a gradient are skipped.
        clipping: ``lambda``, the largest ratio ``||G_i|| / max(||W_i||, eps)`` kept as is.
        eps: the floor of the unit weight norms.
        exclude: regular expressions; a parameter whose name one of them matches
            (``re.search``) is not clipped.
        output_dims: the output dimension of a parameter's units, by name, where it is not 0
            (:func:`output_unit_dims` gives the transposed convolutions').

    Returns:
        :class:`AGCStats`: total gradient norm before clipping, clipped units, largest ratio.

    Raises:
        ValueError: ``clipping`` <= 0, ``eps`` < 0 or a pattern that does not compile.
    """
    _check_options(clipping, eps)
    patterns = _compile(exclude)
    output_dims = output_dims or {}
    by_device: dict[torch.device, tuple[list, list]] = {}
    for name, param in named_parameters:
        if param.grad is None:
            continue
        units, others = by_device.setdefault(param.grad.device, ([], []))
        if any(pattern.search(name) for pattern in patterns):
            others.append(param.grad)
        else:
            units.append((param, _unit_axis(param.shape, output_dims.get(name, 0))))
    return _combine([_clip_units_(u, o, clipping, eps) for u, o in by_device.values()])


def _combine(stats: list[AGCStats]) -> AGCStats:
    if not stats:
        zero = torch.zeros(())
        return AGCStats(zero, zero.long(), zero)
    if len(stats) == 1:
        return stats[0]
    device = stats[0].total_norm.device
    total = torch.stack([s.total_norm.to(device) for s in stats]).square().sum().sqrt()
    clipped = torch.stack([s.clipped_units.to(device) for s in stats]).sum()
    ratio = torch.stack([s.max_ratio.to(device) for s in stats]).max()
    return AGCStats(total, clipped, ratio)


class AdaptiveGradientClipper:
    """AGC for one model: its parameter names decide the exclusions and the unit layout.

    Built with the model, then called like the other clippers with the parameters to clip
    (``model.parameters()``, also of the model wrapped in DDP); it returns the total gradient
    norm before clipping, and keeps the step's :class:`AGCStats` in ``last_stats``.

    Args:
        model: the model whose parameters will be clipped.
        clipping: ``lambda``.
        eps: the floor of the unit weight norms.
        exclude: regular expressions searched in the parameter names; matches are not clipped.

    Raises:
        ValueError: bad ``clipping``/``eps``, a pattern that does not compile, or patterns that
            match no parameter of ``model`` (the final classifier would be clipped; an empty
            list clips everything, on purpose). The messages name the config keys.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: Sequence[str | re.Pattern] = DEFAULT_EXCLUDE,
    ) -> None:
        _check_options(clipping, eps)
        patterns = _compile(exclude)
        self.clipping = clipping
        self.eps = eps
        output_dims = output_unit_dims(model)
        self._units: dict[int, int | None] = {}
        self._excluded: set[int] = set()
        excluded_names = []
        named = list(model.named_parameters())
        for name, param in named:
            if any(pattern.search(name) for pattern in patterns):
                self._excluded.add(id(param))
                excluded_names.append(name)
            else:
                self._units[id(param)] = _unit_axis(param.shape, output_dims.get(name, 0))
        if patterns and not excluded_names:
            shown = ", ".join(name for name, _ in named[-4:])
            raise ValueError(
                f"exclude ({_KEYS['exclude']}): none of {[p.pattern for p in patterns]} matches "
                f"a parameter of the model (its last ones: {shown}), so its final classifier "
                "would be clipped, which the AGC paper advises against; give patterns of the "
                "predictor's parameter names, or [] to clip every parameter"
            )
        self.excluded_names = tuple(excluded_names)
        self.last_stats: AGCStats | None = None
        logger.info(
            "AGC (lambda %g, eps %g) leaves %d parameter(s) unclipped: %s",
            clipping,
            eps,
            len(excluded_names),
            ", ".join(excluded_names),
        )

    def __call__(self, parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
        by_device: dict[torch.device, tuple[list, list]] = {}
        unknown = 0
        for param in parameters:
            if param.grad is None:
                continue
            units, others = by_device.setdefault(param.grad.device, ([], []))
            key = id(param)
            if key in self._excluded:
                others.append(param.grad)
            elif key in self._units:
                units.append((param, self._units[key]))
            else:
                unknown += 1
        if unknown:
            raise ValueError(
                f"AGC clipper: {unknown} parameter(s) with gradients are not parameters of the "
                "model it was built with (build_gradient_clipper(cfg, model) with the model "
                "being trained, after any conversion)"
            )
        if not by_device:
            return None
        self.last_stats = _combine(
            [_clip_units_(u, o, self.clipping, self.eps) for u, o in by_device.values()]
        )
        return self.last_stats.total_norm
