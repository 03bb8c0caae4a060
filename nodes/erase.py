"""The whole solve on ComfyUI objects: tokenise, align, shallow chain, deep sites, report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import comfy.model_management

from erasepro_ops import __version__
from erasepro_ops.chain import Columns, SolverSettings, inputs_with_partners, progressive_shallow, solve_deep
from erasepro_ops.alignment import PART_NAMES, ROLE_PRIORITY, align_chunks, preserve_alignment
from erasepro_ops.templates import ConceptPair, expand
from erasepro_ops.tokens import token_chunks
from erasepro_ops.contexts import (DEFAULT_CONTEXT_PADDING, DEFAULT_CONTEXT_SUFFIX, DEFAULT_CONTEXT_TEMPLATES,
                                   DEFAULT_TEMPLATE_PADDING, MAX_CONTEXT_TEMPLATES, context_pairs)
from erasepro_ops.edit import ErasureEdit, SiteEdit
from erasepro_ops.linalg import (DEFAULT_GAP_FLOOR, DEFAULT_OVERFLOW_DAMPING, DEFAULT_OVERFLOW_PRESERVE_WEIGHT,
                                 DEFAULT_RTOL)
from erasepro_ops.metrics import deep_burden, drift_terms, ratio, residual_against_gap, worst_drift
from erasepro_ops.retain import DEFAULT_RETAIN_PADDING, DEFAULT_RETAIN_STRENGTH, retain_prompts
from erasepro_ops.text import quote

from .host import (
    POOLED_SITE,
    ClipLayerBlock,
    EraseProError,
    detect,
    effective_weights,
    encode_batch,
    fingerprint,
    first_layer_inputs,
    log,
    solve_device,
)

CONTEXT = 77
EMPTY_PROMPT = ""


@dataclass(frozen=True)
class Request:
    concepts: tuple[ConceptPair, ...]
    progressive_layers: int = 3
    method: str = "erasepro"
    rule: str = "residual_schedule"
    preserve: tuple[str, ...] = ()
    preserve_strength: float = 0.0  # soft C weighting on top of the exact preserve constraints
    rtol: float = DEFAULT_RTOL
    overflow_damping: float = DEFAULT_OVERFLOW_DAMPING  # ρ: ridge on constraints beyond the rank budget
    overflow_preserve_weight: float = DEFAULT_OVERFLOW_PRESERVE_WEIGHT  # w: preserve columns in that fit
    features: str = "all"  # "all" (DESIGN §3) or "last_token" (official UCE: the last concept token only)
    keep_empty_prompt: bool = True  # erasepro: the empty prompt (CFG's unconditional branch) is kept exactly
    retain_strength: float = DEFAULT_RETAIN_STRENGTH  # erasepro, S > 0: weight the shallow edits away from the retain bank
    gap_floor: float = DEFAULT_GAP_FLOOR  # erasepro: deep columns closer than this to the anchor count as met
    retain_padding: int = DEFAULT_RETAIN_PADDING  # retain bank: padding positions after each end token weighted too
    context_templates: int = DEFAULT_CONTEXT_TEMPLATES  # erasepro: context sentences added per concept
    context_padding: int = DEFAULT_CONTEXT_PADDING  # their padding positions constrained after the end token
    context_suffix: bool = DEFAULT_CONTEXT_SUFFIX  # their words after the concept constrained too
    template_padding: int = DEFAULT_TEMPLATE_PADDING  # erasepro: padding positions constrained per template

    def preserve_prompts(self) -> tuple[str, ...]:
        """The user's preserve prompts, then the empty prompt when it is kept (erasepro only)."""
        keep_empty = self.keep_empty_prompt and self.method == "erasepro"
        return self.preserve + ((EMPTY_PROMPT,) if keep_empty else ())


def _chunks(clip, text: str, token_key: str) -> list[list[int]]:
    return token_chunks(clip.tokenize(text), token_key)


def prompt_pairs(concepts) -> list[tuple[str, str, ConceptPair]]:
    """Every concept's templates as ``(target prompt, anchor prompt, pair)``."""
    return [(t, a, pair) for pair in concepts for t, a in expand(pair)]


def context_prompt_pairs(concepts, n: int) -> list[tuple[str, str, ConceptPair]]:
    """Every concept's first ``n`` context sentences (``erasepro_ops.contexts``) not among its templates."""
    return [(t, a, pair) for pair in concepts for t, a in context_pairs(pair, n, set(expand(pair)))]


def align_prompts(clip, arch, pairs):
    """Per prompt pair: the alignment (shared by all encoders) and each encoder's chunk ids."""
    alignments, target_ids, anchor_ids = [], [[] for _ in arch.encoders], [[] for _ in arch.encoders]
    for t_prompt, a_prompt, pair in pairs:
        found = None
        for i, enc in enumerate(arch.encoders):
            t_chunks = _chunks(clip, t_prompt, enc.token_key)
            a_chunks = _chunks(clip, a_prompt, enc.token_key)
            try:
                al = align_chunks(t_chunks, a_chunks, enc.special, anchor_empty=not pair.anchor,
                                  target_prompt=t_prompt, anchor_prompt=a_prompt)
            except ValueError as e:
                raise EraseProError(f"concept {quote(pair.target)} → {quote(pair.anchor)}: {e}") from e
            if found is None:
                found = al
            elif (al.keep, al.move, al.partner) != (found.keep, found.move, found.partner):
                raise EraseProError(f"the text encoders tokenise {quote(t_prompt)} differently; cannot align it")
            target_ids[i].append(t_chunks[al.target_chunk])
            anchor_ids[i].append(a_chunks[al.anchor_chunk])
        alignments.append(found)
    return alignments, target_ids, anchor_ids


def preserve_ids(clip, arch, prompts):
    """Each encoder's first-chunk token ids for whole prompts (preserve or unrelated)."""
    ids = [[] for _ in arch.encoders]
    for text in prompts:
        for i, enc in enumerate(arch.encoders):
            ids[i].append(_chunks(clip, text, enc.token_key)[0])
    return ids


def preserve_alignments(arch, prompts, ids):
    """The preserve prompts as self-paired constraints (the same positions for every encoder)."""
    alignments = []
    for j, text in enumerate(prompts):
        per_encoder = [preserve_alignment(text, ids[i][j], enc.special) for i, enc in enumerate(arch.encoders)]
        if any(al.role != per_encoder[0].role for al in per_encoder):
            raise EraseProError(f"the text encoders tokenise the preserve prompt {quote(text)} differently")
        alignments.append(per_encoder[0])
    return alignments


def preserve_conflicts(pairs, alignments, target_ids, preserve_prompts, preserve_tokens) -> list[str]:
    """Warnings for preserve prompts that contain an erased concept's tokens: they cannot be both
    erased and kept; the concept's own columns come first, the preserve prompt's are fitted after."""
    warnings, seen = [], set()
    for (_, _, pair), al, ids in zip(pairs, alignments, target_ids[0]):
        concept = [ids[p] for p in al.positions("concept")]
        for text, chunk in zip(preserve_prompts, preserve_tokens[0]):
            if (pair.target, text) in seen or not concept:
                continue
            if any(list(chunk[i:i + len(concept)]) == concept for i in range(len(chunk) - len(concept) + 1)):
                seen.add((pair.target, text))
                warnings.append(f"preserve prompt {quote(text)} contains the erased concept {quote(pair.target)}: it cannot be "
                                "both erased and kept; the erasure wins. Remove it from the preserve prompts")
    return warnings


def _cat_inputs(a, b):
    """Join two captured first-layer inputs ``(hidden, mask, attention)`` along the batch."""
    (h_a, mask, attention), (h_b, mask_b, _) = a, b
    if mask is not None and mask.dim() > 2 and mask.shape[0] > 1:
        mask = torch.cat([mask, mask_b])
    return torch.cat([h_a, h_b]), mask, attention


def _site_edits(results, part: str, stage: str) -> list[SiteEdit]:
    """The results as float32 CPU edits; sites sharing one ``down`` (every deep site) share its copy."""
    downs, edits = {}, []
    for r in results:
        update = r.solution.update
        if id(update.down) not in downs:
            downs[id(update.down)] = update.down.to("cpu", torch.float32)
        edits.append(SiteEdit(r.name, part, stage, update.up.to("cpu", torch.float32), downs[id(update.down)],
                              r.relative_change, r.solution.residual))
    return edits


def _short_name(key: str) -> str:
    """A compact site label for charts: ``clip_l.3.fc2``, ``in.4.1.k``, ``mid.1.v``, ``pooled``."""
    if key == POOLED_SITE:
        return "pooled"
    if ".mlp.fc2" in key:
        enc, rest = key.split(".", 1)
        return f"{enc}.{rest.split('.layers.')[1].split('.')[0]}.fc2"
    parts = key.replace("diffusion_model.", "").split(".")
    head = {"input_blocks": "in", "middle_block": "mid", "output_blocks": "out"}.get(parts[0], parts[0])
    nums = [p for p in parts[1:] if p.isdigit()]
    return f"{head}.{'.'.join(nums)}.{parts[-2][-1]}"


def run_erasure(model, clip, request: Request, on_site: Callable[[str], None] | None = None) -> ErasureEdit:
    """Solve the edit for ``request`` on the effective weights of ``model`` and ``clip``."""
    if not request.concepts:
        raise EraseProError("no concepts: connect an ErasePro Concept Pair")
    if request.progressive_layers < 0:
        raise EraseProError("progressive_layers must be 0 or more")
    if not request.overflow_preserve_weight > 0:
        raise EraseProError("overflow_preserve_weight must be positive (default "
                            f"{DEFAULT_OVERFLOW_PRESERVE_WEIGHT:g})")
    if not 0 <= request.context_templates <= MAX_CONTEXT_TEMPLATES:
        raise EraseProError(f"context_templates must be between 0 and {MAX_CONTEXT_TEMPLATES}")
    if min(request.context_padding, request.retain_padding, request.template_padding) < 0:
        raise EraseProError("template_padding, context_padding and retain_padding must be 0 or more")
    arch = detect(model, clip)
    start = time.perf_counter()
    device = solve_device()
    settings = SolverSettings(method=request.method, device=str(device), rtol=request.rtol,
                              overflow_damping=request.overflow_damping, preserve_strength=request.preserve_strength,
                              overflow_preserve_weight=request.overflow_preserve_weight, gap_floor=request.gap_floor)

    pairs = prompt_pairs(request.concepts)
    every_position = request.method == "erasepro" and request.features == "all"  # not UCE's own rule
    padding, suffix = [request.template_padding if every_position else None] * len(pairs), [True] * len(pairs)
    if every_position and request.context_templates:
        contexts = context_prompt_pairs(request.concepts, request.context_templates)
        pairs, padding = pairs + contexts, padding + [request.context_padding] * len(contexts)
        suffix += [request.context_suffix] * len(contexts)
    alignments, target_ids, anchor_ids = align_prompts(clip, arch, pairs)
    kept_prompts = request.preserve_prompts()
    preserve_tokens = preserve_ids(clip, arch, kept_prompts) if kept_prompts else None
    # ErasePro constrains the preserve prompts exactly (V* = W_o K, ranked after the concept and end
    # tokens); UCE keeps its own soft preserve term.
    exact_preserve = request.method == "erasepro" and preserve_tokens is not None
    columns = Columns.from_alignments(
        alignments, CONTEXT, last_token_only=request.features == "last_token", padding=padding,
        suffix=suffix,
        preserve=preserve_alignments(arch, kept_prompts, preserve_tokens) if exact_preserve else ())
    soft_preserve = preserve_tokens is not None and (request.method == "uce" or request.preserve_strength > 0)
    n_target = len(alignments)

    # Original model: anchor and target features, first-layer inputs for the cached chain.
    y_cond, y_pooled, anchor_in = encode_batch(clip, arch.encoders, anchor_ids, capture=True)
    x0_cond, x0_pooled, target_in = encode_batch(clip, arch.encoders, target_ids, capture=True)
    x0_target = x0_cond
    k_cond = k_pooled = preserve_in = None
    if preserve_tokens is not None:
        k_cond, k_pooled, preserve_in = encode_batch(clip, arch.encoders, preserve_tokens, capture=True)
    if exact_preserve:  # preserve prompts join both batches, each paired with itself
        y_cond, x0_cond = torch.cat([y_cond, k_cond]), torch.cat([x0_cond, k_cond])
        anchor_in = [_cat_inputs(a, p) for a, p in zip(anchor_in, preserve_in)]
        target_in = [_cat_inputs(t, p) for t, p in zip(target_in, preserve_in)]

    soft = _soft_weighting(clip, arch, request, preserve_in if soft_preserve else None)
    shallow_results, clip_edits, clip_weights, edited_layers = _solve_shallow(
        clip, arch, request, settings, columns, anchor_in, target_in, soft, on_site)

    # Deep sites read the encoder output for the targets (and preserve prompts) with the shallow
    # edits applied, in float32 whatever dtype the text encoder is loaded in.
    if clip_edits:
        batch = target_ids if preserve_tokens is None else [t + p for t, p in zip(target_ids, preserve_tokens)]
        x_all, pooled_all, _ = encode_batch(clip, arch.encoders, batch, overrides=edited_layers)
    else:  # the text encoder is unchanged: its original outputs are the deep sites' inputs
        x_all = x0_target if k_cond is None else torch.cat([x0_target, k_cond])
        pooled_all = x0_pooled if k_pooled is None or x0_pooled is None else torch.cat([x0_pooled, k_pooled])
    x_cond = x_all if exact_preserve else x_all[:n_target]
    k_edited = x_all[n_target:] if preserve_tokens is not None else None

    deep_weights = effective_weights(model, arch.deep_keys)
    x, y = inputs_with_partners(x_cond, y_cond, columns)
    preserve = _flat(k_cond).T if soft_preserve else None
    deep_results = _solve_with_fallback(deep_weights, x, y, columns.groups, settings, preserve, on_site,
                                        columns.n_erasure)
    model_edits = _site_edits(deep_results, "model", "deep")
    model_weights = dict(deep_weights)

    if arch.pooled_width:
        px, py = pooled_all[:n_target], y_pooled
        if exact_preserve:  # the preserve prompts' pooled embeddings stay too, after the targets'
            px, py = torch.cat([px, pooled_all[n_target:]]), torch.cat([py, k_pooled])
        pooled_result, pooled_edit, model_weights[POOLED_SITE] = _solve_pooled(model, arch, px, py, n_target,
                                                                               settings, on_site)
        deep_results = deep_results + [pooled_result]
        model_edits.append(pooled_edit)

    seconds = time.perf_counter() - start
    # Relative to the unedited model's gap (‖W_o X_0 − V*‖, X_0 without shallow edits), so 1 means
    # "as far from the anchor as the original model" whatever S is.
    x0, _ = inputs_with_partners(x0_cond, y_cond, columns)
    summary = _summarise(request, arch, columns, shallow_results, deep_results, deep_weights,
                         gap=(y - x0)[:, : columns.n_erasure], rank_budget=int(x.shape[0]), templates=n_target,
                         seconds=seconds,
                         preserve_features=_kept_features(k_cond, k_edited, len(request.preserve)),
                         empty_features=_kept_features(k_cond, k_edited, len(request.preserve), empty=True)
                         if len(kept_prompts) > len(request.preserve) else None)
    if preserve_tokens is not None:
        summary["warnings"] = preserve_conflicts(pairs, alignments, target_ids, kept_prompts,
                                                 preserve_tokens) + summary["warnings"]
    settings_record = {
        "concepts": [{"target": p.target, "anchor": p.anchor, "concept_type": p.concept_type, "prompts": list(p.prompts)}
                     for p in request.concepts],
        "method": request.method, "progressive_layers": request.progressive_layers, "rule": request.rule,
        "preserve": list(request.preserve), "preserve_strength": request.preserve_strength,
        "overflow_damping": request.overflow_damping, "overflow_preserve_weight": request.overflow_preserve_weight,
        "features": request.features, "rtol": request.rtol, "keep_empty_prompt": request.keep_empty_prompt,
        "retain_strength": request.retain_strength, "retain_padding": request.retain_padding,
        "context_templates": request.context_templates, "context_padding": request.context_padding,
        "context_suffix": request.context_suffix, "template_padding": request.template_padding,
        "gap_floor": request.gap_floor, "family": arch.family, "version": __version__,
    }
    return ErasureEdit(tuple(clip_edits + model_edits), settings_record, summary,
                       fingerprint({**clip_weights, **model_weights}))


@dataclass(frozen=True)
class SoftWeighting:
    """What the shallow sites' weighting ``C`` keeps still: per encoder, the first-layer inputs of
    the preserve prompts (when weighted) and the retain bank, the flat positions used, the strength."""

    hidden: list[torch.Tensor]
    index: torch.Tensor
    strength: float


def _soft_weighting(clip, arch, request: Request, preserve_in) -> SoftWeighting | None:
    """The user's preserve prompts (UCE, or ``preserve_strength`` > 0) at every position, then the
    retain bank (ErasePro with ``retain_strength`` > 0 and S > 0) up to each prompt's end token."""
    parts, index, rows = [], [], 0
    if preserve_in is not None:
        parts.append([p[0] for p in preserve_in])
        rows = preserve_in[0][0].shape[0]
        index.append(torch.arange(rows * CONTEXT))
    retain = request.method == "erasepro" and request.retain_strength > 0 and request.progressive_layers > 0
    if retain:
        prompts = retain_prompts()
        ids = preserve_ids(clip, arch, prompts)
        parts.append([h for h, _, _ in first_layer_inputs(clip, arch.encoders, ids)])
        spans = preserve_alignments(arch, prompts, ids)
        index.append(torch.tensor([(rows + j) * CONTEXT + pos for j, al in enumerate(spans)
                                   for pos in al.positions("preserve") + al.positions("preserve_pad")[:request.retain_padding]]))
    if not parts:
        return None
    hidden = [torch.cat([part[i] for part in parts]) for i in range(len(arch.encoders))]
    strength = request.preserve_strength if preserve_in is not None else request.retain_strength
    return SoftWeighting(hidden, torch.cat(index), strength)


def _kept_features(k: torch.Tensor | None, k_edited: torch.Tensor | None, n_user: int, empty: bool = False):
    """``(K, K')`` as in × columns for the user's preserve prompts (the first ``n_user`` rows), or
    with ``empty`` for the empty prompt after them; None when there are none."""
    if k is None:
        return None
    rows = slice(n_user, n_user + 1) if empty else slice(0, n_user)
    if rows.stop - rows.start <= 0 or k.shape[0] < rows.stop:
        return None
    return _flat(k[rows]).T, _flat(k_edited[rows]).T


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens, width)`` → ``(batch·tokens, width)``."""
    return t.reshape(-1, t.shape[-1])


def _solve_shallow(clip, arch, request: Request, settings: SolverSettings, columns, anchor_in, target_in,
                   soft: SoftWeighting | None, on_site):
    """The shallow sites (``fc2`` of the first S blocks), per text encoder, shallow to deep.

    Returns the site results, their edits, the original weights they were solved on and the
    edited layers as ``{key: (W_o + ΔW, bias)}`` in float32."""
    clip_edits: list[SiteEdit] = []
    clip_weights: dict[str, torch.Tensor] = {}
    edited_layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shallow_results = []
    for i, enc in enumerate(arch.encoders):
        depth = enc.shallow_depth(request.progressive_layers)
        if depth == 0:
            continue
        keys = [enc.fc2_key(l) for l in range(depth)]
        weights = effective_weights(clip.patcher, keys)
        clip_weights.update(weights)
        bias = effective_weights(clip.patcher, [k.replace(".weight", ".bias") for k in keys])
        h_t, mask, attention = target_in[i]
        blocks = [ClipLayerBlock(keys[l], enc.layers[l], weights[keys[l]].to(h_t.device),
                                 bias[keys[l].replace(".weight", ".bias")].to(h_t.device), mask, attention)
                  for l in range(depth)]
        clip.load_model()
        # The erasure's rank budget is the deep sites' width: when the constraints overflow it, the
        # wider shallow sites damp the same overflow instead of fitting it exactly (solve.py). The
        # preserve columns are outside that budget: a 3072-wide fc2 keeps them exact.
        shallow_settings = dataclasses.replace(settings, budget=arch.context_width)
        if soft is not None:
            shallow_settings = dataclasses.replace(shallow_settings, preserve_strength=soft.strength)
        results = progressive_shallow(blocks, h_t, anchor_in[i][0], columns, shallow_settings, rule=request.rule,
                                      h_preserve=None if soft is None else soft.hidden[i],
                                      preserve_index=None if soft is None else soft.index,
                                      on_site=on_site)
        shallow_results += results
        clip_edits += _site_edits(results, "clip", "shallow")
        for key, r in zip(keys, results):
            edited = weights[key].to(torch.float64) + r.solution.update.dense().to(weights[key].device)
            edited_layers[key] = (edited.to(torch.float32), bias[key.replace(".weight", ".bias")])
    return shallow_results, clip_edits, clip_weights, edited_layers


def _solve_pooled(model, arch, px, py, n_target: int, settings: SolverSettings, on_site):
    """SDXL's pooled-embedding input (the ``label_emb`` columns that read it): targets first, then
    the preserve prompts'. Returns the site result, its edit (zero on the size/crop columns) and
    the whole original weight."""
    full = effective_weights(model, [POOLED_SITE])[POOLED_SITE]
    groups = (torch.arange(px.shape[0]) >= n_target).long()
    (r,) = _solve_with_fallback({POOLED_SITE: full[:, : arch.pooled_width]}, px.T, py.T, groups,
                                settings, None, on_site, n_target)
    up, down = r.solution.update.up, r.solution.update.down
    padded = torch.zeros(down.shape[0], full.shape[1], dtype=down.dtype, device=down.device)
    padded[:, : arch.pooled_width] = down
    edit = SiteEdit(POOLED_SITE, "model", "deep", up.float().cpu(), padded.float().cpu(),
                    r.relative_change, r.solution.residual)
    return r, edit, full


def _summarise(request: Request, arch, columns, shallow_results, deep_results, deep_weights, *, gap,
               rank_budget: int, templates: int, seconds: float, preserve_features, empty_features=None) -> dict:
    """The figures of DESIGN §7 the node reports, and the warnings that go with them.

    ``gap`` is the unedited model's ``Y − X_0`` on the erasure's columns; ``preserve_features``
    ``(K, K')``, the preserve prompts through the original and the edited text encoder, or None;
    ``empty_features`` the same for the empty prompt when it is kept."""
    kv_results = [r for r in deep_results if r.name != POOLED_SITE]
    kv_weights = [deep_weights[r.name] for r in kv_results]
    train = residual_against_gap([r.solution.residual_sq for r in kv_results], kv_weights, gap)
    burden = deep_burden([r.weight_norm for r in kv_results], [r.update_norm for r in kv_results])
    preserve_terms, empty_terms = [], []
    for r, w in zip(kv_results, kv_weights):  # one dense ΔW at a time: SDXL has 140 sites
        if preserve_features is None and empty_features is None:
            break
        dense = r.solution.update.dense()
        if preserve_features is not None:  # through the edited text encoder too (S > 0)
            preserve_terms.append(drift_terms(w, dense, *preserve_features))
        if empty_features is not None:
            empty_terms.append(drift_terms(w, dense, *empty_features))
    drift = ratio(preserve_terms) if preserve_features is not None else None
    empty_drift = worst_drift(empty_terms, *empty_features) if empty_features is not None else None
    summary = {
        "method": request.method,
        "progressive_layers": request.progressive_layers,
        "rule": request.rule,
        "family": arch.family,
        "concepts": [f"{p.target} → {p.anchor or '(nothing)'}" for p in request.concepts],
        "sites": [{"name": _short_name(r.name), "key": r.name, "stage": r.stage,
                   "relative_change": r.relative_change, "residual": r.solution.residual}
                  for r in shallow_results + deep_results],
        "train_residual": train,
        "pooled_residual": next((r.solution.residual for r in deep_results if r.name == POOLED_SITE), None),
        "deep_burden": burden,
        "preservation_drift": drift,
        "empty_prompt_drift": empty_drift,
        "solve_seconds": seconds,
        "constraints": columns.n_erasure,
        "preserve_constraints": columns.n_preserve,
        "templates": templates,
        "rank_budget": rank_budget,
        "deep_rank": max((r.rank for r in kv_results), default=0),
        "warnings": [],
    }
    if request.method == "erasepro":
        summary["unaligned_energy"] = max((r.unaligned_energy for r in kv_results), default=0.0)
        summary["overflow_damped"] = any(r.damped for r in kv_results)
        budget_full = summary["overflow_damped"] or summary["deep_rank"] >= rank_budget - 1
        exact, rest = _exact_parts(columns.groups, kv_results[0].exact_groups if kv_results else None,
                                   empty_only=empty_features is not None and preserve_features is None)
        summary["exact_parts"], summary["least_squares_parts"] = exact, rest
        if budget_full and train > 1e-5:
            summary["warnings"].append(
                f"least-squares residual {train:.2e}: the {len(columns)} constraints"
                f"{' (kept prompts included)' if columns.n_preserve else ''} exceed the deep sites' "
                f"rank budget ({rank_budget}); exact: {', '.join(exact) or 'nothing'}; "
                f"{'damped ' if summary['overflow_damped'] else ''}least squares: {', '.join(rest)} "
                f"({summary['unaligned_energy']:.1%} of the target features' energy outside the exact span). "
                "Erase fewer concepts per solve for exact alignment everywhere")
        elif train > 1e-3:
            summary["warnings"].append(
                f"least-squares residual {train:.2e}: some constraints contradict each other (the same "
                "features are asked for different outputs); check the anchors and custom prompts")
    return summary


def _exact_parts(groups: torch.Tensor, exact_groups, empty_only: bool = False) -> tuple[list[str], list[str]]:
    """The names of the constrained parts (prefixes, concept tokens, …) the deep sites fitted
    exactly and those they fitted by least squares, in budget order. ``empty_only``: the only
    preserve prompt is the empty one, and its parts are named so."""
    names = dict(PART_NAMES)
    if empty_only:
        names[ROLE_PRIORITY["preserve"]], names[ROLE_PRIORITY["preserve_pad"]] = "empty prompt", "empty-prompt padding"
    present = sorted(set(groups.tolist()))
    exact = set(present if exact_groups is None else exact_groups)
    return [names[g] for g in present if g in exact], [names[g] for g in present if g not in exact]


def _solve_with_fallback(weights, x, y, groups, settings: SolverSettings, preserve, on_site, report_columns=None):
    """Solve on the compute device; on GPU out-of-memory, warn and solve on the CPU."""
    try:
        return solve_deep(weights, x, y, groups, settings, preserve=preserve, report_columns=report_columns,
                          on_site=on_site)
    except torch.OutOfMemoryError:
        log.warning("ErasePro: out of GPU memory during the solve; falling back to the CPU")
        comfy.model_management.soft_empty_cache()
        cpu = SolverSettings(**{**settings.__dict__, "device": "cpu"})
        return solve_deep(weights, x, y, groups, cpu, preserve=preserve, report_columns=report_columns,
                          on_site=on_site)


def apply_edit(model, clip, edit: ErasureEdit, strength: float):
    """Clones of ``model`` and ``clip`` with the edit as ``"diff"`` patches scaled by ``strength``."""
    new_model = model.clone()
    new_clip = clip.clone() if clip is not None else None
    if strength == 0:
        return new_model, new_clip
    check_sites(new_model.model_state_dict(), edit.part("model"), "MODEL")
    new_model.add_patches({s.key: (s.delta(),) for s in edit.part("model")}, strength)
    if edit.part("clip"):
        if new_clip is None:
            raise EraseProError("this edit also changes the text encoder (progressive_layers > 0): "
                                "connect the CLIP to Apply Erased UNet and use its CLIP output")
        check_sites(new_clip.patcher.model_state_dict(), edit.part("clip"), "CLIP")
        new_clip.add_patches({s.key: (s.delta(),) for s in edit.part("clip")}, strength)
    return new_model, new_clip


def check_sites(state, sites: Sequence[SiteEdit], what: str):
    """Every site's weight exists in ``state`` (a model state dict) with the edit's shape."""
    for s in sites:
        if s.key not in state:
            raise EraseProError(f"this edit was made for another model: the {what} has no weight {s.key}")
        if tuple(state[s.key].shape) != s.shape:
            raise EraseProError(f"this edit was made for another model: {s.key} is {tuple(state[s.key].shape)} "
                                f"in the {what}, the edit expects {s.shape}")
