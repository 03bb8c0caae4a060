"""The toy world's trained model as ComfyUI objects: MODEL, CLIP and VAE from one file.

The file (``toyworld/weights/toy_sd15.safetensors``, made by ``make toy-model``) holds an SD1.x
model narrower than ComfyUI's loader detects: a 128-wide CLIP text encoder, a small UNet reading
it, and a one-level VAE. They are built here from ComfyUI's own classes, configured from the
file's metadata, and loaded with ComfyUI's dtype and device choices, so the rest of the pack
and ComfyUI see an ordinary SD1.x model.
"""
from __future__ import annotations

import json
from pathlib import Path

MODEL_PATH = Path(__file__).resolve().parents[1] / "toyworld" / "weights" / "toy_sd15.safetensors"
LATENT_FACTOR = 2  # the VAE's downscale: a 16 × 16 latent is a 32 × 32 picture


class ToyModelError(ValueError):
    pass


def _split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def read(path: Path = MODEL_PATH) -> tuple[dict, dict]:
    """(state dict, metadata) of the toy model file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise ToyModelError(f"the toy model file is missing: {path}. Run `make toy-model` in the pack's folder "
                            "(or restore it from git).")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for key in ("erasepro.toy.text_config", "erasepro.toy.unet_config", "erasepro.toy.vae_config"):
        if key not in meta:
            raise ToyModelError(f"{path} is not a toy model file (no {key} in its metadata)")
    return load_file(str(path)), meta


def load(path: Path = MODEL_PATH):
    """(MODEL, CLIP, VAE) of the toy model, as ComfyUI's checkpoint loader would give them."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    sd, meta = read(path)
    text_cfg = json.loads(meta["erasepro.toy.text_config"])
    unet_cfg = json.loads(meta["erasepro.toy.unet_config"])
    vae_cfg = json.loads(meta["erasepro.toy.vae_config"])

    mc = comfy.supported_models.SD15(dict(unet_cfg))
    unet_sd = _split(sd, "model.diffusion_model.")
    params = sum(v.numel() for v in unet_sd.values())
    load_device = mm.get_torch_device()
    unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=mc.supported_inference_dtypes)
    mc.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, load_device, mc.supported_inference_dtypes))
    base = mc.get_model(sd, "model.diffusion_model.", device=mm.unet_inital_load_device(params, unet_dtype))
    base.load_model_weights(sd, "model.diffusion_model.")
    model = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())

    clip_sd = {k: v for k, v in sd.items() if k.startswith("clip_l.")}
    options = {"clip_l_model_config": {k: text_cfg[k] for k in ("hidden_size", "intermediate_size",
                                                                 "num_attention_heads", "num_hidden_layers",
                                                                 "projection_dim")}}
    clip = comfy.sd.CLIP(mc.clip_target(), tokenizer_data={}, parameters=sum(v.numel() for v in clip_sd.values()),
                         model_options=options)
    missing, unexpected = clip.load_sd(clip_sd, full_model=True)
    if missing or unexpected:
        raise ToyModelError(f"{path}: the text encoder's weights do not fit (missing {list(missing)[:4]}, "
                            f"unexpected {list(unexpected)[:4]})")

    vae = comfy.sd.VAE(sd=_split(sd, "first_stage_model."), config={"params": vae_cfg})
    vae.downscale_ratio = vae.upscale_ratio = LATENT_FACTOR
    return model, clip, vae
