"""Edits on ComfyUI's MODEL and CLIP: applied as non-destructive "diff" patches on clones, checked
against the model they are applied to, written and read as files."""

from __future__ import annotations

import math
from typing import Sequence

import comfy.lora

from erasepro_ops import export
from erasepro_ops.edit import ErasureEdit, SiteEdit
from erasepro_ops.errors import EraseProError
from erasepro_ops.family import FAMILIES

from .host import model_family
from .weights import fingerprint_of


def apply_edit(model, clip, edit: ErasureEdit, strength: float):
    """Clones of ``model`` and ``clip`` with the edit as ``"diff"`` patches scaled by ``strength``."""
    if not math.isfinite(strength):
        raise EraseProError(f"strength must be a finite number (got {strength}); 1 = full erasure, 0 = original model")
    new_model = model.clone()
    new_clip = clip.clone() if clip is not None else None
    if strength == 0:
        return new_model, new_clip
    check_family(edit, model)
    check_sites(new_model.model_state_dict(), edit.part("model"), "MODEL")
    new_model.add_patches({s.key: (s.delta(),) for s in edit.part("model")}, strength)
    if edit.part("clip"):
        if new_clip is None:
            raise EraseProError("this edit also changes the text encoder (progressive_layers > 0): "
                                "connect the CLIP to Apply Erased UNet and use its CLIP output")
        check_sites(new_clip.patcher.model_state_dict(), edit.part("clip"), "CLIP")
        new_clip.add_patches({s.key: (s.delta(),) for s in edit.part("clip")}, strength)
    return new_model, new_clip


def check_sites(state, sites: Sequence[SiteEdit], what: str):
    """Every site's weight exists in ``state`` (a model state dict) with the edit's shape."""
    for s in sites:
        if s.key not in state:
            raise EraseProError(f"this edit was made for another model: the {what} has no weight {s.key}")
        if tuple(state[s.key].shape) != s.shape:
            raise EraseProError(f"this edit was made for another model: {s.key} is {tuple(state[s.key].shape)} "
                                f"in the {what}, the edit expects {s.shape}")


def check_family(edit, model) -> None:
    """The MODEL is of the family the edit was solved on (Flux.1 and Chroma share layer names)."""
    solved, here = FAMILIES.get(export.edit_family(edit)), model_family(model)
    if solved is not None and solved.name != here.name:
        raise EraseProError(f"this edit was made for another model family ({solved.label}); this MODEL is "
                            f"{here.label}. Connect the {solved.label} model it was solved on, or solve the erasure on this one")


def save_edit_file(edit, path, dtype: str = "float32") -> Path:
    try:
        return export.save(edit, path, dtype)
    except export.EditFileError as e:
        raise EraseProError(str(e)) from None


def load_edit_file(path):
    try:
        return export.load(path)
    except export.EditFileError as e:
        raise EraseProError(f"cannot load this ErasePro edit: {e}") from None


def comfy_key_map(model=None, clip=None) -> dict[str, str]:
    """ComfyUI's own LoRA-name → weight-key map for these models (as comfy.sd.load_lora_for_models)."""
    key_map: dict[str, str] = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def check_fingerprint(edit, model, clip) -> str:
    """Raise EraseProError unless the MODEL/CLIP's edited layers are the ones ``edit`` was solved on.

    Hashes only the edited sites' effective weights (fingerprint_of, one layer at a time), as
    the solver did. Load ErasePro Edit and Apply Erased UNet both refuse with this one message.
    """
    model_sites, clip_sites = edit.part("model"), edit.part("clip")
    parts = [(model, [s.key for s in model_sites])]
    if clip_sites and clip is not None:
        parts.append((clip.patcher, [s.key for s in clip_sites]))
    got = fingerprint_of(parts)
    if got != edit.fingerprint:
        n = sum(len(keys) for _, keys in parts)
        raise EraseProError(
            "this edit was made for another base model: the fingerprint of the "
            f"{n} edited layers is {got[:16]}… here, the edit expects {edit.fingerprint[:16]}…. "
            "Load the checkpoint (and any LoRAs applied before the erasure) the edit was made from, "
            "or set ignore_fingerprint on Load ErasePro Edit to apply it anyway (the erasure is then no "
            "longer exact).")
    return f"fingerprint OK ({got[:16]}…)"


def check_against(edit, model, clip, ignore_fingerprint: bool = False) -> str:
    """Raise EraseProError unless ``edit`` fits ``model``/``clip`` (shapes, then fingerprint).

    Returns a one-line note on the check. Shapes are always checked (a mismatched edit cannot be
    applied); the fingerprint check is skipped only with ``ignore_fingerprint``.
    """
    model_sites, clip_sites = edit.part("model"), edit.part("clip")
    check_family(edit, model)
    check_sites(model.model_state_dict(), model_sites, "MODEL")
    if clip_sites:
        if clip is None:
            if not ignore_fingerprint:
                raise EraseProError("this edit also changes the text encoder: connect the CLIP so its fingerprint "
                                    "can be checked (and use the CLIP on Apply Erased UNet)")
        else:
            check_sites(clip.patcher.model_state_dict(), clip_sites, "CLIP")
    if ignore_fingerprint:
        return "fingerprint not checked (ignore_fingerprint)"
    return check_fingerprint(edit, model, clip)
