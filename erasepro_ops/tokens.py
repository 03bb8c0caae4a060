"""Token ids: ComfyUI's token format read as plain integer ids, and the tokenizer's special ids.

Everything downstream works on plain integer token ids, so the same code serves ComfyUI's CLIP
tokens (:func:`token_chunks` reads its format) and a plain test tokenizer.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["SpecialTokens", "overflow", "token_chunks", "token_ids"]


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


def token_ids(ids: Sequence[object]) -> list[int]:
    """One chunk's tokens (ints or ComfyUI ``(token, weight[, word_id])`` tuples) as integer ids."""
    return [_token_id(item) for item in ids]


def _is_chunk(value: object) -> bool:
    """A chunk is a list or tuple of tokens; a ComfyUI (token, weight) tuple is one token."""
    return isinstance(value, (list, tuple)) and not _is_weighted(value)


def overflow(ids_chunks: object, key: str | None = None) -> bool:
    """Whether a tokenised prompt needed more than one context chunk (the UI warns on it)."""
    return len(token_chunks(ids_chunks, key)) > 1


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special ids: ``start`` (None when the tokenizer adds none), ``end``, and
    ``pad`` (clip_l pads with the end token, clip_g with 0). ``end`` None: the tokenizer adds no
    end token and the prompt's last token before the padding takes its place (Qwen3 under
    Z-Image's chat template, which ends every prompt with the same tokens)."""

    start: int | None
    end: int | None
    pad: int

    def __post_init__(self) -> None:
        if self.start is not None and self.start == self.end:
            raise ValueError("start and end tokens must differ")
