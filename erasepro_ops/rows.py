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

from .linalg import coarse

BUCKET = 16
"""Row lengths are rounded up to a multiple of this: fewer parts, each one pass through a block."""


@dataclass(frozen=True)
class RowBatch:
    parts: tuple[torch.Tensor, ...]  # P_k × L_k × D
    rows: tuple[torch.Tensor, ...]  # each part's rows of the whole batch (CPU, ascending)
    context: int  # T: the whole batch's positions per row
    batch: int  # P: the whole batch's rows
    source: torch.Tensor | None = None  # per row, the row that runs for it (a repeat's first copy); None: itself

    @classmethod
    def whole(cls, h: torch.Tensor) -> RowBatch:
        return cls((h,), (torch.arange(h.shape[0]),), int(h.shape[1]), int(h.shape[0]))

    @classmethod
    def distinct(cls, h: torch.Tensor, index: torch.Tensor, causal: bool, mask=None,
                 at_least: torch.Tensor | None = None) -> RowBatch:
        """``h`` with each row that repeats another exactly (input and attention mask) run once, by
        its first copy, for all of them: every concept of a type has the same anchor prompts. A
        ``causal`` encoder's rows are cut after the last position ``index`` (or ``at_least``,
        positions per row) reaches in any copy."""
        source = repeated_rows(h, mask)
        if causal:
            if at_least is not None:  # each copy's reach, given to the row that runs for it
                at_least = torch.zeros(len(source), dtype=torch.long).scatter_reduce(0, source, at_least.cpu(), "amax")
            out = cls.reaching(h, source[index.cpu() // h.shape[1]] * h.shape[1] + index.cpu() % h.shape[1], at_least)
        else:
            first = torch.unique(source)
            out = cls((h[first.to(h.device)],), (first,), int(h.shape[1]), int(h.shape[0]))
        return dataclasses.replace(out, source=source)

    def _run_row(self, row: torch.Tensor) -> torch.Tensor:
        return row if self.source is None else self.source[row]

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
        wanted[self._run_row(rows.cpu())] = True
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
        row, pos = self._run_row(index // self.context), index % self.context
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

    def dense(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The rows ``rows`` of the whole batch (default: all of them) as ``len(rows) × T × D``,
        zeros where a row was not run."""
        rows = torch.arange(self.batch) if rows is None else rows.cpu()
        run = self._run_row(rows)
        first = self.parts[0]
        out = first.new_zeros(len(rows), self.context, first.shape[-1])
        slot = torch.full((self.batch,), -1, dtype=torch.long)
        for part, r in zip(self.parts, self.rows):
            slot[r] = torch.arange(r.numel())
            sel = torch.nonzero(slot[run] >= 0).flatten()
            out[sel.to(out.device), : part.shape[1]] = part[slot[run[sel]].to(part.device)]
            slot[r] = -1
        return out


def repeated_rows(h: torch.Tensor, mask=None) -> torch.Tensor:
    """Per row of ``h`` (P × T × D), the first row equal to it (itself when none is before it),
    comparing the attention mask's rows too when it has one per row. Rows are matched by a fixed
    random projection, then compared entry by entry."""
    p = int(h.shape[0])
    flat = h.reshape(p, -1)
    g = torch.Generator(device="cpu").manual_seed(0)
    sketch = flat @ torch.randn(flat.shape[1], 1, generator=g, dtype=flat.dtype).to(flat.device)
    per_row = mask is not None and mask.dim() >= 3 and mask.shape[0] == p and p > 1
    source = torch.arange(p)
    first_of: dict[tuple, list[int]] = {}
    for r, key in enumerate(coarse(sketch.T).T.tolist()):
        key = tuple(key)
        for f in first_of.setdefault(key, []):
            if torch.equal(flat[f], flat[r]) and (not per_row or torch.equal(mask[f], mask[r])):
                source[r] = f
                break
        else:
            first_of[key].append(r)
    return source
