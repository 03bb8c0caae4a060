"""In-process ComfyUI for tests, benchmarks and scripts: random-weight models, sampling, the pack.

Builds *real* ComfyUI objects (``comfy.model_patcher.ModelPatcher``, ``comfy.sd.CLIP``,
``comfy.sd.VAE``) from ComfyUI's own classes with random weights, so code under test sees
exactly what a ComfyUI node would receive from "Load Checkpoint".

The ComfyUI folder is ``$COMFYUI`` or ``<repo>/.comfyui`` (made by ``scripts/bootstrap.sh``).
It is put at the *front* of ``sys.path`` so ComfyUI's top-level ``nodes.py`` / ``utils`` win
over this repo's ``nodes/`` package. The pack is loaded from its ``__init__.py`` as ComfyUI loads
a custom node, under another name (:func:`load_pack`); the solve itself needs no pack:
``erasepro_comfy.host.ComfyHost`` and ``erasepro_ops.pipeline.run_erasure``.

Main entry points::

    model, clip = tiny_sd15()            # also tiny_sd2(), tiny_sdxl(), build(kind, size)
    cond, pooled = encode(clip, "a photo of a cat")
    eps = unet_eps(model, cond, pooled, latents, timesteps)
    latent = ksample(model, [[cond, {"pooled_output": pooled}]], neg, seed=0, steps=1)
    pack = load_pack()                   # the repo's __init__.py as module "ComfyUI_ErasePro"

Nothing here touches the network or downloads weights.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE = "ComfyUI_ErasePro"
TINY_CHECKPOINT_NAME = "erasepro_tiny_sd15.safetensors"

KINDS = ("sd15", "sd2", "sdxl")


# ---------------------------------------------------------------------------------------
# Finding and importing ComfyUI
# ---------------------------------------------------------------------------------------
def comfy_dir() -> Path:
    """The ComfyUI folder: ``$COMFYUI`` or ``<repo>/.comfyui``."""
    p = Path(os.environ.get("COMFYUI") or (REPO / ".comfyui")).expanduser().resolve()
    return p


def ensure_comfy_path() -> Path:
    """Put the ComfyUI folder first on ``sys.path`` (idempotent) and return it."""
    d = comfy_dir()
    if not (d / "comfy" / "sd.py").is_file():
        raise RuntimeError(
            f"No ComfyUI found at {d}. Run scripts/bootstrap.sh (or `make setup`), "
            "or set COMFYUI=/path/to/ComfyUI.")
    s = str(d)
    if s in sys.path:
        sys.path.remove(s)
    sys.path.insert(0, s)
    return d


def import_comfy():
    """Import and return the ``comfy`` package (after :func:`ensure_comfy_path`)."""
    ensure_comfy_path()
    import comfy  # noqa: F401
    if "comfy.model_management" not in sys.modules:
        # ComfyUI parses no command line when imported; pick --cpu ourselves when there is
        # no usable GPU (ComfyUI would otherwise call torch.cuda.current_device() and fail).
        import torch
        import comfy.cli_args
        if os.environ.get("ERASEPRO_CPU") == "1" or not (
                torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                or torch.backends.mps.is_available()):
            comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.model_base  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.utils  # noqa: F401
    return comfy


def default_checkpoint_path() -> Path:
    return comfy_dir() / "models" / "checkpoints" / TINY_CHECKPOINT_NAME


# ---------------------------------------------------------------------------------------
# Weight initialisation (ComfyUI allocates with torch.empty: never leave weights as is)
# ---------------------------------------------------------------------------------------
def init_weights_(module, seed: int = 0, std: float = 0.02):
    """Deterministic sane init, in place: Linear/Conv/Embedding weights ~ N(0, std), biases 0,
    norm weights 1 and biases 0. Independent of device/dtype (drawn on CPU in float32)."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    done = set()
    with torch.no_grad():
        for mname, m in module.named_modules():
            is_norm = isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "Norm" in type(m).__name__
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in done:
                    continue
                done.add(id(p))
                if pname == "logit_scale":
                    continue  # created initialised by ComfyUI, unused in the forward pass
                if pname == "bias" or pname.endswith("_bias"):
                    p.zero_()
                elif is_norm:
                    p.fill_(1.0)
                else:
                    t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g)
                    p.copy_(t.to(device=p.device, dtype=p.dtype))
    return module


# ---------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------
def unet_config(kind: str = "sd15", size: str = "tiny") -> dict:
    """A UNet config dict in the exact form ``comfy.model_detection.detect_unet_config``
    produces (so a saved checkpoint is detected back as the same family)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    context_dim = {"sd15": 768, "sd2": 1024, "sdxl": 2048}[kind]
    cfg = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "use_linear_in_transformer": kind != "sd15", "context_dim": context_dim,
        "adm_in_channels": 2816 if kind == "sdxl" else None,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    if kind == "sdxl":
        cfg["num_classes"] = "sequential"
    if size == "full":
        if kind == "sdxl":
            cfg.update(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                       transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
        else:
            cfg.update(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                       transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                       transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
    elif size == "tiny":
        # two resolution levels, one res block each, transformer depth 1 everywhere
        # (SDXL-like: no attention at the first level).
        first = 0 if kind == "sdxl" else 1
        cfg.update(num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[first, 1],
                   transformer_depth_output=[first, first, 1, 1], transformer_depth_middle=1)
    else:
        raise ValueError("size must be 'tiny' or 'full'")
    return cfg


# number of text-encoder transformer layers kept in "tiny" builds ("full" keeps ComfyUI's)
TINY_CLIP_LAYERS = 4

_FAMILY_CONFIG = {"sd15": "SD15", "sd2": "SD20", "sdxl": "SDXL"}
_CLIP_NAMES = {"sd15": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


def model_config(kind: str = "sd15", size: str = "tiny", dtype=None):
    """The ``comfy.supported_models`` config object (SD15 / SD20 / SDXL) for a build."""
    c = import_comfy()
    cls = getattr(c.supported_models, _FAMILY_CONFIG[kind])
    mc = cls(unet_config(kind, size))
    import torch
    dtype = dtype or torch.float32
    mm = c.model_management
    manual_cast = mm.unet_manual_cast(dtype, mm.get_torch_device(), mc.supported_inference_dtypes)
    mc.set_inference_dtype(dtype, manual_cast)
    return mc


def build_model(kind: str = "sd15", size: str = "tiny", seed: int = 0, dtype=None, std: float = 0.02):
    """MODEL: a ``ModelPatcher`` around ``model_config.get_model()`` (BaseModel / SDXL),
    randomly initialised, exactly like ``load_checkpoint_guess_config`` wraps it."""
    c = import_comfy()
    mm = c.model_management
    mc = model_config(kind, size, dtype)
    model = mc.get_model({}, "", device=mm.unet_inital_load_device(0, mc.unet_config["dtype"]))
    init_weights_(model.diffusion_model, seed=seed, std=std)
    return c.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                        offload_device=mm.unet_offload_device())


def clip_model_options(kind: str = "sd15", size: str = "tiny", layers: int | None = None, dtype=None) -> dict:
    """``te_model_options`` for ``comfy.sd.CLIP``. Depth is reduced the ComfyUI-supported way:
    ``SDClipModel`` merges ``model_options["<model_name>_model_config"]`` into the text model's
    JSON config (model_name = clip_l / clip_h / clip_g)."""
    import torch
    opts = {"dtype": dtype or torch.float32}
    if size == "tiny" or layers is not None:
        n = layers or TINY_CLIP_LAYERS
        for name in _CLIP_NAMES[kind]:
            opts[f"{name}_model_config"] = {"num_hidden_layers": n}
    return opts


def build_clip(kind: str = "sd15", size: str = "tiny", seed: int = 0, layers: int | None = None,
               dtype=None, std: float = 0.02):
    """CLIP: ``comfy.sd.CLIP`` from the family's own ``clip_target`` (SD1ClipModel /
    SD2ClipModel / SDXLClipModel) at the real widths, randomly initialised."""
    c = import_comfy()
    mc = model_config(kind, "tiny")  # the clip target does not depend on the UNet size
    target = mc.clip_target()
    clip = c.sd.CLIP(target, model_options=clip_model_options(kind, size, layers, dtype))
    init_weights_(clip.cond_stage_model, seed=seed + 1, std=std)
    return clip


def vae_state_dict(seed: int = 0, std: float = 0.02, dtype=None, latent_channels: int = 4) -> dict:
    """State dict of the standard SD1.x/SDXL KL VAE (ComfyUI's AutoencoderKL), random init;
    ``latent_channels`` 16: SD3's (ComfyUI reads the latent width from ``decoder.conv_in``)."""
    import torch
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {'double_z': True, 'z_channels': latent_channels, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=latent_channels)
    init_weights_(ae, seed=seed + 2, std=std)
    sd = ae.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd


def build_vae(seed: int = 0, std: float = 0.02):
    c = import_comfy()
    return c.sd.VAE(sd=vae_state_dict(seed, std))


def build(kind: str = "sd15", size: str = "tiny", seed: int = 0, clip_layers: int | None = None,
          dtype=None, with_vae: bool = False):
    """(MODEL, CLIP) or (MODEL, CLIP, VAE) for ``kind`` in sd15 / sd2 / sdxl, ``size`` tiny / full."""
    model = build_model(kind, size, seed=seed, dtype=dtype)
    clip = build_clip(kind, size, seed=seed, layers=clip_layers, dtype=dtype)
    if with_vae:
        return model, clip, build_vae(seed)
    return model, clip


def save_checkpoint(model, clip, path, dtype=None, vae=None) -> Path:
    """Write MODEL + CLIP (+ VAE) as one checkpoint file the way ComfyUI's CheckpointSave does
    (``state_dict_for_saving``), every floating tensor cast to ``dtype`` (e.g. float16, as
    checkpoints are shared)."""
    c = import_comfy()
    c.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd() if vae is not None else None, None)
    for k, t in list(sd.items()):
        if dtype is not None and t.is_floating_point() and not k.endswith("position_ids"):
            t = t.to(dtype)
        sd[k] = t.detach().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c.utils.save_torch_file(sd, str(path))
    return path


def load_checkpoint(path):
    """(MODEL, CLIP) through ComfyUI's own loader, as Load Checkpoint gives them: its default
    dtypes (text encoders in float16, also on the CPU)."""
    c = import_comfy()
    model, clip, _, _ = c.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    return model, clip


def as_users_load(kind: str = "sd15", size: str = "tiny", seed: int = 0, clip_layers: int | None = None,
                  folder=None):
    """(MODEL, CLIP) of a random-weight build saved as a float16 checkpoint file and loaded back
    through ComfyUI's loader — what a user with a downloaded checkpoint has. The file is cached
    in ``folder`` (default ``<repo>/.cache/checkpoints``) by kind, size and seed. ``size`` is the
    UNet's; the text encoders are full depth (the loader builds them so).

    ComfyUI detects SDXL only at its real depth, so a tiny SDXL is built the way the loader would
    leave it instead: weights rounded to float16, text encoders in float16, the UNet as loaded."""
    import torch
    if kind == "sdxl" and size != "full":
        text_size = "full" if clip_layers is None else size
        model, clip = build_model(kind, size, seed), build_clip(kind, text_size, seed, clip_layers)
        mm = import_comfy().model_management
        with torch.no_grad():
            for p in model.model.diffusion_model.parameters():
                p.copy_(p.to(torch.float16))
        half = build_clip(kind, text_size, seed, clip_layers, dtype=mm.text_encoder_dtype(mm.text_encoder_device()))
        half.cond_stage_model.load_state_dict(clip.cond_stage_model.state_dict(), strict=False)
        return model, half
    folder = Path(folder or REPO / ".cache" / "checkpoints")
    path = folder / f"{kind}_{size}_s{seed}_fp16.safetensors"
    if not path.is_file():  # ComfyUI's loader builds the text encoders at full depth: so must we
        model, clip = build_model(kind, size, seed), build_clip(kind, "full", seed)
        tmp = save_checkpoint(model, clip, path.with_name(path.name + ".tmp"), torch.float16)
        tmp.replace(path)
        del model, clip
    return load_checkpoint(path)


def tiny_sd15(seed: int = 0, clip_layers: int = TINY_CLIP_LAYERS, dtype=None):
    """(MODEL, CLIP): SD1.5 family, CLIP-L 768 wide with ``clip_layers`` layers, tiny UNet."""
    return build("sd15", "tiny", seed, clip_layers, dtype)


def tiny_sd2(seed: int = 0, clip_layers: int = TINY_CLIP_LAYERS, dtype=None):
    """(MODEL, CLIP): SD2.x family, CLIP-H 1024 wide (penultimate layer), tiny linear-proj UNet."""
    return build("sd2", "tiny", seed, clip_layers, dtype)


def tiny_sdxl(seed: int = 0, clip_layers: int = TINY_CLIP_LAYERS, dtype=None):
    """(MODEL, CLIP): SDXL family, CLIP-L 768 + CLIP-G 1280, context 2048, adm 2816, tiny UNet."""
    return build("sdxl", "tiny", seed, clip_layers, dtype)


def family(model) -> str:
    """'sdxl' / 'sd2' / 'sd15' the way ComfyUI tells them apart."""
    c = import_comfy()
    m = getattr(model, "model", model)
    if isinstance(m, c.model_base.SDXL):
        return "sdxl"
    if isinstance(m.model_config, c.supported_models.SD20):
        return "sd2"
    if isinstance(m.model_config, c.supported_models.SD15):
        return "sd15"
    return type(m.model_config).__name__


# ---------------------------------------------------------------------------------------
# Text encoding, UNet calls and sampling
# ---------------------------------------------------------------------------------------
def encode(clip, text: str):
    """(cond [1, 77·k, D], pooled [1, P]) through ``clip.tokenize`` + ``encode_from_tokens``,
    as CLIPTextEncode does."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def conditioning(clip, text: str):
    """A CONDITIONING list exactly as the CLIPTextEncode node returns it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def _adm(model, pooled, batch: int, height: int, width: int):
    import torch
    m = model.model
    if getattr(m, "adm_channels", 0) == 0:
        return None
    if pooled is None:
        raise ValueError("this model needs the pooled text embedding (SDXL label_emb)")
    y = m.encode_adm(pooled_output=pooled, width=width * 8, height=height * 8)
    if y.shape[0] != batch:
        y = y.expand(batch, -1) if y.shape[0] == 1 else y
    return y.to(torch.float32)


def unet_eps(model, cond, pooled, latents, timesteps, load: bool = True):
    """The UNet's raw prediction (eps for EPS models) for UNet *input* ``latents`` [B,4,h,w]
    at integer DDPM ``timesteps`` (int, [B] or [1]), through ``model.model.diffusion_model``
    with the ModelPatcher's patches applied (``load_models_gpu`` patches the weights, as
    sampling does). ``cond`` [1 or B, 77, D]; ``pooled`` needed for SDXL. Returns float32 on
    the latents' device."""
    import torch
    c = import_comfy()
    if load:
        c.model_management.load_models_gpu([model])
    m = model.model
    dev = m.diffusion_model.input_blocks[0][0].weight.device
    dtype = m.get_dtype()
    if m.manual_cast_dtype is not None:
        dtype = m.manual_cast_dtype
    x = latents.to(dev, dtype)
    b = x.shape[0]
    t = torch.as_tensor(timesteps, dtype=torch.float32, device=dev).reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    ctx = cond.to(dev, dtype)
    if ctx.shape[0] != b:
        ctx = ctx.expand(b, -1, -1)
    extra = {}
    y = _adm(model, pooled, b, x.shape[-2], x.shape[-1])
    if y is not None:
        extra["y"] = y.to(dev, dtype)
    topts = model.model_options.get("transformer_options", {}).copy()
    with torch.no_grad():
        out = m.diffusion_model(x, t, context=ctx, transformer_options=topts, **extra)
    return out.float().to(latents.device)


def empty_latent(width: int = 64, height: int = 64, batch: int = 1):
    """LATENT dict as EmptyLatentImage makes it."""
    import torch
    return {"samples": torch.zeros([batch, 4, height // 8, width // 8])}


def ksample(model, positive, negative, latent=None, seed: int = 0, steps: int = 1, cfg: float = 7.0,
            sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0):
    """Run ComfyUI's real sampler exactly as the KSampler node (``nodes.common_ksampler``:
    prepare_noise + comfy.sample.sample). ``positive``/``negative``: CONDITIONING lists
    (see :func:`conditioning`). Returns the LATENT dict."""
    c = import_comfy()
    if latent is None:
        latent = empty_latent()
    latent_image = c.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = c.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    samples = c.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, noise_mask=latent.get("noise_mask"),
                                  disable_pbar=True, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


def comfy_nodes():
    """ComfyUI's own top-level ``nodes`` module (not this repo's nodes/ package)."""
    ensure_comfy_path()
    import nodes
    if not str(Path(nodes.__file__).resolve()).startswith(str(comfy_dir())):
        raise RuntimeError(f"`import nodes` resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    return nodes


# ---------------------------------------------------------------------------------------
# The pack
# ---------------------------------------------------------------------------------------
def load_pack(name: str = PACK_MODULE, reload: bool = False):
    """Import the repo root (``__init__.py`` exporting NODE_CLASS_MAPPINGS) as package
    ``name`` so its ``nodes`` subpackage is ``<name>.nodes`` and never collides with
    ComfyUI's top-level ``nodes.py``."""
    ensure_comfy_path()
    if name in sys.modules and not reload:
        return sys.modules[name]
    if reload:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
    init = REPO / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} does not exist (the pack's entry point)")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod
