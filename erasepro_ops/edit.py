"""The result of a solve: per-site exact low-rank updates plus what the report needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .summary import Summary


@dataclass(frozen=True)
class SiteEdit:
    """``ΔW = up @ down`` for the weight ``key`` of the MODEL (``part="model"``) or CLIP (``"clip"``).

    ``key`` is the weight's key on ComfyUI's ModelPatcher, e.g.
    ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`` or
    ``clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight``.
    """

    key: str
    part: str  # "model" | "clip"
    stage: str  # "shallow" | "deep"
    up: torch.Tensor  # out × r, float32, CPU
    down: torch.Tensor  # r × in, float32, CPU
    relative_change: float  # ‖ΔW‖_F / ‖W_o‖_F
    residual: float  # this site's ‖W'X − V*‖ / ‖W_o X − V*‖ on the solve's columns

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.up.shape[0]), int(self.down.shape[1]))

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """The dense update, multiplied in float64 then cast."""
        return (self.up.to(torch.float64) @ self.down.to(torch.float64)).to(dtype)


@dataclass(frozen=True)
class ErasureEdit:
    """An ERASEPRO_EDIT: every site's update, the settings that made it and its measured figures."""

    sites: tuple[SiteEdit, ...]
    settings: dict = field(default_factory=dict)  # erasepro_ops.request.Request.settings_record()
    summary: dict = field(default_factory=dict)  # erasepro_ops.summary.Summary.to_dict(): figures, timings, ranks
    fingerprint: str = ""  # SHA-256 of the edited sites' original effective weights, float16-rounded
    fingerprint_ignored: bool = False  # Load ErasePro Edit's ignore_fingerprint: Apply does not check it either

    @property
    def figures(self) -> Summary:
        """The summary as a typed value."""
        return Summary.from_dict(self.summary)

    def part(self, part: str) -> tuple[SiteEdit, ...]:
        return tuple(s for s in self.sites if s.part == part)
