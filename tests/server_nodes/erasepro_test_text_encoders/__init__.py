"""Test-only ComfyUI extension, loaded by the tests' live server (never shipped with the pack).

ComfyUI's stock DualCLIPLoader / CLIPLoader build a T5 at T5-XXL's size (4.7B parameters)
whatever the file holds, which no test machine here can run. A reduced text encoder written by
the tests (scripts/comfy_dit.py ``ensure_flux_workflow_files``,
``ensure_chroma_workflow_files``) carries the ``model_options``
that rebuild it in its safetensors metadata; this passes them to ComfyUI's own
``comfy.sd.load_clip``, exactly as the in-process tests do. Files without that key (every real
model) load unchanged, and the loader nodes, the CLIP object and everything after them are
ComfyUI's own.
"""
import json

import comfy.sd
from safetensors import safe_open

KEY = "erasepro_test_model_options"
_stock_load_clip = comfy.sd.load_clip


def _test_options(paths) -> dict:
    options = {}
    for path in paths:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if KEY in meta:
                options.update(json.loads(meta[KEY]))
    return options


def load_clip(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}):
    return _stock_load_clip(ckpt_paths, embedding_directory=embedding_directory, clip_type=clip_type,
                            model_options={**_test_options(ckpt_paths), **model_options})


comfy.sd.load_clip = load_clip
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
