"""The solve's figures (:class:`~erasepro_ops.summary.Summary`) and the warnings that go with them."""

from __future__ import annotations

import dataclasses

import torch

from .alignment import PART_NAMES, ROLE_PRIORITY
from .metrics import deep_burden, drift_terms, ratio, residual_against_gap, worst_drift
from .request import Request
from .summary import SiteFigure, Summary


def short_name(key: str, pooled_site: str | None = None) -> str:
    """A compact site label for charts: ``clip_l.3.fc2``, ``t5xxl.0.wo``, ``qwen3_4b.0.down``,
    ``in.4.1.k``, ``mid.1.v``, ``txt_in``, ``cap_embedder``, ``pooled``."""
    if key == pooled_site:
        return "pooled"
    if ".mlp.down_proj" in key:
        enc, rest = key.split(".", 1)
        return f"{enc}.{rest.split('.layers.')[1].split('.')[0]}.down"
    if key == "diffusion_model.cap_embedder.1.weight":
        return "cap_embedder"
    if ".mlp.fc2" in key:
        enc, rest = key.split(".", 1)
        return f"{enc}.{rest.split('.layers.')[1].split('.')[0]}.fc2"
    if ".DenseReluDense.wo" in key:
        enc, rest = key.split(".", 1)
        return f"{enc}.{rest.split('.block.')[1].split('.')[0]}.wo"
    parts = key.replace("diffusion_model.", "").split(".")
    if not any(p.isdigit() for p in parts):
        return ".".join(parts[:-1])
    head = {"input_blocks": "in", "middle_block": "mid", "output_blocks": "out"}.get(parts[0], parts[0])
    nums = [p for p in parts[1:] if p.isdigit()]
    return f"{head}.{'.'.join(nums)}.{parts[-2][-1]}"


def exact_parts(groups: torch.Tensor, exact_groups, empty_only: bool = False) -> tuple[list[str], list[str]]:
    """The names of the constrained parts (prefixes, concept tokens, …) the deep sites fitted
    exactly and those they fitted by least squares, in budget order. ``empty_only``: the only
    preserve prompt is the empty one, and its parts are named so."""
    names = dict(PART_NAMES)
    if empty_only:
        names[ROLE_PRIORITY["preserve"]], names[ROLE_PRIORITY["preserve_pad"]] = "empty prompt", "empty-prompt padding"
    present = sorted(set(groups.tolist()))
    exact = set(present if exact_groups is None else exact_groups)
    return [names[g] for g in present if g in exact], [names[g] for g in present if g not in exact]


def _drifts(kv_results, kv_weights, preserve_features, empty_features):
    """The kept prompts' drift through the edit, ``(preserve, empty prompt)``, None where not kept.
    ``kv_weights`` is read once, one weight at a time."""
    if preserve_features is None and empty_features is None:
        return None, None
    preserve_terms, empty_terms = [], []
    for r, w in zip(kv_results, kv_weights):  # one dense ΔW at a time: SDXL has 140 sites
        dense = r.solution.update.dense()
        if preserve_features is not None:  # through the edited text encoder too (S > 0)
            preserve_terms.append(drift_terms(w, dense, *preserve_features))
        if empty_features is not None:
            empty_terms.append(drift_terms(w, dense, *empty_features))
    drift = ratio(preserve_terms) if preserve_features is not None else None
    empty_drift = worst_drift(empty_terms, *empty_features) if empty_features is not None else None
    return drift, empty_drift


def _pooled_residual(deep_results, pooled_site: str | None, pooled_gap) -> float | None:
    r = next((r for r in deep_results if r.name == pooled_site), None)
    if r is None or pooled_gap is None:
        return None if r is None else r.solution.residual
    weight, gap = pooled_gap
    return residual_against_gap([r.solution.residual_sq], [weight], gap)


def summarise(request: Request, family: str, pooled_site: str | None, columns, shallow_results, deep_results,
              deep_weights, *, gap, rank_budget: int, templates: int, seconds: float, preserve_features,
              empty_features=None, warnings=(), pooled_gap=None, refitted: bool = False) -> Summary:
    """The figures the node reports. ``gap`` is the unedited model's ``Y − X_0`` on the erasure's
    columns; ``preserve_features`` ``(K, K')``, the preserve prompts through the original and the
    edited text encoder, or None; ``empty_features`` the same for the empty prompt when it is kept;
    ``pooled_gap`` ``(W, G)``: the pooled site's weight columns and the unedited pooled gap, so its
    residual too is against the original gap (the shallow stage may have closed most of it);
    ``warnings`` come before the ones found here."""
    kv_results = [r for r in deep_results if r.name != pooled_site]
    train = residual_against_gap([r.solution.residual_sq for r in kv_results],
                                 (deep_weights[r.name] for r in kv_results), gap)
    burden = deep_burden([r.weight_norm for r in kv_results], [r.update_norm for r in kv_results])
    drift, empty_drift = _drifts(kv_results, (deep_weights[r.name] for r in kv_results), preserve_features,
                                 empty_features)
    summary = Summary(
        method=request.method, progressive_layers=request.progressive_layers, rule=request.rule, family=family,
        concepts=tuple(f"{p.target} → {p.anchor or '(nothing)'}" for p in request.concepts),
        sites=tuple(SiteFigure(short_name(r.name, pooled_site), r.name, r.stage, r.relative_change,
                               r.solution.residual) for r in shallow_results + deep_results),
        train_residual=train,
        pooled_residual=_pooled_residual(deep_results, pooled_site, pooled_gap),
        deep_burden=burden, preservation_drift=drift, empty_prompt_drift=empty_drift, solve_seconds=seconds,
        constraints=columns.n_erasure, preserve_constraints=columns.n_preserve, templates=templates,
        rank_budget=rank_budget, deep_rank=max((r.rank for r in kv_results), default=0), warnings=tuple(warnings))
    if request.method != "erasepro":
        return summary
    exact, rest = exact_parts(columns.groups, kv_results[0].exact_groups if kv_results else None,
                              empty_only=empty_features is not None and preserve_features is None)
    summary = dataclasses.replace(summary, unaligned_energy=max((r.unaligned_energy for r in kv_results), default=0.0),
                                  overflow_damped=any(r.damped for r in kv_results),
                                  exact_parts=tuple(exact), least_squares_parts=tuple(rest))
    return dataclasses.replace(summary, warnings=summary.warnings + tuple(_residual_warnings(summary, len(columns),
                                                                                            refitted)))


def _residual_warnings(s: Summary, n_columns: int, refitted: bool = False) -> list[str]:
    """ErasePro's warnings about a residual left: the rank budget overflowed, or the constraints
    contradict each other (not said when the deep sites were ``refitted`` with a coarser tolerance,
    whose own note explains the residual)."""
    budget_full = s.overflow_damped or s.deep_rank >= s.rank_budget - 1
    train = s.train_residual
    if budget_full and train > 1e-5:
        return [f"least-squares residual {train:.2e}: the {n_columns} constraints"
                f"{' (kept prompts included)' if s.preserve_constraints else ''} exceed the deep sites' "
                f"rank budget ({s.rank_budget}); exact: {', '.join(s.exact_parts) or 'nothing'}; "
                f"{'damped ' if s.overflow_damped else ''}least squares: {', '.join(s.least_squares_parts)} "
                f"({s.unaligned_energy:.1%} of the target features' energy outside the exact span). "
                "Erase fewer concepts per solve for exact alignment everywhere"]
    if train > 1e-3 and not refitted:
        return [f"least-squares residual {train:.2e}: some constraints contradict each other (the same "
                "features are asked for different outputs); check the anchors and custom prompts"]
    return []
