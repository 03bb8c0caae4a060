"""What the pipeline needs to know about a model family, as plain data.

A :class:`ModelFamily` names its text encoders (:class:`TextEncoderSpec`), how the diffusion
model receives their outputs, which of its layers read per-token text features (the deep sites)
and which one reads a pooled text embedding, if any. A host (``erasepro_ops.host``) resolves it
on a loaded model into an :class:`Architecture`: the same description plus what only the loaded
weights tell (each encoder's depth and width, its special tokens, the deep sites' keys).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .tokens import SpecialTokens

REFERENCE_DEPTH = 12  # progressive_layers counts blocks of a 12-layer encoder; deeper encoders scale it


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder. Its shallow sites are the MLP output projections of its first blocks
    (:class:`erasepro_ops.chain.MLPBlock`), their weight keys ``shallow_site`` with ``{index}``."""

    name: str  # the host's name for it (clip_l, clip_g, …); prefixes its weight keys
    token_key: str  # its key in the host's tokens dict
    shallow_site: str  # weight key of block {index}'s MLP output projection
    causal: bool = True  # causal attention: a position sees only the tokens before it
    context: int = 77  # tokens per chunk (at least: a T5 chunk grows with a longer prompt)
    shallow_bias: bool = True  # the shallow sites have a bias (CLIP's fc2; T5's wo has none)
    per_token: bool = True  # the diffusion model reads its per-token output (False: only its pooled one, Flux's CLIP-L)
    padded: bool = True  # the model reads the padding after the end token too (False: the prompt's own tokens, Chroma)
    segment: int = 0  # encoders of one segment sit side by side per position; segments follow along the sequence
    optional: bool = False  # the family's models run without it (SD3's T5)
    max_padding: int | None = None  # the most padding positions per prompt the solve constrains (SD3's T5: 1)
    bridged: bool = False  # the blocks the model reads after the first S close what those blocks reopen (CLIP)

    def shallow_key(self, index: int) -> str:
        return self.shallow_site.format(index=index)


@dataclass(frozen=True)
class ModelFamily:
    name: str  # sd15 / sd2 / sdxl / sd3 / flux / chroma: stored with every edit
    label: str  # for messages: SD1.x
    encoders: tuple[TextEncoderSpec, ...]
    deep_sites: tuple[str, ...]  # suffixes of the diffusion model's module names that read the text features
    deep_prefix: str = "diffusion_model."  # the deep sites' weight keys: prefix + module name + ".weight"
    pooled_site: str | None = None  # weight key of the layer reading the pooled embedding
    pooled_encoders: tuple[str, ...] = ()  # the encoders whose pooled outputs, side by side, that layer reads
    text_width: int | None = None  # every segment zero-padded to this width (SD3: 4096); None: its own
    clip_model: str | None = None  # the class name ComfyUI's CLIP model must have (its encode combines the encoders)
    gateway_norm: str | None = None  # a norm module between the encoder and the deep site (its input is the normed feature)
    fallback_rtol: float | None = None  # a deep update > pipeline.FALLBACK_CHANGE × its weight is solved again with it


def clip_encoder(name: str, token_key: str) -> TextEncoderSpec:
    """A CLIP text transformer as ComfyUI's ``cond_stage_model.<name>`` holds it."""
    return TextEncoderSpec(name, token_key, f"{name}.transformer.text_model.encoder.layers.{{index}}.mlp.fc2.weight",
                           bridged=True)


def t5_encoder(name: str = "t5xxl", token_key: str = "t5xxl", context: int = 256, padded: bool = True) -> TextEncoderSpec:
    """A T5 encoder stack as ComfyUI's ``cond_stage_model.<name>`` holds it: bidirectional, its
    gated MLP's output projection ``wo`` without bias. Unpadded (Chroma): the solve pads its
    prompts to ``context`` with the attention mask on, so every real position's features are the
    unpadded prompt's, and constrains no position past the end token."""
    return TextEncoderSpec(name, token_key, f"{name}.transformer.encoder.block.{{index}}.layer.1.DenseReluDense.wo.weight",
                           causal=False, context=context, shallow_bias=False, padded=padded)


def qwen3_encoder(name: str = "qwen3_4b", context: int = 256) -> TextEncoderSpec:
    """Qwen3 (a causal decoder LLM, ``comfy.text_encoders.llama``) as ComfyUI's
    ``cond_stage_model.<name>`` holds it: its sites are the MLPs' ``down_proj`` (no bias). The
    model reads the prompt's tokens only (no padding); the solve pads a batch to ``context`` with
    the attention mask on, which a causal encoder's real positions never see anyway."""
    return TextEncoderSpec(name, name, f"{name}.transformer.model.layers.{{index}}.mlp.down_proj.weight",
                           context=context, shallow_bias=False, padded=False)


CROSS_ATTENTION_KV = ("attn2.to_k", "attn2.to_v")
SD15 = ModelFamily("sd15", "SD1.x", (clip_encoder("clip_l", "l"),), CROSS_ATTENTION_KV)
SD2 = ModelFamily("sd2", "SD2.x", (clip_encoder("clip_h", "h"),), CROSS_ATTENTION_KV)
SDXL = ModelFamily("sdxl", "SDXL", (clip_encoder("clip_l", "l"), clip_encoder("clip_g", "g")), CROSS_ATTENTION_KV,
                   pooled_site="diffusion_model.label_emb.0.0.weight", pooled_encoders=("clip_g",))
# Flux.1: T5-XXL's tokens (padded to 256) reach the transformer through one linear gateway,
# txt_in; CLIP-L's pooled output through vector_in's first linear layer. As on SD3, the solve
# constrains only T5's first padding position: on the reduced Flux (one concept, fp16 files) that
# against eight took the held-out residual at the concept and end tokens from 0.42 to 0.32 at S = 0
# and from 1.82 to 0.29 at S = 3, unlisted drift from 0.12 to 0.071 and from 0.41 to 0.043, the
# template's velocity as close to the anchor's or closer. Its gateway is refitted as SD3's (below):
# ten concepts at S = 0 on a Flux whose T5 is 1024 wide took an exact update 36× the weight.
FLUX = ModelFamily("flux", "Flux.1", (dataclasses.replace(clip_encoder("clip_l", "l"), per_token=False),
                                      dataclasses.replace(t5_encoder(), max_padding=1)),
                   ("txt_in",), pooled_site="diffusion_model.vector_in.in_layer.weight", pooled_encoders=("clip_l",),
                   fallback_rtol=1e-3)
# Chroma: Flux's transformer without vector_in; T5-XXL's tokens unpadded (the prompt and its end
# token only) through txt_in; its gateway refitted as Flux's.
CHROMA = ModelFamily("chroma", "Chroma", (t5_encoder(padded=False),), ("txt_in",), fallback_rtol=1e-3)
# SD3 / SD3.5: CLIP-L and CLIP-G side by side (2048 wide, zero-padded to 4096), then T5-XXL's 77
# tokens after them, through one linear gateway, context_embedder; the CLIPs' pooled outputs side by
# side through y_embedder's first linear layer. A CLIP without the T5 gives the CLIP tokens alone.
# Its T5's padding positions (pad token 0, bidirectional) are near-duplicates: fitting eight of them
# per template exactly took the tiny test SD3's gateway update to 11× its weight and moved unlisted
# prompts 13.5× as far as the original features (two: 1.8×); the first alone costs almost nothing
# (drift 0.31, none: 0.29) and takes a one-token pair's output gap from 11% to 1%.
# When its exact gateway update comes out huge (many concepts: near-duplicate T5 columns), the
# gateway is solved again with singular values below 1e-3 of the largest dropped, the kept prompts
# keeping the request's 1e-6: on the test SD3 with 4-layer encoders, ten concepts at S = 0 moved
# unlisted prompts 89× their gateway output at 1e-6 and 1.4× at 1e-3 (UCE 0.31×), the empty and
# preserve prompts still held to 1e-5 (one concept: the same figures, but no longer exact).
SD3 = ModelFamily("sd3", "SD3", (clip_encoder("clip_l", "l"), clip_encoder("clip_g", "g"),
                                 dataclasses.replace(t5_encoder(context=77), segment=1, optional=True,
                                                     max_padding=1)),
                  ("context_embedder",), pooled_site="diffusion_model.y_embedder.mlp.0.weight",
                  pooled_encoders=("clip_l", "clip_g"), text_width=4096, clip_model="SD3ClipModel", fallback_rtol=1e-3)
# Z-Image (Turbo): Qwen3-4B's hidden state after its second-to-last layer, under a chat template,
# reaches the transformer through cap_embedder: an RMSNorm, then the linear gateway. The prompt's
# own tokens only, no pooled embedding.
ZIMAGE = ModelFamily("zimage", "Z-Image", (qwen3_encoder(),), ("cap_embedder.1",), gateway_norm="cap_embedder.0",
                     clip_model="ZImageTEModel")
FAMILIES = {f.name: f for f in (SD15, SD2, SDXL, FLUX, CHROMA, SD3, ZIMAGE)}


@dataclass(frozen=True)
class TextEncoder:
    """A :class:`TextEncoderSpec` on a loaded model."""

    spec: TextEncoderSpec
    special: SpecialTokens
    depth: int  # blocks
    width: int  # output features per token
    read_blocks: tuple[int, ...] = ()  # blocks whose outputs the model reads (its hidden layer, the pooled one's)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def token_key(self) -> str:
        return self.spec.token_key

    def shallow_key(self, index: int) -> str:
        return self.spec.shallow_key(index)

    def shallow_depth(self, progressive_layers: int) -> int:
        """``S`` for this encoder: ``progressive_layers`` of 12, scaled to this encoder's depth."""
        n = self.depth
        if progressive_layers <= 0 or not self.spec.per_token:
            return 0
        return min(n - 1, round(progressive_layers * n / REFERENCE_DEPTH))

    def bridge_blocks(self, progressive_layers: int) -> tuple[int, ...]:
        """The read blocks past the first ``S`` where a bridged encoder closes what is left of the
        gap (:func:`erasepro_ops.chain.progressive_shallow`)."""
        s = self.shallow_depth(progressive_layers)
        if s == 0 or not self.spec.bridged:
            return ()
        return tuple(sorted(b for b in set(self.read_blocks) if b >= s))


@dataclass(frozen=True)
class Architecture:
    """A :class:`ModelFamily` resolved on a loaded model."""

    family: ModelFamily
    encoders: tuple[TextEncoder, ...]
    deep_keys: tuple[str, ...]  # the deep sites' weight keys, model order
    pooled_width: int = 0  # columns of the pooled site that read the pooled embedding; 0: none

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def segments(self) -> tuple[tuple[int, ...], ...]:
        """The per-token encoders (indices into ``encoders``) of each segment of the features the deep
        sites read: side by side within a segment, one segment after the other along the tokens."""
        found: dict[int, list[int]] = {}
        for i, e in enumerate(self.encoders):
            if e.spec.per_token:
                found.setdefault(e.spec.segment, []).append(i)
        return tuple(tuple(found[k]) for k in sorted(found))

    def segment_of(self, encoder: int) -> int:
        """The position in :attr:`segments` of the segment holding encoder ``encoder``."""
        return next(s for s, members in enumerate(self.segments) if encoder in members)

    def segment_context(self, segment: int) -> int:
        """Token positions per prompt of one segment (its encoders' shortest context)."""
        return min(self.encoders[i].spec.context for i in self.segments[segment])

    @property
    def segment_offsets(self) -> tuple[int, ...]:
        """Where each segment's positions start in the features the deep sites read."""
        offsets, at = [], 0
        for s in range(len(self.segments)):
            offsets.append(at)
            at += self.segment_context(s)
        return tuple(offsets)

    @property
    def context(self) -> int:
        """Token positions per prompt in the features the deep sites read."""
        return sum(self.segment_context(s) for s in range(len(self.segments)))

    @property
    def context_width(self) -> int:
        """The deep sites' input width (768 / 1024 / 2048; Flux: T5's 4096; SD3: 4096): the erasure's
        rank budget."""
        if self.family.text_width is not None:
            return self.family.text_width
        return max(sum(self.encoders[i].width for i in members) for members in self.segments)

    @property
    def padded(self) -> bool:
        """Whether the diffusion model reads the positions after a prompt's end token."""
        return all(e.spec.padded for e in self.encoders if e.spec.per_token)

    @property
    def bridged(self) -> bool:
        """Whether every per-token encoder is bridged (:attr:`TextEncoderSpec.bridged`: the CLIP families)."""
        return all(e.spec.bridged for e in self.encoders if e.spec.per_token)

    @property
    def pooled_site(self) -> str | None:
        return self.family.pooled_site if self.pooled_width else None

    def site_count(self, progressive_layers: int) -> int:
        """How many sites a solve with ``progressive_layers`` edits (for progress bars)."""
        shallow = sum(e.shallow_depth(progressive_layers) + len(e.bridge_blocks(progressive_layers))
                      for e in self.encoders)
        return shallow + len(self.deep_keys) + (1 if self.pooled_width else 0)
