"""Token alignment: which positions of a target prompt the edit keeps, which it moves, and the
anchor position each moved position is aligned with (docs/DESIGN.md, *Columns*).

Both prompts of a template are tokenised with the model's own tokenizer; :func:`align_chunks`
finds the target's concept tokens as the span where the two id sequences differ and pairs every
position from there to the end of the context chunk with an anchor position. Preserve prompts are
paired with themselves (:func:`preserve_alignment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .text import quote
from .tokens import SpecialTokens, token_chunks, token_ids

__all__ = ["ROLE_PRIORITY", "PART_NAMES", "PromptAlignment", "align_chunks", "merge_alignments", "preserve_alignment",
           "segment_part", "first_padding", "limit_padding", "end_index"]

ROLE_PRIORITY: dict[str, int] = {
    "keep": 0, "prefix": 0, "concept": 1, "suffix": 1, "end": 2, "preserve": 3, "pad": 4, "preserve_pad": 5,
}
"""The order in which the solver fits the constraint groups, lower first (docs/DESIGN.md, *Rank
budget*): keep-constraints (or, in a bidirectional encoder, the prefix paired with the anchor's), concept tokens (and the template words after them), the end token,
the preserve prompts' own tokens, the target's padding, then the preserve prompts' padding. Within
a group the directions are taken by decreasing singular value. The two preserve groups do not
count toward the rank budget (``chain.PRESERVE_GROUPS``)."""

PART_NAMES: dict[int, str] = {
    ROLE_PRIORITY["keep"]: "prefixes", ROLE_PRIORITY["concept"]: "concept tokens", ROLE_PRIORITY["end"]: "end tokens",
    ROLE_PRIORITY["preserve"]: "preserve prompts", ROLE_PRIORITY["pad"]: "padding",
    ROLE_PRIORITY["preserve_pad"]: "preserve padding",
}
"""What each priority group is called in the summary (concept tokens include the template words after them)."""



@dataclass(frozen=True)
class PromptAlignment:
    """Positions (within one context chunk of length ``context_length``) of one template's
    target prompt, and their anchor partners.

    ``keep`` (positions ``0..p-1``: start token and template words before the concept) are
    identical in both prompts and become keep-constraints. ``move`` (``p..context_length-1``:
    the target's concept tokens and every later position) are aligned to the anchor positions
    in ``partner``; ``role`` names each moved position: "concept", "suffix" (template words
    after the concept), "end" (the end token) or "pad" (after the end token). ``keep`` and
    ``move`` are disjoint and together cover ``0..context_length-1``.

    In a bidirectional encoder (T5) the prefix sees the concept too, so nothing is kept: ``keep``
    is empty and the prefix positions are moved with role "prefix", each paired with the same
    position of the anchor prompt (whose prefix holds the same tokens).
    """

    target_prompt: str
    anchor_prompt: str
    target_chunk: int
    anchor_chunk: int
    keep: tuple[int, ...]
    move: tuple[int, ...]
    partner: tuple[int, ...]
    role: tuple[str, ...]

    @property
    def shifted(self) -> bool:
        """Whether some moved position's partner sits elsewhere: target and anchor tokenize to
        different lengths (or the anchor is empty)."""
        return self.move != self.partner

    def __post_init__(self) -> None:
        if not len(self.move) == len(self.partner) == len(self.role):
            raise ValueError("move, partner and role must have the same length")

    @property
    def context_length(self) -> int:
        return len(self.keep) + len(self.move)

    def positions(self, role: str) -> tuple[int, ...]:
        """Target positions with the given role ("keep" gives ``keep``)."""
        if role == "keep":
            return self.keep
        return tuple(pos for pos, r in zip(self.move, self.role) if r == role)

    def columns(self) -> tuple[tuple[int, int, str], ...]:
        """Every constrained position as ``(target_position, anchor_position, role)``, ordered
        by :data:`ROLE_PRIORITY` then position; a keep position is its own partner."""
        rows = [(pos, pos, "keep") for pos in self.keep]
        rows += list(zip(self.move, self.partner, self.role))
        return tuple(sorted(rows, key=lambda row: (ROLE_PRIORITY[row[2]], row[0])))


def merge_alignments(parts: Sequence[PromptAlignment], offsets: Sequence[int]) -> PromptAlignment:
    """One alignment over segments that follow one another along the tokens (SD3: CLIP's 77
    positions, then T5's), each part's positions and partners shifted by its segment's offset."""
    if len(parts) == 1 and offsets[0] == 0:
        return parts[0]

    def shifted(name):
        return tuple(p + o for al, o in zip(parts, offsets) for p in getattr(al, name))
    first = parts[0]
    return PromptAlignment(first.target_prompt, first.anchor_prompt, first.target_chunk, first.anchor_chunk,
                           shifted("keep"), shifted("move"), shifted("partner"), tuple(r for al in parts for r in al.role))


def limit_padding(rows, limit: int) -> list:
    """``rows`` (position, partner, role) with only the first ``limit`` of each run of padding
    positions (a run is one segment's padding, after its end token)."""
    out, run = [], 0
    for row in rows:
        run = run + 1 if row[2] == "pad" else 0
        if run <= limit:
            out.append(row)
    return out


def first_padding(al: PromptAlignment, n: int) -> PromptAlignment:
    """``al`` (one segment's) with only its first ``n`` padding positions (role "pad")."""
    rows = limit_padding(zip(al.move, al.partner, al.role), n)
    return PromptAlignment(al.target_prompt, al.anchor_prompt, al.target_chunk, al.anchor_chunk, al.keep,
                           tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))


def segment_part(al: PromptAlignment, offset: int, length: int) -> PromptAlignment:
    """The positions of ``al`` in ``[offset, offset + length)`` shifted back to 0: one segment of a
    :func:`merge_alignments` result (its partners lie in the same segment)."""
    if offset == 0 and all(p < length for p in al.move + al.keep):
        return al
    inside = range(offset, offset + length)
    rows = [(m - offset, p - offset, r) for m, p, r in zip(al.move, al.partner, al.role) if m in inside]
    return PromptAlignment(al.target_prompt, al.anchor_prompt, al.target_chunk, al.anchor_chunk,
                           tuple(k - offset for k in al.keep if k in inside), tuple(r[0] for r in rows),
                           tuple(r[1] for r in rows), tuple(r[2] for r in rows))


def end_index(ids: Sequence[int], special: SpecialTokens, what: str = "prompt") -> int:
    """Index of the end token: the first ``special.end`` after the start token; without an end
    token (``special.end`` None) the last token before the first padding token."""
    first = 1 if special.start is not None and ids and ids[0] == special.start else 0
    if special.end is None:
        stop = next((i for i in range(first, len(ids)) if ids[i] == special.pad), len(ids))
        if stop > first:
            return stop - 1
        raise ValueError(f"the {what} tokens are empty")
    for index in range(first, len(ids)):
        if ids[index] == special.end:
            return index
    raise ValueError(f"the {what} tokens have no end token (id {special.end})")


def preserve_alignment(prompt: str, ids: Sequence[object], special: SpecialTokens, padded: bool = True) -> PromptAlignment:
    """A preserve prompt paired with itself in the original model.

    Every position is a constraint asking for the original features (``V* = W_o K``): the
    positions up to the end token as role "preserve", the padding after it as "preserve_pad"
    (none when the model reads no padding, ``padded`` False).
    """
    chunk = token_ids(ids)
    end = end_index(chunk, special, f"preserve prompt {quote(prompt)}")
    positions = tuple(range(len(chunk) if padded else end + 1))
    roles = tuple("preserve" if p <= end else "preserve_pad" for p in positions)
    return PromptAlignment(prompt, prompt, 0, 0, (), positions, positions, roles)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    while n < limit and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _identical_error(target_prompt: str, anchor_prompt: str) -> ValueError:
    return ValueError(
        f"target and anchor tokenize identically ({quote(target_prompt)} vs {quote(anchor_prompt)}): "
        "nothing to erase; choose an anchor that differs from the target"
    )


def _empty_span_error(target_prompt: str, anchor_prompt: str) -> ValueError:
    return ValueError(
        f"the target prompt {quote(target_prompt)} has no tokens of its own against the anchor "
        f"prompt {quote(anchor_prompt)}: the concept must add tokens the anchor does not have"
    )


def _check_chunk(ids: Sequence[int], context_length: int, what: str) -> None:
    if len(ids) > context_length:
        raise ValueError(
            f"the {what} tokens ({len(ids)}) are longer than one context chunk "
            f"({context_length}); pass them as chunks to align_chunks"
        )


def _spans(target: Sequence[int], anchor: Sequence[int], target_prompt: str, anchor_prompt: str) -> tuple[int, int, int]:
    """``(p, target_len, anchor_len)``: the concept spans where two token sequences differ.

    ``p`` is the longest common prefix, ``s`` the longest common suffix not overlapping it; the
    target's concept span is ``target[p : len_t - s]``, the anchor's ``anchor[p : len_a - s]``
    (empty for an empty anchor). Raises ``ValueError`` when the sequences are identical or the
    target has no tokens of its own.
    """
    if tuple(target) == tuple(anchor):
        raise _identical_error(target_prompt, anchor_prompt)
    prefix = _common_prefix(target, anchor)
    limit = min(len(target), len(anchor)) - prefix
    suffix = _common_suffix(target, anchor, limit)
    target_len = len(target) - suffix - prefix
    if target_len <= 0:
        raise _empty_span_error(target_prompt, anchor_prompt)
    return prefix, target_len, len(anchor) - suffix - prefix


def _partners(start: int, target_len: int, anchor_len: int, target_end_token: int, context_length: int,
              anchor_empty: bool) -> tuple[list[int], list[str]]:
    """The anchor partner and the role of every moved position ``start..context_length-1``."""
    target_stop = start + target_len
    anchor_stop = start + anchor_len
    last = context_length - 1
    partner: list[int] = []
    role: list[str] = []
    for offset in range(target_len):
        from_last = target_len - 1 - offset
        if anchor_empty or anchor_len == 0:
            partner.append(max(start - 1, 0))
        else:
            partner.append(start + max(anchor_len - 1 - from_last, 0))
        role.append("concept")
    for position in range(target_stop, context_length):
        partner.append(min(anchor_stop + position - target_stop, last))
        if position < target_end_token:
            role.append("suffix")
        elif position == target_end_token:
            role.append("end")
        else:
            role.append("pad")
    return partner, role


def _pairing(
    target_ids: Sequence[int],
    anchor_ids: Sequence[int],
    special: SpecialTokens,
    *,
    start: int,
    target_len: int,
    anchor_len: int,
    context_length: int,
    anchor_empty: bool,
    target_prompt: str,
    anchor_prompt: str,
    target_chunk: int,
    anchor_chunk: int,
    bidirectional: bool = False,
) -> PromptAlignment:
    """Build the alignment once the concept spans are known.

    Both spans start at ``start`` (the common prefix); the target's is ``target_len`` tokens,
    the anchor's ``anchor_len``. The k-th-from-last target concept token pairs with the
    k-th-from-last anchor concept token, clamped to the anchor's first concept token. With an
    empty anchor every concept token pairs with the last prefix position (``start - 1``, the
    start token for a bare "{}"). Position ``target_end + k`` pairs with ``anchor_end + k``,
    clamped to ``context_length - 1``.

    Why not the anchor's end token: the encoders are causal, so a target concept token's
    features depend only on the prefix, while the end token's depend on the template's suffix
    too. Two templates with one prefix ("{}", "{} body") would then ask the same target column
    for two different outputs, and no edit can meet both. The last prefix position depends on
    the prefix alone.
    """
    target_end_token = end_index(target_ids, special, "target")
    end_index(anchor_ids, special, "anchor")  # the anchor chunk must be well formed too
    partner, role = _partners(start, target_len, anchor_len, target_end_token, context_length, anchor_empty)
    kept = start
    if bidirectional:
        partner, role, kept = list(range(start)) + partner, ["prefix"] * start + role, 0
    return PromptAlignment(
        target_prompt=target_prompt,
        anchor_prompt=anchor_prompt,
        target_chunk=target_chunk,
        anchor_chunk=anchor_chunk,
        keep=tuple(range(kept)),
        move=tuple(range(kept, context_length)),
        partner=tuple(partner),
        role=tuple(role),
    )


@dataclass(frozen=True)
class _Stream:
    """A chunked prompt's real tokens in order, without start, end and padding tokens, with the
    chunk and position each came from."""

    ids: tuple[int, ...]
    chunk: tuple[int, ...]
    position: tuple[int, ...]
    chunk_start: tuple[int, ...]


def _stream(chunks: Sequence[Sequence[int]], special: SpecialTokens, what: str) -> _Stream:
    ids: list[int] = []
    chunk_of: list[int] = []
    position: list[int] = []
    chunk_start: list[int] = []
    for index, chunk in enumerate(chunks):
        first = 1 if special.start is not None and chunk and chunk[0] == special.start else 0
        stop = end_index(chunk, special, f"{what} chunk {index}")
        chunk_start.append(len(ids))
        for pos in range(first, stop):
            ids.append(chunk[pos])
            chunk_of.append(index)
            position.append(pos)
    return _Stream(tuple(ids), tuple(chunk_of), tuple(position), tuple(chunk_start))


def _concept_chunk(target: _Stream, anchor: _Stream, n_anchor_chunks: int, prefix: int, target_len: int,
                   context_length: int, target_prompt: str, anchor_prompt: str) -> int:
    """The index of the chunk holding the target's concept tokens, after checking the anchor
    prompt is chunked alike up to it."""
    chunks = set(target.chunk[prefix : prefix + target_len])
    if len(chunks) > 1:
        raise ValueError(
            f"the concept in {quote(target_prompt or 'the target prompt')} straddles "
            f"{'two' if len(chunks) == 2 else len(chunks)} {context_length}-token chunks "
            f"(chunks {min(chunks)}–{max(chunks)}); shorten the prompt or move "
            "the concept nearer its start"
        )
    index = chunks.pop()
    if index >= n_anchor_chunks:
        raise ValueError(
            f"the concept sits in chunk {index} of the target prompt but the anchor prompt "
            f"{quote(anchor_prompt)} has only {n_anchor_chunks} chunk(s); shorten the prompt"
        )
    if anchor.chunk_start[index] != target.chunk_start[index]:
        raise ValueError(
            f"target and anchor prompts split into {context_length}-token chunks differently "
            "before the concept; shorten the prompt or move the concept nearer its start"
        )
    return index


def align_chunks(
    target_chunks: object,
    anchor_chunks: object,
    special: SpecialTokens,
    *,
    anchor_empty: bool = False,
    context_length: int = 77,
    target_prompt: str = "",
    anchor_prompt: str = "",
    key: str | None = None,
    bidirectional: bool = False,
) -> PromptAlignment:
    """Align prompts of any length, tokenised into context chunks (ComfyUI: 77 = start + 75 +
    end/padding), using the chunk that holds the concept.

    The chunks' real tokens (start, end and padding removed) are joined into one stream per
    prompt, and the concept spans are where the streams differ: after their longest common
    prefix and before their longest common suffix (:func:`_spans`). The concept chunk is the one
    holding the target's concept tokens. The anchor's chunk of the same index is used: the two
    prompts are chunked alike up to the concept and differ only after it, so template suffix and
    later positions follow the usual offset rule inside that chunk (:func:`_pairing`).

    Raises ``ValueError`` when both prompts tokenize identically, when the target has no concept
    tokens of its own, when a chunk has no end token or is longer than ``context_length``, when
    the target's concept straddles two chunks, or when the anchor has no chunk of that index, is
    chunked differently before the concept or its concept does not fit in that chunk. Accepts
    anything :func:`token_chunks` does (``key`` picks the encoder in ComfyUI's dict).
    ``bidirectional``: the encoder's prefix sees the concept (T5): it is paired, not kept.
    """
    targets = token_chunks(target_chunks, key)
    anchors = token_chunks(anchor_chunks, key)
    for what, chunks in (("target", targets), ("anchor", anchors)):
        for index, chunk in enumerate(chunks):
            _check_chunk(chunk, context_length, f"{what} chunk {index}")

    target = _stream(targets, special, "target")
    anchor = _stream(anchors, special, "anchor")
    prefix, target_len, anchor_len = _spans(target.ids, anchor.ids, target_prompt, anchor_prompt)
    index = _concept_chunk(target, anchor, len(anchors), prefix, target_len, context_length,
                           target_prompt, anchor_prompt)

    start = target.position[prefix]
    anchor_end = end_index(anchors[index], special, f"anchor chunk {index}")
    if start + anchor_len > anchor_end:
        raise ValueError(
            f"the anchor's concept in {quote(anchor_prompt or 'the anchor prompt')} does not fit in "
            f"chunk {index} with the target's; shorten the prompt"
        )

    return _pairing(
        targets[index],
        anchors[index],
        special,
        start=start,
        target_len=target_len,
        anchor_len=anchor_len,
        context_length=context_length,
        anchor_empty=anchor_empty,
        target_prompt=target_prompt,
        anchor_prompt=anchor_prompt,
        target_chunk=index,
        anchor_chunk=index,
        bidirectional=bidirectional,
    )
