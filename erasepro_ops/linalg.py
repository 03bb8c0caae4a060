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


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN and no Inf: its minimum and maximum are finite (both are NaN
    when any entry is). One reduction in the tensor's own dtype, nothing to overflow; fp8, which has
    no such kernel, is read as float16, which holds every fp8 value exactly."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:
        tensor = tensor.to(torch.float16)
    if not tensor.is_contiguous():  # a transposed layout (a column-major factor) read in place, not copied
        tensor = tensor.permute(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` when ``tensor`` holds NaN or Inf."""
    if not all_finite(tensor):
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
        v = (y.T @ u).div_(s)
    else:
        evals, evecs = torch.linalg.eigh(y.T @ y if gram is None else gram)
        keep = evals > threshold**2
        if not keep.any():
            return empty
        s = evals[keep].sqrt().flip(0)
        v = evecs[:, keep].flip(1)
        u = (y @ v).div_(s)
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


ROW_BLOCK_BYTES = 4 << 20
"""Bytes of float64 a weight is read in by :func:`float64_rows`."""


def float64_rows(weight: torch.Tensor, device: torch.device | str | None = None):
    """``(start, block)``: ``weight`` (out × in) as float64 blocks of whole rows on ``device``, each
    about :data:`ROW_BLOCK_BYTES`, so reading a site in float64 costs that much memory, not a
    float64 copy of it (SDXL's deep sites are 10–21 MB each in float64, and 140 of them in a row
    leave the allocator holding far more than one)."""
    rows = max(1, ROW_BLOCK_BYTES // (8 * max(1, int(weight.shape[1]))))
    for start in range(0, int(weight.shape[0]), rows):
        yield start, weight[start:start + rows].to(device=device, dtype=torch.float64)


def weight_times(weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``W @ m`` in ``m``'s precision (float64) on ``m``'s device, ``W`` read a block of rows at a
    time (:func:`float64_rows`): no float64 copy of the whole weight."""
    out = m.new_empty(int(weight.shape[0]), int(m.shape[1]))
    for start, block in float64_rows(weight, m.device):
        out[start:start + block.shape[0]] = block @ m
    return out


def frobenius_norm(weight: torch.Tensor) -> float:
    """``‖W‖_F`` in float64, read a block of rows at a time."""
    return sum(float(block.square().sum()) for _, block in float64_rows(weight)) ** 0.5


def gram_trace(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(W G Wᵀ)`` (``= ‖W F‖_F²`` for ``G = F Fᵀ``) in float64 on ``gram``'s device, read a
    block of rows of ``W`` at a time."""
    return sum(float(((block @ gram) * block).sum()) for _, block in float64_rows(weight, gram.device))


GRAM_BLOCK = 512
"""Rows of ``K Kᵀ`` :class:`FeatureMoments` forms per product."""


@dataclass
class FeatureMoments:
    """``K Kᵀ`` (lower triangle), the column count ``M`` and ``Σ K²`` (float64) of features ``K``
    (in × M) added part by part (:meth:`add`), so ``K`` is never held whole.

    The Gram matrix is kept in the first part's precision, float32 at least (the text encoders'
    features are float32 or less: the weighting cache keeps its factor in float32 all the same);
    the products run :data:`GRAM_BLOCK` rows at a time and only the blocks at or left of the
    diagonal (the Cholesky factorisation reads the lower triangle alone)."""

    gram: torch.Tensor  # in × in, column-major, lower triangle filled (right of the diagonal blocks: zero)
    count: int = 0
    sum_sq: float = 0.0

    @classmethod
    def of(cls, k: torch.Tensor) -> "FeatureMoments":
        """From ``K``'s first part. The Gram matrix is laid out column-major, as LAPACK factors it in
        place: in row-major order ``torch.linalg.cholesky`` would take a copy (36 MiB at 3072 wide)."""
        dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        return cls(k.new_zeros(k.shape[0], k.shape[0], dtype=dtype).mT).add(k)

    def add(self, k: torch.Tensor) -> "FeatureMoments":
        n = self.gram.shape[0]
        if k.shape[0] != n:
            raise ValueError(f"features have width {k.shape[0]}, the moments {n}")
        kk = k.to(self.gram.dtype)
        for i in range(0, n, GRAM_BLOCK):
            j = min(i + GRAM_BLOCK, n)
            self.gram[i:j, :j] += kk[i:j] @ kk[:j].T
        self.count += k.shape[1]
        self.sum_sq += float(torch.linalg.vector_norm(kk, dtype=torch.float64)) ** 2
        return self

    @property
    def mean_sq(self) -> float:
        """The mean squared entry of ``K``."""
        return self.sum_sq / max(self.gram.shape[0] * self.count, 1)


@dataclass(frozen=True)
class PreserveWeighting:
    """A whitening ``L⁻¹`` for ``C = λI + α K Kᵀ / M = L Lᵀ`` (Cholesky), used as ``C^{-1/2}``.

    Any square root serves: with ``X̃ = L⁻¹ X``, ``X̃ᵀ X̃ = Xᵀ C⁻¹ X``, so ``ΔW = R X̃⁺ L⁻¹`` is the
    same minimiser of ``‖ΔW C^{1/2}‖_F`` as with the symmetric root, and every step of the solve
    (projections, singular values, damping) sees only such products. One ``in × in`` Cholesky
    costs a tenth of an eigendecomposition. ``K Kᵀ`` is formed and factorised in ``K``'s own
    precision, float32 at least (:class:`FeatureMoments`): float32 rounding (~1e-7 of
    ``α ‖K‖² / M``, the factorisation's backward error a small multiple of it) moves ``C`` by far
    less than ``λ``, so ``L Lᵀ`` stays positive definite; the solve applies ``L`` in float64
    (:func:`solve_lower`), so the constraints stay exact and only the weighting moves, by that much.
    """

    chol: torch.Tensor  # in × in, lower triangular, the moments' dtype (column-major when built from moments)
    c_max: float  # largest eigenvalue of C (power iteration: for thresholds)

    @classmethod
    def build(cls, k: torch.Tensor, lam: float, alpha: float) -> "PreserveWeighting":
        return cls.from_moments(FeatureMoments.of(k), lam, alpha)

    @classmethod
    def from_moments(cls, moments: FeatureMoments, lam: float, alpha: float,
                     device: torch.device | None = None) -> "PreserveWeighting":
        """From ``K``'s moments, whose Gram matrix becomes the factor (in place: it is used up)."""
        if not lam > 0:
            raise ValueError("the preservation weighting C must be positive definite (λ > 0)")
        c, moments.gram = moments.gram if device is None else moments.gram.to(device), None
        c.mul_(alpha / max(moments.count, 1))
        c.diagonal().add_(lam)
        chol = torch.linalg.cholesky(c, out=c)
        return cls(chol, spectral_norm_estimate(chol) ** 2)

    def left(self, x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """``L⁻¹ @ x``, in ``x``'s precision (see :func:`solve_lower`; ``overwrite``: in ``x``'s place)."""
        return solve_lower(self.chol, x, overwrite=overwrite)

    def right(self, x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """``x @ L⁻¹``, in ``x``'s precision (see :func:`solve_lower`; ``overwrite``: in ``x``'s place)."""
        return solve_lower(self.chol, x, left=False, overwrite=overwrite)

    def to(self, device=None, dtype=None) -> "PreserveWeighting":
        return PreserveWeighting(self.chol.to(device=device, dtype=dtype), self.c_max)


SOLVE_BLOCK = 512
"""Rows of a stored triangular factor :func:`solve_lower` widens to the right-hand side's precision at a time."""


def solve_lower(chol: torch.Tensor, b: torch.Tensor, left: bool = True, overwrite: bool = False) -> torch.Tensor:
    """``L⁻¹ b`` (``left``) or ``b L⁻¹`` for a lower-triangular ``L``, in ``b``'s precision;
    ``overwrite`` (the caller done with ``b``): the result may be written into ``b`` (it is, for a
    contiguous ``b`` and a factor stored in a lower precision).

    ``L`` stored in a lower precision (the weighting cache keeps float32) is used as it is: its
    entries are exact in ``b``'s dtype, so the result is the float64 solve with that ``L``. Rather
    than a float64 copy of all of ``L`` (72 MiB at 3072 wide), block substitution widens
    :data:`SOLVE_BLOCK` rows (or columns) at a time::

        left:   X_I = L_II⁻¹ (B_I − L_I,<I X_<I)           for row blocks I, first to last
        right:  Y_J = (B_J − Y_>J L_>J,J) L_JJ⁻¹           for column blocks J, last to first
    """
    if chol.dtype == b.dtype:
        return torch.linalg.solve_triangular(chol, b.contiguous(), upper=False, left=left)
    n = chol.shape[0]
    out = b if overwrite and b.is_contiguous() else b.clone(memory_format=torch.contiguous_format)
    starts = range(0, n, SOLVE_BLOCK)
    for i in starts if left else reversed(starts):
        j = min(i + SOLVE_BLOCK, n)
        diag = chol[i:j, i:j].to(b.dtype)
        if left:
            if i:
                out[i:j] -= chol[i:j, :i].to(b.dtype) @ out[:i]
            out[i:j] = torch.linalg.solve_triangular(diag, out[i:j], upper=False)
        else:
            if j < n:
                out[:, i:j] -= out[:, j:] @ chol[j:, i:j].to(b.dtype)
            out[:, i:j] = torch.linalg.solve_triangular(diag, out[:, i:j], upper=False, left=False)
    return out


def coarse(sketch: torch.Tensor) -> torch.Tensor:
    """Each column of ``sketch`` (k × n) with its entries rounded to 16 significant bits, as
    ``(mantissa, exponent)`` rows (2k × n, CPU): equal vectors projected through different kernel
    paths (a product's last columns) differ in their last bits and still match."""
    mantissa, exponent = torch.frexp(sketch.to(torch.float64).cpu())
    return torch.cat([torch.round(mantissa * 2**16), exponent.to(torch.float64)])
