"""What the three layers share: statistics, the whitening matrix ``D``, the weight transform
``W' = W D`` and its inverse.

Part of :mod:`norm_det.layers.deconv` (its docstring has the algorithm).
"""

from __future__ import annotations

import torch

from norm_det.layers.deconv.standardization import SCALE_INVARIANCES
from norm_det.layers.deconv.statistics import FREEZE_SCHEDULES, computes_statistics_at
from norm_det.layers.distributed import all_reduce_mean_moments, get_world_size
from norm_det.layers.isqrt import BACKENDS, whiten_rows

# Column layouts of a weight matrix (rows: outputs, columns: the data matrix's features).
_INTERLEAVED = "interleaved"  # convolution: column j = f * G + g (group j mod G)
_CHUNKED = "chunked"  # linear: column j = g * F + f (contiguous chunks)
_PER_GROUP = "per_group"  # grouped convolution: one F x F matrix per convolution group


class _DeconvMixin:
    """Configuration, buffers and statistics shared by the three ND layers.

    Buffers: ``running_mean`` ``(mats, F)``, ``running_deconv`` ``(mats, F, F)`` and
    ``num_batches_tracked`` (the freeze schedule's step counter: the number of training forwards
    with a non-empty input, saved in the state dict so that a resumed run keeps the schedule).
    """

    _layout: str

    def _init_deconv(
        self,
        *,
        features: int,
        mats: int,
        iters: int,
        eps: float,
        momentum: float,
        scale_invariance: str,
        freeze: bool,
        freeze_iter: int,
        freeze_schedule: str,
        sync: bool,
        isqrt_backend: str,
        device,
        dtype,
    ) -> None:
        layer = type(self).__name__
        if scale_invariance not in SCALE_INVARIANCES:
            raise ValueError(
                f"{layer}: scale_invariance must be one of {SCALE_INVARIANCES}; "
                f"got {scale_invariance!r}"
            )
        if isqrt_backend not in BACKENDS:
            raise ValueError(
                f"{layer}: isqrt_backend must be one of {BACKENDS}; got {isqrt_backend!r}"
            )
        if iters < 1 or freeze_iter < 1:
            raise ValueError(f"{layer}: iters and freeze_iter must be >= 1")
        if freeze_schedule not in FREEZE_SCHEDULES:
            raise ValueError(
                f"{layer}: freeze_schedule must be one of {FREEZE_SCHEDULES}; "
                f"got {freeze_schedule!r}"
            )
        self.features = features
        self.iters = iters
        self.eps = eps
        self.momentum = momentum
        self.scale_invariance = scale_invariance
        self.freeze = freeze
        self.freeze_iter = freeze_iter
        self.freeze_schedule = freeze_schedule
        self.sync = sync
        self.isqrt_backend = isqrt_backend
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(mats, features, **factory))
        eye = torch.eye(features, **factory).expand(mats, features, features)
        self.register_buffer("running_deconv", eye.clone())
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def _deconv_repr(self) -> str:
        return (
            f", block={self.block}, iters={self.iters}, eps={self.eps}, "
            f"scale_invariance={self.scale_invariance!r}, sync={self.sync}"
            + (
                f", freeze_iter={self.freeze_iter}, freeze_schedule={self.freeze_schedule!r}"
                if self.freeze
                else ""
            )
        )

    def _computes_statistics(self, samples: int) -> bool:
        """Whether this forward estimates fresh statistics (advances the freeze schedule)."""
        if not self.training or samples == 0:
            return False
        self.num_batches_tracked.add_(1)
        if not self.freeze:
            return True
        # Counted as the releases count: the first training forward is step 1.
        step = int(self.num_batches_tracked)
        return computes_statistics_at(step, self.freeze_iter, self.freeze_schedule)

    def _covariance(
        self, mean: torch.Tensor, outer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, Cov)`` from a batch's ``mean`` ``(mats, F)`` and ``E[x x^T]``
        ``(mats, F, F)``, averaged over processes when syncing; updates the running mean."""
        if self.sync and get_world_size() > 1:
            # Upper triangles only: E[x x^T] is symmetric (half the bytes, the same numbers).
            mean, outer = all_reduce_mean_moments(mean, outer)
        cov = torch.baddbmm(outer, mean[:, :, None], mean[:, None, :], alpha=-1)
        cov.diagonal(dim1=-2, dim2=-1).add_(self.eps)
        # One reduction: any NaN or Inf (or an overflow) makes the sum non-finite.
        if not bool(torch.isfinite(cov.sum())):
            raise FloatingPointError(
                f"{self._describe()}: the covariance of the layer's input is not finite "
                "(NaN or Inf reached this layer); lower the learning rate or check the data"
            )
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
        return mean, cov

    def _statistics(
        self, mean: torch.Tensor | None, cov: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mu, D)`` for :meth:`whitened_weight`: ``D`` None where a batch's ``cov`` gives it;
        the running statistics by default, copied when a graph is recorded: it keeps them for
        the backward, and a later forward of this layer in the same step (a head shared by the
        FPN levels, with fresh statistics on that call) updates them in place."""
        deconv = self.running_deconv if cov is None else None
        if mean is None:
            mean = self.running_mean
            if torch.is_grad_enabled():
                mean = mean.clone()
                deconv = None if deconv is None else deconv.clone()
        return mean, deconv

    # Weight matrix <-> stack of per-matrix rows (mats, R, F).

    def _to_stack(self, weight: torch.Tensor) -> torch.Tensor:
        """``(O, J)`` weight -> ``(mats, R, F)`` rows that ``D`` multiplies from the right."""
        rows = weight.shape[0]
        if self._layout == _PER_GROUP:
            return weight.reshape(self.running_mean.shape[0], -1, self.features)
        if self._layout == _INTERLEAVED:
            weight = weight.reshape(rows, self.features, -1).transpose(1, 2)
        return weight.reshape(1, -1, self.features)

    def _from_stack(self, stack: torch.Tensor, rows: int) -> torch.Tensor:
        if self._layout == _INTERLEAVED:
            return stack.reshape(rows, -1, self.features).transpose(1, 2).reshape(rows, -1)
        return stack.reshape(rows, -1)

    def _output_sums(self, per_row: torch.Tensor, rows: int) -> torch.Tensor:
        """Per-stack-row values ``(mats, R)`` summed to one per output ``(O,)``."""
        return per_row.reshape(rows, -1).sum(1)

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
        stack = self._to_stack(weight)
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
        shift = self._output_sums(torch.matmul(stack, mean[:, :, None]).squeeze(-1), rows)
        new_bias = -shift if bias is None else bias - shift
        return self._from_stack(stack, rows), new_bias

    @torch.no_grad()
    def _unwhiten(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(W, b)`` whose running-statistics transform is the plain ``(weight, bias)``."""
        rows = weight.shape[0]
        weight = weight.to(self.running_deconv)
        base = torch.zeros(rows).to(weight) if bias is None else bias.to(weight)
        eye = torch.eye(self.features).to(weight)
        if not self.running_mean.any() and torch.equal(
            self.running_deconv, eye.expand_as(self.running_deconv)
        ):
            return weight, base  # a fresh layer (what surgery converts into) is the plain one
        stack = self._to_stack(weight)
        # W D = target  <=>  D W^T = target^T (D is symmetric).
        solved = torch.linalg.solve(self.running_deconv, stack.transpose(-1, -2))
        shift = torch.matmul(stack, self.running_mean[:, :, None]).squeeze(-1)
        return self._from_stack(solved.transpose(-1, -2), rows), base + self._output_sums(
            shift, rows
        )
