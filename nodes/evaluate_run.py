"""ErasePro Evaluate's ComfyUI work: input checks, batched sampling, VAE decode, CLIP vision embeddings.

Sampling is ComfyUI's own (``comfy.sample.prepare_noise`` + ``comfy.sample.sample``, as the KSampler
node does); decoding is the VAE's ``decode``; embeddings are the CLIP_VISION's ``encode_image``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.utils

from erasepro_comfy.host import detect
from erasepro_ops.errors import EraseProError

log = logging.getLogger("ErasePro")


@dataclass(frozen=True)
class SamplerSetup:
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    width: int
    height: int
    negative: str = ""
    batch_size: int = 4

    def check(self) -> None:
        if not math.isfinite(self.cfg):
            raise EraseProError(f"ErasePro Evaluate: cfg must be a finite number (got {self.cfg})")
        if self.width % 8 or self.height % 8:
            raise EraseProError(f"ErasePro Evaluate: width and height must be multiples of 8 (got {self.width} x "
                                f"{self.height}); e.g. {self.width // 8 * 8 or 8} x {self.height // 8 * 8 or 8}")
        if self.steps < 1 or self.batch_size < 1:
            raise EraseProError("ErasePro Evaluate: steps and batch_size must be at least 1")

    def describe(self) -> str:
        return (f"seed {self.seed}, {self.steps} steps, cfg {self.cfg:g}, {self.sampler_name}/{self.scheduler}, "
                f"{self.width}x{self.height}")


def check_models(original_model, original_clip, erased_model, erased_clip) -> None:
    """Both MODEL/CLIP pairs belong together and the two models share one architecture."""
    archs = []
    for which, model, clip in (("original", original_model, original_clip), ("erased", erased_model, erased_clip)):
        try:
            archs.append(detect(model, clip))
        except EraseProError as e:
            raise EraseProError(f"ErasePro Evaluate: {which}_model / {which}_clip: {e}") from e
    a, b = archs
    if a.name != b.name or a.deep_keys != b.deep_keys or a.context_width != b.context_width:
        raise EraseProError(
            f"ErasePro Evaluate: original_model ({a.name.upper()}, {len(a.deep_keys)} cross-attention K/V layers) "
            f"and erased_model ({b.name.upper()}, {len(b.deep_keys)}) are different architectures: connect the "
            "MODEL and CLIP from Apply Erased UNet, made from the same checkpoint as the original")


def encode_prompt(clip, prompt: str):
    """``(cond [1, T, D], pooled or None)`` through ComfyUI's own CLIP encode."""
    tokens = clip.tokenize(prompt)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def _conditioning(encoded: list) -> list:
    cond = torch.cat([c for c, _ in encoded])
    pooled = [p for _, p in encoded]
    extra = {"pooled_output": torch.cat(pooled)} if all(p is not None for p in pooled) else {}
    return [[cond, extra]]


def _interrupt_check(*_args) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


@torch.no_grad()
def _sample_batch(model, vae, setup: SamplerSetup, encoded: list, negative) -> torch.Tensor:
    n = len(encoded)
    latent = torch.zeros([n, 4, setup.height // 8, setup.width // 8])
    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)
    if fix is not None:
        latent = fix(model, latent)
    # One seed per image, independent of the batch it lands in: the same noise for every prompt and model.
    noise = torch.cat([comfy.sample.prepare_noise(latent[:1], setup.seed)] * n)
    neg = _conditioning([negative] * n)
    samples = comfy.sample.sample(model, noise, setup.steps, setup.cfg, setup.sampler_name, setup.scheduler,
                                  _conditioning(encoded), neg, latent, denoise=1.0, disable_pbar=True,
                                  seed=setup.seed, callback=_interrupt_check)
    images = vae.decode(samples)
    if images.ndim == 5:  # some VAEs return [B, frames, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images.detach().float().clamp(0.0, 1.0).cpu()


def render(model, clip, vae, setup: SamplerSetup, prompts: list[str], bar) -> torch.Tensor:
    """``[N, H, W, 3]`` images of ``prompts`` (same seed each), sampled in batches of up to
    ``setup.batch_size`` of equally long conditionings, halving the batch on out-of-memory."""
    encoded = [encode_prompt(clip, p) for p in prompts]
    negative = encode_prompt(clip, setup.negative)
    out, i, size = [], 0, setup.batch_size
    while i < len(encoded):
        _interrupt_check()
        j = i + 1
        while j < len(encoded) and j - i < size and encoded[j][0].shape == encoded[i][0].shape:
            j += 1
        try:
            out.append(_sample_batch(model, vae, setup, encoded[i:j], negative))
        except comfy.model_management.OOM_EXCEPTION:
            if size == 1:
                raise
            size = max(1, (j - i) // 2)
            log.warning("ErasePro Evaluate: out of memory with %d images per batch, trying %d", j - i, size)
            comfy.model_management.soft_empty_cache()
            continue
        bar.update(j - i)
        i = j
    return torch.cat(out)


@torch.no_grad()
def image_embeddings(clip_vision, images: torch.Tensor, batch: int) -> torch.Tensor:
    """``[N, D]`` CLIP vision ``image_embeds`` of ``[N, H, W, 3]`` images."""
    chunks = []
    for i in range(0, images.shape[0], max(1, batch)):
        _interrupt_check()
        chunks.append(clip_vision.encode_image(images[i:i + batch]).image_embeds.detach().float().cpu())
    return torch.cat(chunks)


def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)
