"""ErasePro Evaluate: before/after images of the erased model, scored with a CLIP vision model."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

import comfy.samplers
import folder_paths

from erasepro_ops.evaluate import (erasure_scores, evaluation_rows, evaluation_summary, preservation_scores,
                                   prompt_lines)
from erasepro_ops.evaluate_grid import draw_grid, draw_score_chart
from erasepro_ops.report import report_to_image_tensor

from .evaluate_run import SamplerSetup, check_models, image_embeddings, progress_bar, render
from erasepro_ops.errors import EraseProError

PREVIEW_PREFIX = "erasepro_evaluate"


def _uint8(images) -> list[np.ndarray]:
    return [np.clip(np.rint(im.numpy() * 255.0), 0, 255).astype(np.uint8) for im in images]


def save_preview(arrays: list[np.ndarray]) -> list[dict]:
    """PNG files in ComfyUI's temp folder, as PreviewImage saves them: the node's ``ui.images``."""
    temp = folder_paths.get_temp_directory()
    h, w = arrays[0].shape[:2]
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(PREVIEW_PREFIX, temp, w, h)
    items = []
    for k, arr in enumerate(arrays):
        filename = f"{name}_{counter + k:05}_.png"
        Image.fromarray(arr).save(os.path.join(folder, filename), compress_level=1)
        items.append({"filename": filename, "subfolder": subfolder, "type": "temp"})
    return items


def score_rows(rows, originals, erased, anchors, clip_vision, batch: int) -> list:
    """Erasure for rows with an anchor, preservation for the others (see erasepro_ops.evaluate)."""
    e_o = image_embeddings(clip_vision, originals, batch)
    e_e = image_embeddings(clip_vision, erased, batch)
    scores = preservation_scores(e_o, e_e)
    named = [i for i, r in enumerate(rows) if r.anchor is not None]
    if named:
        e_a = image_embeddings(clip_vision, anchors, batch)
        for i, s in zip(named, erasure_scores(e_o[named], e_e[named], e_a)):
            scores[i] = s
    return scores


class EraseProEvaluate:
    DESCRIPTION = ("Renders prompts that name the erased concept (the solver's own and held-out sentences) and "
                   "unrelated prompts with the original and the erased model, same seed, into a labelled "
                   "before/after grid. With a CLIP vision model connected it scores each row: erasure (how far the "
                   "erased image moved from the original towards the anchor's image) and preservation (cosine "
                   "similarity of unrelated images to their originals).")
    CATEGORY = "ErasePro"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("grid", "chart", "summary")
    OUTPUT_TOOLTIPS = ("Rows: target, held-out and unrelated prompts; columns: original, erased (and the score).",
                       "Bar chart of the per-row scores (n/a without a CLIP vision model).",
                       "The setup, the group means and every row's score as text.")
    OUTPUT_NODE = True
    FUNCTION = "evaluate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "original_model": ("MODEL", {"tooltip": "The model before erasure (from Load Checkpoint)."}),
                "original_clip": ("CLIP", {"tooltip": "The CLIP of the original model."}),
                "erased_model": ("MODEL", {"tooltip": "The erased model: Apply Erased UNet's MODEL output."}),
                "erased_clip": ("CLIP", {"tooltip": "Apply Erased UNet's CLIP output (it carries the text-encoder edits)."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to decode the images."}),
                "concepts": ("ERASEPRO_CONCEPTS", {"tooltip": "The Concept Pair chain the edit was solved for: its targets, anchors and type pick the prompts."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "One seed for every image: each prompt is rendered from the same noise by both models."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps per image."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampler, as in KSampler."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule, as in KSampler."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width in pixels (a multiple of 8)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height in pixels (a multiple of 8)."}),
            },
            "optional": {
                "held_out": ("STRING", {"multiline": True, "default": "", "tooltip": "Sentences the solver never saw that name the concept, one per line, {} where the concept goes (each concept is filled in). Blank: a few built-in ones for the concept type."}),
                "unrelated": ("STRING", {"multiline": True, "default": "", "tooltip": "Prompts that must come out unchanged, one per line. Blank: a built-in set of everyday prompts."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "Optional (Load CLIP Vision): scores each row from image embeddings. Without it, the grid only."}),
                "negative": ("STRING", {"multiline": False, "default": "", "tooltip": "The negative prompt for every image (empty = unconditional)."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Images sampled together; halved automatically on out-of-memory."}),
            },
        }

    def evaluate(self, original_model, original_clip, erased_model, erased_clip, vae, concepts, seed, steps, cfg,
                 sampler_name, scheduler, width, height, held_out="", unrelated="", clip_vision=None, negative="",
                 batch_size=4):
        setup = SamplerSetup(int(seed), int(steps), float(cfg), sampler_name, scheduler, int(width), int(height),
                             negative or "", int(batch_size))
        setup.check()
        check_models(original_model, original_clip, erased_model, erased_clip)
        try:
            rows = evaluation_rows(tuple(concepts or ()), prompt_lines(held_out), prompt_lines(unrelated))
        except ValueError as e:
            raise EraseProError(f"ErasePro Evaluate: {e}") from e
        prompts = [r.prompt for r in rows]
        anchors = [r.anchor for r in rows if r.anchor is not None] if clip_vision is not None else []
        bar = progress_bar(2 * len(prompts) + len(anchors))
        originals = render(original_model, original_clip, vae, setup, prompts, bar)
        erased = render(erased_model, erased_clip, vae, setup, prompts, bar)
        scores = None
        if clip_vision is not None:
            anchor_images = render(original_model, original_clip, vae, setup, anchors, bar) if anchors else None
            scores = score_rows(rows, originals, erased, anchor_images, clip_vision, setup.batch_size)
        grid = draw_grid(rows, _uint8(originals), _uint8(erased), scores, title=f"seed {setup.seed}")
        chart = draw_score_chart(rows, scores if scores is not None else [None] * len(rows))
        summary = evaluation_summary(rows, scores, setup.describe())
        preview = save_preview([grid] + ([chart] if scores is not None else []))
        return {"ui": {"images": preview, "erasepro_evaluate": [{"rows": len(rows), "scored": scores is not None}]},
                "result": (report_to_image_tensor(grid), report_to_image_tensor(chart), summary)}
