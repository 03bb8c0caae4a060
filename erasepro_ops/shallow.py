"""The shallow sites: the MLP output projections of each text encoder's first blocks."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Collection, Iterator

import torch

from .chain import KeptBatch, SolverSettings, kept_moments, progressive_shallow, unedited_outputs
from .edit import SiteEdit
from .family import Architecture
from .host import Host
from .request import Request
from .retain import retain_prompts
from .rows import RowBatch
from .batches import preserve_alignments, preserve_ids, split
from .weighting_cache import RETAIN_WEIGHTINGS, Loaded


def site_edits(results, part: str, stage: str) -> list[SiteEdit]:
    """The results as float32 CPU edits; sites sharing one ``down`` (every deep site) share its copy."""
    downs, edits = {}, []
    for r in results:
        update = r.solution.update
        if id(update.down) not in downs:
            downs[id(update.down)] = update.down.to("cpu", torch.float32)
        edits.append(SiteEdit(r.name, part, stage, update.up.to("cpu", torch.float32), downs[id(update.down)],
                              r.relative_change, r.solution.residual))
    return edits


RETAIN_BATCH = 64  # bank prompts per batch through the shallow blocks, sorted by length
RETAIN_TOKENS = 1024  # and padded positions per batch at most (a CLIP-L block's MLP: 12 MiB of float32 per 1024)
MIN_SHALLOW_BITS = 16  # text-encoder weights stored in fewer bits (fp8) get no shallow edits, see solve_shallow


@dataclass
class SoftWeighting:
    """What the shallow sites' weighting ``C`` keeps still: per encoder, batches of prompts (the
    preserve prompts when weighted, the retain bank) with the positions used, and the strength.
    ``key`` (the retain bank alone) names them for
    :class:`~erasepro_ops.weighting_cache.WeightingCache`; an encoder's batches (``prepare(i)``)
    are only made when the cache does not hold its weightings, and :meth:`release` drops them once
    those are built."""

    prepare: Callable[[int], list[KeptBatch]]
    strength: float
    key: tuple | None = None
    held: dict[int, list[KeptBatch]] = dataclasses.field(default_factory=dict, repr=False)

    def batches(self, i: int) -> list[KeptBatch]:
        if i not in self.held:
            self.held[i] = self.prepare(i)
        return self.held[i]

    def release(self, i: int) -> None:
        """Drop encoder ``i``'s batches: the bank's hidden states are not held through the fits."""
        self.held.pop(i, None)


def _by_tokens(order: list[int], lengths: list[int]) -> Iterator[list[int]]:
    """``order`` (prompts sorted by length, ``lengths`` theirs) in batches of at most
    :data:`RETAIN_BATCH` prompts and :data:`RETAIN_TOKENS` positions once padded to the batch's
    longest (a causal encoder runs no further): a batch of long prompts holds fewer, so its activations
    stay the size of a short one's."""
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and stop - start < RETAIN_BATCH and (stop + 1 - start) * lengths[stop] <= RETAIN_TOKENS:
            stop += 1
        yield order[start:stop]
        start = stop


def _retain_batches(arch: Architecture, first_inputs, spans, padding: int,
                    encoders: Collection[int] | None = None) -> list[list[KeptBatch]]:
    """The bank, per encoder (only those in ``encoders`` when given), in batches of prompts of
    similar length (``first_inputs(rows)``: the encoders' captured first-block inputs for those
    prompts). A causal encoder's features up to a position do not depend on what follows, so each
    batch stops after its last position used instead of running the whole context."""
    positions = [[list(al.positions("preserve")) + list(al.positions("preserve_pad"))[:padding]
                  for al in split(arch, spans, s)] for s in range(len(arch.segments))]
    order = sorted(range(len(spans)), key=lambda j: max(positions[0][j]))
    out = [[] for _ in arch.encoders]
    for rows in _by_tokens(order, [max(positions[0][j]) + 1 for j in order]):
        for i, (enc, (hidden, mask, _)) in enumerate(zip(arch.encoders, first_inputs(rows))):
            if not enc.spec.per_token or (encoders is not None and i not in encoders):  # pooled only: no sites
                continue
            used = positions[arch.segment_of(i)]
            length = max(max(used[j]) for j in rows) + 1 if enc.spec.causal else hidden.shape[1]
            index = torch.tensor([r * length + pos for r, j in enumerate(rows) for pos in used[j]])
            out[i].append(KeptBatch(hidden[:, :length].contiguous(), index, mask))
    return out


def soft_weighting(host: Host, arch: Architecture, request: Request, preserve_in,
                   kept_lengths=None) -> SoftWeighting | None:
    """The user's preserve prompts (UCE, or ``preserve_strength`` > 0) at every position the model
    reads (``kept_lengths``, see ``batches.read_lengths``), then the retain bank (ErasePro with
    ``retain_strength`` > 0 and S > 0) up to each prompt's end token."""
    retain = request.method == "erasepro" and request.retain_strength > 0 and request.progressive_layers > 0
    if preserve_in is None and not retain:
        return None

    @functools.cache
    def bank_ids():
        return preserve_ids(host, arch, retain_prompts())

    def prepare(i):
        batches = []
        if preserve_in is not None:
            hidden, mask, _ = preserve_in[i]
            p, t = hidden.shape[:2]
            index = (torch.arange(p * t) if kept_lengths is None else
                     torch.tensor([r * t + pos for r, n in enumerate(kept_lengths) for pos in range(n)]))
            batches.append(KeptBatch(hidden, index, mask))
        if retain:
            ids = bank_ids()
            # a batch at a time: the whole bank's first-block inputs at full context are ~70 MiB on CLIP-L
            batches += _retain_batches(arch, lambda rows: host.first_block_inputs([[e[j] for j in rows] for e in ids]),
                                       preserve_alignments(arch, retain_prompts(), ids), request.retain_padding,
                                       encoders=(i,))[i]
        return batches
    strength = request.preserve_strength if preserve_in is not None else request.retain_strength
    key = None if preserve_in is not None else ("retain", retain_prompts(), request.retain_padding, strength)
    return SoftWeighting(prepare, strength, key)


def _weightings(host: Host, enc, blocks, sites, soft: SoftWeighting | None, i: int, settings: SolverSettings):
    """The weighting of each of ``sites`` (block indices) for encoder ``i``, as a list by block (None
    for the other blocks): the retain bank's from the cache, else built from the kept prompts' features.
    The cache's key holds what the weighting depends on: the bank and its settings, the digest of the
    encoder up to the site, and the bits its weights are stored in (the digest rounds to float16)."""
    if soft is None:
        return None
    sites = sorted(sites)  # the bank's features come block by block, shallow to deep

    def build(wanted):  # one site at a time: the cache keeps each in float32 as it comes
        for l, moments in enumerate(kept_moments(blocks, soft.batches(i), wanted)):
            if l in wanted:
                yield None if moments is None else settings.weighting(moments)
    if soft.key is None:
        built = dict(zip(sites, build(sites)))
    else:
        digests = host.text_digests(enc, [l + 1 for l in sites])
        bits = host.text_storage_bits([enc.shallow_key(l) for l in range(max(sites) + 1)])
        keys = [(soft.key, digests[l + 1], l, settings.lam, settings.alpha, bits) for l in sites]
        built = dict(zip(sites, RETAIN_WEIGHTINGS.get(keys, lambda missing: build([sites[j] for j in missing]))))
    soft.release(i)  # a cached file damaged later is built again from a fresh batches(i)
    return Loaded(built.get(l) for l in range(max(sites) + 1))


@dataclass
class ShallowResult:
    results: list  # SiteResult per shallow site, encoder by encoder, shallow to deep
    edits: list[SiteEdit]
    edited: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # key → (W_o + ΔW, bias), float32, of the encoders not resumed
    notes: list[str] = dataclasses.field(default_factory=list)  # settings the solve adjusted, for the summary
    hidden: dict[int, dict[int, torch.Tensor]] = dataclasses.field(default_factory=dict)  # encoder → read block → B × T × D
    # encoder → read block → the templates' rows, no edits / the anchor batch's rows (anchors, then kept prompts)
    unedited: dict[int, dict[int, RowBatch]] = dataclasses.field(default_factory=dict)
    anchors: dict[int, dict[int, RowBatch]] = dataclasses.field(default_factory=dict)

    def drop_encoder_states(self) -> None:
        """Free what only the encodes after the chain read (the edited weights, the hidden states):
        the deep stage and the figures need the results, edits and notes alone."""
        self.edited, self.hidden, self.unedited, self.anchors = {}, {}, {}, {}


def solve_shallow(host: Host, arch: Architecture, request: Request, settings: SolverSettings, columns_of,
                  anchor_in, target_in, soft: SoftWeighting | None, on_site, reach=None,
                  unedited_rows: int | None = None) -> ShallowResult:
    """The shallow sites (the first S blocks' MLP output projections), per text encoder, shallow to deep;
    ``columns_of(segment)``: the columns an encoder of that segment sees (``Batches.columns_of``).
    ``reach(i, special)`` (``Batches.chain_reach``): the positions per row the deep sites read of
    encoder ``i``; when given, a CLIP's chain runs its targets on through the blocks the model
    reads and keeps their hidden states (:attr:`ShallowResult.hidden`), so the deep sites' inputs
    need no second pass through those blocks. With ``unedited_rows``, it also runs that many
    leading rows (the templates) through the unedited blocks it reads
    (:func:`~erasepro_ops.chain.unedited_outputs`, :attr:`ShallowResult.unedited`) and the anchor
    batch (anchors, then kept prompts) on to them (:attr:`ShallowResult.anchors`): the original
    features there cost one pass over the positions the solve uses, not a whole encode.
    On a CLIP, when target and anchor tokenize to different lengths, the blocks it reads past the
    first S are bridges too (:func:`~erasepro_ops.chain.progressive_shallow`): the deep sites then
    have nothing left to fit.

    An encoder whose weights are stored in fewer than :data:`MIN_SHALLOW_BITS` bits (a T5 loaded
    in fp8) gets none: ComfyUI rounds a patched weight to its storage dtype, and fp8's ~6% steps
    would leave the deep sites (solved on the exact edited features) several percent of the gap
    to the anchor. The deep sites then hold the whole erasure, exactly, and the summary says so."""
    out = ShallowResult([], [], {})
    # The erasure's rank budget is the deep sites' width: when the constraints overflow it, the
    # wider shallow sites damp the same overflow instead of fitting it exactly (solve.py). The
    # preserve columns are outside that budget: a 3072-wide fc2 keeps them exact.
    shallow_settings = dataclasses.replace(settings, budget=arch.context_width)
    if soft is not None:
        shallow_settings = dataclasses.replace(shallow_settings, preserve_strength=soft.strength)
    for i, enc in enumerate(arch.encoders):
        schedule = enc.shallow_depth(request.progressive_layers)
        if schedule == 0:
            continue
        columns = columns_of(arch.segment_of(i))
        bridges = enc.bridge_blocks(request.progressive_layers)
        if bridges and not columns.shifted:  # same token counts: nothing reopens past the chain
            if on_site is not None:
                for l in bridges:
                    on_site(enc.shallow_key(l))
            bridges = ()
        sites = list(range(schedule)) + list(bridges)
        rows = None if reach is None or not enc.spec.bridged else reach(i, enc.special)
        reads = enc.read_blocks if rows is not None else ()
        keys = [enc.shallow_key(l) for l in sites]
        bits = host.text_storage_bits(keys)
        if bits < MIN_SHALLOW_BITS:
            out.notes.append(f"progressive_layers {request.progressive_layers} not used on {enc.name}: its weights are stored "
                             f"in {bits}-bit floats, which would round its edits away; the erasure is solved at the deep "
                             f"sites alone. Load {enc.name} in fp16 or bf16 for the progressive edit")
            continue
        run = [enc.shallow_key(l) for l in range(max(sites + list(reads)) + 1)]  # up to the last site or read block
        weights = host.text_weights(run, as_stored=True)  # the chain widens a site's W_o where it uses it
        bias_keys = [k.replace(".weight", ".bias") for k in run]
        bias = host.text_weights(bias_keys) if enc.spec.shallow_bias else dict.fromkeys(bias_keys)
        blocks = host.shallow_blocks(enc, run, [weights[k] for k in run], [bias[k] for k in bias_keys],
                                     target_in[i])
        # an encoder the chain runs on to its read blocks is resumed from them: its edited weights go unused
        outputs, edited = ({}, None) if reads else (None, {})
        anchors = {} if reads and unedited_rows else None
        results = progressive_shallow(blocks, target_in[i][0], anchor_in[i][0], columns,
                                      shallow_settings, rule=request.rule,
                                      preserve=_weightings(host, enc, blocks, sites, soft, i, shallow_settings),
                                      on_site=on_site, masks=(target_in[i][1], anchor_in[i][1]),
                                      schedule=schedule, bridges=bridges, gap_floor=settings.gap_floor,
                                      causal=enc.spec.causal, reads=reads, target_lengths=rows, outputs=outputs,
                                      edited=edited, store=True, anchor_outputs=anchors,
                                      anchor_lengths=None if anchors is None else reach(i, enc.special, anchors=True))
        if reads:
            out.hidden[i] = {l: h.dense() for l, h in outputs.items()}
        if anchors is not None:
            out.anchors[i] = anchors
            out.unedited[i] = unedited_outputs(blocks, target_in[i][0], columns, reads, unedited_rows,
                                               mask=target_in[i][1], causal=enc.spec.causal, target_lengths=rows)
        if edited is not None:
            out.edited.update((r.name, (edited[r.name], bias[r.name.replace(".weight", ".bias")])) for r in results)
        out.results += results
        out.edits += site_edits(results, "clip", "shallow")
    return out
