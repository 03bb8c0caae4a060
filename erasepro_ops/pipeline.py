"""The whole solve on a host's model: batches, shallow chain, deep sites, pooled site, figures."""

from __future__ import annotations

import dataclasses
import time
from collections import ChainMap
from typing import Callable

import torch

from .batches import Batches, build_batches, cat_inputs, select_inputs
from .chain import SolverSettings, inputs_with_partners
from .deep import solve_pooled, solve_with_fallback
from .edit import ErasureEdit
from .family import Architecture
from .figures import summarise
from .fingerprint import fingerprint
from .host import Encoded, Host
from .request import Request
from .shallow import ShallowResult, site_edits, soft_weighting, solve_shallow

FALLBACK_CHANGE = 3.0
"""A deep update larger than this many times its weight (‖ΔW‖/‖W‖) is solved again with the
family's ``fallback_rtol`` (SD3's gateway: ten concepts at S = 0 gave 10–114×; one concept 0.3–0.4)."""


def _kept_features(b: Batches, k, k_edited, n_user: int, empty: bool = False):
    """``(K, K')`` as in × columns for the user's preserve prompts (the first ``n_user`` rows), or
    with ``empty`` for the empty prompt after them, at the positions the model reads; None when
    there are none."""
    if k is None:
        return None
    rows = slice(n_user, n_user + 1) if empty else slice(0, n_user)
    if rows.stop - rows.start <= 0 or k.shape[0] < rows.stop:
        return None
    return b.kept_positions(k, rows).T, b.kept_positions(k_edited, rows).T


def encode_once(host: Host, chunks, capture: bool = False, resume=None) -> Encoded:
    """``host.encode`` with each prompt that repeats in the batch (every concept of a type has the
    same anchor prompts) encoded once and its features copied to every row that holds it.
    ``resume[i][l]`` (a :class:`~erasepro_ops.rows.RowBatch`): encoder ``i``'s hidden states after
    its read block ``l``, for a batch whose first rows are these prompts (``Host.encode``: its
    blocks are not run again)."""
    rows = list(zip(*[[tuple(c) for c in per_encoder] for per_encoder in chunks]))
    first_of: dict[tuple, int] = {}
    for r, row in enumerate(rows):
        first_of.setdefault(row, r)
    if len(first_of) == len(rows):
        return host.encode(chunks, capture=capture, resume=_resumed(resume, torch.arange(len(rows))))
    unique, firsts = list(first_of), torch.tensor(list(first_of.values()))
    where = {row: i for i, row in enumerate(unique)}
    index = torch.tensor([where[row] for row in rows])
    cond, pooled, captured = host.encode([[list(row[i]) for row in unique] for i in range(len(chunks))],
                                         capture=capture, resume=_resumed(resume, firsts))
    return Encoded(cond[index.to(cond.device)], None if pooled is None else pooled[index.to(pooled.device)],
                   [select_inputs(c, index) for c in captured])


def _resumed(resume, rows: torch.Tensor):
    """``resume``'s hidden states at the batch's rows ``rows``, as ``Host.encode`` takes them (None: none)."""
    if not resume:
        return None
    return {i: {l: h.dense(rows) for l, h in per_block.items()} for i, per_block in resume.items()}


class _Originals:
    """The unedited text encoders' outputs: anchors, targets, kept prompts (with first-block inputs).

    With ``chain`` (a shallow chain will run), only the first-block inputs are taken at first and the
    outputs wait for the chain (:meth:`after_chain`): where it runs the prompts through the blocks the
    model reads, their unedited hidden states there come from the positions the solve uses, so no
    whole encode of them is needed."""

    def __init__(self, host: Host, b: Batches, chain: bool = False):
        self.chain = chain
        self.y = self.y_pooled = self.x0 = self.x0_pooled = self.k = self.k_pooled = self.preserve_in = None
        if chain:
            self.anchor_in = host.first_block_inputs(b.anchor_ids)
            self.target_in = host.first_block_inputs(b.target_ids)
            if b.preserve_tokens is not None:
                self.preserve_in = host.first_block_inputs(b.preserve_tokens)
            return
        self.y, self.y_pooled, self.anchor_in = encode_once(host, b.anchor_ids, capture=True)
        self.x0, self.x0_pooled, self.target_in = encode_once(host, b.target_ids, capture=True)
        if b.preserve_tokens is not None:
            self.k, self.k_pooled, self.preserve_in = host.encode(b.preserve_tokens, capture=True)

    def after_chain(self, host: Host, b: Batches, shallow: ShallowResult) -> None:
        """The outputs that waited for the chain, resumed from its unedited hidden states
        (:attr:`ShallowResult.unedited`, :attr:`ShallowResult.anchors`: the host's final norm and
        pooled projection applied); an encoder the chain did not run is encoded whole."""
        if not self.chain:
            return
        anchors = shallow.anchors or None  # anchor rows, then the kept prompts' (they hold any only when constraints)
        self.y, self.y_pooled, _ = encode_once(host, b.anchor_ids, resume=anchors)
        self.x0, self.x0_pooled, _ = encode_once(host, b.target_ids, resume=shallow.unedited or None)
        if b.preserve_tokens is not None:
            self.k, self.k_pooled, _ = host.encode(b.preserve_tokens, resume=_resumed(
                anchors, torch.arange(len(b.preserve_tokens[0])) + len(b.anchor_ids[0])))

    def constrained(self, b: Batches):
        """``(anchor inputs, target inputs)`` with the kept prompts joining both batches (each
        paired with itself) when they are constraints."""
        if not b.exact_preserve:
            return self.anchor_in, self.target_in
        return ([cat_inputs(a, p) for a, p in zip(self.anchor_in, self.preserve_in)],
                [cat_inputs(t, p) for t, p in zip(self.target_in, self.preserve_in)])

    def features(self, b: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y, X_0)``, the anchors' and the targets' unedited outputs, with the kept prompts' after
        them when they are constraints."""
        if not b.exact_preserve:
            return self.y, self.x0
        return torch.cat([self.y, self.k]), torch.cat([self.x0, self.k])


def _deep_inputs(host: Host, b: Batches, o: _Originals, shallow: ShallowResult):
    """The text features the deep sites read with the shallow edits applied (float32 whatever dtype
    the text encoder is in): ``(targets and kept prompts, their pooled embeddings)``. An encoder
    whose read blocks the chain ran already (``shallow.hidden``) runs none of its blocks again."""
    if shallow.edits:
        batch = b.target_ids if b.preserve_tokens is None else [t + p for t, p in zip(b.target_ids, b.preserve_tokens)]
        x_all, pooled_all, _ = host.encode(batch, overrides=shallow.edited, resume=shallow.hidden or None)
        return x_all, pooled_all
    # the text encoder is unchanged: its original outputs are the deep sites' inputs
    x_all = o.x0 if o.k is None else torch.cat([o.x0, o.k])
    pooled_all = o.x0_pooled if o.k_pooled is None or o.x0_pooled is None else torch.cat([o.x0_pooled, o.k_pooled])
    return x_all, pooled_all


def run_erasure(host: Host, request: Request, on_site: Callable[[str], None] | None = None) -> ErasureEdit:
    """Solve the edit for ``request`` on the effective weights of the host's model."""
    request.check()
    arch: Architecture = host.architecture()
    start = time.perf_counter()
    settings = SolverSettings(method=request.method, device=str(host.solve_device()), rtol=request.rtol,
                              overflow_damping=request.overflow_damping, preserve_strength=request.preserve_strength,
                              overflow_preserve_weight=request.overflow_preserve_weight, gap_floor=request.gap_floor)
    b = build_batches(host, arch, request)
    columns, n_target = b.columns, b.n_target
    o = _Originals(host, b, chain=request.method == "erasepro" and request.progressive_layers > 0)
    anchor_in, target_in = o.constrained(b)

    soft = soft_weighting(host, arch, request, o.preserve_in if b.soft_preserve else None, b.kept_lengths)
    shallow = solve_shallow(host, arch, request, settings, b.columns_of, anchor_in, target_in, soft, on_site,
                            reach=b.chain_reach, unedited_rows=n_target if o.chain else None)
    o.after_chain(host, b, shallow)
    y_cond, x0_cond = o.features(b)

    x_all, pooled_all = _deep_inputs(host, b, o, shallow)
    shallow.drop_encoder_states()
    x_cond = x_all if b.exact_preserve else x_all[:n_target]
    k_edited = x_all[n_target:] if b.preserve_tokens is not None else None
    deep_weights = host.model_weights(arch.deep_keys)
    x, y = inputs_with_partners(x_cond, y_cond, columns)
    preserve = b.kept_positions(o.k, slice(None)).T if b.soft_preserve else None
    deep_results = solve_with_fallback(host, deep_weights, x, y, columns.groups, settings, preserve, on_site,
                                       columns.n_erasure)
    notes = b.warnings() + shallow.notes
    coarse = arch.family.fallback_rtol
    largest = max((r.relative_change for r in deep_results), default=0.0)
    refitted = settings.method == "erasepro" and coarse is not None and largest > FALLBACK_CHANGE and coarse > settings.rtol
    if refitted:
        settings_coarse = dataclasses.replace(settings, rtol=coarse, preserve_rtol=settings.rtol)
        deep_results = solve_with_fallback(host, deep_weights, x, y, columns.groups, settings_coarse, preserve, None,
                                           columns.n_erasure)
        notes.append(f"the {arch.family.label} gateway's exact update came out {largest:.0f}× its weight (near-duplicate "
                     f"columns of many concepts): solved again with singular values below {coarse:g} of the largest "
                     f"dropped; the kept prompts stay exact, the erasure's columns are fitted as far as that allows "
                     f"(their residual is the train residual)")
    model_edits = site_edits(deep_results, "model", "deep")

    pooled_gap = None
    if arch.pooled_width:
        px, py = pooled_all[:n_target], o.y_pooled
        if b.exact_preserve:  # the preserve prompts' pooled embeddings stay too, after the targets'
            px, py = torch.cat([px, pooled_all[n_target:]]), torch.cat([py, o.k_pooled])
        pooled_result, pooled_edit, pooled_weight = solve_pooled(host, arch, px, py, n_target, settings, on_site)
        deep_results = deep_results + [pooled_result]
        model_edits.append(pooled_edit)
        pooled_gap = (pooled_weight[:, : arch.pooled_width], (o.y_pooled - o.x0_pooled).T)

    seconds = time.perf_counter() - start
    n_user = len(request.preserve)
    x0, _ = inputs_with_partners(x0_cond, y_cond, columns)
    # Relative to the unedited model's gap (‖W_o X_0 − V*‖, X_0 without shallow edits), so 1 means
    # "as far from the anchor as the original model" whatever S is.
    summary = summarise(request, arch.name, arch.pooled_site, columns, shallow.results, deep_results, deep_weights,
                        gap=(y - x0)[:, : columns.n_erasure],
                        rank_budget=int(x.shape[0]), templates=n_target, seconds=seconds,
                        preserve_features=_kept_features(b, o.k, k_edited, n_user),
                        empty_features=_kept_features(b, o.k, k_edited, n_user, empty=True)
                        if len(b.kept_prompts) > n_user else None,
                        warnings=notes, pooled_gap=pooled_gap, refitted=refitted)
    edits = tuple(shallow.edits + model_edits)
    return ErasureEdit(edits, request.settings_record(arch.name), summary.to_dict(), _fingerprint(host, edits))


def _fingerprint(host: Host, edits) -> str:
    """:func:`~erasepro_ops.fingerprint.fingerprint` of the edited sites' original weights, read
    one at a time (a text-encoder weight as it is stored: float16 rounds it the same)."""
    text = [e.key for e in edits if e.part == "clip"]
    return fingerprint(ChainMap(host.text_weights(text, as_stored=True),
                                host.model_weights([e.key for e in edits if e.part == "model"])))
