"""Small, explicit linear algebra shared by every solver in the pack.

All functions work in float64 and never return NaN or Inf for finite input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_RTOL = 1e-6
"""Singular values below ``rtol * s_max`` are treated as zero (relative to the whole problem)."""

DEFAULT_OVERFLOW_DAMPING = 1e-3
"""ρ: constraints beyond the rank budget are fitted with ridge ``(ρ · s_max)²`` (see ``solve``)."""

DEFAULT_GAP_FLOOR = 1e-4
"""Deep columns whose gap to the anchor is below this share of the anchor features' norm count as
met (see ``chain.settled_columns``): ten times below float16's resolution of the features, far
above the float32 rounding the shallow chain leaves."""

DEFAULT_OVERFLOW_PRESERVE_WEIGHT = 10.0
"""w: weight of the preserve prompts' columns in the overflow's damped least squares (see ``solve``)."""


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` when ``tensor`` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); the model or features are corrupt")


@dataclass(frozen=True)
class RangeBasis:
    """Thin SVD ``Y = U diag(s) Vᵀ`` of a matrix, truncated at an absolute threshold.

    ``pinv`` of ``Y`` is ``V diag(1/s) Uᵀ``. Computed with one symmetric eigendecomposition of
    the smaller Gram matrix (``Y Yᵀ`` or ``Yᵀ Y``), so a wide matrix of many columns costs
    one ``rows × rows`` eigh.
    """

    u: torch.Tensor  # rows × r, orthonormal columns
    s: torch.Tensor  # r, descending, all > threshold
    v: torch.Tensor  # cols × r, orthonormal columns

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def top(self, k: int) -> "RangeBasis":
        """The ``k`` largest singular triplets (all of them when ``k ≥ rank``)."""
        k = max(int(k), 0)
        return self if k >= self.rank else RangeBasis(self.u[:, :k], self.s[:k], self.v[:, :k])


def range_basis(y: torch.Tensor, threshold: float, gram: torch.Tensor | None = None) -> RangeBasis:
    """Truncated SVD of ``y`` (float64) keeping singular values ``> threshold``.

    ``gram``: ``y yᵀ`` or ``yᵀ y``, whichever is smaller, when the caller has it already."""
    rows, cols = y.shape
    empty = RangeBasis(y.new_zeros(rows, 0), y.new_zeros(0), y.new_zeros(cols, 0))
    if rows == 0 or cols == 0:
        return empty
    # eigh of the Gram matrix squares the condition number; float64 keeps ~1e-7 relative
    # singular values meaningful, far below the tolerances used here.
    if rows <= cols:
        evals, evecs = torch.linalg.eigh(y @ y.T if gram is None else gram)
        keep = evals > threshold**2
        if not keep.any():
            return empty
        s = evals[keep].sqrt().flip(0)
        u = evecs[:, keep].flip(1)
        v = (y.T @ u) / s
    else:
        evals, evecs = torch.linalg.eigh(y.T @ y if gram is None else gram)
        keep = evals > threshold**2
        if not keep.any():
            return empty
        s = evals[keep].sqrt().flip(0)
        v = evecs[:, keep].flip(1)
        u = (y @ v) / s
    return RangeBasis(u, s, v)


def spectral_norm_estimate(y: torch.Tensor, iterations: int = 100, tol: float = 1e-10) -> float:
    """Largest singular value of ``y`` by power iteration on ``y yᵀ`` (never forms the Gram matrix).

    Starts from a fixed pseudo-random vector plus the mean direction, so the result is
    deterministic; stops when the estimate changes by less than ``tol`` (relative). Used for
    thresholds and damping scales, where a relative error of 1e-6 does not matter.
    """
    if y.numel() == 0:
        return 0.0
    a = y if y.shape[0] <= y.shape[1] else y.T  # iterate in the smaller dimension
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(a.shape[0], generator=g, dtype=a.dtype).to(a.device) + a.sum(dim=1) / (a.norm() + 1e-300)
    estimate = 0.0
    for _ in range(iterations):
        w = a @ (a.T @ v)
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        previous, estimate = estimate, (norm / float(v.norm())) ** 0.5
        v = w / norm
        if abs(estimate - previous) <= tol * estimate:
            break
    return estimate


@dataclass(frozen=True)
class PreserveWeighting:
    """A whitening ``L⁻¹`` for ``C = λI + α K Kᵀ / M = L Lᵀ`` (Cholesky), used as ``C^{-1/2}``.

    Any square root serves: with ``X̃ = L⁻¹ X``, ``X̃ᵀ X̃ = Xᵀ C⁻¹ X``, so ``ΔW = R X̃⁺ L⁻¹`` is the
    same minimiser of ``‖ΔW C^{1/2}‖_F`` as with the symmetric root, and every step of the solve
    (projections, singular values, damping) sees only such products. One ``in × in`` Cholesky
    costs a tenth of an eigendecomposition. ``K Kᵀ`` is accumulated in ``K``'s own precision, float32
    at least: float32 rounding (~1e-7 of ``α ‖K‖² / M``) moves ``C`` by far less than ``λ``, so ``C``
    stays positive definite and the constraints stay exact; only the weighting moves, by that much.
    """

    chol: torch.Tensor  # in × in, lower triangular, float64
    c_max: float  # largest eigenvalue of C (power iteration: for thresholds)

    @classmethod
    def build(cls, k: torch.Tensor, lam: float, alpha: float) -> "PreserveWeighting":
        if not lam > 0:
            raise ValueError("the preservation weighting C must be positive definite (λ > 0)")
        kk = k if k.dtype == torch.float64 else k.to(torch.float32)
        c = (kk @ kk.T).to(torch.float64).mul_(alpha / max(k.shape[1], 1))
        c.diagonal().add_(lam)
        chol = torch.linalg.cholesky(c, out=c)
        return cls(chol, spectral_norm_estimate(chol) ** 2)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """``L⁻¹ @ x``."""
        return torch.linalg.solve_triangular(self.chol, x, upper=False)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ L⁻¹``."""
        return torch.linalg.solve_triangular(self.chol, x, upper=False, left=False)

    def to(self, device=None, dtype=None) -> "PreserveWeighting":
        return PreserveWeighting(self.chol.to(device=device, dtype=dtype), self.c_max)
