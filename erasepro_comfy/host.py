"""ErasePro's host on ComfyUI for SD1.x, SD2.x and SDXL (``erasepro_ops.host.Host``).

Which family a MODEL is, whether the CLIP belongs to it, and the host's calls on ComfyUI's
objects. Everything here reads ComfyUI objects; the pipeline lives in ``erasepro_ops``.
"""

from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_management
import comfy.supported_models

from erasepro_ops.tokens import SpecialTokens, token_chunks
from erasepro_ops.errors import EraseProError, log  # noqa: F401  (re-exported)
from erasepro_ops.family import FAMILIES, Architecture, ModelFamily, TextEncoder
from erasepro_ops.fingerprint import fingerprint  # noqa: F401  (re-exported)
from erasepro_ops.host import Encoded

from .encode import PROBE_BATCH, ClipLayerBlock, encode_batch, encoder_layers, encoder_module, first_layer_inputs  # noqa: F401
from .weights import effective_weights, fingerprint_of  # noqa: F401

TEXT_ENCODERS = ("clip_l", "clip_h", "clip_g")  # the cond_stage_model attributes looked for


def model_family(model) -> ModelFamily:
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if isinstance(base, comfy.model_base.SDXL):
        return FAMILIES["sdxl"]
    if isinstance(config, comfy.supported_models.SD20):
        return FAMILIES["sd2"]
    if isinstance(config, comfy.supported_models.SD15):
        return FAMILIES["sd15"]
    name = type(config).__name__ if config is not None else type(base).__name__
    raise EraseProError(f"not supported yet: {name}. ErasePro supports SD1.x, SD2.x and SDXL models.")


def _special_tokens(clip, encoder_attr: str) -> SpecialTokens:
    tok = getattr(clip.tokenizer, encoder_attr, None)
    if tok is None:
        raise EraseProError(f"the CLIP's tokenizer has no {encoder_attr}: the CLIP does not match the MODEL")
    end = tok.end_token
    pad = tok.pad_token if getattr(tok, "pad_token", None) is not None else end
    if not getattr(tok, "pad_with_end", True) and getattr(tok, "pad_token", None) is None:
        pad = 0
    return SpecialTokens(start=tok.start_token, end=end, pad=pad)


def _text_encoders(clip, family: ModelFamily) -> tuple[TextEncoder, ...]:
    stage = clip.cond_stage_model
    expected = [e.name for e in family.encoders]
    present = [a for a in TEXT_ENCODERS if hasattr(stage, a)]
    if present != expected:
        raise EraseProError(
            f"the CLIP does not match the MODEL: a {family.name.upper()} model needs text encoder(s) {expected}, "
            f"this CLIP has {present or [type(stage).__name__]}. Use the CLIP from the same checkpoint.")
    encoders = []
    for spec in family.encoders:
        module = getattr(stage, spec.name, None)
        if not hasattr(module, "transformer"):
            raise EraseProError(f"not supported yet: the text encoder {spec.name} of this CLIP is not a CLIP transformer")
        text_model = module.transformer.text_model
        encoders.append(TextEncoder(spec, _special_tokens(clip, spec.name), len(text_model.encoder.layers),
                                    text_model.final_layer_norm.weight.shape[0]))
    return tuple(encoders)


def detect(model, clip) -> Architecture:
    """Check MODEL and CLIP belong together and list the sites."""
    family = model_family(model)
    if clip is None:
        raise EraseProError("connect the CLIP from the same checkpoint as the MODEL")
    encoders = _text_encoders(clip, family)
    width = sum(e.width for e in encoders)
    context = model.model.model_config.unet_config.get("context_dim")
    if context is not None and context != width:
        raise EraseProError(f"the CLIP does not match the MODEL: it gives {width}-wide text features, "
                            f"the UNet reads {context}")
    unet = model.model.diffusion_model
    deep = tuple(f"{family.deep_prefix}{name}.weight" for name, _ in unet.named_modules()
                 if any(name.endswith(site) for site in family.deep_sites))
    if not deep:
        raise EraseProError("not supported yet: this UNet has no cross-attention key/value layers")
    pooled = 0
    if family.pooled_site is not None:
        pooled = encoder_module(clip, encoders[family.pooled_encoder]).transformer.text_projection.weight.shape[0]
    return Architecture(family, encoders, deep, pooled)


def solve_device():
    """The device ComfyUI computes on (the GPU when there is one)."""
    return comfy.model_management.get_torch_device()


class ComfyHost:
    """``erasepro_ops.host.Host`` on a ComfyUI MODEL and CLIP."""

    def __init__(self, model, clip):
        self.model, self.clip = model, clip
        self._arch = None

    def architecture(self) -> Architecture:
        if self._arch is None:
            self._arch = detect(self.model, self.clip)
        return self._arch

    def tokenize(self, text: str, encoder: TextEncoder) -> list[list[int]]:
        return token_chunks(self.clip.tokenize(text), encoder.token_key)

    def encode(self, chunks, capture: bool = False, overrides=None) -> Encoded:
        arch = self.architecture()
        return Encoded(*encode_batch(self.clip, arch.encoders, chunks, capture=capture, overrides=overrides,
                                     combine=arch.family.combine))

    def first_block_inputs(self, chunks) -> list:
        return first_layer_inputs(self.clip, self.architecture().encoders, chunks)

    def text_weights(self, keys) -> dict[str, torch.Tensor]:
        return effective_weights(self.clip.patcher, keys)

    def text_digest(self, encoder, depth: int) -> str:
        text_model = f"{encoder.name}.transformer.text_model."
        prefixes = (text_model + "embeddings.",) + tuple(f"{text_model}encoder.layers.{l}." for l in range(depth))
        keys = [k for k in self.clip.patcher.get_key_patches() if k.startswith(prefixes)]
        return fingerprint_of([(self.clip.patcher, keys)])

    def model_weights(self, keys) -> dict[str, torch.Tensor]:
        return effective_weights(self.model, keys)

    def shallow_blocks(self, encoder, keys, weights, biases, captured) -> list[ClipLayerBlock]:
        h, mask, attention = captured
        layers = encoder_layers(self.clip, encoder)
        blocks = [ClipLayerBlock(key, layers[l], w.to(h.device), b.to(h.device), mask, attention)
                  for l, (key, w, b) in enumerate(zip(keys, weights, biases))]
        self.clip.load_model()
        return blocks

    def solve_device(self):
        return solve_device()

    def free_device_memory(self) -> None:
        comfy.model_management.soft_empty_cache()
