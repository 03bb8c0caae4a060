"""Figures computed from weights, updates and features (docs/DESIGN.md, *Metrics*), used by the
solver node's summary, the benchmark and the tests. The per-site residual and relative change
come from the solve itself (``solve.SiteSolution``, ``chain.SiteResult``); :func:`alignment_residual`
recomputes the former from dense updates. The report only formats what the summary holds.

Site-level figures aggregate over sites as root-sum-of-squares ratios, e.g. the train residual
over deep sites ``s`` is ``sqrt(Σ_s ‖W'_s X − V*_s‖²) / sqrt(Σ_s ‖W_o,s X − V*_s‖²)``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .linalg import gram_trace


def _f64(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float64)


def residual_terms(weight: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """``(‖(W_o + ΔW) X − V*‖², ‖W_o X − V*‖²)`` in float64."""
    dev = delta.device
    w, d, x, v = _f64(weight, dev), _f64(delta, dev), _f64(x, dev), _f64(target, dev)
    before = w @ x - v
    after = before + d @ x
    return float((after * after).sum()), float((before * before).sum())


def ratio(terms: Iterable[tuple[float, float]]) -> float:
    """``sqrt(Σ numerator / Σ denominator)``; 0 when the denominator is 0."""
    num = den = 0.0
    for a, b in terms:
        num += a
        den += b
    return (num / den) ** 0.5 if den > 0 else 0.0


def alignment_residual(
    weights: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor], x: torch.Tensor, targets: Sequence[torch.Tensor]
) -> float:
    """Train (or held-out) residual: ``‖W'X − V*‖_F / ‖W_o X − V*‖_F`` over the given sites.

    0 is complete alignment, 1 is untouched.
    """
    return ratio(residual_terms(w, d, x, v) for w, d, v in zip(weights, deltas, targets))


def residual_against_gap(residual_sqs: Sequence[float], weights: Iterable[torch.Tensor], gap: torch.Tensor) -> float:
    """``sqrt(Σ_s ‖W'_s X − V*_s‖²) / sqrt(Σ_s ‖W_s G‖²)``: residuals against another gap ``G``
    (e.g. the unedited model's ``Y − X_0``), the denominator through ``G Gᵀ`` (in × in); ``weights``
    is read once, one at a time."""
    g = _f64(gap, gap.device)
    gram = g @ g.T
    before = [gram_trace(w, gram) for w in weights]
    return ratio(zip(residual_sqs, before))


def preservation_drift(
    weights: Sequence[torch.Tensor], deltas: Iterable[torch.Tensor], k: torch.Tensor, k_edited: torch.Tensor | None = None
) -> float:
    """``‖W'K' − W_o K‖_F / ‖W_o K‖_F`` over the given sites, for preserve or unrelated features.

    ``K`` are the features through the original text encoder; ``K'`` (default ``K``) through the
    edited one, so a text-encoder edit (S > 0) counts too.
    """
    return ratio(drift_terms(w, d, k, k_edited) for w, d in zip(weights, deltas))


def drift_terms(weight: torch.Tensor, delta: torch.Tensor, k: torch.Tensor,
                k_edited: torch.Tensor | None = None) -> tuple[float, float]:
    """One site's ``(‖W'K' − W_o K‖², ‖W_o K‖²)`` (see :func:`preservation_drift`)."""
    dev = delta.device
    kk = _f64(k, dev)
    w64 = _f64(weight, dev)
    base = w64 @ kk
    change = _f64(delta, dev) @ kk if k_edited is None else (w64 + _f64(delta, dev)) @ _f64(k_edited, dev) - base
    return float((change * change).sum()), float((base * base).sum())


def worst_drift(site_terms: Iterable[tuple[float, float]], k: torch.Tensor, k_edited: torch.Tensor) -> float:
    """The largest relative change of a prompt's features on their way through an edited model:
    at the text encoder's output, ``‖K' − K‖ / ‖K‖`` (every shallow site before it), and at each
    deep site, ``‖W'K' − W_o K‖ / ‖W_o K‖`` from its :func:`drift_terms`."""
    k64, e64 = _f64(k, k.device), _f64(k_edited, k.device)
    base = float(k64.norm())
    worst = float((e64 - k64).norm()) / base if base > 0 else 0.0
    return max([worst] + [ratio([t]) for t in site_terms])


def deep_burden(weight_norms: Sequence[float], delta_norms: Sequence[float]) -> float:
    """``Σ_deep ‖ΔW‖_F / Σ_deep ‖W_o‖_F``."""
    total = sum(weight_norms)
    return sum(delta_norms) / total if total > 0 else 0.0


def eps_erasure(eps_edited_target: torch.Tensor, eps_anchor: torch.Tensor, eps_target: torch.Tensor) -> float:
    """``‖ε'(target) − ε(anchor)‖ / ‖ε(target) − ε(anchor)‖`` (0: the target denoises like the anchor)."""
    a = eps_anchor.to(torch.float64)
    gap = float((eps_target.to(torch.float64) - a).norm())
    return float((eps_edited_target.to(torch.float64) - a).norm()) / gap if gap > 0 else 0.0


def eps_preservation(eps_edited: torch.Tensor, eps_original: torch.Tensor) -> float:
    """``‖ε'(p) − ε(p)‖ / ‖ε(p)‖`` for unrelated prompts."""
    base = eps_original.to(torch.float64)
    norm = float(base.norm())
    return float((eps_edited.to(torch.float64) - base).norm()) / norm if norm > 0 else 0.0


def end_to_end_residual(
    weights: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    x_edited: torch.Tensor,
    x_original: torch.Tensor,
    y: torch.Tensor,
    max_columns: int = 4096,
) -> float:
    """Train / held-out residual of a whole edit (text encoder and deep sites together)::

        sqrt(Σ_s ‖(W_s + ΔW_s) X' − W_s Y‖²) / sqrt(Σ_s ‖W_s X − W_s Y‖²)

    ``X'`` the deep sites' input through the edited encoder, ``X`` through the original one,
    ``Y`` the anchors' original features. 1 = as far from the anchor as the unedited model.
    Beyond ``max_columns`` columns an evenly spaced subset is used (the figure is then an estimate).
    """
    dev = x_edited.device
    n = x_edited.shape[1]
    cols = torch.linspace(0, n - 1, max_columns).round().long() if n > max_columns else torch.arange(n)
    xe, xo, yy = (_f64(t[:, cols.to(t.device)], dev) for t in (x_edited, x_original, y))
    gap_after, gap_before = xe - yy, xo - yy
    terms = []
    for w, d in zip(weights, deltas):
        w64 = _f64(w, dev)
        after = w64 @ gap_after + _f64(d, dev) @ xe
        before = w64 @ gap_before
        terms.append((float((after * after).sum()), float((before * before).sum())))
    return ratio(terms)
