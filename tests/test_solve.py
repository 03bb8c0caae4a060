"""The zero-residual site solve and the UCE baseline (docs/DESIGN.md, *Solvers*), on random problems."""

import pytest
import torch

from erasepro_ops import linalg
from erasepro_ops.solve import ConstraintSystem, UCESystem
from reference_ops import preservation_weighting, uce_update, zero_residual_update


def problem(inn, out, n, seed=0, m=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) / inn**0.5
    x = torch.randn(inn, n, generator=g)
    v = torch.randn(out, n, generator=g)
    k = torch.randn(inn, m, generator=g) if m else None
    return w, x, v, k


def sd_like_problem(inn, out, n, seed=0, m=64):
    """Text-encoder-like features: one direction shared by every token plus a smaller spread.

    A text encoder's token features are strongly correlated (cosine similarity around 0.9 between
    unrelated tokens); target, anchor and preserve columns all share that direction.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) / inn**0.5
    shared = torch.randn(inn, 1, generator=g)
    x = shared + 0.5 * torch.randn(inn, n, generator=g)
    k = shared + 0.5 * torch.randn(inn, m, generator=g)
    v = w @ (shared + 0.5 * torch.randn(inn, n, generator=g))
    return w, x, v, k


def rel(a, b):
    return float((a - b).norm() / b.norm())


def residual_of(w_new, x, v, w_old):
    return float((w_new @ x - v).norm() / (w_old @ x - v).norm())


@pytest.mark.parametrize("inn,out", [(768, 320), (1024, 1280), (2048, 1280)])
@pytest.mark.parametrize("frac", [0.0, 0.05, 0.5, 1.0])
def test_zero_residual_in_float32_where_uce_leaves_a_gap(inn, out, frac):
    n = max(1, int(frac * inn))
    w, x, v, k = sd_like_problem(inn, out, n, seed=n)
    sol = zero_residual_update(w, x, v)
    w_new32 = (w.double() + sol.update.dense()).float()
    # Edited weights stored in float32, product evaluated exactly.
    stored = residual_of(w_new32.double(), x.double(), v.double(), w.double())
    print(f"in={inn} out={out} N={n}: residual f64 {sol.residual:.2e}, float32 weights {stored:.2e}")
    assert sol.residual <= 1e-8
    assert stored <= 1e-5
    if n <= inn // 2:
        # Everything in float32 (a square random X is ill-conditioned enough that a float32
        # matmul alone adds ~1e-5; the stored-weight figure above is the meaningful one there).
        assert residual_of(w_new32, x, v, w) <= 1e-5
    uce = uce_update(w, x, v, k)
    print(f"   UCE (λ=0.5, 64 preserve columns) residual {uce.residual:.2e}")
    assert uce.residual > 1e-3


def kkt_solution(w, x, v, c):
    """Solve the KKT system of min ½‖ΔW C^{1/2}‖² s.t. ΔW X = R directly: [C X; Xᵀ 0][ΔWᵀ; Λ] = [0; Rᵀ]."""
    inn, n = x.shape
    r = v - w @ x
    kkt = torch.zeros(inn + n, inn + n, dtype=torch.float64)
    kkt[:inn, :inn] = c
    kkt[:inn, inn:] = x
    kkt[inn:, :inn] = x.T
    rhs = torch.cat([torch.zeros(inn, w.shape[0], dtype=torch.float64), r.T])
    return torch.linalg.solve(kkt, rhs)[:inn].T


@pytest.mark.parametrize("weighted", [False, True])
def test_update_is_the_kkt_optimum_and_no_feasible_perturbation_is_smaller(weighted):
    w, x, v, k = problem(64, 24, 20, seed=3, m=40)
    w, x, v, k = w.double(), x.double(), v.double(), k.double()
    lam, alpha = 0.7, 3.0
    c = preservation_weighting(k, lam, alpha) if weighted else torch.eye(64, dtype=torch.float64)
    kwargs = dict(preserve=k, lam=lam, alpha=alpha) if weighted else {}
    dw = zero_residual_update(w, x, v, **kwargs).update.dense()
    reference = kkt_solution(w, x, v, c)
    assert rel(dw, reference) <= 1e-6

    def weighted_norm(d):
        return float(torch.trace(d @ c @ d.T))

    best = weighted_norm(dw)
    null = torch.eye(64, dtype=torch.float64) - x @ torch.linalg.pinv(x)  # E @ null keeps ΔW X fixed
    g = torch.Generator().manual_seed(9)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(50):
            e = torch.randn(24, 64, generator=g, dtype=torch.float64) * scale
            other = dw + e @ null
            assert rel(other @ x, dw @ x) < 1e-8
            assert weighted_norm(other) >= best * (1 - 1e-12)


def test_rank_is_bounded_by_rank_x_and_factors_reproduce_dense():
    g = torch.Generator().manual_seed(1)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(96, 5, **f64) @ torch.randn(5, 30, **f64)  # rank 5, 30 columns
    w = torch.randn(40, 96, **f64)
    v = w @ x + torch.randn(40, 96, **f64) @ x  # reachable: R lies in X's row space
    sol = zero_residual_update(w, x, v)
    assert sol.update.rank <= torch.linalg.matrix_rank(x)
    assert sol.update.rank == 5
    reference = (v - w @ x) @ torch.linalg.pinv(x)
    assert rel(sol.update.up @ sol.update.down, reference) <= 1e-6
    assert sol.residual <= 1e-8
    assert abs(sol.update.norm() - float(reference.norm())) <= 1e-8 * float(reference.norm())


def test_preservation_weighting_lowers_drift_at_equal_residual():
    g = torch.Generator().manual_seed(4)
    inn, out = 128, 64
    w = torch.randn(out, inn, generator=g).double() / inn**0.5
    # Preserve features share directions with the constrained ones, as real prompts do.
    common = torch.randn(inn, 8, generator=g).double()
    x = common @ torch.randn(8, 12, generator=g).double() + 0.5 * torch.randn(inn, 12, generator=g).double()
    k = common @ torch.randn(8, 200, generator=g).double() + 0.1 * torch.randn(inn, 200, generator=g).double()
    v = torch.randn(out, 12, generator=g).double()
    plain = zero_residual_update(w, x, v)
    weighted = zero_residual_update(w, x, v, preserve=k, lam=1.0, alpha=10.0)
    drift_plain = float((plain.update.dense() @ k).norm() / (w @ k).norm())
    drift_weighted = float((weighted.update.dense() @ k).norm() / (w @ k).norm())
    print(f"preserve drift: C=I {drift_plain:.4f}, weighted C {drift_weighted:.4f}")
    assert plain.residual <= 1e-8 and weighted.residual <= 1e-8
    assert drift_weighted < 0.7 * drift_plain


def test_more_constraints_than_width_gives_least_squares_with_residual_reported():
    w, x, v, _ = problem(32, 16, 48, seed=5)
    sol = zero_residual_update(w, x, v, overflow_damping=0.0)
    dw = sol.update.dense()
    assert torch.isfinite(dw).all()
    lstsq = torch.linalg.lstsq(x.double().T, (v - w @ x).double().T).solution.T  # min ‖ΔW X − R‖
    best = residual_of(w.double() + lstsq, x.double(), v.double(), w.double())
    assert sol.residual == pytest.approx(best, rel=1e-6)
    assert 0.1 < sol.residual < 1.0


def test_overflow_is_ridge_damped_and_only_when_the_budget_is_spent():
    """Beyond the rank budget the overflow group gets ``R Xᵀ (X Xᵀ + μ I)⁻¹`` (μ = (ρ s_max)²): a
    smaller update than plain least squares for a slightly larger residual; exact groups stay exact."""
    w, x, v, _ = problem(32, 16, 48, seed=5)
    w, x, v = w.double(), x.double(), v.double()
    rho = 1e-1
    damped = zero_residual_update(w, x, v, overflow_damping=rho)
    plain = zero_residual_update(w, x, v, overflow_damping=0.0)
    mu = (rho * float(torch.linalg.matrix_norm(x, ord=2))) ** 2
    ridge = (v - w @ x) @ x.T @ torch.linalg.inv(x @ x.T + mu * torch.eye(32, dtype=torch.float64))
    assert rel(damped.update.dense(), ridge) <= 1e-9
    assert damped.update.norm() < plain.update.norm()
    assert plain.residual < damped.residual < 1.0
    # priority groups: the 6 keep/concept columns stay exact, the 42 padding columns are damped
    groups = [0] * 6 + [1] * 42
    system = ConstraintSystem.build(x, groups, overflow_damping=rho)
    sol = system.solve(w, v)
    out = (w + sol.update.dense()) @ x
    assert system.damped_from == 1 and system.exact_groups == (0,)
    # a group that overflows on its own is not reported exact, with damping or without
    three = [0] * 6 + [1] * 36 + [2] * 6
    assert ConstraintSystem.build(x, three, overflow_damping=0.0).exact_groups == (0,)
    assert ConstraintSystem.build(x, [0] * 6 + [1] * 6 + [2] * 36).exact_groups == (0, 1)
    assert system.rank <= 32  # never more directions than the width, however weak the tolerance
    assert ConstraintSystem.build(x, groups, rtol=1e-300).rank <= 32
    # a strong preserve weighting C must not shrink the damping to nothing (μ is set on C^{-1/2} X)
    k = torch.randn(32, 20, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(preservation_weighting(k, 1.0, 1e6))
    c_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    weighted = [float((ConstraintSystem.build(x, groups, preserve=k, alpha=1e6, overflow_damping=r)
                       .solve(w, v).update.dense() @ c_half).norm()) for r in (0.0, rho)]
    print(f"‖ΔW C^½‖ plain {weighted[0]:.3e}, damped {weighted[1]:.3e}")
    assert weighted[1] < 0.5 * weighted[0]
    assert float((out[:, :6] - v[:, :6]).norm() / (w @ x - v)[:, :6].norm()) <= 1e-9
    # within the budget nothing is damped: N = width is still an exact, square fit
    w2, x2, v2, _ = problem(16, 8, 16, seed=15)
    square = ConstraintSystem.build(x2, overflow_damping=rho)
    assert square.damped_from is None and square.solve(w2, v2).residual <= 1e-8 and square.exact_groups == (0,)


def test_duplicated_columns_with_conflicting_targets_meet_in_the_middle():
    w, x, v, _ = problem(16, 4, 3, seed=6)
    x = torch.cat([x, x[:, :1]], dim=1)
    v = torch.cat([v, v[:, :1] + 2.0], dim=1)
    sol = zero_residual_update(w, x, v)
    out = (w.double() + sol.update.dense()) @ x.double()
    expected = (v[:, 0] + v[:, 3]).double() / 2
    assert torch.allclose(out[:, 0], expected, atol=1e-9)
    assert torch.allclose(out[:, 3], expected, atol=1e-9)
    assert sol.residual > 0.1


def test_all_zero_features_give_no_update_and_residual_one():
    w, _, v, _ = problem(16, 4, 3, seed=7)
    sol = zero_residual_update(w, torch.zeros(16, 3), v)
    assert sol.update.rank == 0
    assert sol.update.dense().abs().max() == 0
    assert sol.residual == pytest.approx(1.0)


@pytest.mark.parametrize("what", ["weight", "features", "target"])
def test_non_finite_input_is_refused_with_its_name(what):
    w, x, v, _ = problem(16, 4, 3, seed=8)
    {"weight": w, "features": x, "target": v}[what][0, 0] = float("nan")
    expected = {"weight": "site weight", "features": "features X", "target": "V\\*"}[what]
    with pytest.raises(ValueError, match=expected):
        zero_residual_update(w, x, v)
    with pytest.raises(ValueError, match=expected):
        uce_update(w, x, v)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16,
                                   torch.float32, torch.float64])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", None])
def test_all_finite_finds_one_bad_entry_in_every_weight_dtype(dtype, bad):
    """The weights' NaN/Inf check (a min and max in the weight's own dtype) sees one bad entry
    anywhere, in every dtype ComfyUI stores weights in (float8_e4m3fn has no Inf: it saturates)."""
    from erasepro_ops.linalg import all_finite

    w = torch.randn(300, 70, generator=torch.Generator().manual_seed(0))
    if bad is not None:
        w[299, 69] = float(bad)
    w = w.to(dtype)
    expected = bad is None or (dtype == torch.float8_e4m3fn and bad != "nan")
    assert bool(torch.isfinite(w.to(torch.float32)).all()) is expected
    assert all_finite(w) is expected
    assert all_finite(w[:0]) is True
    assert all_finite(w.mT) is expected and all_finite(w[:, ::3]) is expected  # column 69 is among them


def test_all_finite_reads_a_transposed_factor_in_place():
    """The cached weighting's column-major factor is checked without a contiguous copy of it (36 MiB
    at 3072 wide): the reduction runs on the same storage, and a NaN in it is still found."""
    from erasepro_ops.linalg import all_finite

    factor = torch.randn(64, 64).mT
    seen = []
    real = torch.aminmax
    try:
        torch.aminmax = lambda t: seen.append(t.is_contiguous() and t.data_ptr() == factor.data_ptr()) or real(t)
        assert all_finite(factor) is True
        factor[3, 60] = float("nan")
        assert all_finite(factor) is False
    finally:
        torch.aminmax = real
    assert seen == [True, True]


def test_uce_matches_its_published_formula():
    w, x, v, k = problem(48, 20, 10, seed=11, m=30)
    w, x, v, k = w.double(), x.double(), v.double(), k.double()
    lam, se, sp = 0.5, 1.3, 0.7
    eye = torch.eye(48, dtype=torch.float64)
    formula = (lam * w + se * v @ x.T + sp * w @ k @ k.T) @ torch.linalg.inv(lam * eye + se * x @ x.T + sp * k @ k.T)
    sol = uce_update(w, x, v, k, lam=lam, erase_scale=se, preserve_scale=sp)
    assert rel(w + sol.update.dense(), formula) <= 1e-10
    assert sol.residual == pytest.approx(residual_of(formula, x, v, w), rel=1e-8)


def test_same_inputs_give_identical_bytes():
    w, x, v, k = problem(256, 64, 100, seed=12, m=50)
    groups = [0] * 10 + [1] * 40 + [2] * 50
    a = zero_residual_update(w, x, v, groups, preserve=k, alpha=2.0)
    b = zero_residual_update(w, x, v, groups, preserve=k, alpha=2.0)
    assert torch.equal(a.update.up, b.update.up) and torch.equal(a.update.down, b.update.down)
    ua, ub = uce_update(w, x, v, k), uce_update(w, x, v, k)
    assert torch.equal(ua.update.up, ub.update.up) and torch.equal(ua.update.down, ub.update.down)


def test_priority_groups_are_exact_first_and_least_squares_after():
    w, x, v, _ = problem(32, 16, 60, seed=13)
    groups = [0] * 20 + [1] * 40
    sol = zero_residual_update(w, x, v, groups)
    out = (w.double() + sol.update.dense()) @ x.double()
    first = float((out[:, :20] - v[:, :20].double()).norm() / (w @ x - v)[:, :20].double().norm())
    assert first <= 1e-9
    assert sol.residual > 0.1
    # When everything fits, grouping changes nothing: the minimum-norm exact update is unique.
    w, x, v, _ = problem(64, 16, 30, seed=14)
    one = zero_residual_update(w, x, v).update.dense()
    grouped = zero_residual_update(w, x, v, [2] * 10 + [0] * 10 + [1] * 10).update.dense()
    assert rel(grouped, one) <= 1e-8


def test_shared_system_solves_many_sites_like_single_solves():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(96, 30, generator=g)
    system = ConstraintSystem.build(x)
    uce = UCESystem.build(x)
    for out in (32, 64, 80):
        w = torch.randn(out, 96, generator=g)
        v = torch.randn(out, 30, generator=g)
        assert torch.allclose(system.solve(w, v).update.dense(), zero_residual_update(w, x, v).update.dense())
        assert torch.allclose(uce.solve(w, v).update.dense(), uce_update(w, x, v).update.dense())


@pytest.mark.parametrize("n", [30, 140])
def test_shared_map_for_linear_targets_equals_per_site_solves(n):
    """Deep sites ask V*_s = W_s Y: the shared form must match solving each site on its own."""
    g = torch.Generator().manual_seed(16)
    x, y = torch.randn(96, n, generator=g), torch.randn(96, n, generator=g)
    k = torch.randn(96, 50, generator=g)
    groups = torch.arange(n) % 3
    for system in (ConstraintSystem.build(x, groups), ConstraintSystem.build(x, groups, preserve=k, alpha=5.0),
                   UCESystem.build(x, k)):
        shared = system.map_targets(y)
        for out in (32, 80):
            w = torch.randn(out, 96, generator=g)
            one = system.solve(w, w @ y)
            mapped = shared.solve(w)
            assert rel(mapped.update.dense(), one.update.dense()) <= 1e-6  # same algebra, other rounding order
            assert mapped.residual == pytest.approx(one.residual, rel=1e-6, abs=1e-12)


def test_row_block_reads_match_whole_products(monkeypatch):
    """A site read in float64 blocks of rows (a few rows per block here) gives the whole-matrix
    figures: ``tr(W G Wᵀ)``, ``‖W‖_F`` and a shared update's ``W z`` and residuals."""
    g = torch.Generator().manual_seed(41)
    x, y = torch.randn(96, 40, generator=g), torch.randn(96, 40, generator=g)
    w = torch.randn(77, 96, generator=g).half()  # as a checkpoint stores it
    f = torch.randn(96, 12, generator=g, dtype=torch.float64)
    w64 = w.double()
    shared = ConstraintSystem.build(x, torch.arange(40) % 2).map_targets(y)
    whole = shared.solve(w)
    monkeypatch.setattr(linalg, "ROW_BLOCK_BYTES", 5 * 96 * 8)  # 5 rows per block: 16 blocks, the last of 2 rows
    assert len(list(linalg.float64_rows(w))) == 16
    assert linalg.gram_trace(w, f @ f.T) == pytest.approx(float((w64 @ f).square().sum()), rel=1e-12)
    assert linalg.frobenius_norm(w) == pytest.approx(float(w64.norm()), rel=1e-12)
    blocked = shared.solve(w)
    assert rel(blocked.update.up, whole.update.up) <= 1e-12  # the same rows' products (BLAS may order the sums otherwise)
    assert blocked.residual == pytest.approx(whole.residual, rel=1e-9)
    assert blocked.initial_sq == pytest.approx(float((w64 @ (y.double() - x.double())).square().sum()), rel=1e-9)
    nan = w.clone()
    nan[70, 3] = float("nan")
    with pytest.raises(ValueError, match="site weight contains 1 NaN"):
        shared.solve(nan)


def test_preservation_weighting_keeps_exact_alignment_however_strong():
    w, x, v, k = sd_like_problem(256, 64, 120, seed=17, m=200)
    for alpha in (1.0, 1e2, 1e4):
        sol = zero_residual_update(w, x, v, preserve=k, lam=1.0, alpha=alpha)
        print(f"alpha {alpha:g}: rank {sol.update.rank}, residual {sol.residual:.2e}")
        assert sol.update.rank == 120
        assert sol.residual <= 1e-8


@pytest.mark.parametrize("m", [20, 300])
def test_preserve_weighting_operator_whitens_c(m):
    """``left`` is a square root of ``C⁻¹`` (``(L⁻¹X)ᵀ(L⁻¹X) = XᵀC⁻¹X``), ``right`` applies the same
    operator from the right (``right(A) X = A left(X)``), and ``c_max`` is ``C``'s largest eigenvalue."""
    from erasepro_ops.linalg import PreserveWeighting

    g = torch.Generator().manual_seed(18)
    k = torch.randn(120, m, generator=g, dtype=torch.float64)
    c = preservation_weighting(k, 0.7, 25.0)
    op = PreserveWeighting.build(k, 0.7, 25.0)
    x = torch.randn(120, 30, generator=g, dtype=torch.float64)
    xt = op.left(x)
    assert rel(xt.T @ xt, x.T @ torch.linalg.solve(c, x)) <= 1e-10
    a = torch.randn(7, 120, generator=g, dtype=torch.float64)
    assert rel(op.right(a) @ x, a @ xt) <= 1e-12
    assert op.c_max == pytest.approx(float(torch.linalg.eigvalsh(c)[-1]), rel=1e-4)  # power iteration: for thresholds


def test_moments_taken_part_by_part_give_the_weighting_of_the_whole_features():
    """``K Kᵀ`` summed part by part (lower triangle only, in row blocks) is the whole product's lower
    triangle, and the weighting built from those moments is the one built from ``K`` at once; the
    factor takes the moments' Gram matrix in place."""
    from erasepro_ops.linalg import GRAM_BLOCK, FeatureMoments, PreserveWeighting

    g = torch.Generator().manual_seed(23)
    n = GRAM_BLOCK + 100  # a block edge inside
    k = torch.randn(n, 700, generator=g, dtype=torch.float64)
    moments = FeatureMoments.of(k[:, :250]).add(k[:, 250:251]).add(k[:, 251:])
    assert moments.count == 700 and moments.sum_sq == pytest.approx(float(k.square().sum()), rel=1e-12)
    assert rel(moments.gram.tril(), (k @ k.T).tril()) <= 1e-13
    assert float(moments.gram[:GRAM_BLOCK, GRAM_BLOCK:].abs().max()) == 0.0  # right of the diagonal blocks: never formed
    gram = moments.gram
    op = PreserveWeighting.from_moments(moments, 0.7, 25.0)
    assert op.chol is gram and moments.gram is None
    whole = PreserveWeighting.build(k, 0.7, 25.0)
    assert rel(op.chol, whole.chol) <= 1e-13
    assert rel(op.chol @ op.chol.T, preservation_weighting(k, 0.7, 25.0)) <= 1e-12
    with pytest.raises(ValueError, match="width"):
        FeatureMoments.of(k).add(k[:-1])


def test_float32_features_give_a_float32_factor_that_keeps_the_constraints_exact():
    """The text encoders' features are float32: their moments and Cholesky factor stay float32 (half
    the memory of float64 at 3072 wide), the factor is within float32 rounding of the float64 one,
    and a solve weighted by it is as exact as one weighted by the float64 factor."""
    from erasepro_ops.linalg import FeatureMoments, PreserveWeighting

    g = torch.Generator().manual_seed(29)
    width, out, n = 600, 80, 40
    k = (torch.randn(width, 2000, generator=g) * torch.linspace(0.1, 3.0, width)[:, None]).to(torch.float32)
    moments = FeatureMoments.of(k[:, :900]).add(k[:, 900:])
    assert moments.gram.dtype == torch.float32
    op32 = PreserveWeighting.from_moments(moments, 1.0, 10.0 / float(k.double().square().mean()))
    op64 = PreserveWeighting.build(k.double(), 1.0, 10.0 / float(k.double().square().mean()))
    assert op32.chol.dtype == torch.float32 and op64.chol.dtype == torch.float64
    gap = rel(op32.chol.double(), op64.chol)
    print(f"float32 factor against float64: {gap:.1e}")
    assert 0 < gap <= 1e-5
    w = torch.randn(out, width, generator=g, dtype=torch.float64)
    x = torch.randn(width, n, generator=g, dtype=torch.float64)
    v = torch.randn(out, n, generator=g, dtype=torch.float64)
    for op in (op32, op64):
        sol = ConstraintSystem.build(x, preserve=op).solve(w, v)
        assert residual_of(w + sol.update.dense(), x, v, w) <= 1e-10


@pytest.mark.parametrize("n", [1000, 1024, 1100])
def test_a_float32_factor_is_applied_in_float64_by_blocks_as_one_float64_solve(n):
    """The cached weighting's float32 factor is widened a block at a time, not copied whole: its
    float64 solves from both sides equal a float64 solve with the same factor (block edges inside,
    on and past a multiple of the block)."""
    from erasepro_ops.linalg import SOLVE_BLOCK, PreserveWeighting

    assert n > SOLVE_BLOCK
    g = torch.Generator().manual_seed(19)
    k = torch.randn(n, 2 * n, generator=g)
    stored = PreserveWeighting.build(k, 1.0, 30.0).to(dtype=torch.float32)
    exact = stored.to(dtype=torch.float64)
    b = torch.randn(n, 40, generator=g, dtype=torch.float64)
    assert rel(stored.left(b), exact.left(b)) <= 1e-12
    assert rel(stored.right(b.T), exact.right(b.T)) <= 1e-12
    assert rel(exact.chol @ stored.left(b), b) <= 1e-12  # it solves with that factor, no other
    assert stored.left(b).dtype == torch.float64 and stored.chol.dtype == torch.float32
    rows = b.T.contiguous()
    expected = stored.right(rows)
    assert stored.right(rows, overwrite=True).data_ptr() == rows.data_ptr()  # in the caller's place
    assert torch.equal(rows, expected)


def test_a_weight_times_features_by_blocks_of_rows_is_the_float64_product():
    """``W @ M`` read a block of rows of ``W`` at a time (a float16 weight widened block by block)
    equals the product of the whole weight widened to float64, across block edges."""
    from erasepro_ops.linalg import ROW_BLOCK_BYTES, weight_times

    g = torch.Generator().manual_seed(23)
    m = torch.randn(300, 17, generator=g, dtype=torch.float64)
    rows_per_block = ROW_BLOCK_BYTES // (8 * 300)
    w = torch.randn(2 * rows_per_block + 5, 300, generator=g).to(torch.float16)
    out = weight_times(w, m)
    assert out.dtype == torch.float64 and out.shape == (w.shape[0], 17)
    assert rel(out, w.to(torch.float64) @ m) <= 1e-14


def test_weighted_update_is_the_closed_form_whatever_the_square_root():
    """With ``C = λI + α K Kᵀ / M`` the solve gives ``ΔW = R (XᵀC⁻¹X)⁻¹ XᵀC⁻¹`` (columns independent)."""
    w, x, v, k = (t.double() for t in sd_like_problem(96, 32, 40, seed=19, m=150))
    c = preservation_weighting(k, 1.0, 30.0)
    sol = zero_residual_update(w, x, v, preserve=k, lam=1.0, alpha=30.0)
    ci_x = torch.linalg.solve(c, x)
    expected = (v - w @ x) @ torch.linalg.solve(x.T @ ci_x, ci_x.T)
    assert rel(sol.update.dense(), expected) <= 1e-6
    assert sol.residual <= 1e-9


def test_residuals_and_unaligned_energy_count_only_the_reported_columns():
    """Preserve columns come last; ``report_columns`` keeps them out of the erasure's figures."""
    g = torch.Generator().manual_seed(3)
    width, n, reported = 24, 40, 30
    x = torch.randn(width, n, generator=g, dtype=torch.float64)
    y = x + 0.1 * torch.randn(width, n, generator=g, dtype=torch.float64)
    w = torch.randn(16, width, generator=g, dtype=torch.float64)
    groups = torch.tensor([0] * 10 + [1] * 20 + [2] * 10)  # group 1 overflows the 14 directions left
    system = ConstraintSystem.build(x, groups, report_columns=reported)
    q, _ = torch.linalg.qr(x[:, :10])  # the exact span: group 0's columns
    xr = x[:, :reported]
    outside = xr - q @ (q.T @ xr)
    assert system.damped_from == 1
    assert system.unaligned_energy == pytest.approx(float((outside**2).sum() / (xr**2).sum()), rel=1e-9)
    sol = system.map_targets(y, reported).solve(w)
    after = w @ (y - x) - sol.update.dense() @ x
    assert sol.residual_sq == pytest.approx(float((after[:, :reported] ** 2).sum()), rel=1e-9)
    assert sol.initial_sq == pytest.approx(float(((w @ (y - x))[:, :reported] ** 2).sum()), rel=1e-12)


def test_unbudgeted_groups_do_not_spend_the_rank_budget():
    """Preserve groups sit between the erasure's groups but only the width limits them."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 30, generator=g, dtype=torch.float64)
    v = torch.randn(8, 30, generator=g, dtype=torch.float64)
    w = torch.randn(8, 40, generator=g, dtype=torch.float64)
    groups = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    budgeted = ConstraintSystem.build(x, groups, budget=16)
    free = ConstraintSystem.build(x, groups, budget=16, unbudgeted=(1,))
    assert budgeted.damped_from == 1 and free.damped_from == 2
    sol = free.solve(w, v)
    after = (w + sol.update.dense()) @ x - v
    assert float(after[:, :20].norm() / (w @ x - v)[:, :20].norm()) <= 1e-10  # groups 0 and 1 exact
    assert float(after[:, 20:].norm() / (w @ x - v)[:, 20:].norm()) > 1e-6  # group 2 damped


def test_preserve_groups_join_an_overflowing_erasure_in_one_weighted_fit():
    """When the erasure overflows, the preserve columns still waiting share its least-squares fit
    with weight w: w = 1 is one merged group, larger w holds them closer at the erasure's expense,
    and the fit is the weighted least squares in the freedom the exact groups leave."""
    g = torch.Generator().manual_seed(5)
    width = 20
    x = torch.randn(width, 46, generator=g, dtype=torch.float64)
    w = torch.randn(8, width, generator=g, dtype=torch.float64)
    v = w @ x + torch.randn(8, 46, generator=g, dtype=torch.float64)
    v[:, 36:] = w @ x[:, 36:]  # preserve columns: unchanged outputs
    groups = torch.tensor([0] * 6 + [1] * 30 + [2] * 10)  # group 1 overflows the 14 directions left

    def fit(weight, damping=0.0, labels=groups, unbudgeted=(2,)):
        system = ConstraintSystem.build(x, labels, unbudgeted=unbudgeted, overflow_weight=weight,
                                        overflow_damping=damping)
        dw = system.solve(w, v).update.dense()
        miss = (w + dw) @ x - v
        return dw, [float(miss[:, cols].norm()) for cols in (slice(0, 6), slice(6, 36), slice(36, 46))]

    merged, _ = fit(1.0, labels=torch.tensor([0] * 6 + [1] * 40), unbudgeted=())
    assert rel(fit(1.0)[0], merged) <= 1e-10

    # weighted least squares under group 0's exact constraints, by elimination
    weight = 10.0
    x0, xm, r = x[:, :6], x[:, 6:], v - w @ x
    dw_p = r[:, :6] @ torch.linalg.pinv(x0)
    n = torch.eye(width, dtype=torch.float64) - x0 @ torch.linalg.pinv(x0)
    c = torch.diag(torch.tensor([1.0] * 30 + [weight] * 10, dtype=torch.float64))
    expected = dw_p + (r[:, 6:] - dw_p @ xm) @ c @ torch.linalg.pinv(n @ xm @ c)
    assert rel(fit(weight)[0], expected) <= 1e-8

    misses = [fit(wt, damping=1e-3)[1] for wt in (1.0, 10.0, 100.0)]
    assert all(m[0] <= 1e-8 * float(r[:, :6].norm()) for m in misses)  # group 0 exact throughout
    assert misses[0][2] > misses[1][2] > misses[2][2]  # preserve columns held closer
    assert misses[0][1] < misses[1][1] < misses[2][1]  # at the erasure overflow's expense


def test_overflow_weight_must_be_positive():
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="overflow_weight"):
        ConstraintSystem.build(x, overflow_weight=0.0)


def test_a_coarser_erasure_tolerance_drops_its_near_duplicates_and_keeps_the_preserve_prompt_exact():
    """Two near-duplicate erasure columns asking for different outputs: at rtol 1e-6 their tiny
    difference is fitted by a huge update; at 1e-3 it is dropped. A preserve column whose own new
    direction is that small stays exact only with its own, finer tolerance (``preserve_rtol``)."""
    from erasepro_ops.chain import PRESERVE_GROUPS
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    e = basis.T
    x = torch.stack([e[0], e[0] + 1e-5 * e[1], e[2], 1e-4 * (e[0] + e[3])], dim=1)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    v = w @ x
    v[:, :3] += torch.randn(5, 3, generator=g, dtype=torch.float64)  # the erasure moves the first three
    keep = sorted(PRESERVE_GROUPS)[0]
    groups = [1, 1, 1, keep]

    def fit(**kw):
        sol = ConstraintSystem.build(x, groups, unbudgeted=PRESERVE_GROUPS, **kw).solve(w, v)
        out = (w + sol.update.dense()) @ x
        return sol.update.norm() / float(w.norm()), float((out[:, 3] - v[:, 3]).norm() / v[:, 3].norm())

    fine_burden, fine_preserve = fit()
    coarse_burden, coarse_preserve = fit(rtol=1e-3)
    split_burden, split_preserve = fit(rtol=1e-3, preserve_rtol=1e-9)
    assert fine_burden > 1e3 * split_burden and fine_preserve < 1e-9
    assert coarse_preserve > 1e-3  # dropped with the erasure's tolerance
    assert split_preserve < 1e-9 and split_burden == pytest.approx(coarse_burden, rel=0.5)


@pytest.mark.parametrize("overflow", [False, True])
def test_columns_repeated_exactly_are_solved_once_with_the_same_update_and_residuals(overflow):
    """Every template of a concept type starts with the same tokens, so its keep columns repeat once
    per concept. Merged into one column scaled by √k, they give the same update, the same
    residuals and the same unaligned energy, exact or past an overflow, weighted or not, and UCE's
    too; an equal ``x`` with another target, or in another group, stays its own column."""
    from erasepro_ops.solve import MergedColumns

    g = torch.Generator().manual_seed(23)
    inn, out = 64, 24
    w = torch.randn(out, inn, generator=g, dtype=torch.float64) / inn**0.5
    base = torch.randn(inn, 30 if overflow else 12, generator=g, dtype=torch.float64)
    picks = torch.tensor([0, 0, 1, 0, 2, 2, 3, 4, 5, 4, 6, 7, 7, 8, 9, 10, 11, 11] + ([] if not overflow else list(range(12, 30))))
    x = base[:, picks]
    v = w @ x + 0.3 * torch.randn(out, 12 if not overflow else 30, generator=g, dtype=torch.float64)[:, picks]
    groups = torch.where(picks < 4, 0, torch.where((picks >= 8) & (picks < 12), 3, 1))
    v[:, 9] += 1.0  # column 9 repeats column 7's x with another target: both stay
    groups[12] = 0  # column 12 is column 11's x in another group: both stay
    k = torch.randn(inn, 40, generator=g, dtype=torch.float64)
    report = int((groups != 3).sum()) if not overflow else None
    order = torch.argsort(groups, stable=True)
    x, v, groups = x[:, order], v[:, order], groups[order]
    merged = MergedColumns.of(x, v, groups, report)
    assert merged.x.shape[1] == x.shape[1] - 4  # columns 1 and 3 (column 0's), 5 (4's) and 17 (16's)
    assert merged.groups.tolist() == sorted(merged.groups.tolist())
    assert merged.report_columns == (None if report is None else int((merged.groups != 3).sum()))
    kw = dict(budget=20, unbudgeted=(3,)) if overflow else {}
    for preserve in (None, k):
        one = ConstraintSystem.build(x, groups, preserve=preserve, alpha=5.0, report_columns=report, **kw)
        once = ConstraintSystem.build(merged.x, merged.groups, preserve=preserve, alpha=5.0,
                                      report_columns=merged.report_columns, **kw)
        assert (one.damped_from is not None) == overflow == (once.damped_from is not None)
        a, b = one.solve(w, v), once.solve(w, merged.target)
        assert rel(b.update.dense(), a.update.dense()) <= 1e-9
        assert b.residual == pytest.approx(a.residual, rel=1e-9, abs=1e-12)
        assert b.residual_sq == pytest.approx(a.residual_sq, rel=1e-9, abs=1e-12)
        assert once.unaligned_energy == pytest.approx(one.unaligned_energy, rel=1e-9, abs=1e-12)
    uce, uce_once = UCESystem.build(x, k).solve(w, v), UCESystem.build(merged.x, k).solve(w, merged.target)
    assert rel(uce_once.update.dense(), uce.update.dense()) <= 1e-9
    assert uce_once.residual == pytest.approx(uce.residual, rel=1e-9)


def test_a_system_built_on_x_it_may_use_up_fits_the_same_residuals():
    """``keep_x=False`` (the chain's shallow sites): the system solves ``C^{-1/2} X`` into the
    caller's own ``X`` and keeps no ``X``; given ``R = V − W_o X`` it gives the update a kept ``X``
    gives, bit for bit, and asks for residuals instead of a weight."""
    from erasepro_ops.linalg import PreserveWeighting
    from erasepro_ops.solve import MergedColumns

    w, x, v, k = (t.double() for t in sd_like_problem(96, 32, 40, seed=29, m=150))
    op = PreserveWeighting.build(k, 1.0, 30.0).to(dtype=torch.float32)  # as the cache stores it
    groups = torch.tensor([0] * 8 + [2] * 32)
    merged = MergedColumns.of(x, v, groups)
    kept = ConstraintSystem.build(merged.x, merged.groups, preserve=op).solve(w.float(), merged.target)
    r = merged.residual(w.float())
    own = merged.x.clone()
    system = ConstraintSystem.build(own, merged.groups, preserve=op, keep_x=False)
    assert system.x is None and not torch.equal(own, merged.x)  # used up: it holds X̃ now
    assert torch.equal(own, op.left(merged.x))
    used = system.fit(r)
    assert torch.equal(used.update.dense(), kept.update.dense()) and used.residual == kept.residual
    assert kept.residual <= 1e-10
    with pytest.raises(ValueError, match="keep_x=False"):
        system.solve(w, merged.target)
