"""The toy world's text encoder: CLIP's architecture, narrow and shallow, trained as CLIP was.

:class:`TextTransformer` has the parameter names of ComfyUI's ``comfy.clip_model.CLIPTextModel``
(``text_model.*``, ``text_projection``) and its arithmetic — token + position embeddings,
pre-norm blocks with causal self-attention and a quick-GELU MLP, a final LayerNorm, the pooled
output at the first end token projected by ``text_projection`` — so its state dict loads into
ComfyUI's SD1 CLIP at this width and ComfyUI encodes exactly what was trained. (ComfyUI's own
forward works in place and is not differentiable.)

:func:`train` fits it contrastively against a small image tower on (render, caption) pairs:
the symmetric InfoNCE loss of CLIP, L = ½ (CE(s·T Iᵀ) + CE(s·I Tᵀ)), with unit-norm text and
image embeddings T, I and a learned scale s.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from . import world

CONFIG = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 6,
          "projection_dim": 128, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
          "eos_token_id": 49407}


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.layer_norm2, self.mlp = nn.LayerNorm(dim), _MLP(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int):
        super().__init__()
        self.token_embedding, self.position_embedding = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"])
                                    for _ in range(cfg["num_hidden_layers"]))


class _TextModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embeddings = _Embeddings(cfg["vocab_size"], cfg["max_position_embeddings"], cfg["hidden_size"])
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg["hidden_size"])


class TextTransformer(nn.Module):
    """CLIP's text transformer under ComfyUI's parameter names; ``forward`` gives (per-token
    features after the final norm [B, 77, D], projected pooled features [B, D])."""

    def __init__(self, cfg: dict = CONFIG):
        super().__init__()
        self.cfg = dict(cfg)
        self.text_model = _TextModel(cfg)
        self.text_projection = nn.Linear(cfg["hidden_size"], cfg["projection_dim"], bias=False)
        for emb in (self.text_model.embeddings.token_embedding, self.text_model.embeddings.position_embedding):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.text_model.embeddings
        x = emb.token_embedding(ids) + emb.position_embedding.weight[: ids.shape[1]]
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        x = self.text_model.final_layer_norm(x)
        end = (ids == self.cfg["eos_token_id"]).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0]), end]
        return x, self.text_projection(pooled)


class Tokenizer:
    """ComfyUI's SD1 tokenizer (CLIP's BPE, start token, end-token padding to 77) with a cache."""

    def __init__(self):
        from comfy.sd1_clip import SDTokenizer
        self._tok = SDTokenizer()
        self._cache: dict[str, list[int]] = {}

    def ids(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            if t not in self._cache:
                chunk = self._tok.tokenize_with_weights(t)
                if len(chunk) > 1:
                    raise ValueError(f"caption over 77 tokens: {t!r}")
                self._cache[t] = [tok for tok, _w in chunk[0]]
            rows.append(self._cache[t])
        return torch.tensor(rows)


class ImageTower(nn.Module):
    """A small CNN from a 32 × 32 render to an embedding (used only to train the text encoder)."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(512, dim))

    def forward(self, x):
        return self.net(x)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    t, i = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    logits = log_scale.exp().clamp(max=100) * t @ i.T
    target = torch.arange(len(t))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train(seed: int = 0, steps: int = 700, batch: int = 128, lr: float = 1e-3, log=print) -> TextTransformer:
    """Contrastive training on fresh (render, caption) batches; deterministic from ``seed``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tok = Tokenizer()
    text, tower = TextTransformer(), ImageTower(CONFIG["projection_dim"])
    log_scale = nn.Parameter(torch.tensor(2.66))  # ln(1/0.07), CLIP's initial temperature
    params = [{"params": [p for n, p in text.named_parameters() if "token_embedding" not in n] + list(tower.parameters()),
               "weight_decay": 0.05},
              # no decay on the token table: words the world never uses keep their initial rows
              {"params": [text.text_model.embeddings.token_embedding.weight, log_scale], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    t0 = time.time()
    for step in range(steps):
        scenes = world.sample_scenes(batch, g)
        images = world.render(scenes, seed=seed * 1_000_003 + step)
        ids = tok.ids([world.caption(s, g) for s in scenes])
        ids = ids[:, : int((ids == CONFIG["eos_token_id"]).int().argmax(dim=1).max()) + 1]  # causal: the rest is unread
        loss = contrastive_loss(text(ids)[1], tower(images), log_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"[text] step {step}/{steps} loss {loss.item():.3f} scale {log_scale.exp().item():.1f} {time.time() - t0:.0f}s")
    text.tower = tower  # kept for the report (zero-shot matching); not saved with the encoder
    text.register_buffer("logit_scale", log_scale.detach().clone())
    return text.eval()


@torch.no_grad()
def semantic_report(text: TextTransformer, seed: int = 1, n: int = 256) -> dict:
    """Does the encoder know the world? Zero-shot caption → render matching among ``n`` renders;
    cosine of pooled features between synonym phrasings of one scene, and between scenes that
    differ in one attribute."""
    g = torch.Generator().manual_seed(seed)
    tok = Tokenizer()
    scenes = [s for s in world.sample_scenes(4 * n, g) if s.shape2 < 0][:n]
    images = world.render(scenes, seed=seed)
    full = tuple(t for t in world.PLAIN_TEMPLATES + world.PAINTER_TEMPLATES if "{obj}" in t and "{bg}" in t)

    def described(s):  # every attribute said, so one render fits the caption
        return world.caption(s, g, full, mention_colour=1.0, mention_background=1.0)

    t = F.normalize(text(tok.ids([described(s) for s in scenes]))[1], dim=-1)
    i = F.normalize(text.tower(images), dim=-1)
    match = (t @ i.T).argmax(dim=1)
    same = [described(s) for s in scenes]  # another phrasing of the same scenes
    t2 = F.normalize(text(tok.ids(same))[1], dim=-1)
    other = [world.Scene((s.shape + 1) % len(world.SHAPES), s.colour, s.background, s.style) for s in scenes]
    t3 = F.normalize(text(tok.ids([described(s) for s in other]))[1], dim=-1)
    # a match is right when the chosen render has the caption's attributes (duplicates are allowed)
    right = [scenes[j] == scenes[k] for k, j in enumerate(match.tolist())]
    return {"zero_shot_match": sum(right) / n, "synonym_cosine": float((t * t2).sum(-1).mean()),
            "other_shape_cosine": float((t * t3).sum(-1).mean())}
