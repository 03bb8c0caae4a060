"""The deep sites: the diffusion model's layers that read the text features, and the pooled site."""

from __future__ import annotations

import dataclasses

import torch

from .chain import SolverSettings, solve_deep
from .edit import SiteEdit
from .errors import log
from .family import Architecture
from .host import Host


def solve_with_fallback(host: Host, weights, x, y, groups, settings: SolverSettings, preserve, on_site,
                        report_columns=None):
    """Solve on the compute device; on out-of-memory there, warn and solve on the CPU. Each site's
    update is kept as the edit keeps it (float32 on the CPU) as soon as it is solved."""
    try:
        return solve_deep(weights, x, y, groups, settings, preserve=preserve, report_columns=report_columns,
                          on_site=on_site, store=True)
    except torch.OutOfMemoryError:
        log.warning("ErasePro: out of GPU memory during the solve; falling back to the CPU")
        host.free_device_memory()
        cpu = dataclasses.replace(settings, device="cpu")
        return solve_deep(weights, x, y, groups, cpu, preserve=preserve, report_columns=report_columns,
                          on_site=on_site, store=True)


def solve_pooled(host: Host, arch: Architecture, px, py, n_target: int, settings: SolverSettings, on_site):
    """The pooled site's columns that read the pooled embedding: targets first, then the preserve
    prompts'. Returns the site result, its edit (zero on the other columns) and the whole original
    weight."""
    key = arch.pooled_site
    full = host.model_weights([key])[key]
    groups = (torch.arange(px.shape[0]) >= n_target).long()
    (r,) = solve_with_fallback(host, {key: full[:, : arch.pooled_width]}, px.T, py.T, groups,
                               settings, None, on_site, n_target)
    up, down = r.solution.update.up, r.solution.update.down
    padded = torch.zeros(down.shape[0], full.shape[1], dtype=down.dtype, device=down.device)
    padded[:, : arch.pooled_width] = down
    edit = SiteEdit(key, "model", "deep", up.float().cpu(), padded.float().cpu(),
                    r.relative_change, r.solution.residual)
    return r, edit, full
