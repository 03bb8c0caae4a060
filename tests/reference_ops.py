"""Test-only helpers: a one-chunk token alignment, CLIP's special token ids, one-site solves and
the dense preservation weighting, each a second route to what the library computes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from erasepro_ops.alignment import PromptAlignment, _check_chunk, end_index, _pairing, _spans
from erasepro_ops.solve import ConstraintSystem, SiteSolution, UCESystem
from erasepro_ops.tokens import SpecialTokens, token_ids

FLOAT32_AGREEMENT = 64 * torch.finfo(torch.float32).eps
"""≈ 7.6e-6: how far (relative) two float32 computations of the same features may differ, e.g. a
prompt run in another batch shape or on a CPU whose kernels sum in another order (measured up to
1.1e-6 through SDXL's 32 CLIP-G blocks on AVX-512, 0 on AVX2). docs/DESIGN.md, *Precision*."""

CLIP_L = SpecialTokens(start=49406, end=49407, pad=49407)
"""SD1.x's CLIP-L (and SDXL's clip_l): padded with the end token."""
CLIP_G = SpecialTokens(start=49406, end=49407, pad=0)
"""SDXL's clip_g (and SD2.x's clip_h): padded with 0."""


def align(
    target_ids: Sequence[int],
    anchor_ids: Sequence[int],
    special: SpecialTokens,
    *,
    context_length: int = 77,
    anchor_empty: bool = False,
    target_prompt: str = "",
    anchor_prompt: str = "",
) -> PromptAlignment:
    """Align one context chunk of a target prompt with the same chunk of its anchor prompt.

    A second implementation of what :func:`~erasepro_ops.alignment.align_chunks` does for one
    chunk, on the sequences themselves rather than on the real-token streams. The concept tokens
    are where the two id sequences differ. Padding after the end token is stripped first. ``p``
    is the longest common prefix (the start token and the template words before ``{}``), ``s``
    the longest common suffix of the real tokens (the template words after ``{}`` and the end
    token), not overlapping the prefix. The target's concept span is ``target[p : len_t - s]``,
    the anchor's ``anchor[p : len_a - s]`` (empty for an empty anchor).

    ``keep`` is ``0..p-1``; ``move`` is ``p..context_length-1``. Pairing: the k-th-from-last
    target concept token with the k-th-from-last anchor concept token, clamped to the anchor's
    first concept token; with an empty anchor (``anchor_empty`` or an empty anchor span) every
    concept token pairs with the last prefix position. Later positions pair by their offset after
    each span (``target_end + k`` with ``anchor_end + k``, clamped to ``context_length - 1``).

    Raises ``ValueError`` when both prompts tokenize identically, when the target has no
    concept tokens of its own, when a sequence has no end token, or when a sequence is longer
    than ``context_length`` (use :func:`align_chunks`).
    """
    target = token_ids(target_ids)
    anchor = token_ids(anchor_ids)
    _check_chunk(target, context_length, "target")
    _check_chunk(anchor, context_length, "anchor")
    target_real = target[: end_index(target, special, "target") + 1]
    anchor_real = anchor[: end_index(anchor, special, "anchor") + 1]
    prefix, target_len, anchor_len = _spans(target_real, anchor_real, target_prompt, anchor_prompt)
    return _pairing(
        target,
        anchor,
        special,
        start=prefix,
        target_len=target_len,
        anchor_len=anchor_len,
        context_length=context_length,
        anchor_empty=anchor_empty,
        target_prompt=target_prompt,
        anchor_prompt=anchor_prompt,
        target_chunk=0,
        anchor_chunk=0,
    )


def zero_residual_update(
    weight: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    groups: Sequence[int] | None = None,
    **kwargs,
) -> SiteSolution:
    """One-site convenience: ``ConstraintSystem.build(x, groups, **kwargs).solve(weight, target)``."""
    return ConstraintSystem.build(x, groups, **kwargs).solve(weight, target)


def uce_update(weight, x, target, preserve=None, **kwargs) -> SiteSolution:
    """One-site convenience for the UCE baseline."""
    return UCESystem.build(x, preserve, **kwargs).solve(weight, target)


def preservation_weighting(preserve: torch.Tensor, lam: float, alpha: float) -> torch.Tensor:
    """``C = λI + α K Kᵀ / M`` for preserve features ``K`` (in × M), in float64, formed densely."""
    k = preserve.to(torch.float64)
    c = k @ k.T * (alpha / max(k.shape[1], 1))
    c.diagonal().add_(lam)
    return c
