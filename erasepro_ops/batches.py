"""The prompts of a solve as token-id batches and constrained columns.

Every concept's templates (and context sentences) pair a target prompt with its anchor prompt;
the preserve prompts pair with themselves. Each text encoder tokenises them its own way, but all
must agree on which positions hold what (:func:`align_prompts`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .chain import Columns
from .templates import ConceptPair, expand
from .alignment import align_chunks, end_index, merge_alignments, preserve_alignment, segment_part, first_padding
from .contexts import ALL_PADDING, PADDING_TEMPLATES, context_pairs, fitted_padding, spread_padding
from .errors import EraseProError
from .family import Architecture
from .host import Host
from .request import Request
from .text import quote


def prompt_pairs(concepts) -> list[tuple[str, str, ConceptPair]]:
    """Every concept's templates as ``(target prompt, anchor prompt, pair)``."""
    return [(t, a, pair) for pair in concepts for t, a in expand(pair)]


def context_prompt_pairs(concepts, n: int) -> list[tuple[str, str, ConceptPair]]:
    """Every concept's first ``n`` context sentences (``erasepro_ops.contexts``) not among its templates."""
    return [(t, a, pair) for pair in concepts for t, a in context_pairs(pair, n, set(expand(pair)))]


def _fitting(chunks, enc, prompt: str):
    """``chunks``, after checking each holds at most the encoder's context (a T5 chunk grows with
    the prompt instead of splitting). An unpadded encoder's chunks (Chroma's T5: the prompt and its
    end token) are padded to the context with its pad token, so a batch has one length; the host
    encodes them with the padding masked out."""
    longest = max(len(c) for c in chunks)
    if longest > enc.spec.context:
        raise EraseProError(f"the prompt {quote(prompt)} is {longest} {enc.name} tokens long; at most "
                            f"{enc.spec.context} fit: shorten it")
    if not enc.spec.padded:
        return [list(c) + [enc.special.pad] * (enc.spec.context - len(c)) for c in chunks]
    return chunks


def align_prompts(host: Host, arch: Architecture, pairs):
    """Per prompt pair: its alignment over the features the deep sites read (each segment's own,
    shared by the encoders of that segment, at the segment's offset: :func:`split`) and each
    encoder's chunk ids."""
    alignments, target_ids, anchor_ids = [], [[] for _ in arch.encoders], [[] for _ in arch.encoders]
    for t_prompt, a_prompt, pair in pairs:
        found = [None] * len(arch.segments)
        for i, enc in enumerate(arch.encoders):
            t_chunks = _fitting(host.tokenize(t_prompt, enc), enc, t_prompt)
            a_chunks = _fitting(host.tokenize(a_prompt, enc), enc, a_prompt)
            if not enc.spec.per_token:  # only its pooled output is read: the prompts' first chunks
                target_ids[i].append(t_chunks[0])
                anchor_ids[i].append(a_chunks[0])
                continue
            try:
                al = align_chunks(t_chunks, a_chunks, enc.special, anchor_empty=not pair.anchor,
                                  context_length=arch.segment_context(arch.segment_of(i)), target_prompt=t_prompt,
                                  anchor_prompt=a_prompt, bidirectional=not enc.spec.causal)
            except ValueError as e:
                raise EraseProError(f"concept {quote(pair.target)} → {quote(pair.anchor)}: {e}") from e
            s = arch.segment_of(i)
            if found[s] is None:
                found[s] = al
            elif (al.keep, al.move, al.partner) != (found[s].keep, found[s].move, found[s].partner):
                raise EraseProError(f"the text encoders tokenise {quote(t_prompt)} differently; cannot align it")
            target_ids[i].append(t_chunks[al.target_chunk])
            anchor_ids[i].append(a_chunks[al.anchor_chunk])
        alignments.append(merge_alignments(found, arch.segment_offsets))
    return alignments, target_ids, anchor_ids


def split(arch: Architecture, alignments, segment: int):
    """The part of each alignment (from :func:`align_prompts` or :func:`preserve_alignments`) in
    one segment, positions counted from the segment's start: what its encoders' shallow sites see."""
    offset, length = arch.segment_offsets[segment], arch.segment_context(segment)
    return [segment_part(al, offset, length) for al in alignments]


def preserve_ids(host: Host, arch: Architecture, prompts):
    """Each encoder's first-chunk token ids for whole prompts (preserve or unrelated)."""
    ids = [[] for _ in arch.encoders]
    for text in prompts:
        for i, enc in enumerate(arch.encoders):
            ids[i].append(_fitting(host.tokenize(text, enc), enc, text)[0])
    return ids


def preserve_alignments(arch: Architecture, prompts, ids):
    """The preserve prompts as self-paired constraints (the same positions for every encoder of a
    segment), over the features the deep sites read."""
    alignments = []
    for j, text in enumerate(prompts):
        parts = []
        for members in arch.segments:
            per_encoder = [preserve_alignment(text, ids[i][j], arch.encoders[i].special, arch.encoders[i].spec.padded)
                           for i in members]
            if any(al.role != per_encoder[0].role for al in per_encoder):
                raise EraseProError(f"the text encoders tokenise the preserve prompt {quote(text)} differently")
            parts.append(per_encoder[0])
        alignments.append(merge_alignments(parts, arch.segment_offsets))
    return alignments


def preserve_conflicts(pairs, alignments, target_ids, preserve_prompts, preserve_tokens) -> list[str]:
    """Warnings for preserve prompts that contain an erased concept's tokens: they cannot be both
    erased and kept; the concept's own columns come first, the preserve prompt's are fitted after.
    ``target_ids`` and ``preserve_tokens``: the chunks of one encoder the alignments were made on."""
    warnings, seen = [], set()
    for (_, _, pair), al, ids in zip(pairs, alignments, target_ids):
        concept = [ids[p] for p in al.positions("concept")]
        for text, chunk in zip(preserve_prompts, preserve_tokens):
            if (pair.target, text) in seen or not concept:
                continue
            if any(list(chunk[i:i + len(concept)]) == concept for i in range(len(chunk) - len(concept) + 1)):
                seen.add((pair.target, text))
                warnings.append(f"preserve prompt {quote(text)} contains the erased concept {quote(pair.target)}: it cannot be "
                                "both erased and kept; the erasure wins. Remove it from the preserve prompts")
    return warnings


def cat_inputs(a, b):
    """Join two captured first-block inputs ``(hidden, mask, attention)`` along the batch."""
    (h_a, mask, attention), (h_b, mask_b, _) = a, b
    if mask is not None and mask.dim() > 2 and mask.shape[0] > 1:
        mask = torch.cat([mask, mask_b])
    return torch.cat([h_a, h_b]), mask, attention


def select_inputs(a, index: torch.Tensor):
    """Rows ``index`` of a captured first-block input ``(hidden, mask, attention)``."""
    hidden, mask, attention = a
    if mask is not None and mask.dim() > 2 and mask.shape[0] > 1:
        mask = mask[index.to(mask.device)]
    return hidden[index.to(hidden.device)], mask, attention


@dataclass(frozen=True)
class Batches:
    """A solve's prompts: the erasure's pairs (templates, then context sentences) and the kept prompts."""

    pairs: list  # (target prompt, anchor prompt, ConceptPair)
    alignments: list
    target_ids: list  # per encoder, one chunk per pair
    anchor_ids: list
    kept_prompts: tuple[str, ...]  # the user's preserve prompts, then the empty prompt when kept
    preserve_tokens: list | None  # per encoder, one chunk per kept prompt; None without any
    columns: Columns
    exact_preserve: bool  # ErasePro: the kept prompts are constraints (V* = W_o K), ranked last
    soft_preserve: bool  # they weight the solve softly (UCE, or preserve_strength > 0)
    notes: list = dataclasses.field(default_factory=list)  # settings the solve adjusted, for the summary
    token_encoder: int = 0  # index of the first encoder whose per-token output the deep sites read
    kept_lengths: tuple[int, ...] | None = None  # positions the model reads of each kept prompt; None: all
    segment_columns: tuple = ()  # per segment, its columns counted from its start (the shallow sites'); () = columns
    first_segment: list | None = None  # the alignments' part in the first segment (the token encoder's)

    def columns_of(self, segment: int) -> Columns:
        """The columns one segment's encoders see (their shallow sites): :attr:`columns` when one
        segment holds every per-token encoder."""
        return self.segment_columns[segment] if self.segment_columns else self.columns

    def kept_positions(self, features: torch.Tensor, rows: slice) -> torch.Tensor:
        """The kept prompts ``rows`` of ``features`` as one (positions × width) matrix, only the
        positions the diffusion model reads."""
        return read_positions(features[rows], None if self.kept_lengths is None else self.kept_lengths[rows])

    @property
    def n_target(self) -> int:
        return len(self.alignments)

    def chain_reach(self, i: int, special, anchors: bool = False) -> torch.Tensor | None:
        """Per row of encoder ``i``'s chain batch (the templates, or with ``anchors`` their anchor
        prompts, then the kept prompts when they are constraints), how many positions the deep
        sites read of its output beyond the constrained columns: a template's up to its end token
        (the pooled embedding's), a kept prompt's all. None when the deep sites read prompts the
        chain does not run (kept prompts that are not constraints)."""
        if self.preserve_tokens is not None and not self.exact_preserve:
            return None
        reach = [end_index(list(c), special) + 1 for c in (self.anchor_ids if anchors else self.target_ids)[i]]
        if self.preserve_tokens is not None:
            reach += [len(c) for c in self.preserve_tokens[i]]
        return torch.tensor(reach, dtype=torch.long)

    def warnings(self) -> list[str]:
        """Warnings about the prompts: adjusted settings, preserve prompts holding an erased concept."""
        if self.preserve_tokens is None:
            return list(self.notes)
        i = self.token_encoder
        first = self.alignments if self.first_segment is None else self.first_segment
        return list(self.notes) + preserve_conflicts(self.pairs, first, self.target_ids[i], self.kept_prompts,
                                                     self.preserve_tokens[i])


def read_lengths(arch: Architecture, chunks) -> tuple[int, ...] | None:
    """How many positions of each whole prompt (``chunks``: one encoder's, one per prompt) the
    diffusion model reads: up to its end token when the model reads no padding; None: all."""
    if arch.padded:
        return None
    enc = next(e for e in arch.encoders if e.spec.per_token)
    return tuple(end_index(list(chunk), enc.special) + 1 for chunk in chunks)


def read_positions(features: torch.Tensor, lengths) -> torch.Tensor:
    """``features`` (prompts × positions × width) as one (positions × width) matrix: every
    position, or the first ``lengths[p]`` of prompt ``p`` (:func:`read_lengths`)."""
    if lengths is None:
        return features.reshape(-1, features.shape[-1])
    return torch.cat([f[:n] for f, n in zip(features, lengths)])


def _max_padding(arch: Architecture, segment: int) -> int | None:
    limits = [arch.encoders[i].spec.max_padding for i in arch.segments[segment]]
    return min((n for n in limits if n is not None), default=None)


def solved_alignments(arch: Architecture, alignments):
    """The alignments as the solve constrains them: at most ``TextEncoderSpec.max_padding`` padding
    positions in a segment whose encoder sets one (the figures still measure every position read)."""
    limits = [_max_padding(arch, s) for s in range(len(arch.segments))]
    if all(n is None for n in limits):
        return alignments
    parts = [split(arch, alignments, s) for s in range(len(limits))]
    return [merge_alignments([p[j] if n is None else first_padding(p[j], n) for n, p in zip(limits, parts)],
                             arch.segment_offsets) for j in range(len(alignments))]


def pair_columns(arch: Architecture, alignments) -> Columns:
    """Every column of aligned prompt pairs that the diffusion model reads (no padding position
    when it reads none): what the figures measure on prompts the solve did not see."""
    return Columns.from_alignments(alignments, arch.context, padding=None if arch.padded else [0] * len(alignments))


def _fitted_template_padding(arch: Architecture, request: Request, templates: int, padding: list, columns_with):
    """``padding`` with the templates' entries lowered (:func:`contexts.spread_padding`, then
    :func:`contexts.fitted_padding` if the erasure would still overflow the rank budget), and
    the notes that say so."""
    requested, n = request.template_padding, len(request.concepts)
    fitted, notes = spread_padding(requested, templates), []
    if fitted < requested:
        notes.append(f"template_padding {requested} lowered to {fitted}: the {templates} templates of {n} concept(s) "
                     f"share the padding positions of {PADDING_TEMPLATES} ({requested * PADDING_TEMPLATES} in all)")
    with_fitted = [fitted] * templates + padding[templates:]
    if fitted > 0 and columns_with(with_fitted).n_erasure > arch.context_width:
        bare = columns_with([0] * templates + padding[templates:]).n_erasure
        padded = sum(_max_padding(arch, s) != 0 for s in range(len(arch.segments)))  # a capped one counts too
        budget_fitted = fitted_padding(fitted, bare, templates * padded, arch.context_width)
        if budget_fitted < fitted:
            fitted, notes = budget_fitted, [
                f"template_padding {requested} lowered to {budget_fitted}: {n} concept(s) with that padding would "
                f"overflow the UNet's {arch.context_width}-direction rank budget"]
    return [fitted] * templates + padding[templates:], notes


def build_batches(host: Host, arch: Architecture, request: Request) -> Batches:
    pairs = prompt_pairs(request.concepts)
    templates = len(pairs)  # the concepts' templates come first, their context sentences after
    every_position = request.every_position
    padding, suffix = [request.template_padding if every_position else None] * len(pairs), [True] * len(pairs)
    if every_position and request.context_templates:
        contexts = context_prompt_pairs(request.concepts, request.context_templates)
        pairs, padding = pairs + contexts, padding + [request.context_padding] * len(contexts)
        suffix += [request.context_suffix] * len(contexts)
    if not arch.padded:  # the model never reads a position past the end token
        padding = [0] * len(pairs)
    alignments, target_ids, anchor_ids = align_prompts(host, arch, pairs)
    alignments = solved_alignments(arch, alignments)
    kept = request.preserve_prompts()
    preserve_tokens = preserve_ids(host, arch, kept) if kept else None
    exact = request.method == "erasepro" and preserve_tokens is not None
    preserve = preserve_alignments(arch, kept, preserve_tokens) if exact else ()

    def columns_with(padding, segment=None):
        if segment is None:
            return Columns.from_alignments(alignments, arch.context, last_token_only=request.features == "last_token",
                                           padding=padding, suffix=suffix, preserve=preserve)
        return Columns.from_alignments(split(arch, alignments, segment), arch.segment_context(segment),
                                       last_token_only=request.features == "last_token", padding=padding,
                                       suffix=suffix, preserve=split(arch, preserve, segment))

    notes = []
    if every_position and arch.padded and request.fit_padding and request.template_padding > 0:
        padding, notes = _fitted_template_padding(arch, request, templates, padding, columns_with)
    if every_position and arch.padded and arch.bridged and request.fit_padding and request.template_padding < ALL_PADDING:
        # A pair of different token counts aligns no padding: its padding columns would ask for the
        # anchor's padding one position along, which every prompt's padding there shares (one object
        # on SD1.5: unlisted drift 0.115 -> 0.033, UCE 0.057; held-out residual 0.675 -> 0.602).
        padding = [0 if al.shifted else n for al, n in zip(alignments, padding)]
    columns = columns_with(padding)
    soft = preserve_tokens is not None and (request.method == "uce" or request.preserve_strength > 0)
    token_encoder = next(i for i, enc in enumerate(arch.encoders) if enc.spec.per_token)
    kept_lengths = None if preserve_tokens is None else read_lengths(arch, preserve_tokens[token_encoder])
    segment_columns, first_segment = (), None
    if len(arch.segments) > 1:
        segment_columns = tuple(columns_with(padding, s) for s in range(len(arch.segments)))
        first_segment = split(arch, alignments, 0)
    return Batches(pairs, alignments, target_ids, anchor_ids, kept, preserve_tokens, columns, exact, soft, notes,
                   token_encoder, kept_lengths, segment_columns, first_segment)
