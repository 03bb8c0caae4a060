"""What the three seeded fuzz families (tests/test_fuzz_edit_files.py, test_fuzz_workflows.py,
test_fuzz_routes.py) share: the seed, the outcome tally, quiet logs, JSON with raw literals.

Three families of thousands of cases each, drawn from one fixed seed (``SEED``: the same cases on
every run); each test prints its count and outcome tally and asserts it ran at least its floor.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

SEED = 20251201


@dataclass
class Tally:
    """Cases run per family and how each ended."""

    family: str
    outcomes: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def report(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return f"[fuzz] {self.family}: {self.total} cases in {time.perf_counter() - self.t0:.1f} s ({parts})"


@contextlib.contextmanager
def quiet_logs():
    """ComfyUI logs every refused prompt and the pack every legacy file: silence them for the loop."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class Raw(str):
    """JSON text put into a document verbatim (a literal Python's json cannot write: 1e400, 5000 digits)."""


def dumps(obj) -> str:
    """``json.dumps`` with :class:`Raw` values written verbatim (and NaN/Infinity allowed)."""
    raws: list[str] = []

    def swap(o):
        if isinstance(o, Raw):
            raws.append(str(o))
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    text = json.dumps(swap(obj), ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00", ensure_ascii=False), raw)
    return text
