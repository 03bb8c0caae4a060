"""PyTorch's default initialisation for modules built from ComfyUI's classes.

ComfyUI builds its layers with ``comfy.ops.disable_weight_init``, whose ``reset_parameters``
does nothing (a loader fills the weights): a module to be trained is initialised here first.
"""
from __future__ import annotations

import torch
from torch import nn

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)


def reset_parameters(module: nn.Module, seed: int) -> nn.Module:
    """Every layer of ``module`` to PyTorch's default initial values, deterministically."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for cls in _LAYERS:
                if isinstance(m, cls):
                    cls.reset_parameters(m)
                    break
    return module
