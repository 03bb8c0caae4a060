"""The figures a solve reports, as one typed value with one dict form.

The dict form (:meth:`Summary.to_dict`) is what the node shows (web/), what an edit file stores
(``erasepro.summary``) and what the demo prints; :meth:`Summary.from_dict` reads it back, from
files of any version.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SiteFigure:
    name: str = ""  # compact label for charts: clip_l.3.fc2, in.4.1.k, pooled
    key: str = ""  # the weight's key
    stage: str = ""  # shallow / deep
    relative_change: float = float("nan")  # ‖ΔW‖_F / ‖W_o‖_F
    residual: float = float("nan")  # this site's residual against its own gap

    def to_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "stage": self.stage,
                "relative_change": self.relative_change, "residual": self.residual}


@dataclass(frozen=True)
class Summary:
    method: str = ""
    progressive_layers: int = 0
    rule: str = ""
    family: str = ""
    concepts: tuple[str, ...] = ()  # "target → anchor"
    sites: tuple[SiteFigure, ...] = ()
    train_residual: float = float("nan")  # deep sites' residual relative to the unedited model's gap
    pooled_residual: float | None = None
    deep_burden: float = float("nan")
    preservation_drift: float | None = None
    empty_prompt_drift: float | None = None
    solve_seconds: float = 0.0
    constraints: int = 0  # the erasure's columns
    preserve_constraints: int = 0
    templates: int = 0
    rank_budget: int = 0
    deep_rank: int = 0
    warnings: tuple[str, ...] = ()
    # ErasePro only (absent from the dict for UCE):
    unaligned_energy: float | None = None
    overflow_damped: bool | None = None
    exact_parts: tuple[str, ...] | None = None
    least_squares_parts: tuple[str, ...] | None = None

    ERASEPRO_ONLY = ("unaligned_energy", "overflow_damped", "exact_parts", "least_squares_parts")

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.ERASEPRO_ONLY and value is None:
                continue
            if f.name == "sites":
                value = [s.to_dict() for s in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        """The summary a dict form holds; keys it lacks keep their defaults, unknown keys are ignored."""
        given = {}
        for f in fields(cls):
            if f.name not in d or d[f.name] is None:
                continue
            value = d[f.name]
            if f.name == "sites":
                value = tuple(SiteFigure(**{k: s[k] for k in ("name", "key", "stage", "relative_change", "residual")
                                            if k in s}) for s in value)
            elif isinstance(value, list):
                value = tuple(value)
            given[f.name] = value
        return cls(**given)

    def shallow_sites(self) -> tuple[SiteFigure, ...]:
        return tuple(s for s in self.sites if s.stage == "shallow")

    def deep_sites(self) -> tuple[SiteFigure, ...]:
        return tuple(s for s in self.sites if s.stage == "deep")
