"""Concept pairs and the prompt templates they expand into (docs/DESIGN.md, *Prompts*).

A concept pair (target ``t``, anchor ``a``) expands into prompt templates; template ``τ`` gives
the target prompt ``τ(t)`` and the anchor prompt ``τ(a)``. An empty anchor removes the concept's
slot from the template ("a photo of a {}" → "a photo of a").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .text import quote

__all__ = ["CONCEPT_TYPES", "PLACEHOLDER", "TEMPLATES", "ConceptPair", "expand", "fill"]

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

