"""Which weights an edit was solved on, as one hash."""

from __future__ import annotations

import hashlib

import torch


def hash_weight(h, key: str, weight: torch.Tensor) -> None:
    w = weight.detach().to("cpu", torch.float16).contiguous()
    h.update(key.encode())
    h.update(str(tuple(w.shape)).encode())
    h.update(w.numpy())


def hash_exact(h, tensor: torch.Tensor) -> None:
    """Add ``tensor`` to the hash ``h`` exactly as stored: ``|dtype(shape)|`` and its bytes (no copy
    when it is contiguous on the CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"|{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the edited sites' original weights (key, shape, float16 bytes), sorted by key.

    Rounded to float16 so one checkpoint gives one fingerprint whether it is loaded in float32
    (CPU) or float16 (GPU, and ComfyUI's text encoders everywhere).
    """
    h = hashlib.sha256()
    for key in sorted(weights):
        hash_weight(h, key, weights[key])
    return h.hexdigest()
