"""Inverse matrix square roots by Newton-type iterations, batched and differentiable.

Three iterations for ``A^{-1/2}`` of symmetric positive definite matrices ``(..., F, F)``:

- ``"inverse_newton"``: the coupled inverse Newton iteration that ND++ uses (Ye et al.,
  "Exploiting Invariance in Training Deep Neural Networks", Implementation Details; Guo & Higham,
  2006) on ``A / ||A||_F``: ``X_0 = I, M_0 = A``, ``T_k = (3I - M_k)/2``, ``X_{k+1} = X_k T_k``,
  ``M_{k+1} = T_k^2 M_k``; ``A^{-1/2} ~ X_T / sqrt(||A||_F)``.
- ``"newton_schulz"``: IterNorm's iteration (Huang et al., "Iterative Normalization", CVPR 2019,
  Alg. 1) on the trace-normalized ``A_N = A / tr(A)``: ``P_0 = I``,
  ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 A_N``; ``A^{-1/2} ~ P_T / sqrt(tr(A))``.
- ``"denman_beavers"``: Denman & Beavers (1976) on ``A / ||A||_F``: ``Y_0 = A, Z_0 = I``,
  ``Y_{k+1} = (Y_k + Z_k^{-1})/2``, ``Z_{k+1} = (Z_k + Y_k^{-1})/2``; ``Z_T -> A^{-1/2}``.

A few iterations give a *partial* whitening (large eigenvalues converge first); the layers use
that on purpose, so the result must be the iteration's, not the exact ``A^{-1/2}``.

Every iterate is a function of ``A`` alone (a polynomial, or a rational function for
Denman-Beavers), so with ``A = Q diag(l) Q^T`` the iteration's result is exactly
``Q diag(f(l)) Q^T``, where ``f`` is the same iteration run on scalars. Two backends compute it:

- ``"matrix"``: the matrix iteration itself; autograd differentiates through every product.
  Fast on GPUs (a few small matmuls), the reference.
- ``"spectral"``: one eigendecomposition, the scalar iteration on the eigenvalues, and a
  closed-form backward (Daleckii-Krein): ``dL/dA = Q (K o (Q^T G Q)) Q^T`` with ``K_ij`` the
  divided difference ``(f(l_i) - f(l_j)) / (l_i - l_j)`` (``f'(l_i)`` on the diagonal). This is
  the exact derivative of the same iteration, for four matmuls instead of autograd's two per
  product. Faster on CPUs, where the matmuls dominate: for ``T = 5`` at ``F = 576`` one
  thread takes 25 ms forward and 41 ms forward + backward, against 46 ms and 151 ms for the
  matrix iteration under autograd. Products whose result is symmetric (``D`` itself, the last
  product of the backward when the gradient is symmetric) cost 2/3 of a plain one
  (:func:`symmetric_matmul`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

METHODS = ("inverse_newton", "newton_schulz", "denman_beavers")
BACKENDS = ("auto", "matrix", "spectral")

# Below this gap (in units of the normalized spectrum, which lies in (0, 1]) a divided
# difference is taken from derivatives instead: in float64 the quotient loses
# ~1e-16 / gap of accuracy, the derivative mean errs by ~|f'''| gap^2.
_DIVIDED_DIFFERENCE_GAP = 1e-7
# symmetric_matmul: below this size the blocks are too small for BLAS to run at full speed; three
# row blocks do 2/3 of the multiply-adds of a plain product (more blocks save little more).
_SYMMETRIC_BLOCKED_MIN = 192
_SYMMETRIC_BLOCKS = 3


# ---------------------------------------------------------------------------------------------
# Normalization: the iterations converge on a matrix scaled into their basin.


def _scale(matrix: torch.Tensor, method: str) -> torch.Tensor:
    """``||A||_F`` (inverse Newton, Denman-Beavers) or ``tr(A)`` (Newton-Schulz), broadcastable."""
    if method == "newton_schulz":
        scale = torch.diagonal(matrix, dim1=-2, dim2=-1).sum(-1)
    else:
        scale = torch.linalg.matrix_norm(matrix)
    return scale[..., None, None]


# ---------------------------------------------------------------------------------------------
# Matrix iterations (autograd through every product).


def _eye_like(matrix: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return eye.expand_as(matrix)


def _matrix_inverse_newton(a: torch.Tensor, iters: int) -> torch.Tensor:
    eye = _eye_like(a)
    x, m = eye, a
    for k in range(iters):
        t = 1.5 * eye - 0.5 * m
        x = t if k == 0 else x @ t
        if k + 1 < iters:
            m = t @ (t @ m)
    return x


def _matrix_newton_schulz(a: torch.Tensor, iters: int) -> torch.Tensor:
    p = _eye_like(a)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * (p @ (p @ (p @ a)))
    return p


def _matrix_denman_beavers(a: torch.Tensor, iters: int) -> torch.Tensor:
    y, z = a, _eye_like(a)
    for _ in range(iters):
        y, z = 0.5 * (y + torch.linalg.inv(z)), 0.5 * (z + torch.linalg.inv(y))
    return z


_MATRIX_ITERATIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "inverse_newton": _matrix_inverse_newton,
    "newton_schulz": _matrix_newton_schulz,
    "denman_beavers": _matrix_denman_beavers,
}


# ---------------------------------------------------------------------------------------------
# Scalar iterations on eigenvalues, with their derivatives (for the divided differences).


def _scalar_iteration(
    lam: torch.Tensor, method: str, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(l)`` and ``f'(l)`` of the iteration run on the eigenvalues ``l`` (any shape)."""
    one = torch.ones_like(lam)
    zero = torch.zeros_like(lam)
    if method == "inverse_newton":
        x, dx, m, dm = one, zero, lam, one
        for _ in range(iters):
            t, dt = 1.5 - 0.5 * m, -0.5 * dm
            x, dx = x * t, dx * t + x * dt
            m, dm = m * t * t, dm * t * t + 2.0 * m * t * dt
        return x, dx
    if method == "newton_schulz":
        p, dp = one, zero
        for _ in range(iters):
            p, dp = (
                1.5 * p - 0.5 * p**3 * lam,
                1.5 * dp - 1.5 * p**2 * dp * lam - 0.5 * p**3,
            )
        return p, dp
    y, dy, z, dz = lam, one, one, zero
    for _ in range(iters):
        y, dy, z, dz = (
            0.5 * (y + 1.0 / z),
            0.5 * (dy - dz / z**2),
            0.5 * (z + 1.0 / y),
            0.5 * (dz - dy / y**2),
        )
    return z, dz


def _divided_differences(lam: torch.Tensor, f: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
    """``K_ij = (f(l_i) - f(l_j)) / (l_i - l_j)``, ``f'`` where eigenvalues (nearly) coincide.

    Args: float64 eigenvalues ``(..., F)`` in ascending order (as ``eigh`` returns them) and
    ``f``, ``f'`` at them. Returns ``(..., F, F)``.
    """
    gap = lam[..., :, None] - lam[..., None, :]
    quotient = (f[..., :, None] - f[..., None, :]).div_(gap)
    # Sorted eigenvalues: if no two neighbours are close, only the diagonal is (0 / 0). That is
    # the usual case, and it spares four passes over the F x F matrices.
    if not bool((lam[..., 1:] - lam[..., :-1] < _DIVIDED_DIFFERENCE_GAP).any()):
        quotient.diagonal(dim1=-2, dim2=-1).copy_(df)
        return quotient
    close = gap.abs() < _DIVIDED_DIFFERENCE_GAP
    derivative = 0.5 * (df[..., :, None] + df[..., None, :])
    return torch.where(close, derivative, quotient)


def symmetric_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for a product known to be symmetric, for about 2/3 of the work.

    The row blocks of the lower block triangle are computed (one product each) and the strictly
    upper blocks are mirrored from them. Every entry is one dot product, as in the plain product.
    Not differentiable (it writes into slices of its result): for use inside backward formulas.

    Args:
        left: ``(..., F, K)``; right: ``(..., K, F)``.

    Returns:
        ``(..., F, F)``.
    """
    size = left.shape[-2]
    if size < _SYMMETRIC_BLOCKED_MIN:
        return torch.matmul(left, right)
    batch = torch.broadcast_shapes(left.shape[:-2], right.shape[:-2])
    out = left.new_empty((*batch, size, size))
    edges = [size * i // _SYMMETRIC_BLOCKS for i in range(_SYMMETRIC_BLOCKS + 1)]
    for start, end in itertools.pairwise(edges):
        torch.matmul(left[..., start:end, :], right[..., :, :end], out=out[..., start:end, :end])
        if start:
            out[..., :start, start:end] = out[..., start:end, :start].transpose(-1, -2)
    return out


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``, single-threaded on CPU.

    LAPACK's tridiagonal reduction synchronizes its threads at each of its ``F`` steps: on a
    busy machine one descheduled thread stalls them all (measured 10x slower on 2 shared cores),
    while one thread is at most 1.6x slower than two on an idle machine.
    """
    threads = torch.get_num_threads()
    if a.device.type != "cpu" or threads == 1:
        return torch.linalg.eigh(a)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(threads)


class _Spectrum:
    """The iteration on ``A = C / s`` as ``Q diag(f(l / s) / sqrt(s)) Q^T``, ``C = Q diag(l) Q^T``.

    The scale ``s`` (``||C||_F = sqrt(sum l^2)`` or ``tr(C) = sum l``) comes from the eigenvalues,
    so the normalization costs no pass over a matrix. The gradient, with ``H = Q^T G Q`` and
    ``K`` the divided differences of ``f`` at ``a = l / s``, is
    ``dL/dC = Q [s^{-3/2} K o H + (dL/ds) diag(ds/dl)] Q^T`` with
    ``dL/ds = -s^{-3/2} (sum_i H_ii f_i / 2 + sum_i K_ii H_ii a_i)``.
    """

    def __init__(self, matrix: torch.Tensor, method: str, iters: int) -> None:
        lam, self.q = _eigh(matrix)
        lam = lam.double()
        if method == "newton_schulz":
            self.scale = lam.sum(-1, keepdim=True)
        else:
            self.scale = lam.square().sum(-1, keepdim=True).sqrt()
        self.normalized = lam / self.scale
        self.f, self.df = _scalar_iteration(self.normalized, method, iters)
        self.method = method

    def matrix(self) -> torch.Tensor:
        """The iteration's result ``(..., F, F)``."""
        weights = (self.f / self.scale.sqrt()).to(self.q.dtype)
        return symmetric_matmul(self.q * weights[..., None, :], self.q.transpose(-1, -2))

    def gradient(self, inner: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
        """``dL/dC`` from ``inner = Q^T (dL/dD) Q``.

        ``symmetric``: ``inner`` is symmetric (so is the result), which saves a third of the
        second product.
        """
        k = _divided_differences(self.normalized, self.f, self.df)
        power = self.scale.pow(-1.5)  # (..., 1)
        diagonal = torch.diagonal(inner, dim1=-2, dim2=-1).double()
        k_diagonal = torch.diagonal(k, dim1=-2, dim2=-1)
        grad_scale = -power * (
            0.5 * (diagonal * self.f).sum(-1, keepdim=True)
            + (k_diagonal * diagonal * self.normalized).sum(-1, keepdim=True)
        )
        # ds/dl_i: 1 for the trace, l_i / s = a_i for the Frobenius norm.
        ds_dl = 1.0 if self.method == "newton_schulz" else self.normalized
        middle = k.mul_(power[..., None]).to(self.q.dtype).mul_(inner)
        middle.diagonal(dim1=-2, dim2=-1).add_((grad_scale * ds_dl).to(self.q.dtype))
        left = torch.matmul(self.q, middle)
        if symmetric:
            return symmetric_matmul(left, self.q.transpose(-1, -2))
        return torch.matmul(left, self.q.transpose(-1, -2))


class _SpectralIteration(torch.autograd.Function):
    """``C -> D``, the iteration's result, through :class:`_Spectrum`."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, method: str, iters: int) -> torch.Tensor:
        ctx.spectrum = _Spectrum(matrix, method, iters)
        return ctx.spectrum.matrix()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q = ctx.spectrum.q
        inner = torch.matmul(torch.matmul(q.transpose(-1, -2), grad), q)
        return ctx.spectrum.gradient(inner), None, None


class _SpectralWhitenedRows(torch.autograd.Function):
    """``(rows, C) -> (rows @ D, D)``; ``D`` is returned for bookkeeping, without gradient.

    Fusing the product lets the backward form ``Q^T (rows^T G) Q`` as
    ``(rows Q)^T (G Q)`` when there are fewer rows than features: ``3 R F^2`` instead of
    ``R F^2 + 2 F^3`` multiply-adds. With ``symmetric`` the gradient of ``C`` is its symmetric
    part, ``(dL/dC + dL/dC^T) / 2``, all that a caller whose ``C`` is symmetric by construction
    (a covariance) passes on, for a third less of two ``F^3`` products.
    """

    @staticmethod
    def forward(
        ctx, rows: torch.Tensor, matrix: torch.Tensor, method: str, iters: int, symmetric: bool
    ):
        spectrum = _Spectrum(matrix, method, iters)
        whitening = spectrum.matrix()
        ctx.save_for_backward(rows, whitening)
        ctx.spectrum = spectrum
        ctx.symmetric = symmetric
        ctx.mark_non_differentiable(whitening)
        return torch.matmul(rows, whitening), whitening

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _):
        rows, whitening = ctx.saved_tensors
        spectrum, symmetric = ctx.spectrum, ctx.symmetric
        q = spectrum.q
        grad_rows = torch.matmul(grad, whitening) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_rows, None, None, None, None
        if rows.shape[-2] < rows.shape[-1]:
            inner = torch.matmul(torch.matmul(rows, q).transpose(-1, -2), torch.matmul(grad, q))
            if symmetric:
                inner = 0.5 * (inner + inner.transpose(-1, -2))
        else:
            outer = torch.matmul(rows.transpose(-1, -2), grad)
            if symmetric:
                outer = 0.5 * (outer + outer.transpose(-1, -2))
                inner = symmetric_matmul(torch.matmul(q.transpose(-1, -2), outer), q)
            else:
                inner = torch.matmul(torch.matmul(q.transpose(-1, -2), outer), q)
        return grad_rows, spectrum.gradient(inner, symmetric), None, None, None


# ---------------------------------------------------------------------------------------------
# Public functions.


def _resolve_backend(backend: str, matrix: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"isqrt: backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        # Eigendecompositions are cheap on CPUs and slow, synchronizing calls on GPUs.
        return "spectral" if matrix.device.type == "cpu" else "matrix"
    return backend


def _check(matrix: torch.Tensor, iters: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"isqrt: method must be one of {METHODS}; got {method!r}")
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"isqrt: expected square matrices (..., F, F); got {tuple(matrix.shape)}")
    if iters < 1:
        raise ValueError(f"isqrt: iters must be >= 1; got {iters}")


def inverse_sqrt(
    matrix: torch.Tensor,
    iters: int = 5,
    method: str = "inverse_newton",
    backend: str = "auto",
) -> torch.Tensor:
    """``iters`` steps of an iteration for ``matrix^{-1/2}``.

    Args:
        matrix: symmetric positive definite ``(..., F, F)`` (add ``eps * I`` to a covariance).
        iters: number of iterations ``T``.
        method: ``"inverse_newton"`` (ND++), ``"newton_schulz"`` (IterNorm) or
            ``"denman_beavers"``.
        backend: ``"matrix"``, ``"spectral"`` or ``"auto"`` (spectral on CPU, matrix elsewhere);
            both give the same value and gradient up to rounding.

    Returns:
        ``(..., F, F)``, the iteration's approximation of ``matrix^{-1/2}``.
    """
    _check(matrix, iters, method)
    if _resolve_backend(backend, matrix) == "spectral":
        return _SpectralIteration.apply(matrix, method, iters)
    scale = _scale(matrix, method)
    return _MATRIX_ITERATIONS[method](matrix / scale, iters) * scale.rsqrt()


def whiten_rows(
    rows: torch.Tensor,
    matrix: torch.Tensor,
    iters: int = 5,
    method: str = "inverse_newton",
    backend: str = "auto",
    *,
    symmetric_gradient: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows @ D`` with ``D = inverse_sqrt(matrix, iters, method, backend)``, and ``D``.

    The same value and gradient as composing :func:`inverse_sqrt` with a matmul, cheaper in the
    spectral backend when ``R < F``. ``D`` (the second result) carries no gradient.

    Args:
        rows: ``(..., R, F)``.
        matrix: ``(..., F, F)`` symmetric positive definite.
        symmetric_gradient: give ``matrix`` the symmetric part of its gradient,
            ``(G + G^T) / 2``: what reaches a matrix that is symmetric by construction (a
            covariance, whose every use is symmetric), and cheaper in the spectral backend.

    Returns:
        ``rows @ D`` ``(..., R, F)`` and ``D`` ``(..., F, F)``.
    """
    _check(matrix, iters, method)
    if _resolve_backend(backend, matrix) == "spectral":
        return _SpectralWhitenedRows.apply(rows, matrix, method, iters, symmetric_gradient)
    if symmetric_gradient:
        matrix = _Symmetrized.apply(matrix)
    whitening = inverse_sqrt(matrix, iters, method, backend="matrix")
    return rows @ whitening, whitening.detach()


class _Symmetrized(torch.autograd.Function):
    """The identity on a symmetric matrix, passing back the symmetric part of its gradient."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.view_as(matrix)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return 0.5 * (grad + grad.transpose(-1, -2))


def isqrt_inverse_newton(
    matrix: torch.Tensor, iters: int = 5, backend: str = "auto"
) -> torch.Tensor:
    """ND++'s coupled inverse Newton iteration on ``matrix / ||matrix||_F`` (see module doc)."""
    return inverse_sqrt(matrix, iters, "inverse_newton", backend)


def isqrt_newton_schulz(
    matrix: torch.Tensor, iters: int = 5, backend: str = "auto"
) -> torch.Tensor:
    """IterNorm's Newton-Schulz iteration on ``matrix / tr(matrix)`` (see module doc)."""
    return inverse_sqrt(matrix, iters, "newton_schulz", backend)


def isqrt_denman_beavers(
    matrix: torch.Tensor, iters: int = 5, backend: str = "auto"
) -> torch.Tensor:
    """The Denman-Beavers iteration on ``matrix / ||matrix||_F`` (see module doc)."""
    return inverse_sqrt(matrix, iters, "denman_beavers", backend)


__all__ = [
    "BACKENDS",
    "METHODS",
    "inverse_sqrt",
    "isqrt_denman_beavers",
    "isqrt_inverse_newton",
    "isqrt_newton_schulz",
    "whiten_rows",
]
