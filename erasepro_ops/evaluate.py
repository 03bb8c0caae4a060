"""Evaluating an erasure with images: which prompts to render, and scores from image embeddings.

The ErasePro Evaluate node renders every prompt of three groups with the original and the erased
model (same seed), and, when a CLIP vision model is connected, scores each row from the images'
embeddings ``e`` (unit-normalised, ``û = e / ‖e‖``):

- **erasure** (target and held-out rows, which name a target; the anchor image is the original
  model's render of the same sentence with the anchor in the target's place)::

      erasure = ⟨û_erased − û_orig, û_anchor − û_orig⟩ / ‖û_anchor − û_orig‖²

  the fraction of the way from the original target image to the anchor image that the erased
  image moved along that line: 0 = not moved, 1 = as close as the anchor image itself. Undefined
  (``None``) when the original and anchor images embed (almost) identically.
- **preservation** (unrelated rows): ``cos(e_orig, e_erased)``; 1 = the erased model's image
  embeds exactly like the original model's.

No ComfyUI import here; the node layer samples, decodes and encodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .templates import PLACEHOLDER, fill
from .text import prompt_lines, quote  # noqa: F401  (prompt_lines: the node's held-out / unrelated inputs)

PROMPTS_FILE = Path(__file__).with_name("data") / "evaluate_prompts.json"
GROUPS = ("target", "held-out", "unrelated")
TARGETS_PER_CONCEPT = 2
DEGENERATE = 1e-6  # ‖û_anchor − û_orig‖² below this: the erasure score is undefined


@dataclass(frozen=True)
class EvalRow:
    """One grid row: ``prompt`` rendered by both models; ``anchor`` is the same sentence with the
    concept's anchor in place of its target (target and held-out rows), else None."""

    group: str
    prompt: str
    anchor: str | None = None


@lru_cache(maxsize=1)
def default_prompts() -> dict:
    """The shipped defaults: ``{"held_out": {concept_type: [template, ...]}, "unrelated": [...]}``."""
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def _target_rows(pair, count: int) -> list[EvalRow]:
    templates = [t for t in pair.templates if t != PLACEHOLDER] or [PLACEHOLDER]
    return [EvalRow("target", fill(t, pair.target), fill(t, pair.anchor)) for t in templates[:count]]


def _held_out_rows(pair, templates: Sequence[str]) -> list[EvalRow]:
    rows = []
    for t in templates:
        if t.count(PLACEHOLDER) != 1:
            raise ValueError(f"held-out prompt {quote(t)} must contain '{{}}' exactly once, where the concept "
                             "goes (e.g. 'a harbour at dawn, painted by {}'); unrelated prompts go in 'unrelated'")
        rows.append(EvalRow("held-out", fill(t, pair.target), fill(t, pair.anchor)))
    return rows


def evaluation_rows(pairs: Sequence, held_out: Sequence[str] | None = None, unrelated: Sequence[str] | None = None,
                    targets_per_concept: int = TARGETS_PER_CONCEPT) -> list[EvalRow]:
    """The grid's rows, grouped: each pair's first ``targets_per_concept`` templates other than the
    bare concept (the solver's own prompts; the bare concept when it is the only one), the held-out templates (``{}`` = the concept; default: the shipped ones for the
    pair's concept type), then the unrelated prompts (default: the shipped set). ``None`` means
    the default; an explicitly empty list is an error. Duplicate prompts are listed once."""
    if not pairs:
        raise ValueError("no concepts: connect an ErasePro Concept Pair to 'concepts'")
    if held_out is not None and not list(held_out):
        raise ValueError("the held-out prompt list is empty: give one per line with {} for the concept, or leave it blank for the defaults")
    if unrelated is not None and not list(unrelated):
        raise ValueError("the unrelated prompt list is empty: give one per line, or leave it blank for the defaults")
    defaults = default_prompts()
    rows = [r for p in pairs for r in _target_rows(p, max(1, int(targets_per_concept)))]
    for p in pairs:
        rows += _held_out_rows(p, held_out if held_out is not None else defaults["held_out"][p.concept_type])
    rows += [EvalRow("unrelated", u) for u in (unrelated if unrelated is not None else defaults["unrelated"])]
    seen, unique = set(), []
    for r in rows:
        if (r.group, r.prompt) not in seen:
            seen.add((r.group, r.prompt))
            unique.append(r)
    return unique


def _unit(e: torch.Tensor) -> torch.Tensor:
    e = e.detach().to("cpu", torch.float64).reshape(e.shape[0], -1)
    return e / e.norm(dim=1, keepdim=True).clamp_min(1e-30)


def erasure_scores(original: torch.Tensor, erased: torch.Tensor, anchor: torch.Tensor) -> list[float | None]:
    """Per row ``⟨û_e − û_o, û_a − û_o⟩ / ‖û_a − û_o‖²`` (see the module docstring); None where
    ``‖û_a − û_o‖² < DEGENERATE``. Inputs: ``[N, D]`` embeddings, row i of each for the same prompt."""
    o, e, a = _unit(original), _unit(erased), _unit(anchor)
    line = a - o
    den = (line * line).sum(dim=1)
    num = ((e - o) * line).sum(dim=1)
    return [float(n / d) if d >= DEGENERATE else None for n, d in zip(num, den)]


def preservation_scores(original: torch.Tensor, erased: torch.Tensor) -> list[float]:
    """Per row ``cos(e_orig, e_erased)`` in float64 (1 = unchanged)."""
    return [float(v) for v in (_unit(original) * _unit(erased)).sum(dim=1)]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def group_means(rows: Sequence[EvalRow], scores: Sequence[float | None]) -> dict[str, float | None]:
    """Mean score per group (``None`` scores skipped): erasure for target / held-out, preservation
    for unrelated."""
    return {g: _mean(s for r, s in zip(rows, scores) if r.group == g) for g in GROUPS}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def evaluation_summary(rows: Sequence[EvalRow], scores: Sequence[float | None] | None, setup: str) -> str:
    """The STRING output: setup line, per-group means, then one line per row."""
    lines = [f"ErasePro Evaluate: {len(rows)} prompts x (original, erased); {setup}"]
    if scores is None:
        lines.append("scores: connect a CLIP vision model (Load CLIP Vision) to score the rows")
        lines += [f"  [{r.group}] {r.prompt}" for r in rows]
        return "\n".join(lines)
    means = group_means(rows, scores)
    lines.append(f"erasure (0 = unchanged, 1 = reached the anchor): target {_fmt(means['target'])}, "
                 f"held-out {_fmt(means['held-out'])}")
    lines.append(f"preservation (cosine to the original, 1 = unchanged): unrelated {_fmt(means['unrelated'])}")
    for r, s in zip(rows, scores):
        kind = "preservation" if r.group == "unrelated" else "erasure"
        lines.append(f"  [{r.group}] {kind} {_fmt(s)}  {r.prompt}")
    return "\n".join(lines)
