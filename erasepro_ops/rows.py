"""A batch of prompts whose rows run only as far as the solve reads them.

A causal encoder's features at a position depend only on the positions up to it, so a prompt's
row needs running only up to the last position the solve reads there: a template's ~10 of CLIP's
77, while a kept prompt (whose every position the diffusion model reads) needs all 77. A
:class:`RowBatch` holds a batch (P × T × D) as parts of rows cut to similar lengths, each
``P_k × L_k × D``, and is indexed as the whole batch: flat index ``row · T + position``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

BUCKET = 16
"""Row lengths are rounded up to a multiple of this: fewer parts, each one pass through a block."""


@dataclass(frozen=True)
class RowBatch:
    parts: tuple[torch.Tensor, ...]  # P_k × L_k × D
    rows: tuple[torch.Tensor, ...]  # each part's rows of the whole batch (CPU, ascending)
    context: int  # T: the whole batch's positions per row
    batch: int  # P: the whole batch's rows

    @classmethod
    def whole(cls, h: torch.Tensor) -> RowBatch:
        return cls((h,), (torch.arange(h.shape[0]),), int(h.shape[1]), int(h.shape[0]))

    @classmethod
    def cut(cls, h: torch.Tensor, lengths: torch.Tensor, bucket: int | None = None) -> RowBatch:
        """``h`` with row ``r`` cut after ``lengths[r]`` positions, rounded up to a multiple of
        ``bucket`` (default :data:`BUCKET`; at most ``T``); rows of length 0 are left out."""
        t, bucket = int(h.shape[1]), BUCKET if bucket is None else bucket
        rounded = torch.clamp((lengths.cpu() + bucket - 1) // bucket * bucket, max=t)
        parts, rows = [], []
        for length in torch.unique(rounded).tolist():
            if length > 0:
                r = torch.nonzero(rounded == length).flatten()
                parts.append(h[r.to(h.device), :length])
                rows.append(r)
        return cls(tuple(parts), tuple(rows), t, int(h.shape[0]))

    @classmethod
    def reaching(cls, h: torch.Tensor, index: torch.Tensor, at_least: torch.Tensor | None = None) -> RowBatch:
        """``h`` cut after the last position of each row that the flat ``index`` (or ``at_least``,
        positions per row) reaches."""
        t = int(h.shape[1])
        index = index.cpu()
        lengths = torch.zeros(h.shape[0], dtype=torch.long)
        lengths.scatter_reduce_(0, index // t, index % t + 1, "amax")
        if at_least is not None:
            lengths = torch.maximum(lengths, at_least.cpu())
        return cls.cut(h, lengths)

    def like(self, parts) -> RowBatch:
        """The same rows holding other tensors (e.g. a block's outputs)."""
        return dataclasses.replace(self, parts=tuple(parts))

    def keep_rows(self, rows: torch.Tensor) -> RowBatch:
        """Only the rows ``rows`` (indices of the whole batch), still indexed as the whole batch."""
        wanted = torch.zeros(self.batch, dtype=torch.bool)
        wanted[rows.cpu()] = True
        parts, kept = [], []
        for part, r in zip(self.parts, self.rows):
            keep = torch.nonzero(wanted[r]).flatten()
            if keep.numel():
                parts.append(part[keep.to(part.device)])
                kept.append(r[keep])
        return dataclasses.replace(self, parts=tuple(parts), rows=tuple(kept))

    def __len__(self) -> int:
        return sum(int(r.numel()) for r in self.rows)

    def mask_of(self, mask, k: int):
        """Part ``k``'s rows of an attention mask given for the whole batch (a mask not per row, or
        None, is every part's)."""
        if mask is None or mask.dim() < 3 or mask.shape[0] != self.batch or self.batch == 1:
            return mask
        return mask[self.rows[k].to(mask.device)]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Columns ``index`` (flat over the whole batch's rows × positions) as a D × n matrix."""
        index = index.cpu()
        row, pos = index // self.context, index % self.context
        part_of = torch.full((self.batch,), -1, dtype=torch.long)
        slot = torch.zeros(self.batch, dtype=torch.long)
        for k, r in enumerate(self.rows):
            part_of[r], slot[r] = k, torch.arange(r.numel())
        which = part_of[row]
        if bool((which < 0).any()) or not self.parts:
            raise ValueError("a column lies in a row this batch did not run")
        out = self.parts[0].new_empty(self.parts[0].shape[-1], index.numel())
        for k, part in enumerate(self.parts):
            sel = torch.nonzero(which == k).flatten()
            if not sel.numel():
                continue
            if bool((pos[sel] >= part.shape[1]).any()):
                raise ValueError("a column lies past the position its row was cut after")
            flat = slot[row[sel]] * part.shape[1] + pos[sel]
            out[:, sel.to(out.device)] = part.reshape(-1, part.shape[-1])[flat.to(part.device)].T
        return out

    def dense(self) -> torch.Tensor:
        """The whole batch P × T × D, zeros where a row was not run."""
        first = self.parts[0]
        out = first.new_zeros(self.batch, self.context, first.shape[-1])
        for part, r in zip(self.parts, self.rows):
            out[r.to(out.device), : part.shape[1]] = part
        return out
