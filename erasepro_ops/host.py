"""What the pipeline asks of the program that holds the model (ComfyUI: ``erasepro_comfy``).

Features are float32 ``(batch, tokens, width)`` tensors; a batch is given per text encoder as
token-id chunks of the encoder's context length, one chunk per prompt.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Protocol, Sequence

import torch

from .chain import MLPBlock
from .family import Architecture, TextEncoder

Chunks = Sequence[Sequence[int]]


class Encoded(NamedTuple):
    cond: torch.Tensor  # the encoders' per-token features combined as the family says
    pooled: torch.Tensor | None  # the pooled embedding the pooled site reads, or None
    captured: list  # per encoder, its first block's input (opaque to the pipeline but for [0]: hidden)


class Host(Protocol):
    def architecture(self) -> Architecture:
        """The family of the loaded model, resolved; raises EraseProError when it is not supported
        or the text encoders do not belong to the diffusion model."""
        ...

    def tokenize(self, text: str, encoder: TextEncoder) -> list[list[int]]:
        """``text`` as chunks of token ids for ``encoder``."""
        ...

    def encode(self, chunks: Sequence[Chunks], capture: bool = False,
               overrides: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
               resume: Mapping[int, Mapping[int, torch.Tensor]] | None = None) -> Encoded:
        """Encode one batch per encoder. ``capture``: record each encoder's first-block input.
        ``overrides``: shallow-site weight key → ``(weight, bias)`` used instead, in float32.
        ``resume[i]``: encoder ``i``'s hidden states after the blocks it reads
        (``TextEncoder.read_blocks``; B × T × D), computed already: its blocks are not run again,
        only what the host does after them (final norm, pooled projection)."""
        ...

    def first_block_inputs(self, chunks: Sequence[Chunks]) -> list:
        """Each encoder's first-block input for a batch, as :meth:`encode` captures it, without
        running the blocks."""
        ...

    def text_weights(self, keys: Sequence[str], as_stored: bool = False) -> dict[str, torch.Tensor]:
        """The text encoders' effective weights (patches such as a LoRA included), float32. With
        ``as_stored``, a weight no patch changes comes as the model stores it (its dtype, no copy):
        the same values for a block that is only run, in a quarter to half the memory."""
        ...

    def text_digests(self, encoder: TextEncoder, depths: Sequence[int]) -> dict[int, str]:
        """Per depth ``d`` in ``depths``, a hash of what the encoder's first ``d`` blocks compute: its
        embeddings' and those blocks' effective weights (patches included), so a LoRA on them
        changes it (and the digests of every greater depth)."""
        ...

    def text_storage_bits(self, keys: Sequence[str]) -> int:
        """The fewest bits per element among these text-encoder weights as stored (16 for fp16,
        8 for fp8): an edit applied to them is rounded to that precision."""
        ...

    def model_weights(self, keys: Sequence[str]) -> Mapping[str, torch.Tensor]:
        """The diffusion model's effective weights, float32, read when accessed: each access makes a
        new copy and none is kept, so take them one at a time rather than all at once."""
        ...

    def shallow_blocks(self, encoder: TextEncoder, keys: Sequence[str], weights: Sequence[torch.Tensor],
                       biases: Sequence[torch.Tensor | None], captured) -> list[MLPBlock]:
        """The encoder's first ``len(keys)`` blocks, given their shallow sites' weights and the
        encoder's captured first-block input (for what it holds beside the hidden states)."""
        ...

    def solve_device(self) -> torch.device:
        ...

    def free_device_memory(self) -> None:
        """After running out of accelerator memory, before solving again on the CPU."""
        ...
