"""The built-in retain bank: ordinary prompts nobody lists, kept still by default.

The erasure's constraints say what must move; they say nothing about the prompts a user never
thinks to list. ErasePro weights every shallow site's update away from the features of a bank of
ordinary prompts (``data/retain_prompts.txt``: people, animals, food, places, objects, art media,
short and long) through the solver's weighting ``C = λI + α K Kᵀ / M`` (``solve.py``): the
update stays exact on the erasure's columns and spends its freedom where these prompts do not
live. Only the positions up to each prompt's end token are used (the padding after it repeats).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

RETAIN_FILE = Path(__file__).with_name("data") / "retain_prompts.txt"

DEFAULT_RETAIN_STRENGTH = 10.0
"""Scale-free α of the retain weighting (``α = strength / mean squared entry of K``); 0 = off."""

DEFAULT_RETAIN_PADDING = 0
"""Padding positions after each bank prompt's end token that are weighted too."""


@lru_cache(maxsize=1)
def retain_prompts() -> tuple[str, ...]:
    """The bank's prompts, one per line of :data:`RETAIN_FILE`."""
    lines = RETAIN_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())
