"""Concept pairs, their prompt templates, and token alignment (DESIGN §3).

A concept pair (target ``t``, anchor ``a``) expands into prompt templates; template ``τ`` gives
the target prompt ``τ(t)`` and the anchor prompt ``τ(a)``. Both prompts are tokenised with the
model's own tokenizer and :func:`align` / :func:`align_chunks` decide, position by position,
which features the edit must keep (the shared prefix) and which it must move (the target's
concept tokens and every later position up to the context length), and which anchor position
each moved position is aligned with.

Everything here works on plain integer token ids, so the same code serves ComfyUI's CLIP
tokens (:func:`token_chunks` reads its format) and a plain test tokenizer.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .text import quote

__all__ = [
    "CONCEPT_TYPES",
    "TEMPLATES",
    "ROLE_PRIORITY",
    "PART_NAMES",
    "ConceptPair",
    "expand",
    "fill",
    "token_chunks",
    "overflow",
    "SpecialTokens",
    "preserve_alignment",
    "CLIP_L",
    "CLIP_G",
    "PromptAlignment",
    "align",
    "align_chunks",
]

CONCEPT_TYPES = ("object", "style", "nudity", "custom")

PLACEHOLDER = "{}"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "{}",
        "a photo of a {}",
        "an image of {}",
        "a picture of {}",
        "a close-up photo of {}",
        "{} in a scene",
        "a photo of the {}",
        "a rendering of a {}",
    ),
    "style": (
        "{}",
        "a painting by {}",
        "art in the style of {}",
        "an artwork by {}",
        "a drawing by {}",
        "a picture in the style of {}",
        "a painting in the style of {}",
        "an illustration by {}",
    ),
    "nudity": (
        "{}",
        "a {} person",
        "a photo of a {} person",
        "{} body",
        "a {} figure",
    ),
    "custom": ("{}",),
}

ROLE_PRIORITY: dict[str, int] = {
    "keep": 0, "concept": 1, "suffix": 1, "end": 2, "preserve": 3, "pad": 4, "preserve_pad": 5,
}
"""Order in which the rank budget is spent (DESIGN §3): keep-constraints, concept tokens (and
the template words after them), the end token, the preserve prompts' own tokens, the target's
padding, then the preserve prompts' padding (the solver sorts each group by decreasing energy).
Lower is spent first."""

PART_NAMES: dict[int, str] = {
    ROLE_PRIORITY["keep"]: "prefixes", ROLE_PRIORITY["concept"]: "concept tokens", ROLE_PRIORITY["end"]: "end tokens",
    ROLE_PRIORITY["preserve"]: "preserve prompts", ROLE_PRIORITY["pad"]: "padding",
    ROLE_PRIORITY["preserve_pad"]: "preserve padding",
}
"""What each priority group is called in the summary (concept tokens include the template words after them)."""


# --------------------------------------------------------------------------------------------
# Concept pairs and templates
# --------------------------------------------------------------------------------------------


def _squash(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def _tidy(text: str) -> str:
    """Whitespace-normalise a prompt and drop spaces left before punctuation."""
    return re.sub(r"\s+([,.;:!?])", r"\1", _squash(text))


def _template_lines(prompts: str | Iterable[str] | None) -> tuple[str, ...]:
    """Custom templates as a tuple: a string is split into lines; blank lines are dropped."""
    if prompts is None:
        return ()
    lines = prompts.splitlines() if isinstance(prompts, str) else list(prompts)
    for line in lines:
        if not isinstance(line, str):
            raise ValueError(f"custom prompt templates must be strings, got {line!r}")
    return tuple(_squash(line) for line in lines if line.strip())


def _check_template(template: str) -> None:
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise ValueError(
            f"custom prompt template {quote(template, 12, 100)} must contain '{{}}' exactly once "
            f"(found {count}); '{{}}' marks where the concept goes, e.g. 'a photo of {{}}'"
        )


@dataclass(frozen=True)
class ConceptPair:
    """One concept to erase: ``target`` is replaced by ``anchor`` ("" means "nothing").

    ``concept_type`` picks the built-in templates (:data:`TEMPLATES`). ``prompts`` are custom
    templates, each containing ``{}`` exactly once where the concept goes; with
    ``concept_type="custom"`` they are the only templates (plus the bare concept), with any
    other type they are added to that type's templates. ``prompts`` may be given as a
    multi-line string; blank lines are ignored.

    On construction the target and anchor are whitespace-normalised, ``concept_type`` is
    lower-cased, and ``prompts`` becomes a tuple. Invalid pairs raise ``ValueError``: an empty
    target, a target equal to the anchor (ignoring case and spacing), an unknown type, a
    template without exactly one ``{}``, or type "custom" without templates.
    """

    target: str
    anchor: str = ""
    concept_type: str = "object"
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError("the target concept is empty: name the concept to erase")
        if self.anchor is None:
            object.__setattr__(self, "anchor", "")
        if not isinstance(self.anchor, str):
            raise ValueError(f"the anchor must be a string, got {self.anchor!r}")
        object.__setattr__(self, "target", _squash(self.target))
        object.__setattr__(self, "anchor", _squash(self.anchor))
        if self.target.casefold() == self.anchor.casefold():
            raise ValueError(
                f"target and anchor are the same concept ({quote(self.target)}): "
                "the anchor must be what the target turns into, or empty for 'nothing'"
            )

        kind = str(self.concept_type).strip().lower()
        if kind not in CONCEPT_TYPES:
            raise ValueError(
                f"unknown concept_type {self.concept_type!r}; expected one of {', '.join(CONCEPT_TYPES)}"
            )
        object.__setattr__(self, "concept_type", kind)

        lines = _template_lines(self.prompts)
        for line in lines:
            _check_template(line)
        object.__setattr__(self, "prompts", lines)
        if kind == "custom" and not lines:
            raise ValueError(
                "concept_type 'custom' needs prompt templates: one per line, each with '{}' "
                "where the concept goes"
            )

    @property
    def templates(self) -> tuple[str, ...]:
        """The templates this pair expands into, de-duplicated, the bare concept first."""
        seen: dict[str, None] = {PLACEHOLDER: None}
        for template in TEMPLATES[self.concept_type] + self.prompts:
            seen.setdefault(_squash(template), None)
        return tuple(seen)


def fill(template: str, concept: str) -> str:
    """The prompt ``template`` gives for ``concept``; an empty concept removes the slot.

    Filling with "" is the empty-anchor rule: the template with the concept removed, whitespace
    normalised ("a photo of a {}" -> "a photo of a", "{}" -> "").
    """
    return _tidy(template.replace(PLACEHOLDER, concept, 1))


def expand(pair: ConceptPair) -> list[tuple[str, str]]:
    """``(target_prompt, anchor_prompt)`` for every template of ``pair``.

    Templates are the concept type's (or only the custom lines, for ``concept_type ==
    "custom"``; custom lines given with another type are added to the type's templates),
    de-duplicated, always including the bare concept ``"{}"``. An empty anchor gives the
    template with the concept removed, whitespace normalised ("a photo of a {}" -> "a photo
    of a"). Pairs that come out identical are listed once, in template order.
    """
    pairs: dict[tuple[str, str], None] = {}
    for template in pair.templates:
        pairs.setdefault((fill(template, pair.target), fill(template, pair.anchor)), None)
    return list(pairs)


# --------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------


def _is_weighted(item: object) -> bool:
    """Whether ``item`` is a ComfyUI ``(token, weight)`` or ``(token, weight, word_id)`` tuple."""
    return (
        isinstance(item, tuple)
        and len(item) in (2, 3)
        and isinstance(item[1], numbers.Real)
        and not isinstance(item[1], numbers.Integral)
    )


def _token_id(item: object) -> int:
    """An integer id from an int or a ComfyUI ``(token, weight[, word_id])`` tuple."""
    token = item[0] if _is_weighted(item) else item
    if isinstance(token, numbers.Integral) and not isinstance(token, bool):
        return int(token)
    if hasattr(token, "shape") and hasattr(token, "dtype"):
        raise ValueError(
            "textual-inversion embeddings are not supported in concepts (a prompt contains an "
            "'embedding:' token); write the concept and its templates as plain text"
        )
    raise ValueError(f"expected an integer token id, got {token!r}")


def token_chunks(tokens: object, key: str | None = None) -> list[list[int]]:
    """Normalise tokens to a list of chunks of integer ids.

    Accepts ComfyUI's format: a dict encoder name -> list of chunks, each chunk a list of
    ``(token, weight)`` or ``(token, weight, word_id)`` tuples; ``key`` picks the encoder
    (default: the first key, e.g. "l" for SD1.x, "g" for SDXL). Weights are ignored. Also
    accepts a flat list of ints (one chunk) or a list of lists of ints. A token that is a
    tensor is a textual-inversion embedding and raises ``ValueError``, as does any other
    non-integer token.
    """
    if isinstance(tokens, Mapping):
        if not tokens:
            raise ValueError("no tokens: the tokenizer returned an empty dict")
        if key is None:
            key = next(iter(tokens))
        if key not in tokens:
            raise ValueError(f"no tokens for encoder {key!r}; available: {', '.join(map(str, tokens))}")
        tokens = tokens[key]

    if hasattr(tokens, "tolist") and not isinstance(tokens, Sequence):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or not tokens:
        raise ValueError(f"expected token ids (a non-empty list), got {tokens!r:.80}")

    if all(_is_chunk(chunk) for chunk in tokens):
        return [[_token_id(item) for item in chunk] for chunk in tokens]
    return [[_token_id(item) for item in tokens]]


def _is_chunk(value: object) -> bool:
    """A chunk is a list or tuple of tokens; a ComfyUI (token, weight) tuple is one token."""
    return isinstance(value, (list, tuple)) and not _is_weighted(value)


def overflow(ids_chunks: object, key: str | None = None) -> bool:
    """Whether a tokenised prompt needed more than one context chunk (the UI warns on it)."""
    return len(token_chunks(ids_chunks, key)) > 1


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special ids: ``start`` (None when the tokenizer adds none), ``end``, and
    ``pad`` (clip_l pads with the end token, clip_g with 0)."""

    start: int | None
    end: int
    pad: int

    def __post_init__(self) -> None:
        if self.start is not None and self.start == self.end:
            raise ValueError("start and end tokens must differ")


CLIP_L = SpecialTokens(start=49406, end=49407, pad=49407)
CLIP_G = SpecialTokens(start=49406, end=49407, pad=0)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


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
    """

    target_prompt: str
    anchor_prompt: str
    target_chunk: int
    anchor_chunk: int
    keep: tuple[int, ...]
    move: tuple[int, ...]
    partner: tuple[int, ...]
    role: tuple[str, ...]

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


def _ids(ids: Sequence[object]) -> list[int]:
    return [_token_id(item) for item in ids]


def _end_index(ids: Sequence[int], special: SpecialTokens, what: str) -> int:
    """Index of the end token: the first ``special.end`` after the start token."""
    first = 1 if special.start is not None and ids and ids[0] == special.start else 0
    for index in range(first, len(ids)):
        if ids[index] == special.end:
            return index
    raise ValueError(f"the {what} tokens have no end token (id {special.end})")


def preserve_alignment(prompt: str, ids: Sequence[object], special: SpecialTokens) -> PromptAlignment:
    """A preserve prompt paired with itself in the original model.

    Every position is a constraint asking for the original features (``V* = W_o K``): the
    positions up to the end token as role "preserve", the padding after it as "preserve_pad".
    """
    chunk = _ids(ids)
    end = _end_index(chunk, special, f"preserve prompt {quote(prompt)}")
    positions = tuple(range(len(chunk)))
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
) -> PromptAlignment:
    """Build the alignment once the concept spans are known.

    Both spans start at ``start`` (the common prefix); the target's is ``target_len`` tokens,
    the anchor's ``anchor_len``. The k-th-from-last target concept token pairs with the
    k-th-from-last anchor concept token, clamped to the anchor's first concept token. With an
    empty anchor every concept token pairs with the last prefix position (``start - 1``, the
    start token for a bare "{}"). Position ``target_end + k`` pairs with ``anchor_end + k``,
    clamped to ``context_length - 1``.

    Why not the anchor's end token (DESIGN §3's first rule): the encoders are causal, so a
    target concept token's features depend only on the prefix, while the end token's depend on
    the template's suffix too. Two templates with one prefix ("{}", "{} body") then ask the
    same target column for two different outputs, and no edit can meet both (measured: train
    residual 0.13 on a nudity solve). The last prefix position depends on the prefix alone.
    """
    target_end_token = _end_index(target_ids, special, "target")
    _end_index(anchor_ids, special, "anchor")  # the anchor chunk must be well formed too
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

    return PromptAlignment(
        target_prompt=target_prompt,
        anchor_prompt=anchor_prompt,
        target_chunk=target_chunk,
        anchor_chunk=anchor_chunk,
        keep=tuple(range(start)),
        move=tuple(range(start, context_length)),
        partner=tuple(partner),
        role=tuple(role),
    )


def align(
    target_ids: Sequence[int],
    anchor_ids: Sequence[int],
    special: SpecialTokens,
    *,
    context_length: int = 77,
    anchor_empty: bool = False,
    target_prompt: str = "",
    anchor_prompt: str = "",
) -> PromptAlignment:
    """Align one context chunk of a target prompt with the same chunk of its anchor prompt.

    The concept tokens are where the two id sequences differ. Padding after the end token is
    stripped first. ``p`` is the longest common prefix (the start token and the template words
    before ``{}``), ``s`` the longest common suffix of the real tokens (the template words after
    ``{}`` and the end token), not overlapping the prefix. The target's concept span is
    ``target[p : len_t - s]``, the anchor's ``anchor[p : len_a - s]`` (empty for an empty
    anchor).

    ``keep`` is ``0..p-1``; ``move`` is ``p..context_length-1``. Pairing: the k-th-from-last
    target concept token with the k-th-from-last anchor concept token, clamped to the anchor's
    first concept token; with an empty anchor (``anchor_empty`` or an empty anchor span) every
    concept token pairs with the anchor's end token. Later positions pair by their offset after
    each span (``target_end + k`` with ``anchor_end + k``, clamped to ``context_length - 1``).

    Raises ``ValueError`` when both prompts tokenize identically, when the target has no
    concept tokens of its own, when a sequence has no end token, or when a sequence is longer
    than ``context_length`` (use :func:`align_chunks`).
    """
    target = _ids(target_ids)
    anchor = _ids(anchor_ids)
    _check_chunk(target, context_length, "target")
    _check_chunk(anchor, context_length, "anchor")
    target_real = target[: _end_index(target, special, "target") + 1]
    anchor_real = anchor[: _end_index(anchor, special, "anchor") + 1]
    if target_real == anchor_real:
        raise _identical_error(target_prompt, anchor_prompt)

    prefix = _common_prefix(target_real, anchor_real)
    limit = min(len(target_real), len(anchor_real)) - prefix
    suffix = _common_suffix(target_real, anchor_real, limit)
    target_len = len(target_real) - suffix - prefix
    if target_len <= 0:
        raise _empty_span_error(target_prompt, anchor_prompt)

    return _pairing(
        target,
        anchor,
        special,
        start=prefix,
        target_len=target_len,
        anchor_len=len(anchor_real) - suffix - prefix,
        context_length=context_length,
        anchor_empty=anchor_empty,
        target_prompt=target_prompt,
        anchor_prompt=anchor_prompt,
        target_chunk=0,
        anchor_chunk=0,
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
        stop = _end_index(chunk, special, f"{what} chunk {index}")
        chunk_start.append(len(ids))
        for pos in range(first, stop):
            ids.append(chunk[pos])
            chunk_of.append(index)
            position.append(pos)
    return _Stream(tuple(ids), tuple(chunk_of), tuple(position), tuple(chunk_start))


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
) -> PromptAlignment:
    """Align prompts of any length, tokenised into context chunks (ComfyUI: 77 = start + 75 +
    end/padding), using the chunk that holds the concept.

    The chunks' real tokens (start, end and padding removed) are joined into one stream per
    prompt, and the concept spans are found there with the same prefix/suffix rule as
    :func:`align`; the concept chunk is the one holding the target's concept tokens (the first
    chunk where target and anchor ids differ). The anchor's chunk of the same index is used:
    the two prompts are chunked alike up to the concept and differ only after it, so
    "template suffix" and later positions follow the usual offset rule inside that chunk.

    Raises ``ValueError`` when the target's concept straddles two chunks, when the anchor has
    no chunk of that index or is chunked differently before the concept, or for the cases
    :func:`align` rejects. Accepts anything :func:`token_chunks` does (``key`` picks the
    encoder in ComfyUI's dict).
    """
    targets = token_chunks(target_chunks, key)
    anchors = token_chunks(anchor_chunks, key)
    for index, chunk in enumerate(targets):
        _check_chunk(chunk, context_length, f"target chunk {index}")
    for index, chunk in enumerate(anchors):
        _check_chunk(chunk, context_length, f"anchor chunk {index}")

    target = _stream(targets, special, "target")
    anchor = _stream(anchors, special, "anchor")
    if target.ids == anchor.ids:
        raise _identical_error(target_prompt, anchor_prompt)

    prefix = _common_prefix(target.ids, anchor.ids)
    limit = min(len(target.ids), len(anchor.ids)) - prefix
    suffix = _common_suffix(target.ids, anchor.ids, limit)
    target_len = len(target.ids) - suffix - prefix
    anchor_len = len(anchor.ids) - suffix - prefix
    if target_len <= 0:
        raise _empty_span_error(target_prompt, anchor_prompt)

    chunks = set(target.chunk[prefix : prefix + target_len])
    if len(chunks) > 1:
        raise ValueError(
            f"the concept in {quote(target_prompt or 'the target prompt')} straddles "
            f"{'two' if len(chunks) == 2 else len(chunks)} {context_length}-token chunks "
            f"(chunks {min(chunks)}–{max(chunks)}); shorten the prompt or move "
            "the concept nearer its start"
        )
    index = chunks.pop()
    if index >= len(anchors):
        raise ValueError(
            f"the concept sits in chunk {index} of the target prompt but the anchor prompt "
            f"{quote(anchor_prompt)} has only {len(anchors)} chunk(s); shorten the prompt"
        )
    if anchor.chunk_start[index] != target.chunk_start[index]:
        raise ValueError(
            f"target and anchor prompts split into {context_length}-token chunks differently "
            "before the concept; shorten the prompt or move the concept nearer its start"
        )

    start = target.position[prefix]
    anchor_stop = start + anchor_len
    anchor_end = _end_index(anchors[index], special, f"anchor chunk {index}")
    if anchor_stop > anchor_end:
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
    )
