"""Save ErasePro Edit / Load ErasePro Edit: an erasure as a LoRA file in ComfyUI's loras folder.

The file is a standard kohya-layout LoRA (ComfyUI's Load LoRA, A1111 and Forge read it) that
holds every site's exact low-rank factors plus ErasePro metadata (erasepro_ops.export).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import folder_paths

from erasepro_comfy.apply import check_against, load_edit_file, save_edit_file
from erasepro_ops import export
from erasepro_ops.errors import EraseProError, log

DTYPES = list(export.STORAGE_DTYPES)


def loras_dir() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def _next_path(prefix: str, root: str) -> tuple[Path, str]:
    """``<root>/<prefix>_NNNNN_.safetensors`` with the next free counter (as ComfyUI's savers do)."""
    prefix = (prefix or "erasepro/erased").replace("\\", "/").strip("/")
    if not prefix or any(p == ".." for p in prefix.split("/")) or os.path.isabs(prefix):
        raise EraseProError(f"filename_prefix {prefix!r} must be a relative name inside the loras folder")
    folder = Path(root, os.path.dirname(prefix))
    base = os.path.basename(prefix)
    if not base:
        raise EraseProError("filename_prefix needs a file name, e.g. erasepro/van_gogh")
    counter = 1
    if folder.is_dir():
        for f in folder.iterdir():
            n = f.name
            if n.startswith(base + "_") and n.endswith("_.safetensors"):
                digits = n[len(base) + 1:-len("_.safetensors")]
                if digits.isdigit():
                    counter = max(counter, int(digits) + 1)
    path = folder / f"{base}_{counter:05}_.safetensors"
    return path, os.path.relpath(path, root).replace(os.sep, "/")


class SaveEraseProEdit:
    DESCRIPTION = ("Saves an ErasePro edit as a small LoRA file in ComfyUI's loras folder. Every layer is stored "
                   "as its exact low-rank factors (no approximation), in the kohya key layout that ComfyUI's "
                   "Load LoRA, A1111 and Forge read, with the concepts, settings and a fingerprint of the base "
                   "model in its metadata. Load it back with Load ErasePro Edit (checks the base model) or Load LoRA.")
    CATEGORY = "ErasePro"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The file's name inside the loras folder (what Load LoRA lists).",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "edit": ("ERASEPRO_EDIT", {"tooltip": "The edit from ErasePro Progressive Solver (or Load ErasePro Edit)."}),
                "filename_prefix": ("STRING", {"default": "erasepro/erased", "tooltip": "File name inside the loras folder; a counter and .safetensors are appended. Subfolders allowed."}),
                "dtype": (DTYPES, {"default": "float32", "tooltip": "Storage precision of the factors. float32 is exact (bit-exact round trip); float16/bfloat16 halve the size."}),
            },
        }

    def save(self, edit, filename_prefix, dtype="float32"):
        root = loras_dir()
        path, rel = _next_path(filename_prefix, root)
        save_edit_file(edit, path, dtype)
        size = path.stat().st_size
        text = f"saved {rel} ({size / 1e6:.2f} MB, {len(edit.sites)} layers, {dtype})"
        log.info("ErasePro: %s", text)
        return {"ui": {"text": [text]}, "result": (rel,)}


class LoadEraseProEdit:
    DESCRIPTION = ("Loads an ErasePro edit saved by Save ErasePro Edit (or the erasepro_ops batch command) for "
                   "Apply Erased UNet. Only well-formed safetensors files are read (never pickles). The edit's "
                   "fingerprint is checked against the MODEL/CLIP it is applied to: an edit made for another base "
                   "model is refused unless ignore_fingerprint is on.")
    CATEGORY = "ErasePro"
    RETURN_TYPES = ("ERASEPRO_EDIT", "STRING")
    RETURN_NAMES = ("edit", "info")
    OUTPUT_TOOLTIPS = ("The edit; connect to Apply Erased UNet (with the same MODEL and CLIP).",
                       "What the file holds: concepts, method, settings, figures, fingerprint check.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "edit_name": (folder_paths.get_filename_list("loras"), {"tooltip": "An ErasePro edit file in the loras folder."}),
                "model": ("MODEL", {"tooltip": "The model the edit will be applied to; its weights are checked against the edit's fingerprint."}),
                "ignore_fingerprint": ("BOOLEAN", {"default": False, "tooltip": "Apply the edit even if it was made for another base model (shapes must still match). The erasure is then no longer exact."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The CLIP the edit will be applied to; needed when the edit changes the text encoder."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, edit_name, **kwargs):
        path = folder_paths.get_full_path("loras", edit_name)
        if not path or not os.path.isfile(path):
            return ""
        st = os.stat(path)
        return f"{st.st_mtime_ns}:{st.st_size}"

    def load(self, edit_name, model, ignore_fingerprint=False, clip=None):
        path = folder_paths.get_full_path("loras", edit_name)
        if path is None:
            raise EraseProError(f"no file {edit_name!r} in the loras folder")
        edit = load_edit_file(path)
        note = check_against(edit, model, clip, bool(ignore_fingerprint))
        if ignore_fingerprint:  # the override travels with the edit: Apply Erased UNet skips its check too
            edit = dataclasses.replace(edit, fingerprint_ignored=True)
        info = export.describe(export.read_metadata(path)) + "\n" + note
        return (edit, info)
