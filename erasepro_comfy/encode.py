"""Running ComfyUI's text encoders: batches of token-id chunks, first-block inputs, float32 overrides."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from erasepro_ops.errors import EraseProError
from erasepro_ops.text import quote

PROBE_BATCH = 8  # batches larger than this are probed with one prompt first (probe_encoders)


def encoder_module(clip, enc) -> torch.nn.Module:
    """The ``comfy.sd1_clip.SDClipModel`` of ``enc`` (an ``erasepro_ops.family.TextEncoder``)."""
    return getattr(clip.cond_stage_model, enc.name)


def encoder_tokenizer(clip, name: str):
    """The ``comfy.sd1_clip.SDTokenizer`` of the text encoder ``name``: ``clip.tokenizer.<name>``,
    or ``clip_<name>`` for a one-encoder ``SD1Tokenizer`` (Chroma's ``clip_t5xxl``); None if absent."""
    tokenizer = getattr(clip.tokenizer, name, None)
    return tokenizer if tokenizer is not None else getattr(clip.tokenizer, f"clip_{name}", None)


@contextmanager
def masked_padding(clip, enc):
    """Encode ``enc``'s batches with the attention mask on when the model reads no padding
    (``enc.spec.padded`` False): the solve pads those prompts to one length, and the mask keeps every
    real position's features what ComfyUI gives for the unpadded prompt."""
    if enc.spec.padded:
        yield
        return
    module = encoder_module(clip, enc)
    before = module.enable_attention_masks
    module.enable_attention_masks = True
    try:
        yield
    finally:
        module.enable_attention_masks = before


@dataclass(frozen=True)
class EncoderStack:
    """Where a ComfyUI text encoder keeps its blocks: a CLIP transformer (``transformer.text_model``)
    or a T5 encoder stack (``transformer.encoder``, ``comfy.text_encoders.t5``). Key prefixes are
    relative to the encoder's name on the CLIP (``clip_l.``, ``t5xxl.``)."""

    kind: str  # "clip", "t5" or "llama"
    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    embeddings: str  # key prefix of the token (and position) embeddings
    block_key: str  # key prefix of block {index}
    config: object = None  # a decoder LLM's config (its rotary embedding)

    def block_prefixes(self, depth: int) -> tuple[str, ...]:
        return tuple(self.block_key.format(index=l) for l in range(depth))

    def block(self, index: int, key: str, weight, bias, captured):
        """Block ``index`` as an ``erasepro_ops.chain.MLPBlock`` with shallow-site weights given, for
        the captured first-block input ``(hidden, mask, attention)``."""
        _, mask, attention = captured
        if self.kind == "clip":
            return ClipLayerBlock(key, self.layers[index], weight, bias, mask, attention)
        if self.kind == "llama":
            return LlamaLayerBlock(key, self.layers[index], weight, bias, mask, attention, self.config)
        return T5LayerBlock(key, self.layers[index], weight, bias, mask, attention, self.layers[0])


def encoder_stack(module) -> EncoderStack | None:
    """The :class:`EncoderStack` of a ComfyUI text-encoder module, or None for another kind."""
    transformer = getattr(module, "transformer", None)
    text_model = getattr(transformer, "text_model", None)
    if text_model is not None and hasattr(text_model, "encoder"):
        return EncoderStack("clip", text_model.encoder.layers, text_model.final_layer_norm,
                            "transformer.text_model.embeddings.", "transformer.text_model.encoder.layers.{index}.")
    stack = getattr(transformer, "encoder", None)
    if stack is not None and hasattr(stack, "block") and hasattr(transformer, "shared"):
        return EncoderStack("t5", stack.block, stack.final_layer_norm, "transformer.shared.",
                            "transformer.encoder.block.{index}.")
    llm = getattr(transformer, "model", None)  # comfy.text_encoders.llama.Llama2_ (Qwen3, ...)
    layers = getattr(llm, "layers", None)
    if (layers is not None and hasattr(llm, "embed_tokens") and getattr(llm, "norm", None) is not None
            and all(type(layer).__name__ == "TransformerBlock" for layer in layers)):
        return EncoderStack("llama", layers, llm.norm, "transformer.model.embed_tokens.",
                            "transformer.model.layers.{index}.", llm.config)
    return None


def encoder_layers(clip, enc):
    return encoder_stack(encoder_module(clip, enc)).layers


class LayerInputCapture:
    """Capture what ComfyUI passes to the first encoder layer: ``(hidden, mask, optimized_attention)``
    (a CLIP layer gets ``(x, mask, attention)``, a T5 block ``(x, mask, past_bias, attention)``, a
    Llama block the keywords ``x, attention_mask, freqs_cis, optimized_attention``)."""

    def __init__(self, layer: torch.nn.Module):
        self.calls = []
        self.handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if "x" in kwargs:
            x, mask, attention = kwargs["x"], kwargs.get("attention_mask"), kwargs.get("optimized_attention")
        else:
            x = args[0]
            mask = args[1] if len(args) > 1 else None
            attention = args[-1] if len(args) > 2 else None
        self.calls.append((x.detach().clone(), mask, attention))

    def remove(self):
        self.handle.remove()


class _Captured(Exception):
    """Stops an encode once the first layer's input is captured."""


def read_as_sampling(clip) -> None:
    """Set the text encoders to hand on the layer sampling reads, as ``CLIP.encode_from_tokens``
    does before every encode: their defaults, then the CLIP's own ``layer_idx`` (CLIP Set Last
    Layer). Without it a module keeps whatever layer the last encode of any CLIP sharing it set."""
    clip.cond_stage_model.reset_clip_options()
    if getattr(clip, "layer_idx", None) is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})


def first_layer_inputs(clip, encoders, chunks_per_encoder) -> list:
    """Each encoder's first-layer input ``(hidden, mask, attention)`` for a batch of chunks, without
    running the encoder's layers (only its embeddings); the prompts whose embeddings are not finite
    are named (:func:`check_features`)."""
    clip.load_model()
    captured = []
    with torch.no_grad():
        for enc, chunks in zip(encoders, chunks_per_encoder):
            first = encoder_layers(clip, enc)[0]
            hook = LayerInputCapture(first)

            def stop(module, args):
                raise _Captured

            stopper = first.register_forward_pre_hook(stop)
            try:
                with masked_padding(clip, enc):
                    encoder_module(clip, enc).encode([list(c) for c in chunks])
            except _Captured:
                pass
            finally:
                hook.remove()
                stopper.remove()
            check_features(clip, enc, chunks, hook.calls[0][0])
            captured.append(hook.calls[0])
    return captured


@dataclass
class LayerBlock:
    """A ComfyUI text-encoder block with its shallow site's weights, as the first block's captured
    input gives its mask and attention function."""

    name: str
    layer: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor | None
    attention: object


@dataclass
class ClipLayerBlock(LayerBlock):
    """A ComfyUI ``CLIPLayer`` seen through ``erasepro_ops.chain.MLPBlock``."""

    def mlp_input(self, h, mask=None):
        layer = self.layer
        dtype = h.dtype
        mask = self.mask if mask is None else mask
        if mask is not None and mask.shape[-1] > h.shape[1]:  # a batch cut short after its last position used
            mask = mask[..., : h.shape[1], : h.shape[1]]
        h_mid = h + layer.self_attn(layer.layer_norm1(h), mask, self.attention).to(dtype)
        x = layer.mlp.activation(layer.mlp.fc1(layer.layer_norm2(h_mid))).to(dtype)
        return h_mid, x


@dataclass
class T5LayerBlock(LayerBlock):
    """A ComfyUI ``T5Block`` seen through ``erasepro_ops.chain.MLPBlock``: the site is its feed-forward
    output projection ``wo`` (no bias); ``x`` is ``act(wi_0 n) * wi_1 n`` (gated, as T5 v1.1 / XXL)
    or ``act(wi n)``, ``n`` the layer-normed residual stream. A block without its own relative
    position bias uses the first block's, as ``T5Stack`` passes it on."""

    first: torch.nn.Module

    def mlp_input(self, h, mask=None):
        attn, ff = self.layer.layer[0], self.layer.layer[-1]
        position_bias = None
        if attn.SelfAttention.relative_attention_bias is None:
            position_bias = self.first.layer[0].SelfAttention.compute_bias(h.shape[1], h.shape[1], h.device, h.dtype)
        out, _ = attn.SelfAttention(attn.layer_norm(h), mask=self.mask if mask is None else mask, past_bias=position_bias,
                                    optimized_attention=self.attention)
        h_mid = h + out.to(h.dtype)
        dense, n = ff.DenseReluDense, ff.layer_norm(h_mid)
        x = dense.act(dense.wi_0(n)) * dense.wi_1(n) if hasattr(dense, "wi_0") else dense.act(dense.wi(n))
        return h_mid, x.to(h.dtype)


@dataclass
class LlamaLayerBlock(LayerBlock):
    """A ComfyUI decoder-LLM block (``comfy.text_encoders.llama.TransformerBlock``: Qwen3) seen
    through ``erasepro_ops.chain.MLPBlock``: the site is its MLP's ``down_proj`` (no bias); ``x`` is
    ``act(gate_proj n) * up_proj n``, ``n`` the RMS-normed residual stream after attention. The
    rotary embedding is the model's own for positions ``0..T-1``."""

    config: object

    def mlp_input(self, h, mask=None):
        from comfy.text_encoders.llama import precompute_freqs_cis
        layer, c = self.layer, self.config
        mask = self.mask if mask is None else mask
        if mask is not None and mask.shape[-1] > h.shape[1]:  # a batch cut short after its last position used
            mask = mask[..., : h.shape[1], : h.shape[1]]
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        freqs = precompute_freqs_cis(c.head_dim, positions, c.rope_theta, c.rope_scale, c.rope_dims, device=h.device)
        out = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask, freqs_cis=freqs,
                              optimized_attention=self.attention)
        h_mid = h + out.to(h.dtype)
        n, mlp = layer.post_attention_layernorm(h_mid), layer.mlp
        return h_mid, (mlp.activation(mlp.gate_proj(n)) * mlp.up_proj(n)).to(h.dtype)


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


@contextmanager
def resumed_blocks(module, hidden: dict):
    """ComfyUI's encode of a CLIP text-encoder ``module`` with its blocks' outputs given instead of
    run: the block stack runs no block and hands on ``hidden[b]`` (B × T × D, the batch's hidden
    state after block ``b``) for each block ``b`` it returns (the last one; the one ``layer_idx``
    or CLIP Set Last Layer picks). ComfyUI's own final norm, hidden-layer choice and pooled
    projection then apply as in any encode. The chain computes those hidden states with the
    shallow edits applied (``erasepro_ops.chain.progressive_shallow``)."""
    encoder = module.transformer.text_model.encoder
    layers, depth = encoder.layers, len(encoder.layers)

    def hand_on(_, args, kwargs, output):
        x = args[0]
        wanted = kwargs.get("intermediate_output", args[2] if len(args) > 2 else None)
        if wanted is not None and not isinstance(wanted, int):
            raise EraseProError(f"cannot hand on the blocks {wanted!r} of {type(module).__name__}")
        index = None if wanted is None else (wanted + depth if wanted < 0 else wanted)
        if index is not None and index not in hidden:
            raise EraseProError(f"block {index} of {type(module).__name__} was not computed")
        last = hidden.get(depth - 1)
        last = torch.zeros_like(x) if last is None else last.to(x.device, x.dtype)  # only its pooled row, unread
        return last, None if index is None else hidden[index].to(x.device, x.dtype)

    handle = encoder.register_forward_hook(hand_on, with_kwargs=True)
    encoder.layers = torch.nn.ModuleList()
    try:
        yield
    finally:
        encoder.layers = layers
        handle.remove()


def _chunk_text(clip, enc: Encoder, ids) -> str:
    """The prompt a token-id chunk holds, decoded by the encoder's own tokenizer (for messages)."""
    ids = [int(t) for t in ids]
    if ids and ids[0] == enc.special.start:
        ids = ids[1:]
    stop = enc.special.end if enc.special.end is not None else enc.special.pad
    if stop in ids:
        ids = ids[: ids.index(stop)]
    try:
        return encoder_tokenizer(clip, enc.name).tokenizer.decode(ids).strip()
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
        f"the text encoder {enc.name} gives NaN/Inf features for {prompts}{more}: its weights are corrupt "
        "(or a LoRA on it is). Load the checkpoint again, or remove the LoRA")


def probe_encoders(clip, encoders, chunks_per_encoder) -> None:
    """Encode one prompt per encoder and check it, so a corrupt text encoder stops the solve before
    a long batch encode (check_features on the whole batch catches prompt-specific NaN after)."""
    with torch.no_grad():
        for enc, chunks in zip(encoders, chunks_per_encoder):
            if len(chunks) > PROBE_BATCH:
                with masked_padding(clip, enc):
                    z, p = encoder_module(clip, enc).encode([list(chunks[0])])[:2]
                check_features(clip, enc, chunks[:1], z, p)


def _real_length(enc, chunks) -> int | None:
    """The longest prompt of an unpadded encoder's batch (``enc.spec.padded`` False), its trailing
    padding tokens dropped; None for a padded encoder, whose model reads the padding."""
    if enc.spec.padded:
        return None
    pad = enc.special.pad
    lengths = [len(c) - next((i for i, t in enumerate(reversed(c)) if t != pad), len(c)) for c in chunks]
    return max(1, max(lengths))


def encode_batch(clip, encoders, chunks_per_encoder, capture: bool = False, overrides: dict | None = None,
                 text_width: int | None = None, pooled_names: tuple[str, ...] = (), resume: dict | None = None):
    """Encode a batch of single chunks through ComfyUI's own text-encoder modules.

    ``chunks_per_encoder[i]`` is a list of token-id chunks for ``encoders[i]``. Returns
    ``(cond [B, T, D], pooled [B, P] or None, captured)`` as ComfyUI's encode combines them: the
    per-token encoders of one segment (``enc.spec.segment``) side by side, cut to the shortest,
    zero-padded to ``text_width`` when given; the segments one after the other along the tokens
    (SD3: CLIP-L‖G, then T5). ``pooled`` is the pooled outputs of ``pooled_names`` side by side.
    ``captured[i]`` is the first layer's input ``(hidden, mask, attention)`` of encoder ``i`` when
    ``capture``. ``overrides``: linear layers computed in float32 with other weights
    (:class:`LinearOverride`). Without ``capture``, an unpadded encoder (Chroma's T5, Qwen3) runs
    only up to the batch's longest prompt: the rest is masked padding, which no real position
    sees; its features there are returned as zeros. ``resume[i]``: encoder ``i``'s blocks'
    outputs already computed (:func:`resumed_blocks`): none of its blocks runs.
    """
    clip.load_model()
    read_as_sampling(clip)
    probe_encoders(clip, encoders, chunks_per_encoder)
    segments, pooled, captured = {}, [], []
    with torch.no_grad():
        for index, (enc, chunks) in enumerate(zip(encoders, chunks_per_encoder)):
            resumed = (resume or {}).get(index)
            hook = LayerInputCapture(encoder_layers(clip, enc)[0]) if capture else None
            override = LinearOverride(clip.cond_stage_model, overrides) if overrides and resumed is None else None
            length = None if capture or resumed is not None else _real_length(enc, chunks)
            resuming = nullcontext() if resumed is None else resumed_blocks(encoder_module(clip, enc), resumed)
            try:
                with masked_padding(clip, enc), resuming:
                    z, p = encoder_module(clip, enc).encode([list(c)[:length] for c in chunks])[:2]
            finally:
                if hook is not None:
                    hook.remove()
                if override is not None:
                    override.remove()
            if length is not None and z.shape[1] < len(chunks[0]):
                z = torch.nn.functional.pad(z, (0, 0, 0, len(chunks[0]) - z.shape[1]))
            check_features(clip, enc, chunks, z, p if enc.name in pooled_names else None)
            if enc.spec.per_token:
                segments.setdefault(enc.spec.segment, []).append(z.float())
            if enc.name in pooled_names:
                pooled.append(p.float())
            if hook is not None:
                captured.append(hook.calls[0])
    cond = []
    for key in sorted(segments):
        outs = segments[key]
        length = min(o.shape[1] for o in outs)
        part = torch.cat([o[:, :length] for o in outs], dim=-1)
        if text_width is not None and part.shape[-1] < text_width:
            part = torch.nn.functional.pad(part, (0, text_width - part.shape[-1]))
        cond.append(part)
    return torch.cat(cond, dim=1), torch.cat(pooled, dim=-1) if pooled else None, captured
