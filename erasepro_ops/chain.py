"""The progressive chain (docs/DESIGN.md, *Progressive chain*): shallow text-encoder sites first,
deep K/V sites last.

Shallow sites are the MLP output projections (``fc2``) of the first ``S`` blocks of a pre-LN
transformer encoder. A block is seen through :class:`MLPBlock`::

    h_mid = h + attn(ln1(h))           x = act(fc1(ln2(h_mid)))       out = h_mid + W x + b

Sites are solved in order on features captured with every earlier edit applied. Hidden states
are cached: block ``l`` runs once on the target prompts, its update is solved, and its edited
output feeds block ``l + 1`` directly, so the chain costs one pass over ``S`` blocks (plus one
anchor pass in the original model), not ``S`` full encoder passes.

Two rules choose what a shallow site's constrained columns must produce:

- ``"anchor_features"`` (published): ``V* = W_o Y``, ``Y`` the anchor's ``fc2`` input at the
  paired position in the original model.
- ``"residual_schedule"``: ``V*`` makes the block output close the fraction ``2 / (S − l + 1)``
  of the remaining gap between the target's residual stream and the anchor's original one::

      V* = W_o X + 2 (out_anchor − out_target) / (S − l + 1)

  Block ``l`` thus closes a share ``2 (S − l) / (S (S + 1))`` of the initial gap — shares that
  fall linearly with depth — and block ``S − 1`` closes all that is left.

Keep-constraints (the prefix before the concept) always ask for ``V* = W_o X``.

Preserve prompts ride along as extra rows of both batches, each paired with itself: their
columns ask for the original model's features at every site (``V* = W_o K``), ranked after the
concept and end tokens (:data:`~erasepro_ops.alignment.ROLE_PRIORITY`). The wide ``fc2`` sites
(3072 inputs on CLIP-L) fit them next to the erasure, so they leave the shallow blocks exactly as
they entered.

Deep sites (:func:`solve_deep`) share one ``X``: the encoder output for the target prompts with
the shallow edits applied, ``V* = W_o Y_out`` with ``Y_out`` the original encoder output for
the anchor at the paired positions. They fit only what the shallow sites measurably left: a
column with ``‖y_j − x_j‖ ≤ floor · ‖y_j‖`` is *settled* (:func:`settled_columns`) and kept where
it is, so rounding noise is never fitted; when every column is settled the deep sites are not
edited at all.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch

from .alignment import ROLE_PRIORITY, PromptAlignment, limit_padding
from .linalg import (DEFAULT_GAP_FLOOR, DEFAULT_OVERFLOW_DAMPING, DEFAULT_OVERFLOW_PRESERVE_WEIGHT, DEFAULT_RTOL,
                     FeatureMoments, PreserveWeighting, check_finite, frobenius_norm, weight_times)
from .rows import RowBatch
from .solve import ConstraintSystem, LowRankUpdate, MergedColumns, SharedUpdate, SiteSolution, UCESystem

SHALLOW_RULES = ("anchor_features", "residual_schedule")
PRESERVE_GROUPS = (ROLE_PRIORITY["preserve"], ROLE_PRIORITY["preserve_pad"])  # outside the erasure's rank budget
METHODS = ("erasepro", "uce")


class MLPBlock(Protocol):
    """One pre-LN transformer block, seen from its MLP output projection (the shallow site)."""

    name: str
    weight: torch.Tensor  # effective fc2 weight W_o (out × in)
    bias: torch.Tensor | None

    def mlp_input(self, h: torch.Tensor, mask: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_mid, x)``: the residual stream entering the MLP and the ``fc2`` input, for ``h`` (B × T × D).
        ``mask``: that batch's attention mask as the host captured it (None: the block's own)."""
        ...


def block_output(h_mid: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = h_mid + x @ weight.to(x.dtype).T
    return out if bias is None else out + bias.to(x.dtype)


@dataclass(frozen=True)
class Columns:
    """Constrained columns of a batch of aligned prompts, as flat indices into ``(prompt, position)``.

    Row ``p`` of the target batch is prompt ``p``'s chunk holding the concept; row ``p`` of the
    anchor batch is its anchor prompt's matching chunk. Keep columns come first; the last
    ``n_preserve`` columns belong to preserve prompts (rows after the erasure's prompts in both
    batches, each paired with itself), so the first :attr:`n_erasure` columns are the erasure's.
    """

    target: torch.Tensor  # flat indices into the target batch (keep columns, then moved columns)
    anchor: torch.Tensor  # flat indices into the anchor batch for moved columns
    n_keep: int
    groups: torch.Tensor  # priority per column (ROLE_PRIORITY), keep columns included
    n_preserve: int = 0

    @property
    def shifted(self) -> bool:
        """Whether some moved column's partner sits at another position (target and anchor
        tokenize to different lengths): a causal encoder's later blocks then reopen the gap that
        the chain closed. Otherwise every column up to the last moved one enters them aligned."""
        return not torch.equal(self.target[self.n_keep:], self.anchor)

    @classmethod
    def from_alignments(
        cls, alignments: Sequence[PromptAlignment], context_length: int, *, last_token_only: bool = False,
        preserve: Sequence[PromptAlignment] = (), padding: Sequence[int | None] | None = None,
        suffix: Sequence[bool] | None = None,
    ) -> "Columns":
        """All constrained columns (docs/DESIGN.md, *Columns*), or with ``last_token_only`` just each template's last
        concept token and no keep-constraints — the features the official UCE edits. ``preserve``
        (from :func:`~erasepro_ops.alignment.preserve_alignment`) adds preserve prompts' columns.
        ``padding[p]``, when not None, keeps only the first that many padding positions of prompt
        ``p`` (of each segment's padding, SD3), and ``suffix[p]`` False drops its suffix positions
        (context sentences: their concept and end columns carry the erasure)."""
        keep, move, partner, groups = [], [], [], []
        for p, al in enumerate(alignments):
            base = p * context_length
            rows = list(zip(al.move, al.partner, al.role))
            limit = None if padding is None else padding[p]
            if limit is not None:
                rows = limit_padding(rows, limit)
            if suffix is not None and not suffix[p]:
                rows = [r for r in rows if r[2] != "suffix"]
            if last_token_only:
                rows = [max((r for r in rows if r[2] == "concept"), key=lambda r: r[0])]
            else:
                keep += [base + pos for pos in al.keep]
            move += [base + pos for pos, _, _ in rows]
            partner += [base + pos for _, pos, _ in rows]
            groups += [ROLE_PRIORITY[r] for _, _, r in rows]
        n_preserve = 0
        for p, al in enumerate(preserve, start=len(alignments)):
            if al.keep:
                raise ValueError("a preserve alignment pairs every position with itself; it has no keep positions")
            base = p * context_length
            move += [base + pos for pos in al.move]
            partner += [base + pos for pos in al.partner]
            groups += [ROLE_PRIORITY[r] for r in al.role]
            n_preserve += len(al.move)
        keep_groups = [ROLE_PRIORITY["keep"]] * len(keep)
        return cls(
            torch.tensor(keep + move, dtype=torch.long),
            torch.tensor(partner, dtype=torch.long),
            len(keep),
            torch.tensor(keep_groups + groups, dtype=torch.long),
            n_preserve,
        )

    def __len__(self) -> int:
        return int(self.target.numel())

    @property
    def n_erasure(self) -> int:
        """Columns of the erasure itself (the target prompts'), which come before the preserve columns."""
        return len(self) - self.n_preserve


def gather(h: torch.Tensor | RowBatch, index: torch.Tensor) -> torch.Tensor:
    """Columns ``index`` (flat over batch × positions) of ``h`` (B × T × D) as a D × n matrix."""
    if isinstance(h, RowBatch):
        return h.gather(index)
    return h.reshape(-1, h.shape[-1])[index.to(h.device)].T


def inputs_with_partners(x_target: torch.Tensor, y_anchor: torch.Tensor, columns: Columns) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)`` for a site: ``X`` the target columns, ``Y`` what each column should look like —
    the target's own features for keep columns, the paired anchor features for moved ones."""
    x = gather(x_target, columns.target)
    y = torch.cat([x[:, : columns.n_keep], gather(y_anchor, columns.anchor)], dim=1)
    return x, y


@dataclass(frozen=True)
class SolverSettings:
    """Which closed form to use and its constants (docs/DESIGN.md, *Solvers*)."""

    method: str = "erasepro"
    rtol: float = DEFAULT_RTOL
    preserve_rtol: float | None = None  # the kept prompts' tolerance (None: rtol)
    overflow_damping: float = DEFAULT_OVERFLOW_DAMPING  # ρ for constraints beyond the rank budget
    overflow_preserve_weight: float = DEFAULT_OVERFLOW_PRESERVE_WEIGHT  # w of preserve columns in that fit
    budget: int | None = None  # rank budget for the overflow rule (None: each site's own width)
    gap_floor: float = DEFAULT_GAP_FLOOR  # erasepro deep sites: relative gap below which a column is met
    lam: float = 1.0  # ErasePro: C = λI + α K Kᵀ / M
    alpha: float = 0.0
    preserve_strength: float = 0.0  # scale-free α: preserve_strength / (mean squared entry of K)
    uce_lam: float = 0.5  # UCE's λ, erase and preserve scales (official defaults)
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    def weighting(self, preserve: torch.Tensor | FeatureMoments) -> PreserveWeighting | None:
        """ErasePro's ``C^{-1/2}`` for preserve features ``K`` (in × M, or their moments, see
        :func:`kept_moments`): ``C = λI + α K Kᵀ / M`` with ``α = preserve_strength / (mean squared
        entry of K)`` (scale-free), or the fixed ``alpha``; None when that is 0."""
        if not (self.preserve_strength > 0 or self.alpha > 0):
            return None
        device = None if self.device is None else torch.device(self.device)
        if isinstance(preserve, torch.Tensor):
            check_finite("preserve features", preserve)
            preserve = FeatureMoments.of(preserve if device is None else preserve.to(device))
        alpha = self.preserve_strength / max(preserve.mean_sq, 1e-12) if self.preserve_strength > 0 else self.alpha
        if not alpha > 0:
            return None
        return PreserveWeighting.from_moments(preserve, self.lam, alpha, device)

    def system(self, x: torch.Tensor, groups: torch.Tensor, preserve: torch.Tensor | PreserveWeighting | None,
               report_columns: int | None = None, keep_x: bool = True):
        """The shared factorisation of one site's (or one group of sites') constrained features;
        ``preserve``: the preserve features, or ErasePro's weighting built from them already;
        ``keep_x`` False: ``x`` is used up (ErasePro: see ``ConstraintSystem.build``; UCE keeps it)."""
        if self.method == "uce":
            return UCESystem.build(
                x, preserve, lam=self.uce_lam, erase_scale=self.erase_scale,
                preserve_scale=self.preserve_scale, device=self.device,
            )
        if isinstance(preserve, torch.Tensor):
            preserve = self.weighting(preserve)
        return ConstraintSystem.build(
            x, groups, preserve=preserve, lam=self.lam, rtol=self.rtol, preserve_rtol=self.preserve_rtol,
            overflow_damping=self.overflow_damping, budget=self.budget, unbudgeted=PRESERVE_GROUPS,
            overflow_weight=self.overflow_preserve_weight,
            report_columns=report_columns,
            device=self.device,
            keep_x=keep_x,
        )


@dataclass(frozen=True)
class SiteResult:
    name: str
    stage: str  # "shallow" | "deep"
    solution: SiteSolution
    weight_norm: float
    constraints: int  # columns
    rank: int  # rank of the update
    unaligned_energy: float = 0.0  # share of the features' energy outside the exactly-fitted span
    damped: bool = False  # the rank budget overflowed: later groups were fitted by damped least squares
    exact_groups: tuple[int, ...] | None = None  # groups fitted exactly (None: all of them, or not tracked)
    stored_norm: float | None = None  # ‖ΔW‖_F measured in float64: by the chain from its dense ΔW, or by :meth:`stored`

    @functools.cached_property
    def update_norm(self) -> float:
        return self.stored_norm if self.stored_norm is not None else self.solution.update.norm()

    def stored(self, downs: dict) -> "SiteResult":
        """This result with its update as the edit keeps it, float32 factors on the CPU (``‖ΔW‖``
        measured first, in float64). Sites that share one ``down`` share its copy in ``downs``. A
        deep stage of rank ~in on SDXL's 140 sites would otherwise hold gigabytes in float64."""
        update = self.solution.update
        if id(update.down) not in downs:
            downs[id(update.down)] = update.down.to("cpu", torch.float32)
        kept = LowRankUpdate(update.up.to("cpu", torch.float32), downs[id(update.down)])
        return dataclasses.replace(self, solution=dataclasses.replace(self.solution, update=kept),
                                   stored_norm=self.update_norm)

    @property
    def relative_change(self) -> float:
        return self.update_norm / self.weight_norm if self.weight_norm > 0 else 0.0


@dataclass(frozen=True)
class KeptBatch:
    """Prompts whose ``fc2`` inputs a shallow weighting keeps still: their hidden states entering
    the first block (P × T × D; for a causal encoder ``T`` may stop after the last position used),
    the flat positions used, and their attention mask (None: the blocks' own)."""

    hidden: torch.Tensor
    index: torch.Tensor
    mask: object = None


def _kept_parts(blocks: Sequence[MLPBlock], batches: Sequence[KeptBatch],
                sites: Sequence[int] | None) -> Iterator[tuple[int, torch.Tensor | None]]:
    """``(l, features)`` for each batch at each block ``l`` in ``sites``, then ``(l, None)`` when
    block ``l`` is done (every block up to the last of ``sites``)."""
    wanted = set(range(len(blocks)) if sites is None else sites)
    last = max(wanted, default=-1)
    hidden = [batch.hidden for batch in batches]
    for l, block in enumerate(blocks[: last + 1]):
        for j, batch in enumerate(batches):
            with torch.no_grad():
                mid, x = block.mlp_input(hidden[j], batch.mask)
                part = gather(x, batch.index) if l in wanted else None
                hidden[j] = block_output(mid, x, block.weight, block.bias) if l < last else None
                del mid, x
            if part is not None:
                yield l, part
                del part
        yield l, None


def kept_features(blocks: Sequence[MLPBlock], batches: Sequence[KeptBatch],
                  sites: Sequence[int] | None = None) -> Iterator[torch.Tensor | None]:
    """Block by block, the ``fc2`` inputs (D_in × M) of every batch at its positions, through the
    original blocks (a weighting keeps the unedited model's features still); None for a block not
    in ``sites`` (default: every block), nothing past the last of them.

    The batches advance one block at a time, so only one block's features (and every batch's
    hidden state, ``D`` wide where the features are ``D_in``) are held at once."""
    parts = []
    for _, part in _kept_parts(blocks, batches, sites):
        if part is None:
            yield _joined(parts)
        else:
            parts.append(part)


def kept_moments(blocks: Sequence[MLPBlock], batches: Sequence[KeptBatch],
                 sites: Sequence[int] | None = None) -> Iterator[FeatureMoments | None]:
    """:func:`kept_features`' features as each block's :class:`~erasepro_ops.linalg.FeatureMoments`,
    summed a batch at a time: one batch's features are held, never a block's."""
    moments = None
    for _, part in _kept_parts(blocks, batches, sites):
        if part is None:
            yield moments
            moments = None
            continue
        check_finite("preserve features", part)
        moments = FeatureMoments.of(part) if moments is None else moments.add(part)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The columns of ``parts`` side by side (None for none), the list emptied so that only the
    result holds them."""
    out = torch.cat(parts, dim=1) if parts else None
    parts.clear()
    return out


def _mlp_input(block: MLPBlock, h: RowBatch, mask) -> tuple[RowBatch, RowBatch]:
    mids, xs = [], []
    for k, part in enumerate(h.parts):
        mid, x = block.mlp_input(part, h.mask_of(mask, k))
        mids.append(mid)
        xs.append(x)
    return h.like(mids), h.like(xs)


def _block_output(mid: RowBatch, x: RowBatch, weight: torch.Tensor, bias: torch.Tensor | None) -> RowBatch:
    return mid.like(block_output(m, p, weight, bias) for m, p in zip(mid.parts, x.parts))


def _run_rows(h: torch.Tensor, index: torch.Tensor, causal: bool, at_least: torch.Tensor | None = None) -> RowBatch:
    """The batch as the chain runs it: a causal encoder's rows cut after the last position
    ``index`` (or ``at_least``) reaches (:class:`~erasepro_ops.rows.RowBatch`), else whole."""
    return RowBatch.reaching(h, index, at_least) if causal else RowBatch.whole(h)


def progressive_shallow(
    blocks: Sequence[MLPBlock],
    h_target: torch.Tensor,
    h_anchor: torch.Tensor,
    columns: Columns,
    settings: SolverSettings,
    *,
    rule: str = "anchor_features",
    preserve: Sequence[torch.Tensor | PreserveWeighting | None] | None = None,
    on_site: Callable[[str], None] | None = None,
    masks: tuple[object, object] = (None, None),
    schedule: int | None = None,
    bridges: Sequence[int] = (),
    gap_floor: float = DEFAULT_GAP_FLOOR,
    causal: bool = False,
    reads: Sequence[int] = (),
    target_lengths: torch.Tensor | None = None,
    outputs: dict | None = None,
    edited: dict | None = None,
    anchor_lengths: torch.Tensor | None = None,
    anchor_outputs: dict | None = None,
    store: bool = False,
) -> list[SiteResult]:
    """Solve the shallow sites in order (docs/DESIGN.md, *Progressive chain*).

    ``h_target``/``h_anchor`` (P × T × D) are the hidden states entering ``blocks[0]``, ``masks``
    their attention masks (None: the blocks' own);
    ``preserve`` (optional) per block the ``fc2`` inputs the ``C`` weighting keeps still (preserve
    prompts, the retain bank: :func:`kept_features`) or the weighting built from them.

    The first ``schedule`` blocks (default: all) are the chain. Past it the blocks run unedited,
    except the *bridges* (``bridges``: the blocks whose outputs the model reads): when target
    and anchor tokenize to different lengths, the later blocks' attention sees one token more or
    less and reopens the gap; a bridge block closes all of it, ``V* = W_o X + (out_a − out_t)``,
    unless no column's relative gap ``‖out_a − out_t‖ / ‖out_a‖`` exceeds ``gap_floor``. Inside the
    chain too, a moved column whose gap (or, with ``"anchor_features"``, whose ``fc2`` input's
    distance to its partner's) is at most ``gap_floor`` of its partner's norm is settled: it asks
    for ``V* = W_o X``. A kept prompt paired with itself has such a gap after an edited block, the
    float32 rounding of two computations of one feature; fitting it would make the constraints
    contradict each other (its start token's column is a keep column's too) and the residual
    depend on the CPU's kernels.

    ``causal``: the blocks' attention is causal, so each row runs only up to the last position a
    column (or ``target_lengths``, positions per target row) reaches. ``outputs``, when given,
    receives the target batch's hidden state after each block in ``reads`` (edits applied) as a
    :class:`~erasepro_ops.rows.RowBatch`; the blocks run on to the last of them. ``edited``, when
    given, receives each solved site's ``W_o + ΔW`` (float32, as the chain ran it) by name. With
    ``edited`` or ``store``, the results keep their updates as the edit does
    (:meth:`SiteResult.stored`), so no earlier site's float64 factors are held while the next one
    solves. ``anchor_outputs``, with ``outputs``, receives the anchor batch's (unedited) hidden state
    after each block in ``reads`` the same way: every anchor row then runs on past the chain, as far
    as ``anchor_lengths`` (per row) or its columns reach.
    """
    if rule not in SHALLOW_RULES:
        raise ValueError(f"shallow rule must be one of {SHALLOW_RULES}, got {rule!r}")
    depth = len(blocks) if schedule is None else schedule
    reads = tuple(reads) if outputs is not None else ()
    last = max((depth - 1, *bridges, *reads))
    if last >= len(blocks):
        raise ValueError(f"block {last} is past the {len(blocks)} blocks given")
    results: list[SiteResult] = []
    h_t = _run_rows(h_target, columns.target, causal, target_lengths)
    h_a = RowBatch.distinct(h_anchor, columns.anchor, causal, masks[1], anchor_lengths)  # a type's anchors repeat
    shifted = columns.target[columns.n_keep:] != columns.anchor
    anchor_reads = reads if anchor_outputs is not None else ()
    for l, block in enumerate(blocks[: last + 1]):
        with torch.no_grad():
            if l == depth and not anchor_reads:  # past the chain: only the anchor rows a shifted column reads run on
                h_a = h_a.keep_rows(torch.unique(columns.anchor[shifted] // h_a.context))
            if l < depth:
                mid_a, x_a = _mlp_input(block, h_a, masks[1])
                out_a = _block_output(mid_a, x_a, block.weight, block.bias)
                mid_t, x_t = _mlp_input(block, h_t, masks[0])
                x, y = inputs_with_partners(x_t, x_a, columns)
                del mid_a, x_a
                x = x.to(torch.float64)
                if rule == "anchor_features":
                    target = weight_times(block.weight, _settle(x, y.to(torch.float64), gap_floor))
                else:
                    out_t = _block_output(mid_t, x_t, block.weight, block.bias)
                    gap = _moved_gap(out_a, out_t, columns, gap_floor)
                    del out_t
                    target = weight_times(block.weight, x)
                    target[:, columns.n_keep:] += gap * (2.0 / (depth - l + 1))
                del y
                h_a = out_a
                if l in anchor_reads:
                    anchor_outputs[l] = h_a
            else:
                mid_t, x_t = _mlp_input(block, h_t, masks[0])
                h_t = _block_output(mid_t, x_t, block.weight, block.bias)
                if len(h_a):
                    mid_a, x_a = _mlp_input(block, h_a, masks[1])
                    h_a = _block_output(mid_a, x_a, block.weight, block.bias)
                if l in anchor_reads:
                    anchor_outputs[l] = h_a
                gap = _open_gap(h_a, h_t, columns, shifted, gap_floor) if l in bridges else None
                if gap is None:
                    if l in bridges and on_site is not None:
                        on_site(block.name)
                    if l in reads:
                        outputs[l] = h_t
                    continue
                x = gather(x_t, columns.target).to(torch.float64)
                target = weight_times(block.weight, x)
                target[:, columns.n_keep:] += gap
            merged = MergedColumns.of(x, target, columns.groups)
            del x, target  # the solve's transients are the peak of the chain: only what it reads stays
            r = merged.residual(block.weight)
            system = settings.system(merged.x, merged.groups, None if preserve is None else preserve[l], keep_x=False)
            del merged  # its X is the system's X̃ now
            solution = system.fit(r)
            del system, r
            w_new = solution.update.dense().to(block.weight.device)
            change = float(w_new.norm())  # ‖ΔW‖ from the product formed anyway
            w_new.add_(block.weight)  # W_o + ΔW, float64
            h_t = _block_output(mid_t, x_t, w_new.to(x_t.parts[0].dtype), block.bias)
            del mid_t, x_t
            if edited is not None:
                edited[block.name] = w_new.to(torch.float32)
            del w_new
            if l in reads:
                outputs[l] = h_t
        results.append(SiteResult(block.name, "shallow", solution,
                                  float(torch.linalg.vector_norm(block.weight, dtype=torch.float64)),
                                  len(columns), solution.update.rank, stored_norm=change))
        del solution  # with ``edited`` or ``store``, the float64 factors go before the next site solves
        if edited is not None or store:
            results[-1] = results[-1].stored({})  # each site its own down (a freed one's id may come again)
        if on_site is not None:
            on_site(block.name)
    return results


def unedited_outputs(blocks: Sequence[MLPBlock], h_target: torch.Tensor, columns: Columns, reads: Sequence[int],
                     rows: int, *, mask: object = None, causal: bool = False,
                     target_lengths: torch.Tensor | None = None) -> dict[int, RowBatch]:
    """The first ``rows`` rows of :func:`progressive_shallow`'s target batch through the unedited
    blocks: their hidden state after each block in ``reads``, each row run as far as the chain runs
    it (a causal encoder's up to the last position it uses). The original model's features at
    every position the solve reads, for one pass over those positions instead of a whole encode."""
    h = _run_rows(h_target, columns.target, causal, target_lengths).keep_rows(torch.arange(rows))
    outputs = {}
    for l, block in enumerate(blocks[: max(reads, default=-1) + 1]):
        with torch.no_grad():
            mid, x = _mlp_input(block, h, mask)
            h = _block_output(mid, x, block.weight, block.bias)
            del mid, x
        if l in reads:
            outputs[l] = h
    return outputs


def _moved_gap(out_a: RowBatch, out_t: RowBatch, columns: Columns, floor: float) -> torch.Tensor:
    """``out_a − out_t`` at the moved columns (float64), 0 at the settled ones
    (:func:`settled_columns`): a column whose gap is float32 rounding (a kept prompt paired with
    itself, computed once in the edited batch and once in the unedited one) asks to stay where it
    is, as a keep column sharing its features does, instead of for a difference that depends on
    which kernels the CPU picked."""
    y = gather(out_a, columns.anchor).to(torch.float64)
    x = gather(out_t, columns.target[columns.n_keep:]).to(torch.float64)
    return _settle(x, y, floor).sub_(x)


def _settle(x: torch.Tensor, y: torch.Tensor, floor: float) -> torch.Tensor:
    """``y`` (float64, changed in place) with each settled column (:func:`settled_columns`) replaced
    by ``x``'s: what a column within ``floor`` of its partner is asked for is where it already is."""
    if floor > 0:
        settled = settled_columns(x, y, floor)
        y[:, settled] = x[:, settled]
    return y


def _open_gap(out_a: RowBatch, out_t: RowBatch, columns: Columns, shifted: torch.Tensor,
              floor: float) -> torch.Tensor | None:
    """``out_a − out_t`` at the moved columns (float64; 0 where not ``shifted``: a same-length
    pair's partner enters every block past the chain aligned, its anchor feature is the target's),
    or None when every column is settled (:func:`settled_columns`)."""
    x = gather(out_t, columns.target[columns.n_keep:])
    y = x.clone()
    if bool(shifted.any()):
        y[:, shifted.to(y.device)] = gather(out_a, columns.anchor[shifted])
    if bool(settled_columns(x, y, floor).all()):
        return None
    return y.to(torch.float64) - x.to(torch.float64)


def settled_columns(x: torch.Tensor, y: torch.Tensor, floor: float) -> torch.Tensor:
    """Which columns are already aligned: ``‖y_j − x_j‖ ≤ floor · ‖y_j‖`` (a bool per column)."""
    x64, y64 = x.to(torch.float64), y.to(device=x.device, dtype=torch.float64)
    return (y64 - x64).norm(dim=0) <= floor * y64.norm(dim=0)


def solve_deep(
    weights: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    settings: SolverSettings,
    *,
    preserve: torch.Tensor | None = None,
    report_columns: int | None = None,
    on_site: Callable[[str], None] | None = None,
    store: bool = False,
) -> list[SiteResult]:
    """Solve every deep site that reads the same features ``X`` (D × N), ``V*_s = W_s Y``.
    ``store``: keep each site's update as the edit does (:meth:`SiteResult.stored`) as it is solved.

    One factorisation of ``X`` and one shared map serve all sites (decompose once, not once per
    site); each site then costs one ``out × in × rank`` product. Residuals and the
    unaligned energy are reported on the first ``report_columns`` columns (the erasure's).
    ErasePro leaves settled columns (:func:`settled_columns`) where they are; when all are, no
    site changes and nothing is factorised. Columns that repeat exactly are solved once
    (:class:`~erasepro_ops.solve.MergedColumns`); the sites report the columns given.
    """
    n_columns = int(x.shape[1])
    merged = MergedColumns.of(x, y, groups, report_columns)
    x, y, groups, report_columns = merged.x, merged.target, merged.groups, merged.report_columns
    settled = None
    if settings.method == "erasepro" and settings.gap_floor > 0:
        settled = settled_columns(x, y, settings.gap_floor)
    if settled is not None and bool(settled.all()):
        system, shared = None, SharedUpdate.unchanged(x, y, report_columns)
    else:
        system = settings.system(x, groups, preserve, report_columns)
        shared = system.map_targets(y, report_columns, settled)
    unaligned = getattr(system, "unaligned_energy", 0.0)
    damped = getattr(system, "damped_from", None) is not None
    exact_groups = getattr(system, "exact_groups", None)
    results, downs = [], {}
    for name, w in weights.items():
        solution = shared.solve(w)
        weight_norm = frobenius_norm(w)
        results.append(SiteResult(name, "deep", solution, weight_norm, n_columns, solution.update.rank,
                                  unaligned, damped, exact_groups))
        if store:
            results[-1] = results[-1].stored(downs)
        if on_site is not None:
            on_site(name)
    return results
