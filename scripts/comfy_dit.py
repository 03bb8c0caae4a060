"""Flux.1 (dev) in the in-process ComfyUI host: random-weight models from ComfyUI's own classes.

Companion of :mod:`scripts.comfy_host` (SD1.5 / SD2 / SDXL). Everything here is a real ComfyUI
object, built the way ComfyUI builds it, only smaller:

* MODEL: ``comfy.model_patcher.ModelPatcher`` around ``comfy.model_base.Flux`` (the DiT
  ``comfy.ldm.flux.model.Flux``), from ``comfy.supported_models.Flux`` with a custom unet_config
  (guidance_embed True, as Flux.1 dev).
* CLIP: ``comfy.sd.CLIP`` whose cond_stage_model is ``comfy.text_encoders.flux.FluxClipModel``
  (``clip_l`` = ``sd1_clip.SDClipModel``, ``t5xxl`` = ``sd3_clip.T5XXLModel`` around
  ``comfy.text_encoders.t5.T5``) and tokenizer ``FluxTokenizer``. The widths are reduced the
  ComfyUI-supported way: ``SDClipModel`` merges ``model_options["<model_name>_model_config"]``
  into the text model's JSON config (``clip_l_model_config`` / ``t5xxl_model_config``).

Main entry points::

    model, clip = build_flux("tiny")                 # hidden 128, T5 d_model 64, CLIP-L 768 x 4 layers
    cond, pooled = encode_flux(clip, "a photo of a cat")   # [1, 256, 64], [1, 768]
    v = flux_velocity(model, cond, pooled, latents, sigmas)  # the DiT's raw output (velocity)
    paths = save_flux_files(model, clip, folder)     # diffusion model + clip_l + t5xxl files
    model2, clip2 = load_flux_files(paths)           # comfy.sd.load_diffusion_model / load_clip

What ComfyUI's loaders force (ComfyUI 0.3.75):

* ``comfy.sd.load_diffusion_model`` -> ``model_detection.detect_unet_config`` (Flux branch,
  comfy/model_detection.py:201-270) reads hidden_size (img_in / txt_in rows), context_in_dim
  (txt_in columns), vec_in_dim (vector_in.in_layer columns), in_channels, depth and
  depth_single_blocks from the weights, but *hard-codes* num_heads 24, axes_dim [16, 56, 56],
  mlp_ratio 4.0, theta 10000, qkv_bias True, patch_size 2 (lines 219-226). FluxParams then needs
  hidden_size % 24 == 0 and hidden_size // 24 == 128 (comfy/ldm/flux/model.py:57-63), so a
  loadable Flux file has hidden_size exactly 3072. Safetensors metadata cannot override this
  (the ``metadata["config"]`` hook exists only for LTXV, model_detection.py:313). Hence
  ``size="loader"``: hidden 3072, 24 heads, one double and one single block (~0.5 B parameters).
* ``comfy.sd.load_clip(..., clip_type=CLIPType.FLUX)`` with two files (comfy/sd.py:1172-1174)
  does no shape detection for Flux: ``flux_clip(**t5xxl_detect(...))`` only reads the T5 dtype
  (sd.py:1036-1044, sd3_clip.py t5_xxl_detect), and ``T5XXLModel`` always starts from
  ``t5_config_xxl.json`` (d_model 4096, 24 layers, 64 heads, d_ff 10240); CLIP-L from
  ``sd1_clip_config.json`` (12 layers). Smaller text encoders load only when ``model_options``
  saying so are passed to ``load_clip`` (``t5xxl_model_config`` for the T5; for CLIP-L
  ``model_config``, because ``long_clipl.model_options_long_clip`` overwrites
  ``clip_l_model_config``, see :func:`load_clip_model_options`). ``save_flux_files`` writes them
  next to the weights (``text_encoders.json``) and :func:`load_flux_files` passes them. The stock
  DualCLIPLoader node passes no such options: it would build a full T5-XXL and fail on the shape
  mismatch (and a CLIP-L with fewer than 12 layers would keep uninitialised layers).
"""
from __future__ import annotations

import json
from pathlib import Path

from scripts.comfy_host import REPO, import_comfy, init_weights_

SIZES = ("tiny", "loader")

# CLIP-L: full width (768, as Flux's vector_in expects), reduced depth like comfy_host's tiny SD1.5.
TINY_CLIP_L_LAYERS = 4

# T5 "tiny": ComfyUI's T5 class with gated-gelu like T5-XXL, small widths; vocab kept at 32128
# (t5_config_xxl.json) so every id of the shipped T5 tokenizer is covered.
TINY_T5 = {"d_model": 64, "d_kv": 32, "num_heads": 2, "d_ff": 128,
           "is_gated_act": True, "dense_act_fn": "gelu_pytorch_tanh", "vocab_size": 32128}

TE_CONFIG_NAME = "text_encoders.json"
FILE_NAMES = {"diffusion_model": "flux_diffusion_model.safetensors",
              "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl.safetensors"}


# ---------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------
def flux_unet_config(size: str = "tiny", context_in_dim: int = TINY_T5["d_model"], vec_in_dim: int = 768) -> dict:
    """The Flux dit_config in the form ``model_detection.detect_unet_config`` produces.

    ``tiny``: hidden 128, 2 heads (head dim 64, axes_dim [8, 28, 28]: Flux's 16:56:56 halved).
    ``loader``: the smallest Flux ComfyUI's detection loads back from a file: hidden 3072,
    24 heads, axes_dim [16, 56, 56] (forced by model_detection.py:219-221), one double and one
    single block."""
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
           "patch_size": 2, "mlp_ratio": 4.0, "theta": 10000, "qkv_bias": True,
           "context_in_dim": int(context_in_dim), "vec_in_dim": int(vec_in_dim),
           "depth": 1, "depth_single_blocks": 1}
    if size == "tiny":
        cfg.update(hidden_size=128, num_heads=2, axes_dim=[8, 28, 28])
    elif size == "loader":
        cfg.update(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56])
    else:
        raise ValueError(f"size must be one of {SIZES}")
    return cfg


def flux_model_config(size: str = "tiny", dtype=None, context_in_dim: int = TINY_T5["d_model"], vec_in_dim: int = 768):
    """``comfy.supported_models.Flux`` (Flux.1 dev) for a build, inference dtype set."""
    import torch
    c = import_comfy()
    mc = c.supported_models.Flux(flux_unet_config(size, context_in_dim, vec_in_dim))
    dtype = dtype or torch.float32
    mm = c.model_management
    mc.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), mc.supported_inference_dtypes))
    return mc


def t5_config(layers: int = 2, t5: dict | None = None) -> dict:
    """The tiny T5 overrides (merged by SDClipModel into t5_config_xxl.json); ``t5`` changes
    more of them (``{"d_model": 256, "d_ff": 512}``)."""
    return {**TINY_T5, **(t5 or {}), "num_layers": int(layers)}


def flux_te_model_options(t5_layers: int = 2, clip_l_layers: int = TINY_CLIP_L_LAYERS, dtype=None,
                          t5: dict | None = None) -> dict:
    """``model_options`` for ``comfy.sd.CLIP`` that make FluxClipModel build the tiny encoders
    (``None`` = ComfyUI's full config for that encoder). For ``comfy.sd.load_clip`` use
    :func:`load_clip_model_options` (the loader rewrites ``clip_l_model_config``)."""
    opts = {}
    if dtype is not None:
        opts["dtype"] = dtype
    if clip_l_layers is not None:
        opts["clip_l_model_config"] = {"num_hidden_layers": int(clip_l_layers)}
    if t5_layers is not None:
        opts["t5xxl_model_config"] = t5_config(t5_layers, t5)
    return opts


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------
def build_flux_model(size: str = "tiny", seed: int = 0, dtype=None, context_in_dim: int = TINY_T5["d_model"],
                     vec_in_dim: int = 768, std: float = 0.02):
    """MODEL: ``ModelPatcher`` around ``comfy.model_base.Flux``, random weights (seeded)."""
    c = import_comfy()
    mm = c.model_management
    mc = flux_model_config(size, dtype, context_in_dim, vec_in_dim)
    model = mc.get_model({}, "", device=mm.unet_inital_load_device(0, mc.unet_config["dtype"]))
    init_weights_(model.diffusion_model, seed=seed, std=std)
    return c.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def build_flux_clip(seed: int = 0, dtype=None, t5_layers: int = 2, clip_l_layers: int = TINY_CLIP_L_LAYERS,
                    std: float = 0.02, t5: dict | None = None):
    """CLIP: ``comfy.sd.CLIP`` from ``supported_models.Flux.clip_target()`` (FluxTokenizer +
    FluxClipModel) with the tiny T5 / CLIP-L configs, random weights (seeded)."""
    import torch
    c = import_comfy()
    target = flux_model_config("tiny").clip_target()
    clip = c.sd.CLIP(target, model_options=flux_te_model_options(t5_layers, clip_l_layers, dtype or torch.float32, t5))
    init_weights_(clip.cond_stage_model, seed=seed + 1, std=std)
    return clip


def build_flux(size: str = "tiny", seed: int = 0, dtype=None, t5_layers: int = 2,
               clip_l_layers: int = TINY_CLIP_L_LAYERS, t5: dict | None = None):
    """(MODEL, CLIP) of a Flux.1 dev build. ``size``: "tiny" (hidden 128) or "loader" (hidden
    3072, the smallest that ``comfy.sd.load_diffusion_model`` detects back); the text encoders are
    tiny in both (T5 d_model 64 with ``t5_layers`` blocks, CLIP-L 768 wide)."""
    clip = build_flux_clip(seed, dtype, t5_layers, clip_l_layers, t5=t5)
    model = build_flux_model(size, seed, dtype, context_in_dim=_t5_width(clip), vec_in_dim=_clip_l_width(clip))
    return model, clip


def _t5_width(clip) -> int:
    return int(clip.cond_stage_model.t5xxl.transformer.shared.weight.shape[1])


def _clip_l_width(clip) -> int:
    return int(clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1])


# ---------------------------------------------------------------------------------------
# Text encoding and the DiT call
# ---------------------------------------------------------------------------------------
def encode_flux(clip, text: str):
    """(cond [1, 256·k, d_t5], pooled [1, 768]) through ``clip.tokenize`` +
    ``encode_from_tokens(return_pooled=True)``, as CLIPTextEncode does. cond is the T5 output
    (FluxTokenizer pads T5 to at least 256 tokens), pooled is CLIP-L's pooled output."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def flux_velocity(model, cond, pooled, latents, timesteps, guidance: float = 3.5, load: bool = True,
                  return_denoised: bool = False):
    """The Flux DiT's raw output (the flow velocity) for ``latents`` [B, 16, h, w] at sigmas
    ``timesteps`` (float in (0, 1], scalar / [1] / [B]; Flux's timestep *is* sigma). Chroma too
    (``pooled`` None: it reads no pooled embedding).

    Goes the samplers' way: ``model.model.extra_conds(cross_attn=cond, pooled_output=pooled,
    guidance=...)`` -> ``process_cond`` -> ``model.model.apply_model(x, sigma, c_crossattn=...,
    y=..., guidance=..., transformer_options=...)`` with the patcher's weights loaded
    (``load_models_gpu``). ``apply_model`` returns the denoised latent (x - v·sigma); the raw
    DiT output is taken from a forward hook on ``diffusion_model`` during that call.
    Returns float32 on the latents' device (``(v, denoised)`` with ``return_denoised``)."""
    import torch
    c = import_comfy()
    if load:
        c.model_management.load_models_gpu([model])
    m = model.model
    dev = next(m.diffusion_model.parameters()).device
    x = latents.to(dev, torch.float32)
    b = x.shape[0]
    sigma = torch.as_tensor(timesteps, dtype=torch.float32, device=dev).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(b)
    conds = m.extra_conds(cross_attn=cond.to(dev), pooled_output=None if pooled is None else pooled.to(dev),
                          guidance=guidance,
                          noise=x, device=dev, width=x.shape[-1] * 8, height=x.shape[-2] * 8)
    kwargs = {k: v.process_cond(batch_size=b, device=dev, area=None).cond for k, v in conds.items()}
    topts = model.model_options.get("transformer_options", {}).copy()
    captured = []
    h = m.diffusion_model.register_forward_hook(lambda mod, a, out: captured.append(out))
    try:
        with torch.no_grad():
            denoised = m.apply_model(x, sigma, transformer_options=topts, **kwargs)
    finally:
        h.remove()
    v = captured[-1].float().to(latents.device)
    if return_denoised:
        return v, denoised.float().to(latents.device)
    return v


def load_clip_model_options(clip_l_layers: int | None = TINY_CLIP_L_LAYERS, t5: dict | None = None) -> dict:
    """``model_options`` for ``comfy.sd.load_clip`` that rebuild the reduced Flux text encoders.

    Not the same keys as for ``comfy.sd.CLIP``: ``load_text_encoder_state_dicts`` runs
    ``long_clipl.model_options_long_clip`` on each file (comfy/sd.py:1216), which *replaces*
    ``clip_l_model_config`` with ``model_options["model_config"]`` plus max_position_embeddings
    (comfy/text_encoders/long_clipl.py:22-25). So CLIP-L's depth goes in ``model_config``; the
    T5's in ``t5xxl_model_config`` (read by SDClipModel for model_name "t5xxl")."""
    opts = {}
    if clip_l_layers is not None:
        opts["model_config"] = {"num_hidden_layers": int(clip_l_layers)}
    if t5 is not None:
        opts["t5xxl_model_config"] = dict(t5)
    return opts


def t5_config_of(clip) -> dict:
    """The T5 config overrides that rebuild ``clip``'s T5 (read off its weights)."""
    t5 = clip.cond_stage_model.t5xxl.transformer
    blk = t5.encoder.block[0]
    att, ff = blk.layer[0].SelfAttention, blk.layer[-1].DenseReluDense
    gated = hasattr(ff, "wi_0")
    return {"d_model": int(t5.shared.weight.shape[1]), "vocab_size": int(t5.shared.weight.shape[0]),
            "num_heads": int(att.num_heads), "d_kv": int(att.q.weight.shape[0]) // int(att.num_heads),
            "d_ff": int(ff.wo.weight.shape[1]), "num_layers": int(t5.num_layers),
            "is_gated_act": gated, "dense_act_fn": "gelu_pytorch_tanh" if gated else "relu"}


# ---------------------------------------------------------------------------------------
# Files, as users have them: diffusion model + clip_l + t5xxl
# ---------------------------------------------------------------------------------------
def _cast(sd: dict, dtype) -> dict:
    out = {}
    for k, t in sd.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.detach().cpu().contiguous()
    return out


def encoder_state_dict(clip_sd: dict, name: str) -> dict:
    """One text encoder's weights out of a CLIP's state dict, keyed as its own file holds them
    (``t5xxl.transformer.encoder.…`` -> ``encoder.…``), the way ComfyUI's CLIPSave splits a CLIP."""
    spu = import_comfy().utils.state_dict_prefix_replace
    part = {k: v for k, v in clip_sd.items() if k.startswith(name + ".")}
    return spu(spu(part, {name + ".": ""}), {"transformer.": ""})


def save_flux_files(model, clip, folder, dtype=None) -> dict:
    """Write ``folder``/flux_diffusion_model.safetensors (BFL keys ``img_in.weight``,
    ``double_blocks.0...``, as flux1-dev.safetensors and "Load Diffusion Model" read them),
    clip_l.safetensors (``text_model.*``) and t5xxl.safetensors (``encoder.*``, ``shared.weight``)
    the way ComfyUI's CLIPSave splits a Flux CLIP, plus text_encoders.json (the te model_options
    :func:`load_flux_files` needs for the reduced text encoders). Patches are baked in
    (``load_models_gpu(force_patch_weights=True)``, as the save nodes do). ``dtype`` default
    float16. Returns {"diffusion_model", "clip_l", "t5xxl", "te_config": Path}."""
    import torch
    c = import_comfy()
    dtype = torch.float16 if dtype is None else dtype
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    paths = {k: folder / v for k, v in FILE_NAMES.items()}
    c.utils.save_torch_file(_cast(model.model.diffusion_model.state_dict(), dtype), str(paths["diffusion_model"]))
    clip_sd = clip.get_sd()
    for name in ("clip_l", "t5xxl"):
        c.utils.save_torch_file(_cast(encoder_state_dict(clip_sd, name), dtype), str(paths[name]))
    te = load_clip_model_options(int(clip.cond_stage_model.clip_l.num_layers), t5_config_of(clip))
    paths["te_config"] = folder / TE_CONFIG_NAME
    paths["te_config"].write_text(json.dumps(te, indent=1))
    return paths


def load_flux_files(folder_or_paths, te_model_options: dict | None = None, model_options: dict | None = None):
    """(MODEL, CLIP) through ComfyUI's own loaders: ``comfy.sd.load_diffusion_model`` (what
    "Load Diffusion Model" calls) and ``comfy.sd.load_clip(ckpt_paths=[clip_l, t5xxl],
    clip_type=CLIPType.FLUX)`` (DualCLIPLoader, type "flux") with the reduced text encoders'
    configs from text_encoders.json (or ``te_model_options``). The loaders pick their default
    dtypes (on the CPU: text encoders float16, the DiT float32).

    Raises ValueError for a diffusion model ComfyUI cannot detect back (hidden size != 3072,
    see the module docstring): build it with ``size="loader"``."""
    c = import_comfy()
    if isinstance(folder_or_paths, dict):
        paths = {k: Path(v) for k, v in folder_or_paths.items()}
    else:
        folder = Path(folder_or_paths)
        paths = {k: folder / v for k, v in FILE_NAMES.items()}
        paths["te_config"] = folder / TE_CONFIG_NAME
    from safetensors import safe_open
    with safe_open(str(paths["diffusion_model"]), framework="pt") as f:
        hidden = f.get_slice("img_in.weight").get_shape()[0] if "img_in.weight" in f.keys() else None
    if hidden is not None and hidden != 3072:
        raise ValueError(f"{paths['diffusion_model']}: hidden size {hidden}; ComfyUI's Flux detection forces "
                         "num_heads 24 and axes_dim [16, 56, 56] (comfy/model_detection.py:219-221), i.e. "
                         "hidden 3072. Build with size='loader'.")
    if te_model_options is None:
        p = paths.get("te_config")
        te_model_options = json.loads(Path(p).read_text()) if p is not None and Path(p).is_file() else {}
    model = c.sd.load_diffusion_model(str(paths["diffusion_model"]), model_options=dict(model_options or {}))
    clip = c.sd.load_clip(ckpt_paths=[str(paths["clip_l"]), str(paths["t5xxl"])],
                          clip_type=c.sd.CLIPType.FLUX, model_options=dict(te_model_options))
    return model, clip


def as_users_load(seed: int = 0, t5_layers: int = 2, folder=None, t5: dict | None = None):
    """(MODEL, CLIP) of a ``size="loader"`` build saved as float16 files and loaded back through
    ComfyUI's loaders (text encoders in float16, as ComfyUI loads them), cached in ``folder``
    (default ``<repo>/.cache/flux/loader_s{seed}_t{t5_layers}[_d{d_model}]``)."""
    width = f"_d{t5['d_model']}" if t5 and "d_model" in t5 else ""
    folder = Path(folder or REPO / ".cache" / "flux" / f"loader_s{seed}_t{t5_layers}{width}")
    if not all((folder / n).is_file() for n in (*FILE_NAMES.values(), TE_CONFIG_NAME)):
        model, clip = build_flux("loader", seed, t5_layers=t5_layers, t5=t5)
        save_flux_files(model, clip, folder)
        del model, clip
    return load_flux_files(folder)


# ---------------------------------------------------------------------------------------
# Chroma: Flux's transformer without vector_in, a T5 alone, prompts unpadded
# ---------------------------------------------------------------------------------------
def chroma_unet_config(context_in_dim: int = TINY_T5["d_model"]) -> dict:
    """A tiny ``comfy.supported_models.Chroma`` unet_config: hidden 128, 2 heads, one double and one
    single block, the modulation approximator 64 → 256 (× 2 layers) → 128. ComfyUI's detection
    would force hidden 3072 and a 5120-wide approximator (model_detection.py:251-258), so a
    Chroma is built in memory here, not loaded from a file."""
    return {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "mlp_ratio": 4.0,
            "theta": 10000, "qkv_bias": True, "context_in_dim": int(context_in_dim), "hidden_size": 128,
            "num_heads": 2, "axes_dim": [8, 28, 28], "depth": 1, "depth_single_blocks": 1,
            "in_dim": 64, "out_dim": 128, "hidden_dim": 256, "n_layers": 2}


def _random_model(config_class: str, unet_config: dict, seed: int, dtype, std: float, fill=None):
    """``ModelPatcher`` around ``comfy.supported_models.<config_class>(unet_config)``'s model, its
    inference dtype set, random weights (seeded); ``fill(diffusion_model)`` sets what is not a weight."""
    import torch
    c = import_comfy()
    mm = c.model_management
    mc = getattr(c.supported_models, config_class)(unet_config)
    dtype = dtype or torch.float32
    mc.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), mc.supported_inference_dtypes))
    model = mc.get_model({}, "", device=mm.unet_inital_load_device(0, dtype))
    init_weights_(model.diffusion_model, seed=seed, std=std)
    if fill is not None:
        fill(model.diffusion_model)
    return c.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def build_chroma_model(seed: int = 0, dtype=None, context_in_dim: int = TINY_T5["d_model"], std: float = 0.02):
    """MODEL: ``ModelPatcher`` around ``comfy.model_base.Chroma``, random weights (seeded)."""
    return _random_model("Chroma", chroma_unet_config(context_in_dim), seed, dtype, std)


def build_chroma_clip(seed: int = 0, dtype=None, t5_layers: int = 2, std: float = 0.02, t5: dict | None = None):
    """CLIP: ``comfy.sd.CLIP`` from ``supported_models.Chroma.clip_target()`` (PixArtTokenizer, no
    padding, + the PixArt T5 model) with the tiny T5 config, random weights (seeded)."""
    import torch
    c = import_comfy()
    target = c.supported_models.Chroma(chroma_unet_config()).clip_target()
    opts = {"dtype": dtype or torch.float32, "t5xxl_model_config": t5_config(t5_layers, t5)}
    clip = c.sd.CLIP(target, model_options=opts)
    init_weights_(clip.cond_stage_model, seed=seed + 1, std=std)
    return clip


def build_chroma(seed: int = 0, dtype=None, t5_layers: int = 2, t5: dict | None = None):
    """(MODEL, CLIP) of a tiny Chroma: its T5 (``t5_layers`` blocks, d_model 64 unless ``t5`` says)."""
    clip = build_chroma_clip(seed, dtype, t5_layers, t5=t5)
    return build_chroma_model(seed, dtype, context_in_dim=_t5_width(clip)), clip


def t5_as_users_load(clip, folder, dtype=None):
    """Chroma's CLIP as CLIPLoader (type chroma) gives it for ``clip``'s T5 saved as one float16
    file (``t5xxl.safetensors``, ``encoder.*`` keys): the file read by ``comfy.utils.load_torch_file``,
    the T5's dtype detected from it, the CLIP built and loaded by ``comfy.sd.CLIP`` — what
    ``comfy.sd.load_text_encoder_state_dicts`` does once it has recognised a T5-XXL. Its
    recognition itself needs block 23 of a 4096-wide T5 (comfy/sd.py detect_te_model), so a reduced
    T5 file would be taken for T5-base; this skips only that step. On the CPU ComfyUI runs it in
    float16, as users get it."""
    import torch
    c = import_comfy()
    from comfy import supported_models_base
    from comfy.text_encoders import pixart_t5, sd3_clip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAMES["t5xxl"]
    c.utils.save_torch_file(_cast(encoder_state_dict(clip.get_sd(), "t5xxl"), dtype or torch.float16), str(path))
    sd = c.utils.load_torch_file(str(path), safe_load=True)
    target = supported_models_base.ClipTarget(pixart_t5.PixArtTokenizer,
                                              pixart_t5.pixart_te(**sd3_clip.t5_xxl_detect(sd)))
    loaded = c.sd.CLIP(target, parameters=c.utils.calculate_parameters(sd),
                       model_options=load_clip_model_options(None, t5_config_of(clip)))
    missing, _ = loaded.load_sd(sd)
    if missing:
        raise ValueError(f"{path}: the T5 misses {missing[:3]}")
    return loaded


# ---------------------------------------------------------------------------------------
# SD3 / SD3.5: an MMDiT reading CLIP-L‖G (zero-padded to 4096) then T5 along the tokens
# ---------------------------------------------------------------------------------------
SD3_T5 = {"d_model": 4096, "d_kv": 64, "num_heads": 4, "d_ff": 512}  # SD3's encode pads the CLIPs to 4096: T5 must be that wide


def sd3_unet_config(depth: int = 2) -> dict:
    """A tiny ``comfy.supported_models.SD3`` unet_config as ``model_detection`` reads it from a file:
    hidden 64·depth (SD3's head size 64, ``depth`` heads), the 4096-wide ``context_embedder``, the
    2048-wide pooled input, a 16 × 16 position grid."""
    return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
            "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64 * depth}},
            "num_patches": 256, "pos_embed_max_size": 16}


def _sd3_pos_embed(dm) -> None:
    """pos_embed is a buffer a checkpoint fills (torch.empty until then): SD3's fixed 2D sin-cos grid."""
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    grid = get_2d_sincos_pos_embed(dm.hidden_size, dm.pos_embed_max_size)
    dm.pos_embed.copy_(torch.as_tensor(grid, dtype=dm.pos_embed.dtype).reshape(dm.pos_embed.shape))


def build_sd3_model(seed: int = 0, dtype=None, depth: int = 2, std: float = 0.02):
    """MODEL: ``ModelPatcher`` around ``comfy.model_base.SD3`` (ComfyUI's MMDiT), random weights."""
    return _random_model("SD3", sd3_unet_config(depth), seed, dtype, std, fill=_sd3_pos_embed)


def build_sd3_clip(seed: int = 0, dtype=None, clip_layers: int | None = 4, t5_layers: int | None = 4,
                   std: float = 0.02):
    """CLIP: ``comfy.sd.CLIP`` with ``sd3_clip.SD3Tokenizer`` and ``SD3ClipModel``: CLIP-L (768) and
    CLIP-G (1280) at full width with ``clip_layers`` layers (None: full depth, 12 and 32), and a T5
    4096 wide (SD3's encode needs that width) with ``t5_layers`` blocks and a small feed-forward;
    ``t5_layers`` None: no T5, as a checkpoint with only the CLIPs (or DualCLIPLoader type sd3) gives."""
    import torch
    c = import_comfy()
    from comfy import supported_models_base
    from comfy.text_encoders import sd3_clip
    with_t5 = t5_layers is not None
    target = supported_models_base.ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(
        clip_l=True, clip_g=True, t5=with_t5, dtype_t5=dtype or torch.float32))
    opts = {"dtype": dtype or torch.float32}
    if clip_layers is not None:
        opts["clip_l_model_config"] = {"num_hidden_layers": int(clip_layers)}
        opts["clip_g_model_config"] = {"num_hidden_layers": int(clip_layers)}
    if with_t5:
        opts["t5xxl_model_config"] = t5_config(t5_layers, SD3_T5)
    clip = c.sd.CLIP(target, model_options=opts)
    init_weights_(clip.cond_stage_model, seed=seed + 1, std=std)
    return clip


def build_sd3(seed: int = 0, dtype=None, clip_layers: int = 4, t5_layers: int | None = 4, depth: int = 2):
    """(MODEL, CLIP) of a tiny SD3 (see :func:`build_sd3_model`, :func:`build_sd3_clip`)."""
    return build_sd3_model(seed, dtype, depth), build_sd3_clip(seed, dtype, clip_layers, t5_layers)


SD3_CHECKPOINT_NAME = "erasepro_tiny_sd3.safetensors"


def ensure_sd3_checkpoint(folder, seed: int = 0) -> Path:
    """``folder/erasepro_tiny_sd3.safetensors``, written once: an SD3 checkpoint the stock Load
    Checkpoint detects as SD3 (its MMDiT detection takes any depth): the tiny MMDiT (depth 2),
    CLIP-L and CLIP-G at full depth (the loader builds them so), no T5, a 16-channel VAE; float16,
    random weights, saved the way CheckpointSave does."""
    import torch
    from scripts.comfy_host import save_checkpoint, vae_state_dict
    path = Path(folder) / SD3_CHECKPOINT_NAME
    if not path.is_file():
        c = import_comfy()
        model, clip = build_sd3_model(seed), build_sd3_clip(seed, clip_layers=None, t5_layers=None)
        vae = c.sd.VAE(sd=vae_state_dict(seed, latent_channels=16))
        tmp = save_checkpoint(model, clip, path.with_name(path.name + ".tmp"), torch.float16, vae=vae)
        tmp.replace(path)
    return path


FLUX_WORKFLOW_FILES = {"diffusion_models": "erasepro_tiny_flux.safetensors",
                       "clip_l": "erasepro_tiny_flux_clip_l.safetensors",
                       "t5xxl": "erasepro_tiny_flux_t5xxl.safetensors", "vae": "erasepro_tiny_flux_ae.safetensors"}
TEST_MODEL_OPTIONS_KEY = "erasepro_test_model_options"
"""Safetensors metadata key of a reduced text encoder written for the live-server tests: the
``model_options`` that ``comfy.sd.load_clip`` needs to build it (tests/server_nodes reads it)."""


WORKFLOW_T5 = {"d_model": 512, "d_ff": 1024}
"""The Flux workflow files' T5 width (the gateway's rank budget: 512 holds one concept exactly)."""


def ensure_flux_workflow_files(models_dir, seed: int = 0, t5_layers: int = 4) -> dict:
    """The files the Flux example workflow names, written once into ComfyUI's ``models_dir``:
    ``diffusion_models/`` the ``size="loader"`` Flux (hidden 3072, one block of each kind),
    ``text_encoders/`` CLIP-L at full depth and a small T5 (``t5_layers`` blocks, :data:`WORKFLOW_T5`;
    its config in the metadata under :data:`TEST_MODEL_OPTIONS_KEY`), ``vae/`` a 16-channel KL
    VAE; float16, random weights. Returns {"diffusion_models", "clip_l", "t5xxl", "vae": Path}."""
    import torch
    from safetensors.torch import load_file
    from scripts.comfy_host import vae_state_dict
    models_dir = Path(models_dir)
    sub = {"diffusion_models": "diffusion_models", "clip_l": "text_encoders", "t5xxl": "text_encoders",
           "vae": "vae"}
    paths = {k: models_dir / sub[k] / name for k, name in FLUX_WORKFLOW_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    c = import_comfy()
    model, clip = build_flux("loader", seed, t5_layers=t5_layers, clip_l_layers=12, t5=WORKFLOW_T5)
    tmp = models_dir / ".erasepro_flux_tmp"
    written = save_flux_files(model, clip, tmp)
    options = json.dumps(load_clip_model_options(None, t5_config_of(clip)))
    del model, clip
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    c.utils.save_torch_file(load_file(str(written["t5xxl"])), str(paths["t5xxl"]),
                            metadata={TEST_MODEL_OPTIONS_KEY: options})
    written["clip_l"].replace(paths["clip_l"])
    c.utils.save_torch_file(vae_state_dict(seed, dtype=torch.float16, latent_channels=16), str(paths["vae"]))
    written["diffusion_model"].replace(paths["diffusion_models"])  # last: its presence means all are written
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return paths


CHROMA_WORKFLOW_FILES = {"diffusion_models": "erasepro_tiny_chroma.safetensors",
                         "t5xxl": "erasepro_tiny_chroma_t5xxl.safetensors",
                         "vae": FLUX_WORKFLOW_FILES["vae"]}
CHROMA_WORKFLOW_T5 = {"d_model": 4096, "d_kv": 64, "num_heads": 1, "d_ff": 256}
"""The Chroma workflow files' T5: CLIPLoader recognises a T5-XXL only by block 23 of a 4096-wide
encoder (comfy/sd.py ``detect_te_model``), so 24 blocks at T5-XXL's width, with one head and a
narrow feed-forward (~0.23 B parameters, 465 MB in fp16, most of them the token embedding)."""


def chroma_loader_unet_config() -> dict:
    """The Chroma dit_config ComfyUI's detection gives a file with one double and one single block:
    hidden 3072, 24 heads, the modulation approximator 64 -> 5120 (x 5) -> 3072, T5-XXL's 4096
    (model_detection.py:219-258 force all but the depths and the T5 width)."""
    return {**chroma_unet_config(CHROMA_WORKFLOW_T5["d_model"]), "hidden_size": 3072, "num_heads": 24,
            "axes_dim": [16, 56, 56], "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}


def ensure_chroma_workflow_files(models_dir, seed: int = 0) -> dict:
    """The files the Chroma example workflow names, written once into ComfyUI's ``models_dir``:
    ``diffusion_models/`` a Chroma that "Load Diffusion Model" detects (:func:`chroma_loader_unet_config`),
    ``text_encoders/`` the T5 of :data:`CHROMA_WORKFLOW_T5` (24 blocks; its config in the metadata
    under :data:`TEST_MODEL_OPTIONS_KEY`), ``vae/`` the Flux workflow's 16-channel VAE (Chroma
    uses Flux's); float16, random weights. Returns {"diffusion_models", "t5xxl", "vae": Path}."""
    import torch
    from scripts.comfy_host import vae_state_dict
    models_dir = Path(models_dir)
    sub = {"diffusion_models": "diffusion_models", "t5xxl": "text_encoders", "vae": "vae"}
    paths = {k: models_dir / sub[k] / name for k, name in CHROMA_WORKFLOW_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    c = import_comfy()
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    if not paths["vae"].is_file():
        tmp = paths["vae"].with_name(paths["vae"].name + ".tmp")
        c.utils.save_torch_file(vae_state_dict(seed, dtype=torch.float16, latent_channels=16), str(tmp))
        tmp.replace(paths["vae"])
    clip = build_chroma_clip(seed, t5_layers=24, t5=CHROMA_WORKFLOW_T5)
    options = json.dumps(load_clip_model_options(None, t5_config_of(clip)))
    c.utils.save_torch_file(_cast(encoder_state_dict(clip.get_sd(), "t5xxl"), torch.float16),
                            str(paths["t5xxl"]), metadata={TEST_MODEL_OPTIONS_KEY: options})
    del clip
    model = _random_model("Chroma", chroma_loader_unet_config(), seed, None, 0.02)
    tmp = paths["diffusion_models"].with_name(paths["diffusion_models"].name + ".tmp")
    c.utils.save_torch_file(_cast(model.model.diffusion_model.state_dict(), torch.float16), str(tmp))
    tmp.replace(paths["diffusion_models"])  # last: its presence means all are written
    return paths


# ---------------------------------------------------------------------------------------
# Z-Image: Qwen3 (a causal decoder LLM) -> cap_embedder (RMSNorm, then the linear gateway)
# ---------------------------------------------------------------------------------------
# Qwen3-4B's shape made small: ComfyUI's Qwen3_4B class reads ``qwen3_4b_model_config`` over its
# config (head_dim stays 128); the vocabulary is kept so every id of the shipped tokenizer exists.
TINY_QWEN3 = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 2,
              "num_key_value_heads": 1}


def zimage_unet_config(cap_feat_dim: int = TINY_QWEN3["hidden_size"]) -> dict:
    """A tiny ``comfy.supported_models.ZImage`` unet_config (Lumina 2's NextDiT as Z-Image sets it:
    z_image_modulation, captions padded to a multiple of 32 with a learned token): hidden 256, two
    heads of 128 (the rope axes 32 + 48 + 48, as Z-Image's), one refiner and one main layer.
    ComfyUI's detection reads Z-Image only at hidden 3840, so it is built in memory."""
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": int(cap_feat_dim),
            "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
            "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
            "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
            "pad_tokens_multiple": 32}


def build_zimage_model(seed: int = 0, dtype=None, cap_feat_dim: int = TINY_QWEN3["hidden_size"], std: float = 0.02):
    """MODEL: ``ModelPatcher`` around ``comfy.model_base.Lumina2`` from ``supported_models.ZImage``."""
    return _random_model("ZImage", zimage_unet_config(cap_feat_dim), seed, dtype, std)


def qwen3_config(layers: int = TINY_QWEN3["num_hidden_layers"], qwen: dict | None = None) -> dict:
    return {**(qwen or TINY_QWEN3), "num_hidden_layers": int(layers)}


def build_zimage_clip(seed: int = 0, dtype=None, layers: int = TINY_QWEN3["num_hidden_layers"], std: float = 0.02,
                      qwen: dict | None = None):
    """CLIP: ``comfy.sd.CLIP`` with ``z_image.ZImageTokenizer`` (the chat template around the prompt)
    and ``z_image.te()`` (``Qwen3_4BModel``: the hidden state after the second-to-last layer, no
    final norm), the Qwen3 reduced as :data:`TINY_QWEN3` says."""
    import torch
    c = import_comfy()
    from comfy import supported_models_base
    from comfy.text_encoders import z_image
    target = supported_models_base.ClipTarget(z_image.ZImageTokenizer, z_image.te())
    clip = c.sd.CLIP(target, model_options={"dtype": dtype or torch.float32,
                                            "qwen3_4b_model_config": qwen3_config(layers, qwen)})
    init_weights_(clip.cond_stage_model, seed=seed + 1, std=std)
    return clip


def build_zimage(seed: int = 0, dtype=None, layers: int = TINY_QWEN3["num_hidden_layers"]):
    """(MODEL, CLIP) of a tiny Z-Image (see :func:`build_zimage_model`, :func:`build_zimage_clip`)."""
    return build_zimage_model(seed, dtype), build_zimage_clip(seed, dtype, layers)


def qwen3_as_users_load(clip, folder, dtype=None):
    """Z-Image's CLIP as CLIPLoader gives it for ``clip``'s Qwen3 saved as one float16 file
    (``qwen3_4b.safetensors``, ``model.*`` keys): ``comfy.sd.load_clip`` itself, which recognises a
    Qwen3-4B by its q_norm (any size) and loads it in its detected dtype; only the reduced shape is
    passed as ``model_options`` (the stock node would build the full 4B model). On the CPU
    ComfyUI runs it in float16, as users get it."""
    import torch
    c = import_comfy()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qwen3_4b.safetensors"
    part = {k.removeprefix("qwen3_4b.transformer."): v for k, v in clip.get_sd().items() if k.startswith("qwen3_4b.")}
    c.utils.save_torch_file(_cast(part, dtype or torch.float16), str(path))
    config = clip.cond_stage_model.qwen3_4b.transformer.model.config
    shape = {k: getattr(config, k) for k in TINY_QWEN3}
    return c.sd.load_clip([str(path)], clip_type=c.sd.CLIPType.LUMINA2,
                          model_options={"qwen3_4b_model_config": shape})
