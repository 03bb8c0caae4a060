"""What a solve is asked to do, its checks, and the settings record stored with its edit."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import __version__
from .templates import ConceptPair
from .contexts import (DEFAULT_CONTEXT_PADDING, DEFAULT_CONTEXT_SUFFIX, DEFAULT_CONTEXT_TEMPLATES,
                       DEFAULT_TEMPLATE_PADDING, MAX_CONTEXT_TEMPLATES)
from .errors import EraseProError
from .linalg import DEFAULT_GAP_FLOOR, DEFAULT_OVERFLOW_DAMPING, DEFAULT_OVERFLOW_PRESERVE_WEIGHT, DEFAULT_RTOL
from .retain import DEFAULT_RETAIN_PADDING, DEFAULT_RETAIN_STRENGTH

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
    features: str = "all"  # "all" positions, or "last_token" (official UCE: the last concept token only)
    keep_empty_prompt: bool = True  # erasepro: the empty prompt (CFG's unconditional branch) is kept exactly
    retain_strength: float = DEFAULT_RETAIN_STRENGTH  # erasepro, S > 0: weight the shallow edits away from the retain bank
    gap_floor: float = DEFAULT_GAP_FLOOR  # erasepro: deep columns closer than this to the anchor count as met
    retain_padding: int = DEFAULT_RETAIN_PADDING  # retain bank: padding positions after each end token weighted too
    context_templates: int = DEFAULT_CONTEXT_TEMPLATES  # erasepro: context sentences added per concept
    context_padding: int = DEFAULT_CONTEXT_PADDING  # their padding positions constrained after the end token
    context_suffix: bool = DEFAULT_CONTEXT_SUFFIX  # their words after the concept constrained too
    template_padding: int = DEFAULT_TEMPLATE_PADDING  # erasepro: padding positions constrained per template
    fit_padding: bool = True  # erasepro: lower template_padding for many templates or a full rank budget

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise EraseProError(f"{f.name} must be a finite number (got {value})")
        if not self.concepts:
            raise EraseProError("no concepts: connect an ErasePro Concept Pair")
        if self.progressive_layers < 0:
            raise EraseProError("progressive_layers must be 0 or more")
        if not self.overflow_preserve_weight > 0:
            raise EraseProError("overflow_preserve_weight must be positive (default "
                                f"{DEFAULT_OVERFLOW_PRESERVE_WEIGHT:g})")
        if not 0 <= self.context_templates <= MAX_CONTEXT_TEMPLATES:
            raise EraseProError(f"context_templates must be between 0 and {MAX_CONTEXT_TEMPLATES}")
        if min(self.context_padding, self.retain_padding, self.template_padding) < 0:
            raise EraseProError("template_padding, context_padding and retain_padding must be 0 or more")

    @property
    def every_position(self) -> bool:
        """ErasePro's rule (every position after the concept, plus padding), not UCE's own."""
        return self.method == "erasepro" and self.features == "all"

    def preserve_prompts(self) -> tuple[str, ...]:
        """The user's preserve prompts, then the empty prompt when it is kept (erasepro only)."""
        keep_empty = self.keep_empty_prompt and self.method == "erasepro"
        return self.preserve + ((EMPTY_PROMPT,) if keep_empty else ())

    def settings_record(self, family: str) -> dict:
        """Every setting that changes the result, the family and the version: stored with the edit."""
        record = {
            "concepts": [{"target": p.target, "anchor": p.anchor, "concept_type": p.concept_type,
                          "prompts": list(p.prompts)} for p in self.concepts],
            "method": self.method, "progressive_layers": self.progressive_layers, "rule": self.rule,
            "preserve": list(self.preserve), "preserve_strength": self.preserve_strength,
            "overflow_damping": self.overflow_damping, "overflow_preserve_weight": self.overflow_preserve_weight,
            "features": self.features, "rtol": self.rtol, "keep_empty_prompt": self.keep_empty_prompt,
            "retain_strength": self.retain_strength, "retain_padding": self.retain_padding,
            "context_templates": self.context_templates, "context_padding": self.context_padding,
            "context_suffix": self.context_suffix, "template_padding": self.template_padding,
            "gap_floor": self.gap_floor, "fit_padding": self.fit_padding, "family": family, "version": __version__,
        }
        return record

    @classmethod
    def from_settings(cls, record: dict) -> Request:
        """The request an edit's settings record describes. A setting the record lacks (files from
        older versions) takes its default, which is what those versions used (``fit_padding``: off)."""
        concepts = tuple(ConceptPair(target=c["target"], anchor=c.get("anchor", ""),
                                     concept_type=c.get("concept_type", "object"), prompts=tuple(c.get("prompts", ())))
                         for c in record.get("concepts", ()))
        fields = {f.name for f in dataclasses.fields(cls)} - {"concepts"}
        given = {k: record[k] for k in fields if k in record}
        given.setdefault("fit_padding", False)  # added later than the others; before, the padding was never lowered
        if "preserve" in given:
            given["preserve"] = tuple(given["preserve"])
        return cls(concepts, **given)
