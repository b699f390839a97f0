"""What the three layers share: the whitening matrix ``D``, the weight transform ``W' = W D``
and its inverse, and the layer protocol built on them (``fuse``, ``load_plain_weights``).

Part of :mod:`norm_det.layers.deconv` (its docstring has the algorithm).
"""

from __future__ import annotations

import torch
from torch import nn

from norm_det.layers.checks import check_integer, check_one_of
from norm_det.layers.deconv.standardization import (
    SCALE_INVARIANCES,
    _with_input_standardization,
)
from norm_det.layers.deconv.statistics import (
    _RunningStatistics,
    resolve_block,
    second_moments,
)
from norm_det.layers.isqrt import BACKENDS, whiten_rows

# Column layouts of a weight matrix (rows: outputs, columns: the data matrix's features).
_INTERLEAVED = "interleaved"  # convolution: column j = f * G + g (group j mod G)
_CHUNKED = "chunked"  # linear: column j = g * F + f (contiguous chunks)
_PER_GROUP = "per_group"  # grouped convolution: one F x F matrix per convolution group


def _init_conv_groups(
    conv: nn.Conv2d | nn.ConvTranspose2d, block: int, sampling_stride: int, layer: str
) -> tuple[int, int]:
    """Set a convolution's ``sampling_stride``, ``block`` and ``_layout``; return the data
    matrix's ``(F, mats)``.

    A grouped convolution whitens each group's ``in_channels / groups`` channels with a matrix of
    its own; otherwise the ``C / B`` interleaved groups of ``B`` channels share one matrix.
    """
    check_integer(layer, "sampling_stride", sampling_stride, 1)
    if conv.groups > 1:
        conv.block, mats, conv._layout = conv.in_channels // conv.groups, conv.groups, _PER_GROUP
    else:
        conv.block = resolve_block(block, conv.in_channels, layer, stacklevel=4)
        mats, conv._layout = 1, _INTERLEAVED
    conv.sampling_stride = sampling_stride
    return conv.kernel_size[0] * conv.kernel_size[1] * conv.block, mats


# Weight matrix <-> stack of per-matrix rows (mats, R, F).


def _to_stack(weight: torch.Tensor, layout: str, mats: int, features: int) -> torch.Tensor:
    """``(O, J)`` weight -> ``(mats, R, F)`` rows that ``D`` multiplies from the right."""
    rows = weight.shape[0]
    if layout == _PER_GROUP:
        return weight.reshape(mats, -1, features)
    if layout == _INTERLEAVED:
        weight = weight.reshape(rows, features, -1).transpose(1, 2)
    return weight.reshape(1, -1, features)


def _from_stack(stack: torch.Tensor, rows: int, layout: str, features: int) -> torch.Tensor:
    """The inverse of :func:`_to_stack`: ``(mats, R, F)`` -> the ``(rows, J)`` weight."""
    if layout == _INTERLEAVED:
        return stack.reshape(rows, -1, features).transpose(1, 2).reshape(rows, -1)
    return stack.reshape(rows, -1)


def _output_sums(per_row: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-stack-row values ``(mats, R)`` summed to one per output ``(O,)``."""
    return per_row.reshape(rows, -1).sum(1)


@torch.no_grad()
def _unwhitened(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    deconv: torch.Tensor,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of the running-statistics transform: the ``(W, b)`` that ``mean``
    ``(mats, F)`` and ``deconv`` ``(mats, F, F)`` turn into the plain ``(O, J)`` weight and
    bias."""
    rows, features = weight.shape[0], mean.shape[1]
    weight = weight.to(deconv)
    base = torch.zeros(rows).to(weight) if bias is None else bias.to(weight)
    eye = torch.eye(features).to(weight)
    if not mean.any() and torch.equal(deconv, eye.expand_as(deconv)):
        return weight, base  # a fresh layer (what surgery converts into) is the plain one
    stack = _to_stack(weight, layout, *mean.shape)
    # W D = target  <=>  D W^T = target^T (D is symmetric).
    solved = torch.linalg.solve(deconv, stack.transpose(-1, -2))
    shift = torch.matmul(stack, mean[:, :, None]).squeeze(-1)
    raw = _from_stack(solved.transpose(-1, -2), rows, layout, features)
    return raw, base + _output_sums(shift, rows)


def _options_repr(layer: _DeconvMixin) -> str:
    """What ``extra_repr`` adds to the plain layer's: the convolutions' sampling stride, the
    block, ``T``, ``eps``, ``S``, the sync and, when it freezes, the schedule."""
    sampling_stride = getattr(layer, "sampling_stride", None)  # DeconvLinear takes every row
    return (
        ("" if sampling_stride is None else f", sampling_stride={sampling_stride}")
        + f", block={layer.block}, iters={layer.iters}, eps={layer.eps}, "
        f"scale_invariance={layer.scale_invariance!r}, sync={layer.sync}"
        + (
            f", freeze_iter={layer.freeze_iter}, freeze_schedule={layer.freeze_schedule!r}"
            if layer.freeze
            else ""
        )
    )


class _DeconvMixin(_RunningStatistics):
    """``S``, ``D`` and ``W' = W D`` for the three ND layers, between ``nn.Conv2d``,
    ``nn.Linear`` or ``nn.ConvTranspose2d`` and their running statistics.

    A layer sets ``block`` and ``_layout``, names the plain layer ``fuse`` returns
    (``_plain_type``, built from its attributes ``_plain_arguments``) and, when its weight is not
    already the ``(O, J)`` matrix of the data's columns, converts it (``_weight_matrix``,
    ``_layer_weight``). A layer whose statistics are :func:`second_moments` of its data matrix
    (``_data_matrix``) takes its forward's weight from :meth:`_whitened_weight_for`.
    """

    block: int
    _layout: str
    _plain_type: type[nn.Module]
    _plain_arguments: tuple[str, ...]

    def _init_whitening(
        self, iters: int, eps: float, scale_invariance: str, isqrt_backend: str
    ) -> None:
        layer = type(self).__name__
        check_one_of(layer, "scale_invariance", scale_invariance, SCALE_INVARIANCES)
        check_one_of(layer, "isqrt_backend", isqrt_backend, BACKENDS)
        check_integer(layer, "iters", iters, 1)
        self.iters = iters
        self.eps = eps
        self.scale_invariance = scale_invariance
        self.isqrt_backend = isqrt_backend

    def extra_repr(self) -> str:
        return super().extra_repr() + _options_repr(self)

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The layer's weight as the ``(O, J)`` matrix acting on the data's columns."""
        return weight

    def _layer_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_weight_matrix`."""
        return matrix

    def whitened_weight(
        self, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` in the layer's own weight layout for a batch's ``(mu, Cov)``, by
        default for the running statistics."""
        mean, deconv = self._statistics(mean, cov)
        weight = self._weight_matrix(self.weight)
        weight, bias = self._whiten(weight, self.bias, mean, deconv, cov)
        return self._layer_weight(weight), bias

    def _whitened_weight_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` of a forward of the (standardized) ``x``: from its data matrix
        (``_data_matrix``) when this step estimates statistics, else the running ones."""
        if self._computes_statistics(x.shape[0]):
            moments = second_moments(self._data_matrix(x))
            return self.whitened_weight(*self._covariance(*moments))
        return self.whitened_weight()

    def _whiten(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        deconv: torch.Tensor | None = None,
        cov: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``W' = W D`` per group and ``b' = b - sum W' mu`` for an ``(O, J)`` weight.

        ``D`` is given, or computed from a batch's ``cov`` (then also averaged into
        ``running_deconv``).
        """
        rows = weight.shape[0]
        stack = _to_stack(weight, self._layout, *self.running_mean.shape)
        if cov is None:
            stack = torch.matmul(stack, deconv)
        else:
            stack, deconv = whiten_rows(
                stack,
                cov,
                self.iters,
                "inverse_newton",
                self.isqrt_backend,
                symmetric_gradient=True,  # Cov is symmetric by construction
            )
            with torch.no_grad():
                self.running_deconv.lerp_(deconv, self.momentum)
        shift = _output_sums(torch.matmul(stack, mean[:, :, None]).squeeze(-1), rows)
        new_bias = -shift if bias is None else bias - shift
        return _from_stack(stack, rows, self._layout, self.features), new_bias

    # The layer protocol (norm_det.layers): fold into the plain layer, and back.

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The plain layer (``nn.Conv2d``, ``nn.Linear`` or ``nn.ConvTranspose2d``) with ``W'``,
        ``b'`` from the running statistics.

        With scale invariance it standardizes each input sample in a forward pre-hook first.
        """
        weight, bias = self.whitened_weight()
        geometry = {name: getattr(self, name) for name in self._plain_arguments}
        plain = self._plain_type(**geometry, bias=True).to(weight)
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
        return _with_input_standardization(plain, self.scale_invariance, self.eps)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set ``W``, ``b`` so that the running-statistics layer computes the plain layer.

        Exact for ND; with scale invariance the input is standardized first, which no weight
        can undo. A layer without bias cannot absorb a nonzero ``b' + sum W' mu``.
        """
        matrix = self._weight_matrix(weight)
        raw, raw_bias = _unwhitened(
            matrix, bias, self.running_mean, self.running_deconv, self._layout
        )
        self.weight.copy_(self._layer_weight(raw))
        if self.bias is not None:
            self.bias.copy_(raw_bias)
