"""The shallow sites: the MLP output projections of each text encoder's first blocks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .chain import SolverSettings, progressive_shallow
from .edit import SiteEdit
from .family import Architecture
from .host import Host
from .request import Request
from .retain import retain_prompts
from .batches import preserve_alignments, preserve_ids


def site_edits(results, part: str, stage: str) -> list[SiteEdit]:
    """The results as float32 CPU edits; sites sharing one ``down`` (every deep site) share its copy."""
    downs, edits = {}, []
    for r in results:
        update = r.solution.update
        if id(update.down) not in downs:
            downs[id(update.down)] = update.down.to("cpu", torch.float32)
        edits.append(SiteEdit(r.name, part, stage, update.up.to("cpu", torch.float32), downs[id(update.down)],
                              r.relative_change, r.solution.residual))
    return edits


@dataclass(frozen=True)
class SoftWeighting:
    """What the shallow sites' weighting ``C`` keeps still: per encoder, the first-block inputs of
    the preserve prompts (when weighted) and the retain bank, the flat positions used, the strength."""

    hidden: list[torch.Tensor]
    index: torch.Tensor
    strength: float


def soft_weighting(host: Host, arch: Architecture, request: Request, preserve_in) -> SoftWeighting | None:
    """The user's preserve prompts (UCE, or ``preserve_strength`` > 0) at every position, then the
    retain bank (ErasePro with ``retain_strength`` > 0 and S > 0) up to each prompt's end token."""
    parts, index, rows = [], [], 0
    context = arch.context
    if preserve_in is not None:
        parts.append([p[0] for p in preserve_in])
        rows = preserve_in[0][0].shape[0]
        index.append(torch.arange(rows * context))
    retain = request.method == "erasepro" and request.retain_strength > 0 and request.progressive_layers > 0
    if retain:
        prompts = retain_prompts()
        ids = preserve_ids(host, arch, prompts)
        parts.append([captured[0] for captured in host.first_block_inputs(ids)])
        spans = preserve_alignments(arch, prompts, ids)
        index.append(torch.tensor([(rows + j) * context + pos for j, al in enumerate(spans)
                                   for pos in al.positions("preserve") + al.positions("preserve_pad")[:request.retain_padding]]))
    if not parts:
        return None
    hidden = [torch.cat([part[i] for part in parts]) for i in range(len(arch.encoders))]
    strength = request.preserve_strength if preserve_in is not None else request.retain_strength
    return SoftWeighting(hidden, torch.cat(index), strength)


@dataclass
class ShallowResult:
    results: list  # SiteResult per shallow site, encoder by encoder, shallow to deep
    edits: list[SiteEdit]
    weights: dict[str, torch.Tensor]  # the original weights they were solved on
    edited: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # key → (W_o + ΔW, bias), float32


def solve_shallow(host: Host, arch: Architecture, request: Request, settings: SolverSettings, columns,
                  anchor_in, target_in, soft: SoftWeighting | None, on_site) -> ShallowResult:
    """The shallow sites (the first S blocks' MLP output projections), per text encoder, shallow to deep."""
    out = ShallowResult([], [], {}, {})
    # The erasure's rank budget is the deep sites' width: when the constraints overflow it, the
    # wider shallow sites damp the same overflow instead of fitting it exactly (solve.py). The
    # preserve columns are outside that budget: a 3072-wide fc2 keeps them exact.
    shallow_settings = dataclasses.replace(settings, budget=arch.context_width)
    if soft is not None:
        shallow_settings = dataclasses.replace(shallow_settings, preserve_strength=soft.strength)
    for i, enc in enumerate(arch.encoders):
        depth = enc.shallow_depth(request.progressive_layers)
        if depth == 0:
            continue
        keys = [enc.shallow_key(l) for l in range(depth)]
        bias_keys = [k.replace(".weight", ".bias") for k in keys]
        weights = host.text_weights(keys)
        out.weights.update(weights)
        bias = host.text_weights(bias_keys)
        blocks = host.shallow_blocks(enc, keys, [weights[k] for k in keys], [bias[k] for k in bias_keys],
                                     target_in[i])
        results = progressive_shallow(blocks, target_in[i][0], anchor_in[i][0], columns, shallow_settings,
                                      rule=request.rule, h_preserve=None if soft is None else soft.hidden[i],
                                      preserve_index=None if soft is None else soft.index, on_site=on_site)
        out.results += results
        out.edits += site_edits(results, "clip", "shallow")
        for key, bias_key, r in zip(keys, bias_keys, results):
            edited = weights[key].to(torch.float64) + r.solution.update.dense().to(weights[key].device)
            out.edited[key] = (edited.to(torch.float32), bias[bias_key])
    return out
