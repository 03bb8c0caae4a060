"""ComfyUI glue: which architecture this is, where its sites are, effective weights, encoders.

Everything here reads ComfyUI objects; the math lives in ``erasepro_ops``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.supported_models

from erasepro_ops.concepts import SpecialTokens

log = logging.getLogger("ErasePro")

# Text-encoder attribute on cond_stage_model -> key in the tokens dict.
ENCODERS = {"sd15": (("clip_l", "l"),), "sd2": (("clip_h", "h"),), "sdxl": (("clip_l", "l"), ("clip_g", "g"))}
POOLED_SITE = "diffusion_model.label_emb.0.0.weight"  # SDXL: first linear layer reading the pooled text embedding
REFERENCE_DEPTH = 12  # progressive_layers counts blocks of a 12-layer encoder; deeper encoders scale it


class EraseProError(ValueError):
    """A problem with the user's input, worded to say what to change."""


@dataclass(frozen=True)
class Encoder:
    attr: str  # clip_l / clip_h / clip_g
    token_key: str  # l / h / g
    module: torch.nn.Module  # comfy.sd1_clip.SDClipModel
    special: SpecialTokens

    @property
    def layers(self):
        return self.module.transformer.text_model.encoder.layers

    def fc2_key(self, index: int) -> str:
        return f"{self.attr}.transformer.text_model.encoder.layers.{index}.mlp.fc2.weight"

    def shallow_depth(self, progressive_layers: int) -> int:
        """``S`` for this encoder: ``progressive_layers`` of 12, scaled to this encoder's depth."""
        n = len(self.layers)
        return min(n - 1, round(progressive_layers * n / REFERENCE_DEPTH)) if progressive_layers > 0 else 0


@dataclass(frozen=True)
class Architecture:
    family: str  # sd15 / sd2 / sdxl
    encoders: tuple[Encoder, ...]
    deep_keys: tuple[str, ...]  # attn2.to_k / to_v weights, model order
    pooled_width: int  # SDXL: columns of label_emb.0.0 that read the pooled embedding; 0 otherwise

    @property
    def context_width(self) -> int:
        """The deep sites' input width (768 / 1024 / 2048): the erasure's rank budget."""
        return text_width(self.encoders)


def text_width(encoders) -> int:
    """Width of the concatenated text features the encoders give the UNet."""
    return sum(e.module.transformer.text_model.final_layer_norm.weight.shape[0] for e in encoders)


def model_family(model) -> str:
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    if isinstance(config, comfy.supported_models.SD20):
        return "sd2"
    if isinstance(config, comfy.supported_models.SD15):
        return "sd15"
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


def detect(model, clip) -> Architecture:
    """Check MODEL and CLIP belong together and list the sites (DESIGN §4)."""
    family = model_family(model)
    if clip is None:
        raise EraseProError("connect the CLIP from the same checkpoint as the MODEL")
    stage = clip.cond_stage_model
    expected = [a for a, _ in ENCODERS[family]]
    present = [a for a in ("clip_l", "clip_h", "clip_g") if hasattr(stage, a)]
    if present != expected:
        raise EraseProError(
            f"the CLIP does not match the MODEL: a {family.upper()} model needs text encoder(s) {expected}, "
            f"this CLIP has {present or [type(stage).__name__]}. Use the CLIP from the same checkpoint.")
    encoders = []
    for attr, key in ENCODERS[family]:
        module = getattr(stage, attr, None)
        if not hasattr(module, "transformer"):
            raise EraseProError(f"not supported yet: the text encoder {attr} of this CLIP is not a CLIP transformer")
        encoders.append(Encoder(attr, key, module, _special_tokens(clip, attr)))
    width = text_width(encoders)
    context = model.model.model_config.unet_config.get("context_dim")
    if context is not None and context != width:
        raise EraseProError(f"the CLIP does not match the MODEL: it gives {width}-wide text features, "
                            f"the UNet reads {context}")

    unet = model.model.diffusion_model
    deep = tuple(f"diffusion_model.{name}.weight" for name, _ in unet.named_modules()
                 if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"))
    if not deep:
        raise EraseProError("not supported yet: this UNet has no cross-attention key/value layers")
    pooled = 0
    if family == "sdxl":
        pooled = encoders[-1].module.transformer.text_projection.weight.shape[0]
    return Architecture(family, tuple(encoders), deep, pooled)


def effective_weights(patcher, keys) -> dict[str, torch.Tensor]:
    """Base weight plus the patches already on the ModelPatcher (a LoRA counts), float32.

    Uses ComfyUI's own path: ``get_key_patches`` (base weight from the backup if patched) and
    ``comfy.lora.calculate_weight``, as ``ModelPatcher.patch_weight_to_device`` does.
    """
    wanted = set(keys)
    patches = {k: v for k, v in patcher.get_key_patches().items() if k in wanted}
    out = {}
    for key in keys:
        if key not in patches:
            raise EraseProError(f"the model has no weight {key}")
        (weight, convert), *rest = patches[key]
        w = convert(weight.detach().to(torch.float32, copy=True), inplace=True)
        if rest:
            w = comfy.lora.calculate_weight(rest, w, key)
        if not torch.isfinite(w).all():
            raise EraseProError(f"the weight {key} contains NaN/Inf: the model is corrupt (or a LoRA on it is)")
        out[key] = w
    return out


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the edited sites' original weights (key, shape, float16 bytes), sorted by key.

    Rounded to float16 so one checkpoint gives one fingerprint whether ComfyUI loads it in
    float32 (CPU) or float16 (GPU, and its text encoders everywhere).
    """
    h = hashlib.sha256()
    for key in sorted(weights):
        w = weights[key].detach().to("cpu", torch.float16).contiguous()
        h.update(key.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


class LayerInputCapture:
    """Capture what ComfyUI passes to the first encoder layer: ``(hidden, mask, optimized_attention)``."""

    def __init__(self, layer: torch.nn.Module):
        self.calls = []
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0]
        mask = args[1] if len(args) > 1 else None
        attention = args[2] if len(args) > 2 else None
        self.calls.append((x.detach().clone(), mask, attention))

    def remove(self):
        self.handle.remove()


class _Captured(Exception):
    """Stops an encode once the first layer's input is captured."""


def first_layer_inputs(clip, encoders, chunks_per_encoder) -> list:
    """Each encoder's first-layer input ``(hidden, mask, attention)`` for a batch of chunks, without
    running the encoder's layers (only its embeddings)."""
    clip.load_model()
    captured = []
    with torch.no_grad():
        for enc, chunks in zip(encoders, chunks_per_encoder):
            hook = LayerInputCapture(enc.layers[0])

            def stop(module, args):
                raise _Captured

            stopper = enc.layers[0].register_forward_pre_hook(stop)
            try:
                enc.module.encode([list(c) for c in chunks])
            except _Captured:
                pass
            finally:
                hook.remove()
                stopper.remove()
            captured.append(hook.calls[0])
    return captured


@dataclass
class ClipLayerBlock:
    """A ComfyUI ``CLIPLayer`` seen through ``erasepro_ops.chain.MLPBlock``."""

    name: str
    layer: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor | None
    attention: object

    def mlp_input(self, h):
        layer = self.layer
        dtype = h.dtype
        h_mid = h + layer.self_attn(layer.layer_norm1(h), self.mask, self.attention).to(dtype)
        x = layer.mlp.activation(layer.mlp.fc1(layer.layer_norm2(h_mid))).to(dtype)
        return h_mid, x


class LinearOverride:
    """Forward hooks that recompute chosen linear layers in float32 with the weights given.

    ``weights`` maps a weight key on the CLIP (``clip_l.….mlp.fc2.weight``) to ``(weight, bias)``.
    The shallow edits go through the encoder this way at full precision: patched into a float16
    text encoder they would be rounded, and the deep sites would fit that rounding noise.
    """

    def __init__(self, root: torch.nn.Module, weights: dict):
        self.handles = []
        for key, (weight, bias) in weights.items():
            module = root.get_submodule(key.removesuffix(".weight"))
            self.handles.append(module.register_forward_hook(self._hook(weight, bias)))

    @staticmethod
    def _hook(weight, bias):
        def hook(module, args, out):
            x = args[0]
            w = weight.to(x.device, torch.float32)
            b = None if bias is None else bias.to(x.device, torch.float32)
            return torch.nn.functional.linear(x.to(torch.float32), w, b).to(out.dtype)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def encode_batch(clip, encoders, chunks_per_encoder, capture: bool = False, overrides: dict | None = None):
    """Encode a batch of single chunks through ComfyUI's own text-encoder modules.

    ``chunks_per_encoder[i]`` is a list of token-id chunks for ``encoders[i]``. Returns
    ``(cond [B, 77, D_total], pooled [B, P] or None, captured)`` where ``captured[i]`` is the
    first layer's input ``(hidden, mask, attention)`` of encoder ``i`` when ``capture``.
    ``overrides``: linear layers computed in float32 with other weights (:class:`LinearOverride`).
    """
    clip.load_model()
    outs, pooled, captured = [], None, []
    with torch.no_grad():
        for enc, chunks in zip(encoders, chunks_per_encoder):
            hook = LayerInputCapture(enc.layers[0]) if capture else None
            override = LinearOverride(clip.cond_stage_model, overrides) if overrides else None
            try:
                z, p = enc.module.encode([list(c) for c in chunks])[:2]
            finally:
                if hook is not None:
                    hook.remove()
                if override is not None:
                    override.remove()
            outs.append(z.float())
            pooled = p.float() if p is not None else None
            if hook is not None:
                captured.append(hook.calls[0])
    length = min(o.shape[1] for o in outs)
    return torch.cat([o[:, :length] for o in outs], dim=-1), pooled, captured


def solve_device():
    """The device ComfyUI computes on (the GPU when there is one)."""
    return comfy.model_management.get_torch_device()
