"""Network deconvolution (ND) and ND++: whitened convolution, linear and transposed layers.

Ye et al., "Network Deconvolution", ICLR 2020, and Ye et al., "Exploiting Invariance in Training
Deep Neural Networks" (ND++, AAAI 2022), Algorithm 1 and "Implementation Details". A layer
computes ``y = S X D W``: ``S`` standardizes each sample with its own statistics (ND++'s scale
invariance; ND has none), ``X`` is the layer's data matrix (im2col rows for a convolution),
``D ~ Cov(X)^{-1/2}`` decorrelates its columns with batch statistics, and the product is
reordered as ``(S X)(D W)`` so that only the *weight* is transformed and the convolution stays
one ``F.conv2d`` (the paper's acceleration).

Exactly (norm_det DESIGN, "Layer semantics"):

- ``S``: ``x / sigma - mu / sigma`` over each sample's ``C x H x W`` values, ``sigma`` the
  unbiased standard deviation plus ``eps`` (``"layernorm"``), or ``x / (E|x| + eps)``
  (``"l1norm"``), or nothing (``"none"``, ND).
- ``X``: im2col with the convolution's kernel, dilation and padding at patch centres every
  ``sampling_stride * stride`` pixels (a 1x1 convolution takes every ``s_h * s_w``-th of the
  ``N*H*W`` pixels). Its ``C*k*k`` columns (unfold order) form ``C/B`` groups of
  ``F = k*k*B`` features, column ``j`` in group ``j mod (C/B)``; the groups are stacked as extra
  samples of one ``F x F`` covariance (a grouped convolution has one matrix per group; a linear
  layer pools its ``in_features/B`` contiguous chunks).
- ``Cov = E[X^T X] - mu mu^T + eps I``, the two moments averaged over processes when ``sync``
  (differentiably, each process weighted equally); ``D`` = ``iters`` coupled inverse-Newton
  steps on ``Cov / ||Cov||_F`` (:mod:`norm_det.layers.isqrt`); ``W' = W D`` per group and
  ``b' = b - sum W' mu``. Running averages of ``mu`` and ``D`` (``momentum``) serve in eval, and
  in training while ``freeze`` holds the statistics (:func:`computes_statistics_at`).

Where the time goes, and what keeps it small (docs/whitening.md has the measurements):

- the statistics use only the sampled patches, gathered tap by tap as strided slices of the
  input straight into the layout whose view is the data matrix of either grouping (no im2col,
  no copy); the per-sample statistics, the standardized patches and both moments are one
  autograd node (:class:`_SampledMoments`) whose backward adds into one input gradient;
- the Gram matrix, ``D`` and the isqrt backward's last product are symmetric: computed as their
  lower block triangle (:func:`norm_det.layers.isqrt.symmetric_matmul`, 2/3 of the work);
- ``D`` comes from one eigendecomposition with a closed-form (Daleckii-Krein) backward, exact for
  the ``T``-step iteration (:mod:`norm_det.layers.isqrt`);
- the per-sample standardization is folded into the convolution,
  ``conv(S x, W') = conv(x, W') / sigma - (mu / sigma) conv(1, W')``, where ``conv(1, W')`` is
  the weight sums except on the zero-padded border; the standardized input is never
  materialized, the weight gradient is taken per sample (which also gives the gradient of
  ``1 / sigma``) and the convolution hands its input gradient to the statistics' backward
  instead of returning a second full-size one (:class:`_StandardizedConv`,
  :class:`_GradientHandOff`).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.distributed import all_reduce_mean_moments, get_world_size
from norm_det.layers.isqrt import BACKENDS, symmetric_matmul, whiten_rows

SCALE_INVARIANCES = ("none", "layernorm", "l1norm")
FREEZE_SCHEDULES = ("ndpp", "iclr2020")
# Float32 sums of squares this many times the centred sum leave fewer than ~4 of their 7 digits
# for the variance: such samples are recomputed centred.
_CANCELLATION = 1e3
# Per-sample affine maps of at most this many samples run as one scalar operation per sample.
_AFFINE_LOOP_MAX = 16
# _StandardizedConv: with at most this many samples the weight gradient is taken per sample
# (one convolution backward each), which spares two passes over the activations.
_PER_SAMPLE_WEIGHT_GRAD_MAX = 8

# Column layouts of a weight matrix (rows: outputs, columns: the data matrix's features).
_INTERLEAVED = "interleaved"  # convolution: column j = f * G + g (group j mod G)
_CHUNKED = "chunked"  # linear: column j = g * F + f (contiguous chunks)
_PER_GROUP = "per_group"  # grouped convolution: one F x F matrix per convolution group


# ---------------------------------------------------------------------------------------------
# Scale invariance: per-sample standardization.


def _sample_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation of each sample ``x[n]``: two ``(N,)`` tensors.

    Reads ``x`` twice and allocates nothing of its size: float32 sums and sums of squares over
    short chunks (one channel each for images), merged in float64 (Chan et al.'s pairwise
    update). Where the mean is so large against the spread that float32 sums of squares cannot
    resolve the variance, the centred sums are recomputed directly.
    """
    n, count = x.shape[0], x[0].numel()
    chunks = x.reshape(n * x.shape[1], -1) if x.dim() > 2 else x.reshape(n, -1)
    size = chunks.shape[1]
    sums = torch.mv(chunks, chunks.new_ones(size)).double().view(n, -1)
    squares = torch.linalg.vector_norm(chunks, dim=1).double().square().view(n, -1)
    chunk_mean = sums / size
    mean = sums.sum(1) / count
    m2 = (squares - sums * chunk_mean).sum(1)
    m2 = m2 + (size * (chunk_mean - mean[:, None]).square()).sum(1)
    if x.dtype != torch.float64 and bool((squares.sum(1) > _CANCELLATION * m2).any()):
        centre = mean.to(x.dtype).view(n, 1, 1).expand(n, 1, size).contiguous()
        distances = torch.cdist(
            chunks.view(n, -1, size), centre, compute_mode="donot_use_mm_for_euclid_dist"
        )
        m2 = distances.double().square().sum((1, 2))
    std = (m2.clamp_min(0) / max(count - 1, 1)).sqrt()
    return mean.to(x.dtype), std.to(x.dtype)


def _sample_mean_std_grad(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    grad_mean: torch.Tensor,
    grad_std: torch.Tensor,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dL/dx`` from the gradients of :func:`_sample_mean_std`'s results: one pass over ``x``.

    With ``out``, ``out_scale[n] * out[n]`` plus that, in place (see :func:`_per_sample_affine`).
    """
    count = x[0].numel()
    # d std / d x_i = (x_i - mean) / ((count - 1) std); zero for a constant sample.
    alpha = torch.where(std > 0, grad_std / (std * max(count - 1, 1)), 0.0)
    beta = grad_mean / count - alpha * mean
    return _per_sample_affine(x, alpha, beta, out, out_scale)


def _per_sample_affine(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha[n] * x[n] + beta[n]`` for ``x`` ``(N, ...)``, into a new tensor or, with ``out``,
    ``out[n] = out_scale[n] * out[n] + alpha[n] * x[n] + beta[n]`` in place."""
    if x.shape[0] > _AFFINE_LOOP_MAX:
        view = (-1,) + (1,) * (x.dim() - 1)
        if out is None:
            return torch.addcmul(beta.view(view), x, alpha.view(view))
        if out_scale is not None:
            out.mul_(out_scale.view(view))
        return out.addcmul_(x, alpha.view(view)).add_(beta.view(view))
    # A few samples: scalar operations per sample run at memory speed, where the broadcast
    # addcmul took 2.5x as long.
    coefficients = zip(alpha.tolist(), beta.tolist())
    if out is None:
        out = torch.empty_like(x)
        for n, (a, b) in enumerate(coefficients):
            torch.add(x.new_tensor(b), x[n], alpha=a, out=out[n])
        return out
    scales = [None] * x.shape[0] if out_scale is None else out_scale.tolist()
    for n, ((a, b), c) in enumerate(zip(coefficients, scales)):
        sample = out[n] if c is None else out[n].mul_(c)
        sample.add_(x[n], alpha=a).add_(b)
    return out


class _SampleMeanStd(torch.autograd.Function):
    """:func:`_sample_mean_std` with a one-pass backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = _sample_mean_std(x)
        ctx.save_for_backward(x, mean, std)
        return mean, std

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_std: torch.Tensor) -> torch.Tensor:
        x, mean, std = ctx.saved_tensors
        return _sample_mean_std_grad(x, mean, std, grad_mean, grad_std)


def sample_standardization(
    x: torch.Tensor, mode: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample ``(scale, shift)`` with ``S x = scale[n] * x + shift[n]``.

    Args:
        x: ``(N, ...)``; each ``x[n]`` is one sample.
        mode: ``"layernorm"`` (``scale = 1/(sigma + eps)``, ``shift = -mu * scale``, unbiased
            ``sigma``) or ``"l1norm"`` (``scale = 1/(E|x| + eps)``, no shift).

    Returns:
        ``scale`` ``(N,)`` and ``shift`` ``(N,)`` (``None`` for l1norm).
    """
    if mode == "layernorm":
        mean, std = _SampleMeanStd.apply(x)
        scale = 1.0 / (std + eps)
        return scale, -mean * scale
    if mode == "l1norm":
        return 1.0 / (x.reshape(x.shape[0], -1).abs().mean(1) + eps), None
    raise ValueError(f"scale_invariance must be one of {SCALE_INVARIANCES}; got {mode!r}")


def standardize(x: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """``S x``: each sample of ``x`` ``(N, ...)`` standardized (identity for ``"none"``)."""
    if mode == "none" or x.shape[0] == 0:
        return x
    scale, shift = sample_standardization(x, mode, eps)
    view = (-1,) + (1,) * (x.dim() - 1)
    if shift is None:
        return x * scale.view(view)
    return torch.addcmul(shift.view(view), x, scale.view(view))


def _is_exporting() -> bool:
    """Whether a graph is being traced (ONNX export, TorchScript, torch.compile)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def _standardize_for_inference(x: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """``S x``; in plain tensor operations when a graph is being exported (ONNX needs them).

    Eagerly and without autograd, layernorm uses the training path's two reads and one write
    per sample (:func:`_sample_mean_std`, :func:`_per_sample_affine`): 5-16x faster than the
    plain operations' five passes and two temporaries at detection shapes on a 2-core CPU.
    """
    eager = not _is_exporting() and not (torch.is_grad_enabled() and x.requires_grad)
    if mode == "layernorm" and x.shape[0] > 0 and eager:
        mean, std = _sample_mean_std(x)
        scale = 1.0 / (std + eps)
        return _per_sample_affine(x, scale, -mean * scale)
    flat = x.reshape(x.shape[0], -1)
    if mode == "layernorm":
        centered = flat - flat.mean(1, keepdim=True)
        return (centered / (flat.std(1, keepdim=True) + eps)).view_as(x)
    return (flat / (flat.abs().mean(1, keepdim=True) + eps)).view_as(x)


def _standardize_input_hook(
    module: nn.Module, args: tuple, *, mode: str, eps: float
) -> tuple[torch.Tensor, ...]:
    return (_standardize_for_inference(args[0], mode, eps), *args[1:])


def _with_input_standardization(plain: nn.Module, mode: str, eps: float) -> nn.Module:
    """``plain`` standardizing each input sample first (a forward pre-hook; none for ND).

    The fused layer stays a plain ``nn.Conv2d``/``nn.Linear``/``nn.ConvTranspose2d`` whose
    ``weight`` and ``bias`` are the whitened ones; the hook is picklable and traced by export.
    """
    if mode != "none":
        plain.register_forward_pre_hook(
            functools.partial(_standardize_input_hook, mode=mode, eps=eps)
        )
    return plain


# ---------------------------------------------------------------------------------------------
# Shared machinery: block sizes, statistics, the whitening matrix, the weight transform.


def computes_statistics_at(step: int, freeze_iter: int, schedule: str = "ndpp") -> bool:
    """Whether training step ``step`` (the first training forward is step 1) estimates fresh
    statistics under ``freeze``, with ``f = freeze_iter``.

    - ``"ndpp"``, the ND++ release (``NormalizedDeconv``: the counter is incremented, then the
      statistics are frozen when ``counter % (10 f) > f``): steps ``s`` with
      ``s mod 10f <= f``, i.e. ``1..f`` and then ``f + 1`` of every ``10 f`` steps. At ``f = 1``:
      steps 1, 10, 11, 20, 21, ...; at ``f = 2``: 1, 2, 20, 21, 22, 40, ...
    - ``"iclr2020"``, the Network Deconvolution code (``FastDeconv``: frozen when
      ``counter > f``, tested before the counter is incremented modulo ``10 f``): steps with
      ``(s - 1) mod 10f <= f``, ``f + 1`` of every ``10 f``. At ``f = 1``: 1, 2, 11, 12, 21, ...;
      at ``f = 2``: 1, 2, 3, 21, 22, 23, ...
    """
    if schedule == "ndpp":
        return step % (10 * freeze_iter) <= freeze_iter
    if schedule == "iclr2020":
        return (step - 1) % (10 * freeze_iter) <= freeze_iter
    raise ValueError(f"freeze_schedule must be one of {FREEZE_SCHEDULES}; got {schedule!r}")


def resolve_block(block: int, channels: int, layer: str) -> int:
    """The block size actually used: at most ``channels``, and dividing it.

    A block that does not divide the channels falls back to ``gcd(block, channels)`` with one
    warning (per layer).
    """
    if block < 1:
        raise ValueError(f"{layer}: block must be >= 1; got {block}")
    if block >= channels:
        return channels
    if channels % block:
        fallback = math.gcd(block, channels)
        warnings.warn(
            f"{layer}: block {block} does not divide the {channels} input channels; "
            f"using gcd(block, channels) = {fallback}",
            stacklevel=3,
        )
        return fallback
    return block


def second_moments(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``E[x x^T]`` of the columns of ``data``.

    Args:
        data: ``(batch, mats, F, S)``: ``mats`` independent matrices whose samples are the
            ``batch * S`` columns.

    Returns:
        ``mean`` ``(mats, F)`` and ``E[x x^T]`` ``(mats, F, F)``.
    """
    count = data.shape[0] * data.shape[-1]
    mean = data.sum(dim=(0, -1)) / count
    return mean, _Gram.apply(data) / count


class _Gram(torch.autograd.Function):
    """``sum_batch data @ data^T``: ``(batch, mats, F, S)`` -> ``(mats, F, F)``.

    Autograd would differentiate the two factors separately (two products); the gradient of a
    Gram matrix is one product, ``(G + G^T) @ data``.
    """

    @staticmethod
    def forward(ctx, data: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(data)
        if data.shape[0] == 1:
            return symmetric_matmul(data[0], data[0].transpose(-1, -2))
        return torch.matmul(data, data.transpose(-1, -2)).sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (data,) = ctx.saved_tensors
        return torch.matmul(grad + grad.transpose(-1, -2), data)


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


# ---------------------------------------------------------------------------------------------
# A convolution's sampled data matrix and its moments.


def _tap_range(size: int, positions: int, stride: int, offset: int) -> tuple[int, int, int]:
    """The sampled positions ``a`` whose tap reads inside the input, ``0 <= a*stride + offset <
    size``: ``(first, end, first input index)``; empty when ``end <= first``."""
    first = max(0, -(offset // stride))
    end = min(positions, (size - 1 - offset) // stride + 1)
    return first, end, first * stride + offset


class _GridSampler:
    """``k x k`` patches at every ``(s_h, s_w)``-th position of a zero-padded input.

    The patches are stored as ``buffer`` ``(C, kh*kw, N, L_h, L_w)`` (padding entries 0): its
    rows ``c * kh*kw + t`` are the unfold order of the columns of the data matrix, so
    ``buffer.view(mats, F, S)`` is the data matrix of either grouping (interleaved: row
    ``f * G + g``; per convolution group: ``g * F + f``) with one sample per column. Each tap is
    one strided slice of the input, so no full im2col exists and no index is computed.
    """

    def __init__(
        self,
        kernel: tuple[int, int],
        dilation: tuple[int, int],
        padding: tuple[int, int, int, int],
        strides: tuple[int, int],
        size: tuple[int, int],
    ) -> None:
        (kh, kw), (dh, dw), (top, bottom, left, right) = kernel, dilation, padding
        (sh, sw), (height, width) = strides, size
        self.positions = (
            (height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (width + left + right - dw * (kw - 1) - 1) // sw + 1,
        )
        self.kernel_taps = kh * kw
        # (tap, positions along H, along W, input rows, input columns)
        self.taps: list[tuple[int, slice, slice, slice, slice]] = []
        for i in range(kh):
            a0, a1, r0 = _tap_range(height, self.positions[0], sh, i * dh - top)
            for j in range(kw):
                b0, b1, c0 = _tap_range(width, self.positions[1], sw, j * dw - left)
                if a1 > a0 and b1 > b0:
                    rows = slice(r0, r0 + (a1 - a0 - 1) * sh + 1, sh)
                    cols = slice(c0, c0 + (b1 - b0 - 1) * sw + 1, sw)
                    self.taps.append((i * kw + j, slice(a0, a1), slice(b0, b1), rows, cols))

    def gather(
        self, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        """The patches of ``scale[n] * x[n] + shift[n]`` (zero padding): the buffer."""
        n, channels = x.shape[:2]
        buffer = x.new_zeros(channels, self.kernel_taps, n, *self.positions)
        view = (n, 1, 1, 1)
        for tap, a, b, rows, cols in self.taps:
            source = x[:, :, rows, cols]
            target = buffer[:, tap, :, a, b].transpose(0, 1)
            if scale is None:
                target.copy_(source)
            elif shift is None:
                torch.mul(source, scale.view(view), out=target)
            else:
                torch.addcmul(shift.view(view), source, scale.view(view), out=target)
        return buffer

    def sample_sums(
        self, grad: torch.Tensor, buffer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample ``n``: ``<grad, buffer>`` and ``grad`` summed over the entries inside
        the input (not the padding)."""
        per_tap = grad.sum(0)  # (kh*kw, N, L_h, L_w)
        inside = grad.new_zeros(per_tap.shape[0], 1, *per_tap.shape[2:])
        for tap, a, b, _, _ in self.taps:
            inside[tap, :, a, b] = 1
        products = (grad * buffer).sum((0, 1, 3, 4))
        return products, (per_tap * inside).sum((0, 2, 3))

    def scatter_add_(
        self, target: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor | None
    ) -> None:
        """``target`` ``(N, C, H, W)`` += the input gradient of the buffer's ``grad``."""
        view = (target.shape[0], 1, 1, 1)
        for tap, a, b, rows, cols in self.taps:
            source = grad[:, tap, :, a, b].transpose(0, 1)
            if scale is None:
                target[:, :, rows, cols] += source
            else:
                target[:, :, rows, cols].addcmul_(source, scale.view(view))


class _PixelSampler:
    """Every ``step``-th of the ``N*H*W`` pixels (a 1x1 convolution's data), as ``(C, M)``.

    Viewed as ``(mats, F, M * C / (mats * F))`` this is the data matrix of either grouping.
    """

    def __init__(self, step: int, x: torch.Tensor) -> None:
        n, _, height, width = x.shape
        index = torch.arange(0, n * height * width, step, device=x.device)
        pixel = index % (height * width)
        self.index = (index // (height * width), pixel // width, pixel % width)
        self.samples = n

    def gather(
        self, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        sample = self.index[0]
        buffer = x.transpose(0, 1)[(slice(None), *self.index)]  # (C, M)
        if scale is not None:
            buffer.mul_(scale[sample])
        if shift is not None:
            buffer.add_(shift[sample])
        return buffer

    def sample_sums(
        self, grad: torch.Tensor, buffer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zeros, sample = grad.new_zeros(self.samples), self.index[0]
        products = zeros.index_add(0, sample, (grad * buffer).sum(0))
        return products, zeros.index_add(0, sample, grad.sum(0))

    def scatter_add_(
        self, target: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor | None
    ) -> None:
        if scale is not None:
            grad = grad * scale[self.index[0]]
        # Indexing a transposed view writes into ``target`` whatever its memory layout.
        target.transpose(0, 1)[(slice(None), *self.index)] += grad


class _GradientHandOff:
    """The input gradient of :class:`_StandardizedConv`, handed on to :class:`_SampledMoments`.

    Both nodes of a training step differentiate with respect to the same ``x``. Instead of two
    full-size gradients that autograd would add, the convolution leaves its ``conv^T(g, W)``
    here (with the per-sample scale still to apply, if any) and returns none for ``x``; the
    statistics' backward, which always runs after it (it needs the convolution's gradients of
    ``scale``, ``shift`` and, through ``D``, of ``W``), scales it and adds its own part in
    place.
    """

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # what ``grad`` still has to be scaled by

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        taken, self.grad, self.scale = (self.grad, self.scale), None, None
        return taken


class _SampledMoments(torch.autograd.Function):
    """``x -> (mean, E[x x^T], scale, shift)`` of a convolution's sampled, standardized data.

    One node for what are otherwise three (per-sample statistics, standardized patches, Gram
    matrix): forward reads ``x`` twice for the statistics and the sampled entries once;
    backward writes ``dL/dx`` once (the statistics' part) and adds the sampled entries' part to
    it in place, instead of three full-size gradients that autograd would sum.

    Args of ``apply``: ``x`` ``(N, C, H, W)``; ``padded``: the input the patches are taken from
    when the convolution pads other than with zeros (``F.pad`` of ``x``), else ``None``;
    ``sampler``: a :class:`_GridSampler` or :class:`_PixelSampler`; ``mode``, ``eps``: the scale
    invariance; ``mats``, ``features``: the data matrix's shape ``(mats, F, S)``.

    Returns ``mean`` ``(mats, F)``, ``E[x x^T]`` ``(mats, F, F)`` and ``S``'s ``scale``,
    ``shift`` ``(N,)`` (``None`` where the mode has none).
    """

    @staticmethod
    def forward(ctx, x, padded, sampler, mode, eps, mats, features, handoff):
        n = x.shape[0]
        scale = shift = mean_std = None
        if mode == "layernorm":
            mean_std = _sample_mean_std(x)
            scale = 1.0 / (mean_std[1] + eps)
            shift = -mean_std[0] * scale
        elif mode == "l1norm":
            absolute = torch.linalg.vector_norm(x.reshape(n, -1), ord=1, dim=1)
            scale = 1.0 / (absolute / x[0].numel() + eps)
        buffer = sampler.gather(x if padded is None else padded, scale, shift)
        data = buffer.view(mats, features, -1)
        count = data.shape[-1]
        mean = data.sum(-1).div_(count)
        outer = symmetric_matmul(data, data.transpose(-1, -2)).div_(count)
        ctx.sampler, ctx.mode, ctx.handoff = sampler, mode, handoff
        ctx.padded_shape = None if padded is None else padded.shape
        ctx.save_for_backward(x, buffer, scale, shift, *(mean_std or ()))
        return mean, outer, scale, shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_outer, grad_scale, grad_shift):
        x, buffer, scale, shift, *mean_std = ctx.saved_tensors
        mode, sampler = ctx.mode, ctx.sampler
        handed, handed_scale = (None, None) if ctx.handoff is None else ctx.handoff.take()
        none = (None,) * 8
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return none
        data = buffer.view(grad_outer.shape[0], grad_outer.shape[1], -1)
        count = data.shape[-1]
        # mean = sum(data) / S, E[x x^T] = data data^T / S.
        grad = torch.baddbmm(
            grad_mean[:, :, None],
            grad_outer + grad_outer.transpose(-1, -2),
            data,
            beta=1.0 / count,
            alpha=1.0 / count,
        ).view_as(buffer)
        if mode == "none" and ctx.padded_shape is not None:
            grad_x = None  # only the padded copy's patches reach the loss through the moments
        elif mode == "none":
            grad_x = torch.zeros_like(x) if handed is None else handed
        else:
            # The data is P = scale * patches + shift * inside:
            # dL/dscale += <G, patches> = (<G, P> - shift <G, inside>) / scale.
            products, inside = sampler.sample_sums(grad, buffer)
            if shift is None:
                grad_scale = grad_scale + products / scale
            else:
                grad_scale = grad_scale + (products - shift * inside) / scale
                grad_shift = grad_shift + inside
            view = (-1, 1, 1, 1)
            if mode == "layernorm":
                # scale = 1 / (std + eps), shift = -mean * scale.
                mean, std = mean_std
                grad_std = -scale.square() * (grad_scale - grad_shift * mean)
                grad_x = _sample_mean_std_grad(
                    x, mean, std, -grad_shift * scale, grad_std, handed, handed_scale
                )
            else:
                # scale = 1 / (E|x| + eps).
                coefficient = (-scale.square() * grad_scale / x[0].numel()).view(view)
                grad_x = x.sign().mul_(coefficient)
                if handed is not None:
                    if handed_scale is not None:
                        handed = handed.mul_(handed_scale.view(view))
                    grad_x = handed.add_(grad_x)
        if ctx.padded_shape is None:
            sampler.scatter_add_(grad_x, grad, scale)
            return grad_x, *none[1:]
        grad_padded = x.new_zeros(ctx.padded_shape)
        sampler.scatter_add_(grad_padded, grad, scale)
        return grad_x, grad_padded, *none[2:]


# ---------------------------------------------------------------------------------------------
# Per-sample standardization folded into a zero-padded convolution.


def _scale_and_add_(out: torch.Tensor, scale: torch.Tensor, constant: torch.Tensor) -> None:
    """``out[n] = scale[n] * out[n] + constant[n, :, None, None]`` in place, ``out`` 4-d."""
    if out.shape[0] > _AFFINE_LOOP_MAX:
        out.mul_(scale.view(-1, 1, 1, 1)).add_(constant[:, :, None, None])
        return
    # One fused multiply-add per sample; torch.addcmul with a broadcast factor ran 9x slower.
    for n, factor in enumerate(scale.tolist()):
        torch.add(constant[n, :, None, None], out[n], alpha=factor, out=out[n])


@functools.lru_cache(maxsize=256)
def _valid_taps(
    size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[tuple[float, ...], ...]:
    """``[out_size][kernel]``: 1 where output position ``h``'s tap ``i`` reads the input."""
    return tuple(
        tuple(float(0 <= h * stride - padding + i * dilation < size) for i in range(kernel))
        for h in range(out_size)
    )


class _StandardizedConv(torch.autograd.Function):
    """``conv(S x, W) + b`` for zero padding, ``S x = scale[n] * x + shift[n]``, unmaterialized.

    ``y = scale[n] * conv(x, W) + b + shift[n] * E`` with ``E = conv(1, W)``: the weight sums
    ``inner[o]`` wherever every tap reads the input, less at the padded border. Forward: the
    convolution and one fused pass. Backward: one reduction of the gradient ``g`` (plus its
    border rows and columns) and the convolution's backward, with ``g`` left unscaled: the
    input gradient is scaled afterwards (by :class:`_SampledMoments` when it is handed on) and,
    for a few samples, the weight gradient is taken per sample,
    ``sum_n scale[n] corr(x_n, g_n)``, which also gives ``dL/dscale[n] =
    <g_n, conv(x_n, W)> = <corr(x_n, g_n), W>`` without another pass over the activations.
    With ``scale`` ``None`` (ND) it is a plain convolution that only hands its input gradient on
    (``handoff``, a :class:`_GradientHandOff` or ``None``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, stride, padding, dilation, groups, handoff):
        ctx.save_for_backward(x, weight, scale, shift)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.handoff = handoff
        if scale is None:  # ND: a plain convolution, here only to hand its input gradient on
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        n, _, height, width = x.shape
        (kh, kw), (out_h, out_w) = weight.shape[2:], out.shape[2:]
        row_taps = _valid_taps(height, out_h, kh, stride[0], padding[0], dilation[0])
        col_taps = _valid_taps(width, out_w, kw, stride[1], padding[1], dilation[1])
        taps = weight.sum(1)  # (O, kh, kw)
        inner = taps.sum((1, 2))
        constant = bias.expand(n, -1)
        if shift is not None:
            constant = constant + shift[:, None] * inner
        _scale_and_add_(out, scale, constant)
        if shift is not None:
            _add_border(out, shift, taps, row_taps, col_taps)
        ctx.valid_taps = (row_taps, col_taps)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, scale, shift = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        n = grad.shape[0]
        view = (-1, 1, 1, 1)
        needs_x, needs_w, needs_scale = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        geometry = (stride, padding, dilation, False, [0, 0], groups)
        sums = grad.sum((2, 3))  # (N, O)
        if scale is None:
            mask = (needs_x, needs_w)
            grad_x, grad_w = _convolution_backward(grad, x, weight, geometry, mask)
            grad_x = _hand_on(ctx.handoff, grad_x, None)
            return grad_x, grad_w, sums.sum(0), *(None,) * 7
        grad_shift = grad_taps = None
        if shift is not None:
            borders = (_Border(valid, grad) for valid in ctx.valid_taps)
            per_tap = _tap_sums(grad, sums, *borders)  # (N, O, kh, kw) = <g, E-parts>
            grad_shift = (per_tap * weight.sum(1)).sum((1, 2, 3))
            grad_taps = (shift.view(view) * per_tap).sum(0)
        per_sample = n <= _PER_SAMPLE_WEIGHT_GRAD_MAX
        grad_x = grad_w = grad_scale = None
        if per_sample:
            if needs_x:
                grad_x = _convolution_backward(grad, x, weight, geometry, (True, False))[0]
            if needs_w or needs_scale:
                products = []
                for i, factor in enumerate(scale.tolist()):
                    part = _convolution_backward(grad[i : i + 1], x[i : i + 1], weight, geometry)[1]
                    products.append(torch.vdot(part.flatten(), weight.flatten()))
                    grad_w = (
                        part.mul_(factor) if grad_w is None else grad_w.add_(part, alpha=factor)
                    )
                grad_scale = torch.stack(products)
        else:
            mask = (needs_x or needs_scale, needs_w)
            grad_x, grad_w = _convolution_backward(
                grad * scale.view(view), x, weight, geometry, mask
            )
            if needs_scale:
                # <g_n, conv(x_n, W)> = <conv^T(g_n, W), x_n>; grad_x = scale * conv^T(g, W).
                grad_scale = torch.linalg.vecdot(grad_x.view(n, -1), x.reshape(n, -1)) / scale
        if grad_w is not None and grad_taps is not None:
            grad_w = grad_w + grad_taps[:, None]
        # The per-sample branch leaves grad_x unscaled.
        grad_x = _hand_on(ctx.handoff, grad_x, scale if per_sample else None)
        if not needs_w:
            grad_w = None
        return grad_x, grad_w, sums.sum(0), grad_scale, grad_shift, *(None,) * 5


def _hand_on(
    handoff: _GradientHandOff | None, grad_x: torch.Tensor | None, scale: torch.Tensor | None
) -> torch.Tensor | None:
    """``scale[n] * grad_x[n]``, or ``None`` after leaving both to ``handoff``."""
    if grad_x is None:
        return None
    if handoff is not None:
        handoff.grad, handoff.scale = grad_x, scale
        return None
    return grad_x if scale is None else grad_x.mul_(scale.view(-1, 1, 1, 1))


def _convolution_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geometry: tuple,
    mask: tuple[bool, bool] = (False, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dL/dx, dL/dweight)`` of ``F.conv2d(x, weight)`` (bias-free), as ``mask`` asks."""
    stride, padding, dilation, transposed, output_padding, groups = geometry
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        None,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        [mask[0], mask[1], False],
    )
    return grad_x, grad_w


class _Border:
    """The output rows (or columns) where some tap reads the zero padding.

    ``index``: those positions ``(B,)``; ``missing``: ``(B, k)``, 1 where tap ``i`` reads the
    padding there.
    """

    def __init__(self, valid: tuple[tuple[float, ...], ...], like: torch.Tensor) -> None:
        border = [h for h, taps in enumerate(valid) if min(taps) < 1]
        self.index = torch.tensor(border, dtype=torch.long, device=like.device)
        missing = [[1.0 - v for v in valid[h]] for h in border]
        kernel = len(valid[0])
        self.missing = torch.tensor(missing, dtype=like.dtype, device=like.device).view(-1, kernel)


def _tap_sums(grad: torch.Tensor, sums: torch.Tensor, rows: _Border, cols: _Border) -> torch.Tensor:
    """``sum_{h,w} grad[n, o, h, w] [tap (i, j) at (h, w) reads the input]``: ``(N, O, kh, kw)``.

    Every tap reads the input away from the border, so the sums are the totals ``sums``
    ``(N, O)`` less what the border rows and columns hold (inclusion-exclusion at the corners):
    only those are read again.
    """
    per_tap = sums[:, :, None, None].expand(
        *sums.shape, rows.missing.shape[1], cols.missing.shape[1]
    )
    if len(rows.index):
        border_rows = grad.index_select(2, rows.index)  # (N, O, B_h, W')
        per_tap = per_tap - torch.matmul(border_rows.sum(3), rows.missing)[..., :, None]
    if len(cols.index):
        border_cols = grad.index_select(3, cols.index)  # (N, O, H', B_w)
        per_tap = per_tap - torch.matmul(border_cols.sum(2), cols.missing)[..., None, :]
        if len(rows.index):
            corners = border_cols.index_select(2, rows.index)  # (N, O, B_h, B_w)
            per_tap = per_tap + torch.einsum(
                "hi,nohw,wj->noij", rows.missing, corners, cols.missing
            )
    return per_tap


def _add_border(
    out: torch.Tensor,
    shift: torch.Tensor,
    taps: torch.Tensor,
    row_taps: tuple[tuple[float, ...], ...],
    col_taps: tuple[tuple[float, ...], ...],
) -> None:
    """``out += shift[n] * (E - inner)`` in place where they differ: the zero-padded border.

    ``E[o, h, w] = sum_ij taps[o, i, j] rows[h, i] cols[w, j]`` equals ``inner[o]`` wherever every
    tap reads the input; the border rows (all columns) and the border columns of the other rows
    are corrected, nothing else is touched.
    """
    like = {"dtype": out.dtype, "device": out.device}
    inner = taps.sum((1, 2))
    column = shift.view(-1, 1, 1, 1)
    interior = [min(valid) >= 1 for valid in row_taps]
    border_rows = [h for h, inside in enumerate(interior) if not inside]
    border_cols = [w for w, valid in enumerate(col_taps) if min(valid) < 1]
    if border_rows:
        rows = torch.tensor([row_taps[h] for h in border_rows], **like)
        edge = torch.einsum("ri,oij,wj->orw", rows, taps, torch.tensor(col_taps, **like))
        index = torch.tensor(border_rows, device=out.device)
        out.index_add_(2, index, column * (edge - inner[:, None, None]))
    if border_cols:
        cols = torch.tensor([col_taps[w] for w in border_cols], **like)
        edge = torch.einsum("oij,cj->oc", taps, cols) - inner[:, None]
        edge = torch.tensor(interior, **like)[None, :, None] * edge[:, None, :]  # (O, H', C)
        out.index_add_(3, torch.tensor(border_cols, device=out.device), column * edge)


# ---------------------------------------------------------------------------------------------
# Convolution.


class DeconvConv2d(_DeconvMixin, nn.Conv2d):
    """``nn.Conv2d`` with network deconvolution (ND, or ND++ with scale invariance).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as in ``nn.Conv2d``.
        block: channels ``B`` per whitening group (``F = k*k*B`` features); at most
            ``in_channels``, gcd fallback with a warning. A grouped convolution uses one
            matrix per convolution group instead.
        sampling_stride: patch centres every ``sampling_stride * stride`` pixels (3 at ImageNet
            scale, 5 at COCO scale).
        iters: coupled inverse-Newton iterations ``T``.
        eps: added to the covariance diagonal and to the per-sample standard deviation.
        momentum: of the running mean and running ``D``.
        scale_invariance: ``"none"`` (ND), ``"layernorm"`` (ND++) or ``"l1norm"``.
        freeze: estimate statistics only on some training steps (``freeze_schedule``) and use
            the running ones otherwise.
        freeze_iter: ``f`` of the schedule: statistics on about ``f + 1`` of every ``10 f`` steps.
        freeze_schedule: ``"ndpp"`` (the ND++ release: steps ``s`` with ``s mod 10f <= f``,
            the first training forward being step 1) or ``"iclr2020"`` (the Network
            Deconvolution code: ``(s - 1) mod 10f <= f``); see :func:`computes_statistics_at`.
        sync: average the statistics over the default process group (no-op without one).
        isqrt_backend: ``"auto"``, ``"matrix"`` or ``"spectral"``
            (:func:`norm_det.layers.isqrt.inverse_sqrt`).

    Shapes: ``x`` ``(N, in_channels, H, W)`` -> ``(N, out_channels, H', W')`` as ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        block: int = 64,
        sampling_stride: int = 3,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        scale_invariance: str = "none",
        freeze: bool = False,
        freeze_iter: int = 100,
        freeze_schedule: str = "ndpp",
        sync: bool = False,
        isqrt_backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        if sampling_stride < 1:
            raise ValueError(f"DeconvConv2d: sampling_stride must be >= 1; got {sampling_stride}")
        taps = self.kernel_size[0] * self.kernel_size[1]
        if groups > 1:
            self.block, mats, self._layout = in_channels // groups, groups, _PER_GROUP
        else:
            self.block = resolve_block(block, in_channels, "DeconvConv2d")
            mats, self._layout = 1, _INTERLEAVED
        self.sampling_stride = sampling_stride
        self._init_deconv(
            features=taps * self.block,
            mats=mats,
            iters=iters,
            eps=eps,
            momentum=momentum,
            scale_invariance=scale_invariance,
            freeze=freeze,
            freeze_iter=freeze_iter,
            freeze_schedule=freeze_schedule,
            sync=sync,
            isqrt_backend=isqrt_backend,
            device=device,
            dtype=dtype,
        )

    # Data matrix ----------------------------------------------------------------------------

    def _sampler(self, x: torch.Tensor) -> _GridSampler | _PixelSampler:
        """Where the data matrix's samples of ``x`` (or of its padded copy) come from."""
        strides = (self.sampling_stride * self.stride[0], self.sampling_stride * self.stride[1])
        if self.kernel_size == (1, 1):
            return _PixelSampler(strides[0] * strides[1], x)
        left, right, top, bottom = self._reversed_padding_repeated_twice
        padding = (top, bottom, left, right) if self.padding_mode == "zeros" else (0, 0, 0, 0)
        return _GridSampler(self.kernel_size, self.dilation, padding, strides, x.shape[2:])

    def _sampled_moments(
        self, x: torch.Tensor, handoff: _GradientHandOff | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Mean ``(mats, F)`` and ``E[x x^T]`` ``(mats, F, F)`` of the sampled, standardized
        data matrix, and the standardization's per-sample ``(scale, shift)``."""
        padded = None
        if self.padding_mode != "zeros" and self.kernel_size != (1, 1):
            padded = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        sampler = self._sampler(x if padded is None else padded)
        mats, features = self.running_mean.shape
        return _SampledMoments.apply(
            x, padded, sampler, self.scale_invariance, self.eps, mats, features, handoff
        )

    @torch.no_grad()
    def _sampled_data(self, x: torch.Tensor) -> torch.Tensor:
        """The sampled data matrix of ``x`` (unstandardized): ``(mats, F, S)``."""
        if self.padding_mode != "zeros" and self.kernel_size != (1, 1):
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return self._sampler(x).gather(x, None, None).view(*self.running_mean.shape, -1)

    # Forward --------------------------------------------------------------------------------

    def whitened_weight(
        self, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` for a batch's ``(mu, Cov)``, by default for the running statistics."""
        mean, deconv = self._statistics(mean, cov)
        weight, bias = self._whiten(self.weight.flatten(1), self.bias, mean, deconv, cov)
        return weight.view_as(self.weight), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self._describe()}: expected (N, C, H, W) input; got {x.shape}")
        standardized_conv = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        handoff = None
        if self._computes_statistics(x.shape[0]):
            handoff = _GradientHandOff() if standardized_conv else None
            mean, outer, scale, shift = self._sampled_moments(x, handoff)
            weight, bias = self.whitened_weight(*self._covariance(mean, outer))
        else:
            scale = shift = None
            if self.scale_invariance != "none" and x.shape[0] > 0:
                scale, shift = sample_standardization(x, self.scale_invariance, self.eps)
            weight, bias = self.whitened_weight()
        if standardized_conv and (scale is not None or handoff is not None):
            geometry = (self.stride, self.padding, self.dilation, self.groups)
            return _StandardizedConv.apply(x, weight, bias, scale, shift, *geometry, handoff)
        if scale is None:
            return self._conv_forward(x, weight, bias)
        out = self._conv_forward(x, weight, None) * scale.view(-1, 1, 1, 1)
        constant = bias.view(1, -1, 1, 1)
        if shift is not None:
            constant = constant + shift.view(-1, 1, 1, 1) * self._weight_sums(x, weight)
        return out + constant

    def _weight_sums(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``conv(1, W')``: ``(1, O, H', W')``, or ``(1, O, 1, 1)`` without zero padding."""
        if self.padding_mode != "zeros":
            # Reflect/replicate/circular padding of a constant image is constant.
            return weight.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        ones = x.new_ones(1, 1, *x.shape[2:])
        summed = weight.sum(dim=1, keepdim=True)
        return F.conv2d(ones, summed, None, self.stride, self.padding, self.dilation)

    # Protocol -------------------------------------------------------------------------------

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with ``W'``, ``b'`` from the running statistics.

        With scale invariance it standardizes each input sample in a forward pre-hook first.
        """
        weight, bias = self.whitened_weight()
        plain = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            padding_mode=self.padding_mode,
        ).to(weight)
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
        return _with_input_standardization(plain, self.scale_invariance, self.eps)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set ``W``, ``b`` so that the running-statistics layer computes the plain conv.

        Exact for ND; with scale invariance the input is standardized first, which no weight
        can undo. A layer without bias cannot absorb a nonzero ``b' + sum W' mu``.
        """
        raw, raw_bias = self._unwhiten(weight.flatten(1), bias)
        self.weight.copy_(raw.view_as(self.weight))
        if self.bias is not None:
            self.bias.copy_(raw_bias)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", sampling_stride={self.sampling_stride}" + self._deconv_repr()
        )


# ---------------------------------------------------------------------------------------------
# Linear.


class DeconvLinear(_DeconvMixin, nn.Linear):
    """``nn.Linear`` with network deconvolution over ``in_features / B`` pooled chunks.

    Args:
        in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
        block: features ``B`` per chunk (512 for classifiers, 256 in detection heads); at most
            ``in_features``, gcd fallback with a warning.
        iters, eps, momentum, scale_invariance, freeze, freeze_iter, freeze_schedule, sync,
            isqrt_backend: as in :class:`DeconvConv2d`; scale invariance standardizes each
            row of the input.

    Shapes: ``(*, in_features)`` -> ``(*, out_features)``; every input row is a sample.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        block: int = 512,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        scale_invariance: str = "none",
        freeze: bool = False,
        freeze_iter: int = 100,
        freeze_schedule: str = "ndpp",
        sync: bool = False,
        isqrt_backend: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = resolve_block(block, in_features, "DeconvLinear")
        self._layout = _CHUNKED
        self._init_deconv(
            features=self.block,
            mats=1,
            iters=iters,
            eps=eps,
            momentum=momentum,
            scale_invariance=scale_invariance,
            freeze=freeze,
            freeze_iter=freeze_iter,
            freeze_schedule=freeze_schedule,
            sync=sync,
            isqrt_backend=isqrt_backend,
            device=device,
            dtype=dtype,
        )

    def whitened_weight(
        self, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` for a batch's ``(mu, Cov)``, by default for the running statistics."""
        mean, deconv = self._statistics(mean, cov)
        return self._whiten(self.weight, self.bias, mean, deconv, cov)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        rows = standardize(rows, self.scale_invariance, self.eps)
        if self._computes_statistics(rows.shape[0]):
            chunks = rows.reshape(-1, self.block)
            moments = second_moments(chunks.t()[None, None])
            weight, bias = self.whitened_weight(*self._covariance(*moments))
        else:
            weight, bias = self.whitened_weight()
        return F.linear(rows, weight, bias).view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W'``, ``b'`` (input standardization in a pre-hook)."""
        weight, bias = self.whitened_weight()
        plain = nn.Linear(self.in_features, self.out_features, bias=True).to(weight)
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
        return _with_input_standardization(plain, self.scale_invariance, self.eps)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set ``W``, ``b`` so that the running-statistics layer computes the plain linear."""
        raw, raw_bias = self._unwhiten(weight, bias)
        self.weight.copy_(raw)
        if self.bias is not None:
            self.bias.copy_(raw_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._deconv_repr()


# ---------------------------------------------------------------------------------------------
# Transposed convolution.


class DeconvConvTranspose2d(_DeconvMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with network deconvolution.

    A transposed convolution is a correlation of the input with the flipped kernel (ND++ paper,
    Case 3). Its data matrix here is the im2col of the input with the kernel, dilation and
    "full" padding ``dilation * (k - 1) - padding``, sampled every ``sampling_stride * stride``
    pixels; ``D`` multiplies the equivalent correlation kernel. For ``stride > 1`` the inserted
    zeros are left out of the statistics, as in the authors' code.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device, dtype: as in ``nn.ConvTranspose2d``.
        block, sampling_stride, iters, eps, momentum, scale_invariance, freeze, freeze_iter,
            freeze_schedule, sync, isqrt_backend: as in :class:`DeconvConv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        block: int = 64,
        sampling_stride: int = 3,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        scale_invariance: str = "none",
        freeze: bool = False,
        freeze_iter: int = 100,
        freeze_schedule: str = "ndpp",
        sync: bool = False,
        isqrt_backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=bias,
            dilation=dilation,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        if sampling_stride < 1:
            raise ValueError(
                f"DeconvConvTranspose2d: sampling_stride must be >= 1; got {sampling_stride}"
            )
        taps = self.kernel_size[0] * self.kernel_size[1]
        if groups > 1:
            self.block, mats, self._layout = in_channels // groups, groups, _PER_GROUP
        else:
            self.block = resolve_block(block, in_channels, "DeconvConvTranspose2d")
            mats, self._layout = 1, _INTERLEAVED
        self.sampling_stride = sampling_stride
        self._init_deconv(
            features=taps * self.block,
            mats=mats,
            iters=iters,
            eps=eps,
            momentum=momentum,
            scale_invariance=scale_invariance,
            freeze=freeze,
            freeze_iter=freeze_iter,
            freeze_schedule=freeze_schedule,
            sync=sync,
            isqrt_backend=isqrt_backend,
            device=device,
            dtype=dtype,
        )

    # The weight (C_in, C_out/g, kh, kw) as a correlation kernel (C_out, C_in/g * kh * kw).

    def _correlation_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        in_channels, out_per_group, kh, kw = weight.shape
        grouped = weight.reshape(self.groups, in_channels // self.groups, out_per_group, kh, kw)
        kernel = grouped.flip(-1, -2).transpose(1, 2)
        return kernel.reshape(self.groups * out_per_group, -1)

    def _transposed_weight(self, kernel: torch.Tensor) -> torch.Tensor:
        in_channels, out_per_group, kh, kw = self.weight.shape
        grouped = kernel.reshape(self.groups, out_per_group, in_channels // self.groups, kh, kw)
        return grouped.transpose(1, 2).flip(-1, -2).reshape(self.weight.shape)

    def whitened_weight(
        self, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` in ``nn.ConvTranspose2d`` layout for a batch's ``(mu, Cov)``, by
        default for the running statistics."""
        mean, deconv = self._statistics(mean, cov)
        kernel = self._correlation_kernel(self.weight)
        kernel, bias = self._whiten(kernel, self.bias, mean, deconv, cov)
        return self._transposed_weight(kernel), bias

    def _sampled_data(self, x: torch.Tensor) -> torch.Tensor:
        mats, features = self.running_mean.shape
        padding = tuple(
            max(d * (k - 1) - p, 0)
            for d, k, p in zip(self.dilation, self.kernel_size, self.padding)
        )
        strides = tuple(self.sampling_stride * s for s in self.stride)
        patches = F.unfold(x, self.kernel_size, self.dilation, padding, strides)
        if self._layout == _PER_GROUP:
            return patches.reshape(x.shape[0], mats, features, -1)
        return patches.reshape(x.shape[0], 1, features, -1)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self._describe()}: expected (N, C, H, W) input; got {x.shape}")
        x = standardize(x, self.scale_invariance, self.eps)
        if self._computes_statistics(x.shape[0]):
            moments = second_moments(self._sampled_data(x))
            weight, bias = self.whitened_weight(*self._covariance(*moments))
        else:
            weight, bias = self.whitened_weight()
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    @torch.no_grad()
    def fuse(self) -> nn.ConvTranspose2d:
        """A plain ``nn.ConvTranspose2d`` with ``W'``, ``b'`` (standardization in a pre-hook)."""
        weight, bias = self.whitened_weight()
        plain = nn.ConvTranspose2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            groups=self.groups,
            bias=True,
            dilation=self.dilation,
        ).to(weight)
        plain.weight.copy_(weight)
        plain.bias.copy_(bias)
        return _with_input_standardization(plain, self.scale_invariance, self.eps)

    @torch.no_grad()
    def load_plain_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set ``W``, ``b`` so that the running-statistics layer computes the plain layer."""
        kernel, raw_bias = self._unwhiten(self._correlation_kernel(weight), bias)
        self.weight.copy_(self._transposed_weight(kernel))
        if self.bias is not None:
            self.bias.copy_(raw_bias)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", sampling_stride={self.sampling_stride}" + self._deconv_repr()
        )


__all__ = [
    "FREEZE_SCHEDULES",
    "SCALE_INVARIANCES",
    "DeconvConv2d",
    "DeconvConvTranspose2d",
    "DeconvLinear",
    "computes_statistics_at",
    "resolve_block",
    "sample_standardization",
    "second_moments",
    "standardize",
]
