"""ErasePro's host on ComfyUI for SD1.x, SD2.x, SDXL, SD3, Flux.1, Chroma and Z-Image
(``erasepro_ops.host.Host``).

Which family a MODEL is, whether the CLIP belongs to it, and the host's calls on ComfyUI's
objects. Everything here reads ComfyUI objects; the pipeline lives in ``erasepro_ops``.
"""

from __future__ import annotations

from pathlib import Path

import torch

import comfy.model_base
import comfy.model_management
import comfy.supported_models
import comfy.utils

from erasepro_ops.tokens import SpecialTokens, token_chunks
from erasepro_ops.errors import EraseProError, log  # noqa: F401  (re-exported)
from erasepro_ops.family import FAMILIES, Architecture, ModelFamily, TextEncoder
from erasepro_ops.fingerprint import fingerprint  # noqa: F401  (re-exported)
from erasepro_ops.host import Encoded
from erasepro_ops.weighting_cache import RETAIN_WEIGHTINGS

from .encode import (PROBE_BATCH, ClipLayerBlock, encode_batch, encoder_layers, encoder_module, encoder_stack,  # noqa: F401
                     encoder_tokenizer, first_layer_inputs)
from .weights import EffectiveWeights, effective_weights, fingerprint_of, running_fingerprints  # noqa: F401

TEXT_ENCODERS = ("clip_l", "clip_h", "clip_g", "t5xxl", "qwen3_4b")  # the cond_stage_model attributes looked for


SUPPORTED = "SD1.x, SD2.x, SDXL, SD3 / SD3.5, Flux.1, Chroma and Z-Image"


def cache_directory() -> Path:
    """Where the retain bank's weightings are kept between solves and sessions: ComfyUI's system user
    folder ``user/__erasepro`` (internal, never served over HTTP; the same path on ComfyUIs before it)."""
    import folder_paths
    system = getattr(folder_paths, "get_system_user_directory", None)
    if system is not None:
        return Path(system("erasepro")) / "weightings"
    user = getattr(folder_paths, "get_user_directory", lambda: folder_paths.user_directory)()
    return Path(user) / "__erasepro" / "weightings"


RETAIN_WEIGHTINGS.directory = cache_directory()


def model_family(model) -> ModelFamily:
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    flux = getattr(comfy.model_base, "Flux", None)  # not in ComfyUI before August 2024
    if flux is not None and type(base) is flux:  # Flux.1 dev / schnell / fill; not Flux.2
        return FAMILIES["flux"]
    chroma = getattr(comfy.model_base, "Chroma", None)  # not in ComfyUI before mid 2025
    if chroma is not None and type(base) is chroma:  # not Chroma Radiance (pixel space, untested)
        return FAMILIES["chroma"]
    sd3 = getattr(comfy.model_base, "SD3", None)  # not in ComfyUI before June 2024
    if sd3 is not None and type(base) is sd3:
        return FAMILIES["sd3"]
    z_image = getattr(comfy.supported_models, "ZImage", None)  # not in ComfyUI before November 2025
    if z_image is not None and isinstance(config, z_image):
        return FAMILIES["zimage"]
    if isinstance(base, comfy.model_base.SDXL):
        return FAMILIES["sdxl"]
    if isinstance(config, comfy.supported_models.SD20):
        return FAMILIES["sd2"]
    if isinstance(config, comfy.supported_models.SD15):
        return FAMILIES["sd15"]
    name = type(config).__name__ if config is not None else type(base).__name__
    raise EraseProError(f"not supported yet: {name}. ErasePro supports {SUPPORTED} models.")


def _special_tokens(clip, encoder_attr: str) -> SpecialTokens:
    tok = encoder_tokenizer(clip, encoder_attr)
    if tok is None:
        raise EraseProError(f"the CLIP's tokenizer has no {encoder_attr}: the CLIP does not match the MODEL")
    end = tok.end_token  # None: the tokenizer adds none (Qwen3)
    pad = tok.pad_token if getattr(tok, "pad_token", None) is not None else end
    if not getattr(tok, "pad_with_end", True) and getattr(tok, "pad_token", None) is None:
        pad = 0
    return SpecialTokens(start=tok.start_token, end=end, pad=pad)


def _read_blocks(clip, module, depth: int, pooled: bool) -> tuple[int, ...]:
    """The blocks whose outputs ComfyUI's encode hands on: the per-token layer (the module's own
    ``layer``/``layer_idx``, or the CLIP's ``clip_layer``, as ``SDClipModel.set_clip_options``
    resolves them) and, when the model reads the pooled embedding, the last block."""
    layer, index = getattr(module, "options_default", (getattr(module, "layer", "last"), getattr(module, "layer_idx", None)))[:2]
    if getattr(clip, "layer_idx", None) is not None and not (isinstance(layer, list) or layer == "all"):
        index = clip.layer_idx
        layer = "last" if abs(index) > depth else "hidden"
    if isinstance(layer, list) or layer == "all":
        blocks = {depth - 1} if layer == "all" else {(i + depth if i < 0 else i) for i in layer}
    elif layer == "hidden" and index is not None:
        blocks = {index + depth if index < 0 else index}
    else:
        blocks = {depth - 1}
    if pooled:
        blocks.add(depth - 1)
    return tuple(sorted(b for b in blocks if 0 <= b < depth))


def _text_encoders(clip, family: ModelFamily) -> tuple[TextEncoder, ...]:
    stage = clip.cond_stage_model
    present = [a for a in TEXT_ENCODERS if getattr(stage, a, None) is not None]
    specs = [e for e in family.encoders if e.name in present]
    classes = {c.__name__ for c in type(stage).__mro__}
    if ([e.name for e in specs] != present or any(not e.optional and e.name not in present for e in family.encoders)
            or (family.clip_model is not None and family.clip_model not in classes)):
        needs = ", ".join(e.name + (" (optional)" if e.optional else "") for e in family.encoders)
        raise EraseProError(
            f"the CLIP does not match the MODEL: {family.label} models need the text encoder(s) {needs}; "
            f"this CLIP has {', '.join(present) or type(stage).__name__}. Use the CLIP from the same checkpoint "
            "(or the loader type made for this model).")
    encoders = []
    for spec in specs:
        module = getattr(stage, spec.name, None)
        stack = encoder_stack(module)
        if stack is None:
            raise EraseProError(f"not supported yet: the text encoder {spec.name} of this CLIP is neither a CLIP, a T5 "
                                "nor a Llama-style decoder (Qwen3)")
        depth = len(stack.layers)
        encoders.append(TextEncoder(spec, _special_tokens(clip, spec.name), depth, stack.final_norm.weight.shape[0],
                                    _read_blocks(clip, module, depth, spec.name in family.pooled_encoders)))
    return tuple(encoders)


def _pooled_width(clip, enc: TextEncoder) -> int:
    """Width of the pooled embedding ``enc`` gives: its projection's, or its hidden width when the
    CLIP returns it unprojected (Flux's CLIP-L)."""
    module = encoder_module(clip, enc)
    if getattr(module, "return_projected_pooled", True):
        return module.transformer.text_projection.weight.shape[0]
    return enc.width


def detect(model, clip) -> Architecture:
    """Check MODEL and CLIP belong together and list the sites."""
    family = model_family(model)
    if clip is None:
        raise EraseProError("connect the CLIP from the same checkpoint as the MODEL")
    encoders = _text_encoders(clip, family)
    unet = model.model.diffusion_model
    deep_modules = [(name, m) for name, m in unet.named_modules() if any(name.endswith(site) for site in family.deep_sites)]
    if not deep_modules:
        raise EraseProError(f"not supported yet: this {family.label} model has no {' / '.join(family.deep_sites)} layers")
    deep = tuple(f"{family.deep_prefix}{name}.weight" for name, _ in deep_modules)
    arch = Architecture(family, encoders, deep)
    reads = deep_modules[0][1].weight.shape[1]
    if reads != arch.context_width:
        raise EraseProError(f"the CLIP does not match the MODEL: it gives {arch.context_width}-wide text features, "
                            f"the {family.label} model reads {reads}. Use the text encoder(s) made for this model")
    if family.pooled_site is None:
        return arch
    pooled = [e for e in encoders if e.name in family.pooled_encoders]
    return Architecture(family, encoders, deep, sum(_pooled_width(clip, e) for e in pooled))


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

    def encode(self, chunks, capture: bool = False, overrides=None, resume=None) -> Encoded:
        arch = self.architecture()
        cond, pooled, captured = encode_batch(self.clip, arch.encoders, chunks, capture=capture, overrides=overrides,
                                              resume=resume,
                                              text_width=arch.family.text_width,
                                              pooled_names=arch.family.pooled_encoders if arch.pooled_width else ())
        if arch.family.gateway_norm is not None:
            cond = self._gateway_norm(arch.family, cond)
        return Encoded(cond, pooled, captured)

    def _gateway_norm(self, family, cond):
        """What the deep site reads: ``cond`` through the model's RMSNorm before it (Z-Image's
        cap_embedder.0), in float32 with its effective weight."""
        norm = self.model.model.diffusion_model.get_submodule(family.gateway_norm)
        key = f"{family.deep_prefix}{family.gateway_norm}.weight"
        weight = effective_weights(self.model, [key])[key].to(cond.device)
        return torch.nn.functional.rms_norm(cond, (cond.shape[-1],), weight, norm.eps)

    def first_block_inputs(self, chunks) -> list:
        return first_layer_inputs(self.clip, self.architecture().encoders, chunks)

    def text_weights(self, keys, as_stored: bool = False) -> dict[str, torch.Tensor]:
        return effective_weights(self.clip.patcher, keys, as_stored)

    def text_digests(self, encoder, depths) -> dict[int, str]:
        stack = encoder_stack(encoder_module(self.clip, encoder))
        prefixes = [f"{encoder.name}.{p}" for p in (stack.embeddings,) + stack.block_prefixes(max(depths))]
        keys = list(self.clip.patcher.get_key_patches())
        running = running_fingerprints(self.clip.patcher, [[k for k in keys if k.startswith(p)] for p in prefixes])
        return {depth: running[depth] for depth in depths}

    def text_storage_bits(self, keys) -> int:
        return min(comfy.utils.get_attr(self.clip.patcher.model, key).dtype.itemsize * 8 for key in keys)

    def model_weights(self, keys) -> EffectiveWeights:
        return EffectiveWeights(self.model, keys)

    def shallow_blocks(self, encoder, keys, weights, biases, captured) -> list:
        h = captured[0]
        stack = encoder_stack(encoder_module(self.clip, encoder))
        blocks = [stack.block(l, key, w.to(h.device), None if b is None else b.to(h.device), captured)
                  for l, (key, w, b) in enumerate(zip(keys, weights, biases))]
        self.clip.load_model()
        return blocks

    def solve_device(self):
        return solve_device()

    def free_device_memory(self) -> None:
        comfy.model_management.soft_empty_cache()
