"""The toy world's diffusion model: ComfyUI's UNetModel (SD1.x's, narrow), trained on frozen text.

Trained as SD was: the VAE's latents x₀ (scaled by 0.18215), SD1.x's discrete schedule (1000
steps, scaled-linear β from 0.00085 to 0.012), the noisy latent xₜ = √ᾱₜ x₀ + √(1 − ᾱₜ) ε and
the loss ‖ε − ε_θ(xₜ, t, c)‖², c the frozen text encoder's per-token features (all 77
positions, padding included, as ComfyUI passes them); captions dropped to the empty prompt at
``drop`` for classifier-free guidance. Three levels (16, 8, 4), cross-attention on the two
coarser ones and the middle block, as SDXL leaves its finest level without attention.
"""
from __future__ import annotations

import time

import torch

from . import world
from .init import reset_parameters
from .vae import SD15_SCALE

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 16, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 64, "use_linear_in_transformer": False,
    "context_dim": 128, "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
}


def model_config(dtype=torch.float32):
    """ComfyUI's SD15 model config at this UNet's size (its latent format, schedule and heads)."""
    import comfy.supported_models
    mc = comfy.supported_models.SD15(dict(UNET_CONFIG))
    mc.set_inference_dtype(dtype, None)
    return mc


def build():
    """(BaseModel, its UNetModel): what ComfyUI's loader would build for this config."""
    model = model_config().get_model({}, "")
    return model, model.diffusion_model


def alphas_cumprod(model) -> torch.Tensor:
    """ᾱₜ from ComfyUI's own schedule: σₜ² = (1 − ᾱₜ)/ᾱₜ."""
    return 1.0 / (1.0 + model.model_sampling.sigmas.double() ** 2)


def train(text, ae, seed: int = 0, steps: int = 3600, batch: int = 32, lr: float = 6e-4, drop: float = 0.1,
          snr_gamma: float = 5.0, offset_noise: float = 0.1, log=print):
    """Train the UNet on fresh renders, ``text`` and ``ae`` frozen; deterministic from ``seed``.
    Each sample's loss is weighted by min(SNRₜ, γ) / SNRₜ (min-SNR weighting: the noisy steps,
    where the layout and the shapes are decided, are not drowned by the easy clean ones); the
    weights returned are the exponential moving average (0.999) of the trained ones.

    Offset noise: ε = n + ``offset_noise``·m, n ~ N(0, I) per element and m ~ N(0, I) one value
    per sample and channel. SD1.x's last step keeps √ᾱ_T ≈ 0.07 of the signal, and a 16×16
    latent's noise has a per-channel mean of spread 1/16 — as large: trained on plain noise, the
    model takes the starting noise's mean for the picture's and draws the background and the
    colour the seed suggests (measured: white backgrounds drawn sand-coloured, red drawn orange;
    sampling from zero-mean noise raised colour from 85 % to 99 %). With the offset the starting
    mean is noise to the model, and the caption decides the picture's overall colour."""
    from .text_encoder import Tokenizer
    from .vae import encode
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 21)
    model, unet = build()
    reset_parameters(unet, seed)
    unet.train()
    abar = alphas_cumprod(model).float()
    snr = abar / (1 - abar)
    tok = Tokenizer()
    text.eval().requires_grad_(False)
    ae.eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.02, 2 / steps))
    ema = [p.detach().clone() for p in unet.parameters()]
    t0 = time.time()
    for step in range(steps):
        scenes = world.sample_scenes(batch, g)
        caps = [world.caption(s, g) if u > drop else "" for s, u in zip(scenes, torch.rand(batch, generator=g).tolist())]
        with torch.no_grad():
            x0 = encode(ae, world.render(scenes, seed=seed * 15485863 + step)) * SD15_SCALE
            context = text(tok.ids(caps))[0]
        t = torch.randint(0, len(abar), (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        eps = eps + offset_noise * torch.randn(x0.shape[:2] + (1, 1), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        per_sample = (unet(xt, timesteps=t.float(), context=context) - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * snr[t].clamp(max=snr_gamma) / snr[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"[unet] step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval()
    return model
