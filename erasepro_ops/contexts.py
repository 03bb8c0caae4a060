"""Context sentences: more varied prompts per concept, aligned at the concept and end tokens only.

A concept type's templates (``templates.TEMPLATES``) are short and few, so an edit solved on them
alone generalises poorly to the sentences users write: the concept at other positions, after
adjectives, inside lists, in long prompts. ``data/extra_templates.json`` ships twenty varied
sentences per built-in type. The solve adds the first ``n`` of them for every concept and
constrains only their concept tokens, the template words after them, the end token and the
first ``padding`` positions after it: those few columns per sentence spend little of the rank
budget, where every padding position of twenty more prompts would take 1 500 columns. The same
holds for a concept type's own templates: :data:`DEFAULT_TEMPLATE_PADDING`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .templates import ConceptPair, fill

CONTEXT_FILE = Path(__file__).with_name("data") / "extra_templates.json"

DEFAULT_CONTEXT_TEMPLATES = 0
"""Context sentences added per concept (at most :data:`MAX_CONTEXT_TEMPLATES`); 0 = off."""

DEFAULT_CONTEXT_PADDING = 0
"""Padding positions after a context sentence's end token that are constrained too."""

DEFAULT_CONTEXT_SUFFIX = True
"""Whether a context sentence's words after the concept are constrained too."""

MAX_CONTEXT_TEMPLATES = 20

ALL_PADDING = 77
"""``template_padding`` value that constrains every padding position (one CLIP context chunk)."""

DEFAULT_TEMPLATE_PADDING = 8
"""Padding positions after each template's end token that the erasure aligns exactly. Every
position (:data:`ALL_PADDING`) erases the template prompts themselves to the last digit, but those
near-identical padding columns fill the rank budget and move every prompt's padding with them
(README.md, *Which positions are aligned*, has the figures)."""

PADDING_TEMPLATES = 8
"""A solve's templates share the padding columns of this many (one built-in concept type's):
``template_padding · 8`` in all. The padding columns of many templates are near-duplicates of one
another; aligning all of them exactly made unlisted prompts drift more and unseen sentences be
erased less (ten concepts on SD1.5, and on SDXL, whose 2048 directions hold them), so more
templates get fewer positions each (:func:`spread_padding`; at the default 8: three concepts 2,
ten none)."""

PADDING_BUDGET_SHARE = 0.5
"""When the erasure's columns would overflow the deep sites' width (the rank budget: ten concepts
on SD1.5), the template padding shrinks until they take at most this share of it, to 0 at the
least. The concept and end tokens then stay exact and leave the deep sites room, instead of the
padding filling the budget and being fitted by damped least squares (:func:`fitted_padding`)."""


def spread_padding(requested: int, templates: int) -> int:
    """The largest padding ``≤ requested`` whose columns (``padding · templates``) number at most
    ``requested · PADDING_TEMPLATES``, 0 at the least."""
    return max(0, min(requested, requested * PADDING_TEMPLATES // max(templates, 1)))


def fitted_padding(requested: int, columns_without_padding: int, templates: int, budget: int) -> int:
    """For an erasure that overflows ``budget``: the largest padding ``≤ requested`` whose columns
    (``columns_without_padding + padding · templates``) take at most ``PADDING_BUDGET_SHARE ·
    budget``, 0 at the least."""
    room = int(PADDING_BUDGET_SHARE * budget) - columns_without_padding
    return max(0, min(requested, room // max(templates, 1)))


@lru_cache(maxsize=1)
def _bank() -> dict[str, tuple[str, ...]]:
    data = json.loads(CONTEXT_FILE.read_text(encoding="utf-8"))
    return {kind: tuple(lines) for kind, lines in data.items()}


def context_templates(concept_type: str, n: int) -> tuple[str, ...]:
    """The first ``n`` context sentences of ``concept_type`` (none for "custom")."""
    if n < 0 or n > MAX_CONTEXT_TEMPLATES:
        raise ValueError(f"context templates must be between 0 and {MAX_CONTEXT_TEMPLATES}, got {n}")
    return _bank().get(concept_type, ())[:n]


def context_pairs(pair: ConceptPair, n: int, skip: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(target prompt, anchor prompt)`` of ``pair``'s first ``n`` context sentences, without
    those already in ``skip`` (the pair's own templates) or repeated."""
    out: list[tuple[str, str]] = []
    for template in context_templates(pair.concept_type, n):
        prompts = (fill(template, pair.target), fill(template, pair.anchor))
        if prompts not in skip:
            skip.add(prompts)
            out.append(prompts)
    return out
