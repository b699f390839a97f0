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

The package reads in the algorithm's order: :mod:`.standardization` (``S``),
:mod:`.sampling` (``X``: where a convolution's patches lie, and their moments),
:mod:`.statistics` (the schedule, block sizes, second moments, ``Cov`` and the running averages
of ``mu`` and ``D``), :mod:`.whitening` (``D``, ``W' = W D`` and its inverse, shared by the three
layers, with ``fuse``), :mod:`.standardized_conv` (``S`` folded into the convolution) and
:mod:`.modules` (the layers).

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

from norm_det.layers.deconv.modules import DeconvConv2d, DeconvConvTranspose2d, DeconvLinear
from norm_det.layers.deconv.standardization import (
    SCALE_INVARIANCES,
    sample_standardization,
    standardize,
)
from norm_det.layers.deconv.statistics import (
    FREEZE_SCHEDULES,
    computes_statistics_at,
    resolve_block,
    second_moments,
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
