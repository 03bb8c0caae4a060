"""ErasePro Progressive Solver: the closed-form erasure, with a report chart and summary."""

import comfy.model_management
import comfy.utils

from erasepro_comfy.host import ComfyHost
from erasepro_ops.chain import METHODS, SHALLOW_RULES
from erasepro_ops.contexts import (ALL_PADDING, DEFAULT_CONTEXT_TEMPLATES, DEFAULT_TEMPLATE_PADDING, MAX_CONTEXT_TEMPLATES,
                                   PADDING_TEMPLATES)
from erasepro_ops.linalg import DEFAULT_OVERFLOW_DAMPING
from erasepro_ops.pipeline import run_erasure
from erasepro_ops.report import draw_report, report_to_image_tensor, summary_text
from erasepro_ops.request import Request
from erasepro_ops.retain import DEFAULT_RETAIN_STRENGTH
from erasepro_ops.text import prompt_lines


def preserve_lines(text: str) -> tuple[str, ...]:
    return prompt_lines(text) or ()


class ProgressiveSolver:
    DESCRIPTION = ("Erases the concepts in closed form: aligns the target's features with the anchor's exactly "
                   "(zero residual), spreading the change from shallow text-encoder layers to the UNet's "
                   "cross-attention so the deep layers move least. Takes seconds on a GPU.")
    CATEGORY = "ErasePro"
    RETURN_TYPES = ("ERASEPRO_EDIT", "IMAGE", "STRING")
    RETURN_NAMES = ("edit", "report", "summary")
    OUTPUT_TOOLTIPS = ("The edit; connect to Apply Erased UNet.",
                       "A chart of the per-layer change and the residual.",
                       "The figures as text: residual, deep burden, time.")
    FUNCTION = "solve"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to erase from (SD1.x, SD2.x, SDXL, SD3 / SD3.5, Flux.1, Chroma or Z-Image). LoRAs already applied count."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) of the same model: the checkpoint's CLIP, or the CLIP loader's output made for this model (DualCLIPLoader for Flux, CLIPLoader for Chroma and Z-Image)."}),
                "concepts": ("ERASEPRO_CONCEPTS", {"tooltip": "From ErasePro Concept Pair (chain several for many concepts)."}),
                "progressive_layers": ("INT", {"default": 3, "min": 0, "max": 12, "tooltip": "How many shallow text-encoder blocks (of 12; scaled for deeper encoders) take part of the change. 0 = edit the UNet only (a DiT's text gateway)."}),
                "method": (list(METHODS), {"default": "erasepro", "tooltip": "erasepro: exact (zero-residual) alignment. uce: the UCE baseline, for comparison."}),
            },
            "optional": {
                "preserve": ("STRING", {"multiline": True, "default": "", "tooltip": "Prompts that must keep working, one per line. erasepro keeps their features exactly where they were (after the erased concepts' own tokens, within the rank budget); uce weights them softly."}),
                "shallow_rule": (list(SHALLOW_RULES), {"default": "residual_schedule", "tooltip": "How shallow blocks move: residual_schedule closes the gap to the anchor step by step; anchor_features is the published rule."}),
                "preserve_strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000000.0, "step": 1.0, "tooltip": "Extra soft weighting towards the preserve prompts on top of keeping them exactly (0 = off, the default). Larger values also steer the rest of the edit away from them; with progressive_layers > 0 they can make the UNet fit rounding noise, so leave at 0 unless the preserve set is larger than the rank budget."}),
                "features": (["all", "last_token"], {"default": "all", "tooltip": "Which token positions are constrained: all (the concept, every later position and the prefix) or only each template's last concept token, as the official UCE does."}),
                "overflow_damping": ("FLOAT", {"default": DEFAULT_OVERFLOW_DAMPING, "min": 0.0, "max": 1.0, "step": 0.0001, "tooltip": "Only matters when the constraints exceed the rank budget (many concepts in one solve): the overflow (padding positions) is fitted by damped least squares instead of exactly, so the model is not wrecked. 0 = plain least squares; larger = gentler edit, larger residual."}),
                "keep_empty_prompt": ("BOOLEAN", {"default": True, "tooltip": "Hold the empty prompt exactly still (erasepro). Samplers run it as the negative/unconditional branch at every step of every image, so moving it changes pictures that never name the concept."}),
                "retain_strength": ("FLOAT", {"default": DEFAULT_RETAIN_STRENGTH, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": "With progressive_layers > 0 (erasepro): steer the text-encoder edit away from a built-in bank of 300 ordinary prompts, so prompts you did not list change less. 0 = off; larger = they change less, the edit spreads elsewhere."}),
                "template_padding": ("INT", {"default": DEFAULT_TEMPLATE_PADDING, "min": 0, "max": ALL_PADDING, "tooltip": f"erasepro: how many padding positions after each template's end token are aligned exactly. 77 = all of them: the template prompts themselves are erased to the last digit, but other prompts and sentences you write are served worse (they drift more, the UNet changes more). Fewer = better on your own sentences, lighter on everything else. With several concepts in one solve their templates share the padding positions of {PADDING_TEMPLATES} (one concept's): at 8, three concepts get 2 each and ten none; the padding is lowered further if it would overflow the model's rank budget; the summary says so. A concept whose anchor has another token count aligns none below 77 (SD1.x, SD2.x, SDXL): its padding sits one position off the anchor's, and aligning it would move every prompt's padding."}),
                "context_sentences": ("INT", {"default": DEFAULT_CONTEXT_TEMPLATES, "min": 0, "max": MAX_CONTEXT_TEMPLATES, "tooltip": "erasepro: also align the concept in this many varied built-in sentences per concept (at its own tokens, the words after it and the end token). Erases better in sentences you write yourself and moves unlisted prompts less, but one concept then fills the rank budget: the templates' padding and the empty prompt are fitted by least squares instead of exactly. 0 = the templates only (exact)."}),
            },
        }

    @staticmethod
    def request(concepts, progressive_layers, method, preserve="", shallow_rule="residual_schedule",
                preserve_strength=0.0, features="all", overflow_damping=DEFAULT_OVERFLOW_DAMPING,
                keep_empty_prompt=True, retain_strength=DEFAULT_RETAIN_STRENGTH,
                template_padding=DEFAULT_TEMPLATE_PADDING, context_sentences=DEFAULT_CONTEXT_TEMPLATES) -> Request:
        """The solve's request from the node's inputs (settings without a widget keep their defaults)."""
        return Request(tuple(concepts or ()), int(progressive_layers), method, shallow_rule,
                       preserve_lines(preserve), float(preserve_strength), features=features,
                       overflow_damping=float(overflow_damping), keep_empty_prompt=bool(keep_empty_prompt),
                       retain_strength=float(retain_strength), template_padding=int(template_padding),
                       context_templates=int(context_sentences))

    def solve(self, model, clip, concepts, progressive_layers, method, preserve="", shallow_rule="residual_schedule",
              preserve_strength=0.0, features="all", overflow_damping=DEFAULT_OVERFLOW_DAMPING,
              keep_empty_prompt=True, retain_strength=DEFAULT_RETAIN_STRENGTH,
              template_padding=DEFAULT_TEMPLATE_PADDING, context_sentences=DEFAULT_CONTEXT_TEMPLATES):
        host = ComfyHost(model, clip)
        bar = comfy.utils.ProgressBar(host.architecture().site_count(progressive_layers))

        def step(_name):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)

        request = self.request(concepts, progressive_layers, method, preserve, shallow_rule, preserve_strength,
                               features, overflow_damping, keep_empty_prompt, retain_strength, template_padding,
                               context_sentences)
        edit = run_erasure(host, request, on_site=step)
        report = dict(edit.summary)
        image = report_to_image_tensor(draw_report(report))
        return {"ui": {"erasepro_report": [report]}, "result": (edit, image, summary_text(report))}
