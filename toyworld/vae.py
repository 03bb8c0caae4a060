"""The toy world's VAE: ComfyUI's own AutoencoderKL, small, trained on the renders.

One downsampling level: a 32 × 32 render is a 16 × 16 × 4 latent. (ComfyUI's Empty Latent Image
makes width / 8: 128 × 128 there gives this latent, which decodes to a 32 × 32 picture.) Trained
as SD's KL autoencoder without its adversarial and perceptual terms:
L = |x − D(z)|₁ + ‖x − D(z)‖² + β KL(q(z|x) ‖ N(0, I)), z = μ + σ ε. Afterwards the latent
is rescaled (:func:`calibrate`) so that SD1.x's latent scale 0.18215 gives unit variance, as
ComfyUI's SD15 latent format assumes.
"""
from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from . import world
from .init import reset_parameters

DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
EMBED_DIM = 4
SD15_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor


def build():
    from comfy.ldm.models.autoencoder import AutoencoderKL
    return AutoencoderKL(ddconfig=dict(DDCONFIG), embed_dim=EMBED_DIM)


def _moments(ae, x):
    mean, logvar = ae.quant_conv(ae.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def _decode(ae, z):
    return ae.decoder(ae.post_quant_conv(z))


def train(seed: int = 0, steps: int = 600, batch: int = 32, lr: float = 2e-3, beta: float = 1e-6, log=print):
    """Fit on fresh renders (in [-1, 1]); deterministic from ``seed``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 11)
    ae = reset_parameters(build(), seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    t0 = time.time()
    for step in range(steps):
        x = world.render(world.sample_scenes(batch, g), seed=seed * 7919 + step) * 2 - 1
        mean, logvar = _moments(ae, x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = _decode(ae, z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"[vae] step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    ae.eval()
    calibrate(ae, seed)
    return ae


@torch.no_grad()
def calibrate(ae, seed: int = 0, n: int = 256) -> float:
    """Scale the latent so that std(z)·0.18215 = 1: the mean half of ``quant_conv`` by c, its
    log-variance half by +2 ln c, ``post_quant_conv``'s input by 1/c (the decoder unchanged)."""
    images = world.render(world.sample_scenes(n, torch.Generator().manual_seed(seed + 5)), seed=seed) * 2 - 1
    std = float(_moments(ae, images)[0].std())
    c = 1.0 / (SD15_SCALE * std)
    k = EMBED_DIM
    ae.quant_conv.weight[:k] *= c
    ae.quant_conv.bias[:k] *= c
    ae.quant_conv.bias[k:] += 2 * torch.log(torch.tensor(c))
    ae.post_quant_conv.weight /= c
    return c


@torch.no_grad()
def encode(ae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Renders [N, 3, 32, 32] in [0, 1] → latent means [N, 4, 16, 16] (ComfyUI's VAE encodes the mode)."""
    out = [_moments(ae, images[i:i + batch] * 2 - 1)[0] for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def decode(ae, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Latents → pictures [N, 3, 32, 32] in [0, 1]."""
    out = [_decode(ae, latents[i:i + batch]) for i in range(0, len(latents), batch)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def reconstruction_error(ae, seed: int = 3, n: int = 128) -> float:
    """Mean absolute error (0–1 scale) of encode → decode on unseen renders at render size."""
    images = world.render(world.sample_scenes(n, torch.Generator().manual_seed(seed)), seed=seed)
    return float((decode(ae, encode(ae, images)) - images).abs().mean())
