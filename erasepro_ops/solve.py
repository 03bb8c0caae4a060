"""Closed-form weight edits for one linear site: ErasePro's zero-residual update and UCE.

A site is a linear layer with weight ``W_o`` (out × in). ``X`` (in × N) holds the site's input
features for the constrained columns and ``V`` (out × N) what they must produce after the edit.

Zero-residual (ErasePro; docs/DESIGN.md, *Solvers*)::

    minimise ‖(W − W_o) C^{1/2}‖_F²   subject to   W X = V
    ΔW = R (Xᵀ C⁻¹ X)⁺ Xᵀ C⁻¹,   R = V − W_o X

``C = I`` is the published objective; ``C = λI + α K Kᵀ / M`` (``K`` the preserve features) keeps
the preserve outputs still. With ``X̃ = C^{-1/2} X`` the update is ``ΔW = R X̃⁺ C^{-1/2}``.

The columns come in priority groups (keep-constraints, concept tokens, end token, preserve
prompts, padding, preserve padding: :data:`~erasepro_ops.alignment.ROLE_PRIORITY`). They are
solved in order: group ``g`` is matched as closely as possible (exactly when its columns are
independent of the earlier groups' span) without disturbing earlier groups, i.e. with

    Y_g = P_{<g} X̃_g,   ΔW̃_g = R̃_g Y_g⁺,   R̃_g = R_g − ΔW̃_{<g} X̃_g

where ``P_{<g}`` projects onto the complement of the directions already accepted. When all the
constraints fit the site's input width the sum equals the one-shot minimum-norm solution; when
they do not, later groups get the least-squares solution in the freedom that is left and the
residual is reported. ``Y_g⁺`` keeps singular values above ``rtol · s_max(X) / sqrt(λ_max(C))``:
since ``σ_i(C^{-1/2} X) ≥ σ_i(X) / sqrt(λ_max(C))``, every direction of ``X`` above
``rtol · s_max(X)`` stays exact however strongly ``C`` weights the preserve features.

Overflow. When a group has more columns than the width (or the rank budget) left and its
directions fill it, it and every later group get damped least squares::

    ΔW̃_g = R̃_g Y_g⁺(μ),   Y_g⁺(μ) = V diag(s / (s² + μ)) Uᵀ,   μ = (ρ · s_max(X̃))²

An exact fit of the weakest of hundreds of near-parallel padding columns costs ``1/s`` each and
moves every other prompt sharing those directions; the damping (ρ = ``overflow_damping``) caps
that. Groups that fit are never damped. Groups listed as ``unbudgeted`` (the preserve
prompts' columns) do not count toward the budget and overflow only the site's width: a 3072-wide
text-encoder site keeps them exact next to an erasure that fills the 768-wide budget. When the
erasure itself overflows, the unbudgeted groups still waiting join its damped fit, their columns
weighted by ``w`` (``overflow_weight``): weighted least squares ``‖(ΔW̃X̃ − R) diag(c)‖²``, ``c = 1``
or ``w``. Placed after the overflow instead, they would get no direction at all (all taken);
placed before it, exactly, they would leave the erasure too little.

Deep sites ask for ``V*_s = W_s Y`` (the anchor's features through the site's own weight), so
``R_s = W_s (Y − X)`` and every site's update is ``ΔW_s = W_s T`` with one shared ``T = Z down``
(:meth:`ConstraintSystem.map_targets`): the per-site cost is one ``out × in × r`` product.

Every update is returned as an exact low-rank product ``ΔW = up @ down`` with
``rank ≤ rank X``. Deep sites share ``X`` and ``C``: build a :class:`ConstraintSystem` once and
call :meth:`ConstraintSystem.solve` per site.

UCE (Gandikota et al., WACV 2024), the baseline::

    W = (λW_o + s_e V Xᵀ + s_p W_o K Kᵀ)(λI + s_e X Xᵀ + s_p K Kᵀ)⁻¹
    ⇔  ΔW = s_e R Xᵀ (λI + s_e X Xᵀ + s_p K Kᵀ)⁻¹
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch

from .linalg import (DEFAULT_OVERFLOW_DAMPING, DEFAULT_OVERFLOW_PRESERVE_WEIGHT, DEFAULT_RTOL, PreserveWeighting,
                     check_finite, coarse, gram_trace, range_basis, spectral_norm_estimate, weight_times)


@dataclass(frozen=True)
class LowRankUpdate:
    """``ΔW = up @ down`` (out × r times r × in), stored in float64 on the solve device."""

    up: torch.Tensor
    down: torch.Tensor
    down_gram: torch.Tensor | None = field(default=None, repr=False, compare=False)  # down downᵀ, when shared

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def dense(self) -> torch.Tensor:
        return self.up @ self.down

    def norm(self) -> float:
        """Frobenius norm of ``up @ down``: ``sqrt(tr(up (down downᵀ) upᵀ))``, or through the dense
        product when the rank is so high that forming it is cheaper."""
        (out, r), width = self.up.shape, self.down.shape[1]
        if self.down_gram is None and out * width < r * (out + width):
            return float(self.dense().norm())
        gram = self.down @ self.down.T if self.down_gram is None else self.down_gram
        value = ((self.up @ gram) * self.up).sum()
        return float(value.clamp_min(0).sqrt())

    def to(self, device=None, dtype=None) -> "LowRankUpdate":
        return LowRankUpdate(self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class SiteSolution:
    """One site's update and how well it met its constraints."""

    update: LowRankUpdate
    residual: float  # ‖W'X − V‖_F / ‖W_o X − V‖_F (0 = exact, 1 = untouched)
    residual_sq: float  # ‖W'X − V‖_F², for aggregating over sites
    initial_sq: float  # ‖W_o X − V‖_F²


def _residual(weight: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``R = V − W_o X`` in float64 on ``x``'s device, ``W_o`` read a block of rows at a time
    (:func:`~erasepro_ops.linalg.weight_times`), after checking the weight and targets."""
    check_finite("site weight", weight)
    v = target.to(device=x.device, dtype=torch.float64)
    check_finite("target outputs V*", v)
    if weight.shape[1] != x.shape[0]:
        raise ValueError(f"site weight has input width {weight.shape[1]}, features have {x.shape[0]}")
    if v.shape != (weight.shape[0], x.shape[1]):
        raise ValueError(f"V* must be {weight.shape[0]} × {x.shape[1]}, got {tuple(v.shape)}")
    return v - weight_times(weight, x)


def _residual_solution(update: LowRankUpdate, r: torch.Tensor, dwx: torch.Tensor) -> SiteSolution:
    initial = float((r * r).sum())
    left = float(((r - dwx) ** 2).sum())
    residual = (left / initial) ** 0.5 if initial > 0 else 0.0
    return SiteSolution(update, residual, left, initial)


def _fills(n_columns: int, rank: int, limit: int, used: int) -> bool:
    """A group overflows a limit when it has more columns than room left and its directions fill it."""
    return n_columns > limit - used and used + rank >= limit - 1


def _outside(basis: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``(I − B Bᵀ) M``: the part of ``M``'s columns outside the orthonormal columns ``B``."""
    return m - basis @ (basis.T @ m) if basis.shape[1] else m


def _columns_of(group_ids: torch.Tensor, ids: list[int], device) -> torch.Tensor:
    return torch.nonzero(torch.isin(group_ids, torch.tensor(ids))).flatten().to(device)


def _step_columns(group_ids: torch.Tensor, ids: list[int], budgeted: list[int], overflow_weight: float,
                  xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of groups ``ids`` and their weights: 1, or ``overflow_weight`` for the
    unbudgeted ones when they share a step with budgeted groups (a merged overflow)."""
    in_step = torch.isin(group_ids, torch.tensor(ids))
    cols = _columns_of(group_ids, ids, xt.device)
    cw = torch.ones(cols.numel(), dtype=xt.dtype, device=xt.device)
    if budgeted and len(budgeted) < len(ids):
        cw[torch.isin(group_ids[in_step], torch.tensor(budgeted), invert=True).to(xt.device)] = overflow_weight
    return cols, cw


def _rank(y: torch.Tensor, gram: torch.Tensor | None, threshold: float) -> int:
    """Number of singular values of ``y`` above ``threshold``, from ``eigvalsh`` of its smaller Gram
    matrix (``gram`` when given; no eigenvectors: cheaper than the step's own ``eigh``)."""
    if y.numel() == 0:
        return 0
    if gram is None:
        gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y
    return int((torch.linalg.eigvalsh(gram) > threshold**2).sum())


@dataclass(frozen=True)
class _Step:
    columns: torch.Tensor  # indices into X's columns
    coef: torch.Tensor  # n_g × r_g: V_g diag(1/s_g)
    cross: tuple[torch.Tensor, ...]  # A_h X̃_g for each earlier step h (r_h × n_g)


@dataclass
class _Fit:
    """What :meth:`ConstraintSystem.build` has accepted so far: the orthonormal directions of
    ``X̃`` taken (the rows of ``directions``, :attr:`basis` their transpose), the steps that took
    them, and how much of the rank budget they spent. The directions are written into one
    ``min(width, N) × width`` buffer as they come (never more than that many are taken), so no
    step copies the earlier ones."""

    xt: torch.Tensor  # X̃ = C^{-1/2} X
    threshold: float  # singular values at or below it are rounding noise
    budget: int
    damping: float  # ρ
    preserve_threshold: float | None = None  # the unbudgeted (preserve) groups' own; None: threshold
    steps: list[_Step] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # each step's directions: rows of ``directions``
    taken: int = 0  # directions accepted so far
    spent: int = 0  # directions taken by budgeted groups
    exact: int | None = None  # directions fitted exactly: those accepted before the first overflow
    exact_groups: list[int] = field(default_factory=list)  # the groups of the steps before it
    damped_from: int | None = None
    mu: float | None = None  # (ρ · s_max(X̃))², from the first overflow on
    directions: torch.Tensor | None = None  # min(width, N) × width; the first ``taken`` rows are the basis

    def __post_init__(self) -> None:
        width, n = self.xt.shape
        self.directions = self.xt.new_empty(min(width, n), width)

    @property
    def basis(self) -> torch.Tensor:
        """The directions taken, width × ``taken`` (a view)."""
        return self.directions[: self.taken].T

    @property
    def room(self) -> int:
        return int(self.xt.shape[0]) - self.taken

    def may_overflow(self, n_columns: int) -> bool:
        """Whether a budgeted group of ``n_columns`` columns could overflow: no overflow yet and more
        columns than the width or the budget has left (only then is its rank worth computing)."""
        return self.exact is None and n_columns > min(self.room, self.budget - self.spent)

    def overflows(self, n_columns: int, rank: int, *, budgeted: bool) -> bool:
        return _fills(n_columns, rank, int(self.xt.shape[0]), self.taken) or (
            budgeted and _fills(n_columns, rank, self.budget, self.spent))

    def cross(self, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Bᵀ X̃_g, y)``: a step's columns ``xg`` in the directions taken, and ``xg`` itself made
        ``(I − B Bᵀ) X̃_g`` in place (its part outside them)."""
        inside = self.basis.T @ xg
        if self.taken:
            xg.addmm_(self.basis, inside, alpha=-1.0)
        return inside, xg

    def add(self, ids: list[int], cols: torch.Tensor, inside: torch.Tensor, y: torch.Tensor, cw: torch.Tensor,
            gram: torch.Tensor | None, budgeted: bool) -> None:
        """Fit one step (groups ``ids``): ``inside`` is its columns of ``X̃`` in the directions
        taken (:meth:`cross`), ``y`` their part outside them, weighted by ``cw``."""
        threshold = self.threshold if budgeted or self.preserve_threshold is None else self.preserve_threshold
        rb = range_basis(y, threshold, gram).top(self.room)  # rounding noise cannot add rank
        overflow = self.overflows(cols.numel(), rb.rank, budgeted=budgeted)
        cross = tuple(inside[a:b] for a, b in self.spans)
        self.spent += rb.rank if budgeted else 0
        if self.exact is None and overflow:
            self.exact = self.taken
            if self.damping > 0:
                self.damped_from = len(self.steps)
                self.mu = (self.damping * spectral_norm_estimate(self.xt)) ** 2
        if self.exact is None:
            self.exact_groups += ids
        coef = rb.v / rb.s if self.damped_from is None else rb.v * (rb.s / (rb.s**2 + self.mu))
        coef = coef * cw[:, None]  # weighted least squares: R diag(w) (Y diag(w))⁺
        self.steps.append(_Step(cols, coef, cross))
        start, end = self.taken, self.taken + rb.rank
        rows = self.directions[start:end]
        rows.copy_(rb.u.T)
        if start:  # once more outside the directions taken: what rounding left inside them goes
            rows.addmm_(rows @ self.basis, self.directions[:start], alpha=-1.0)
        self.taken = end
        self.spans.append((start, end))

    def system(self, x64: torch.Tensor, cis, report_columns: int | None, rtol: float) -> "ConstraintSystem":
        exact = self.taken if self.exact is None else self.exact
        down_t = self.directions[: self.taken]  # every step's directions as rows, in order
        down_x = down_t @ self.xt
        # The rows of down_t are the orthonormal basis, so ‖P X̃‖² is read off down_x's first rows.
        total = float((self.xt[:, :report_columns] ** 2).sum())
        inside = float((down_x[:exact, :report_columns] ** 2).sum())
        unaligned = max(total - inside, 0.0) / total if total > 0 else 0.0
        self.xt = None  # X̃ is not needed past here
        if cis is None:
            down = down_t.clone() if self.taken < self.directions.shape[0] else down_t
        else:
            down = cis.right(down_t, overwrite=True)
        self.directions = None
        return ConstraintSystem(x64, tuple(self.steps), down, down_x, unaligned, rtol, self.damped_from,
                                tuple(self.exact_groups))


def _check_settings(x: torch.Tensor, rtol: float, overflow_damping: float, overflow_weight: float) -> None:
    if x.dim() != 2:
        raise ValueError(f"features X must be a 2-D (in × N) matrix, got shape {tuple(x.shape)}")
    if not rtol > 0:
        raise ValueError("rtol must be positive")
    if not overflow_damping >= 0:
        raise ValueError("overflow_damping must be 0 or more")
    if not overflow_weight > 0:
        raise ValueError("overflow_weight must be positive")


def _group_ids(groups: Sequence[int] | torch.Tensor | None, n: int) -> torch.Tensor:
    """Each column's priority as a CPU tensor (all 0 when ``groups`` is None)."""
    if groups is None:
        return torch.zeros(n, dtype=torch.long)
    group_ids = torch.as_tensor(groups, dtype=torch.long).cpu()
    if group_ids.shape != (n,):
        raise ValueError(f"groups must give one priority per column ({n}), got {tuple(group_ids.shape)}")
    return group_ids


def _weighting(preserve: torch.Tensor | PreserveWeighting | None, width: int, lam: float, alpha: float,
               device: torch.device) -> PreserveWeighting | None:
    """``C^{-1/2}`` for ``C = λI + α K Kᵀ / M``, or None for ``C = I`` (no preserve features or α = 0);
    ``preserve`` may be that operator already (kept in its stored precision: it is applied in the
    solve's float64 all the same, see :func:`~erasepro_ops.linalg.solve_lower`)."""
    if isinstance(preserve, PreserveWeighting):
        if preserve.chol.shape[0] != width:
            raise ValueError(f"the weighting has width {preserve.chol.shape[0]}, the site has {width}")
        return preserve.to(device)
    if preserve is None or not alpha > 0:
        return None
    if preserve.shape[0] != width:
        raise ValueError(f"preserve features have width {preserve.shape[0]}, the site has {width}")
    check_finite("preserve features", preserve)
    return PreserveWeighting.build(preserve.to(device), lam, alpha)


def _fit_groups(fit: _Fit, group_ids: torch.Tensor, unbudgeted: set[int], overflow_weight: float,
                device: torch.device) -> None:
    """Fit the groups in priority order, one step each, or merged where an overflow takes in the
    unbudgeted groups still waiting."""
    xt = fit.xt
    pending = [[g] for g in torch.unique(group_ids).tolist()]  # a step fits one group, or merged ones
    merged_gram = None  # the Gram matrix of a merged step, from its parts
    while pending:
        ids = pending.pop(0)
        budgeted = [g for g in ids if g not in unbudgeted]
        cols, cw = _step_columns(group_ids, ids, budgeted, overflow_weight, xt)
        inside, y = fit.cross(xt[:, cols])
        y.mul_(cw)
        gram, merged_gram = merged_gram, None
        if gram is None and y.shape[0] <= y.shape[1]:
            gram = y @ y.T
        waiting = [h for h in pending if set(h) <= unbudgeted]
        if budgeted and waiting and fit.may_overflow(cols.numel()) and fit.overflows(
                cols.numel(), min(_rank(y, gram, fit.threshold), fit.room), budgeted=True):
            # From here on the erasure is least squares: the preserve groups still waiting join
            # its damped fit (weighted) instead of getting only the directions it leaves over.
            more = sum(waiting, [])
            if gram is not None:
                y_more = _outside(fit.basis, xt[:, _columns_of(group_ids, more, device)]) * overflow_weight
                merged_gram = gram + y_more @ y_more.T
            pending = [ids + more] + [h for h in pending if h not in waiting]
            continue
        fit.add(ids, cols, inside, y, cw, gram, bool(budgeted))
        del inside, y


@dataclass(frozen=True)
class MergedColumns:
    """Constraints with every column that repeats exactly (same group, same ``x``, same target)
    taken once, scaled by ``√k`` for its ``k`` copies.

    ``k`` equal columns and one column ``√k x`` have the same ``X Xᵀ`` and ask the same
    (``ΔW √k x = √k r``), so every Gram matrix, singular value, threshold, exact fit, least-squares
    weight and residual (a sum of squares over columns) of a solve is the same, at the cost of the
    distinct columns. Every template of a concept type starts with the same tokens, so the keep
    columns (start token and template prefix) repeat once per concept: a hundred concepts' 3450 keep
    columns are 40 distinct ones.
    """

    x: torch.Tensor  # in × n, float64
    target: torch.Tensor  # out × n, float64 (V*, or the anchor features Y)
    groups: torch.Tensor  # n priorities, CPU
    report_columns: int | None  # how many of the first report_columns columns remain

    def residual(self, weight: torch.Tensor) -> torch.Tensor:
        """``R = V* − W_o X`` of a site whose targets these are (float64, ``W_o`` read by blocks of rows)."""
        return _residual(weight, self.target, self.x)

    @classmethod
    def of(cls, x: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None,
           report_columns: int | None = None) -> "MergedColumns":
        n = x.shape[1]
        group_ids = _group_ids(groups, n)
        reported = torch.arange(n) < (n if report_columns is None else report_columns)
        x64 = x.to(torch.float64)
        t64 = target.to(device=x64.device, dtype=torch.float64)
        first, counts = _repeats(x64, t64, group_ids * 2 + reported.long())
        scale = counts.to(device=x64.device, dtype=torch.float64).sqrt()
        on = first.to(x64.device)
        return cls(x64.index_select(1, on).mul_(scale), t64.index_select(1, on).mul_(scale), group_ids[first],
                   None if report_columns is None else int(reported[first].sum()))


def _repeats(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, counts)``: the first column of each run of exactly equal columns of ``[x; t]`` with
    one ``label``, in order of first appearance, and how many there are. Columns are matched by two
    fixed random projections (:func:`~erasepro_ops.linalg.coarse`), then compared entry by entry."""
    if x.shape[1] == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    g = torch.Generator(device="cpu").manual_seed(0)
    px = torch.randn(2, x.shape[0], generator=g, dtype=x.dtype).to(x.device)
    pt = torch.randn(2, t.shape[0], generator=g, dtype=t.dtype).to(t.device)
    sketch = torch.cat([coarse(px @ x + pt @ t), label[None].to(torch.float64)])
    _, inverse = torch.unique(sketch, dim=1, return_inverse=True)
    columns = torch.arange(x.shape[1])
    first_of = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), x.shape[1], dtype=torch.long)
    candidate = first_of.scatter_reduce(0, inverse, columns, "amin")[inverse]
    owner = columns.clone()
    later = columns[candidate != columns]
    for part in later.split(512):  # a slice at a time: the compared copies stay small
        first = candidate[part]
        p, f = part.to(x.device), first.to(x.device)
        same = ((x[:, p] == x[:, f]).all(0) & (t[:, p] == t[:, f]).all(0)).cpu()
        owner[part[same]] = first[same]
    first, counts = torch.unique(owner, return_counts=True)  # sorted: the order of first appearance
    return first, counts


@dataclass(frozen=True)
class ConstraintSystem:
    """The factorisation of ``X`` (and ``C``) shared by every site constrained on the same columns."""

    x: torch.Tensor | None  # in × N, float64 (None: built with keep_x=False)
    steps: tuple[_Step, ...]
    down: torch.Tensor  # r × in in original coordinates (rows of each step's Uᵀ, times C^{-1/2})
    down_x: torch.Tensor  # r × N: down @ x, for residuals
    unaligned_energy: float  # share of ‖X̃‖² outside the exactly-constrained span
    rtol: float
    damped_from: int | None = None  # index of the first step fitted by damped least squares (overflow)
    exact_groups: tuple[int, ...] = ()  # the groups fitted exactly: those before the first overflow

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def width(self) -> int:
        return int(self.down.shape[1])

    @classmethod
    def build(
        cls,
        x: torch.Tensor,
        groups: Sequence[int] | torch.Tensor | None = None,
        *,
        preserve: torch.Tensor | None = None,
        lam: float = 1.0,
        alpha: float = 0.0,
        rtol: float = DEFAULT_RTOL,
        preserve_rtol: float | None = None,
        overflow_damping: float = DEFAULT_OVERFLOW_DAMPING,
        budget: int | None = None,
        unbudgeted: Collection[int] = (),
        overflow_weight: float = DEFAULT_OVERFLOW_PRESERVE_WEIGHT,
        report_columns: int | None = None,
        device: torch.device | str | None = None,
        keep_x: bool = True,
    ) -> "ConstraintSystem":
        """Factorise the constrained features.

        ``groups[j]`` is column ``j``'s priority (lower first); ``None`` puts all in one group.
        ``preserve`` (in × M) with ``alpha > 0`` selects ``C = λI + α K Kᵀ / M``; otherwise ``C = I``;
        a :class:`~erasepro_ops.linalg.PreserveWeighting` built already is used as it is.
        ``overflow_damping`` is ρ of the overflow rule (0: plain least squares on the overflow);
        ``budget`` the rank budget it checks (default: the width; the chain gives shallow sites the
        deep sites' width, so the whole erasure overflows at once); groups in ``unbudgeted`` (the
        preserve prompts') do not count toward it and overflow only the width, and ``overflow_weight`` weights
        them when they join an overflowing erasure's fit; ``report_columns`` the number of
        leading columns the unaligned energy is measured on (default all; preserve columns come last).
        ``preserve_rtol``: the tolerance of the groups in ``unbudgeted`` (default ``rtol``), so the
        erasure's near-degenerate directions can be dropped while the kept prompts stay exact.
        ``keep_x`` False: ``x`` is the caller's to use up (float64 on ``device`` already, it may be
        overwritten by ``X̃``) and the system keeps no ``X``: it fits residuals (:meth:`fit`) only.
        """
        _check_settings(x, rtol, overflow_damping, overflow_weight)
        if preserve_rtol is not None and not preserve_rtol > 0:
            raise ValueError("preserve_rtol must be positive")
        device = x.device if device is None else torch.device(device)
        x64 = x.to(device=device, dtype=torch.float64)
        check_finite("features X", x64)
        width, n = x64.shape
        budget = width if budget is None else min(int(budget), width)
        group_ids = _group_ids(groups, n)
        cis = _weighting(preserve, width, lam, alpha, device)
        c_max = 1.0 if cis is None else cis.c_max
        scale = spectral_norm_estimate(x64) / c_max**0.5
        xt = x64 if cis is None else cis.left(x64, overwrite=not keep_x)
        if not keep_x:
            x64 = None
        fit = _Fit(xt, rtol * scale, budget, overflow_damping, None if preserve_rtol is None else preserve_rtol * scale)
        del xt  # the fit holds X̃ until its system is made
        _fit_groups(fit, group_ids, set(unbudgeted), overflow_weight, device)
        return fit.system(x64, cis, report_columns, rtol)

    def solve(self, weight: torch.Tensor, target: torch.Tensor) -> SiteSolution:
        """The zero-residual update of a site with weight ``W_o`` towards outputs ``V`` (out × N)."""
        if self.x is None:
            raise ValueError("this system was built without X (keep_x=False): give it the residuals (fit)")
        return self.fit(_residual(weight, target, self.x))

    def fit(self, r: torch.Tensor) -> SiteSolution:
        """The update for residuals ``R = V − W_o X`` (out × N, float64 on the solve device)."""
        if r.shape[1] != self.down_x.shape[1]:
            raise ValueError(f"R must have {self.down_x.shape[1]} columns, got {tuple(r.shape)}")
        ups: list[torch.Tensor] = []
        for step in self.steps:
            r_g = r[:, step.columns]
            for up_h, cross_h in zip(ups, step.cross):
                r_g = r_g - up_h @ cross_h
            ups.append(r_g @ step.coef)
        up = torch.cat(ups, dim=1) if ups else r.new_zeros(r.shape[0], 0)
        update = LowRankUpdate(up, self.down)
        return _residual_solution(update, r, up @ self.down_x)


    def map_targets(self, y: torch.Tensor, report_columns: int | None = None,
                    settled: torch.Tensor | None = None) -> "SharedUpdate":
        """The shared update for sites whose targets are ``V*_s = W_s Y`` (``Y``: in × N).

        With ``D = Y − X`` and ``R_s = W_s D``, step ``g`` gives ``up_g = W_s Z_g`` where
        ``Z_g = D_g coef_g − Σ_{h<g} Z_h (cross_h coef_g)`` does not depend on the site.
        Columns marked ``settled`` are solved as kept (their ``D`` taken as 0); residuals are
        measured against the true ``D`` on the first ``report_columns`` columns (default all).
        """
        if self.x is None:
            raise ValueError("this system was built without X (keep_x=False): it cannot map targets")
        d = y.to(device=self.x.device, dtype=torch.float64) - self.x
        check_finite("anchor features Y", d)
        d_solve = d if settled is None else d.masked_fill(settled.to(d.device)[None, :], 0.0)
        zs: list[torch.Tensor] = []
        for step in self.steps:
            z_g = d_solve[:, step.columns] @ step.coef
            for z_h, cross_h in zip(zs, step.cross):
                z_g = z_g - z_h @ (cross_h @ step.coef)
            zs.append(z_g)
        z = torch.cat(zs, dim=1) if zs else d.new_zeros(d.shape[0], 0)
        f = d - z @ self.down_x
        return SharedUpdate.from_parts(z, self.down, d[:, :report_columns], f[:, :report_columns])


@dataclass(frozen=True)
class SharedUpdate:
    """Updates ``ΔW_s = (W_s z) @ down`` for every site reading the same ``X`` with ``V*_s = W_s Y``.

    Residuals come from ``‖W_s F‖_F² = tr(W_s F Fᵀ W_sᵀ)`` with ``F = D − z down X`` (after)
    and ``F = D`` (before), so no site ever forms an ``out × N`` matrix.
    """

    z: torch.Tensor  # in × r
    down: torch.Tensor  # r × in
    gram_before: torch.Tensor  # D Dᵀ
    gram_after: torch.Tensor  # F Fᵀ
    down_gram: torch.Tensor  # down downᵀ, shared by every site's ‖ΔW_s‖

    @classmethod
    def from_parts(cls, z, down, d, f) -> "SharedUpdate":
        return cls(z, down, d @ d.T, f @ f.T, down @ down.T)

    @classmethod
    def unchanged(cls, x: torch.Tensor, y: torch.Tensor, report_columns: int | None = None) -> "SharedUpdate":
        """No update at all (rank 0), with the residuals of leaving ``X`` where it is."""
        x64 = x.to(torch.float64)
        d = (y.to(device=x.device, dtype=torch.float64) - x64)[:, :report_columns]
        empty = x64.new_zeros(x64.shape[0], 0)
        gram = d @ d.T
        return cls(empty, empty.T, gram, gram, empty.T @ empty)  # one Gram matrix: before is after

    def solve(self, weight: torch.Tensor) -> SiteSolution:
        """The site's update and residuals, ``W_s`` read in float64 a block of rows at a time."""
        check_finite("site weight", weight)
        if weight.shape[1] != self.z.shape[0]:
            raise ValueError(f"site weight has input width {weight.shape[1]}, features have {self.z.shape[0]}")
        before = gram_trace(weight, self.gram_before)
        after = before if self.gram_after is self.gram_before else max(gram_trace(weight, self.gram_after), 0.0)
        residual = (after / before) ** 0.5 if before > 0 else 0.0
        up = weight_times(weight, self.z)
        return SiteSolution(LowRankUpdate(up, self.down, self.down_gram), residual, after, before)


@dataclass(frozen=True)
class UCESystem:
    """UCE's shared inverse: ``down = s_e Xᵀ (λI + s_e X Xᵀ + s_p K Kᵀ)⁻¹`` (N × in)."""

    x: torch.Tensor
    down: torch.Tensor
    down_x: torch.Tensor

    @classmethod
    def build(
        cls,
        x: torch.Tensor,
        preserve: torch.Tensor | None = None,
        *,
        lam: float = 0.5,
        erase_scale: float = 1.0,
        preserve_scale: float = 1.0,
        device: torch.device | str | None = None,
    ) -> "UCESystem":
        if not lam > 0:
            raise ValueError("UCE needs λ > 0")
        device = x.device if device is None else torch.device(device)
        x64 = x.to(device=device, dtype=torch.float64)
        check_finite("features X", x64)
        m = erase_scale * (x64 @ x64.T)
        if preserve is not None and preserve.numel():
            k = preserve.to(device=device, dtype=torch.float64)
            check_finite("preserve features", k)
            m = m + preserve_scale * (k @ k.T)
        m.diagonal().add_(lam)
        down = erase_scale * torch.linalg.solve(m, x64).T  # M is symmetric: (M⁻¹X)ᵀ = XᵀM⁻¹
        return cls(x64, down, down @ x64)

    def solve(self, weight: torch.Tensor, target: torch.Tensor) -> SiteSolution:
        return self.fit(_residual(weight, target, self.x))

    def fit(self, r: torch.Tensor) -> SiteSolution:
        """The update for residuals ``R = V − W_o X`` (out × N, float64 on the solve device)."""
        update = LowRankUpdate(r, self.down)
        return _residual_solution(update, r, r @ self.down_x)

    def map_targets(self, y: torch.Tensor, report_columns: int | None = None, settled=None) -> SharedUpdate:
        """Shared form for ``V*_s = W_s Y``: ``ΔW_s = W_s D down`` with ``D = Y − X`` (UCE as
        published: ``settled`` is ignored).

        Kept as ``(W_s D) @ down`` (rank N) when ``N ≤ in``, else as ``(W_s D down) @ I``.
        """
        d = y.to(device=self.x.device, dtype=torch.float64) - self.x
        check_finite("anchor features Y", d)
        n, width = self.down.shape
        if n <= width:
            z, down = d, self.down
        else:
            z, down = d @ self.down, torch.eye(width, dtype=d.dtype, device=d.device)
        f = d - (d @ self.down) @ self.x
        return SharedUpdate.from_parts(z, down, d[:, :report_columns], f[:, :report_columns])

