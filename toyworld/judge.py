"""The judge: classifiers that tell a picture's attributes, trained on renders, never on the model.

One small CNN on 32 × 32 pictures (model outputs are area-downscaled to it) with four heads:
which shapes and which colours are present (multi-label: a two-object scene has two), the
background and the style (one of each). Trained on fresh renders with their true labels, under
blur, noise and colour jitter so that a generated picture's softness does not fool it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import world

HEADS = {"shape": len(world.SHAPES), "colour": len(world.COLOURS), "background": len(world.BACKGROUNDS),
         "style": len(world.STYLES)}
MULTI_LABEL = ("shape", "colour")


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(48, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(96, 160, 3, padding=1), nn.BatchNorm2d(160), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(640, n) for k, n in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The judge's feature vector of pictures (any size; downscaled to 32 × 32)."""
        return self.body(world.downscale(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}


def labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    n = len(scenes)
    shape, colour = torch.zeros(n, HEADS["shape"]), torch.zeros(n, HEADS["colour"])
    for i, s in enumerate(scenes):
        shape[i, s.shape] = colour[i, s.colour] = 1
        if s.shape2 >= 0:
            shape[i, s.shape2] = colour[i, s.colour2] = 1
    return {"shape": shape, "colour": colour, "background": torch.tensor([s.background for s in scenes]),
            "style": torch.tensor([s.style for s in scenes])}


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (a random mix with a 3 × 3 box blur), brightness / colour jitter and noise."""
    n = len(images)
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mix = torch.rand(n, 1, 1, 1, generator=g) * 0.8
    x = images * (1 - mix) + blur * mix
    x = x * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)) + 0.06 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.05
    return x.clamp(0, 1)


def loss_fn(out: dict, y: dict) -> torch.Tensor:
    total = 0.0
    for k in HEADS:
        if k in MULTI_LABEL:
            total = total + F.binary_cross_entropy_with_logits(out[k], y[k])
        else:
            total = total + F.cross_entropy(out[k], y[k])
    return total


def train(seed: int = 0, steps: int = 1500, batch: int = 128, lr: float = 2e-3, log=print) -> Judge:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 41)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    t0 = time.time()
    judge.train()
    for step in range(steps):
        scenes = world.sample_scenes(batch, g, two_objects=0.3)
        x = augment(world.render(scenes, seed=seed * 104729 + step), g)
        loss = loss_fn(judge(x), labels(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"[judge] step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    return judge.eval()


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in each picture: shapes and colours present (sets), background, style."""

    shapes: list[frozenset]
    colours: list[frozenset]
    background: list[int]
    style: list[int]


@torch.no_grad()
def judge_images(judge: Judge, images: torch.Tensor, batch: int = 256) -> Verdict:
    """Read ``images`` [N, 3, H, W] in [0, 1]. A multi-label head names every class above
    probability ½, and at least its most probable one."""
    outs = [judge(images[i:i + batch]) for i in range(0, len(images), batch)]
    out = {k: torch.cat([o[k] for o in outs]) for k in HEADS}

    def present(logits):
        on = logits.sigmoid() > 0.5
        on[torch.arange(len(logits)), logits.argmax(1)] = True
        return [frozenset(torch.nonzero(row).flatten().tolist()) for row in on]

    return Verdict(present(out["shape"]), present(out["colour"]), out["background"].argmax(1).tolist(),
                   out["style"].argmax(1).tolist())


def accuracy_report(judge: Judge, seed: int = 99, n: int = 2000) -> dict:
    """Accuracy per attribute on unseen renders (a multi-label attribute is right when the set
    is exactly right) and the confusion matrices of the single-object scenes."""
    scenes = world.sample_scenes(n, torch.Generator().manual_seed(seed), two_objects=0.3)
    v = judge_images(judge, world.render(scenes, seed=seed))
    truth_shapes = [frozenset({s.shape} | ({s.shape2} if s.shape2 >= 0 else set())) for s in scenes]
    truth_colours = [frozenset({s.colour} | ({s.colour2} if s.colour2 >= 0 else set())) for s in scenes]
    acc = {
        "shape": sum(a == b for a, b in zip(v.shapes, truth_shapes)) / n,
        "colour": sum(a == b for a, b in zip(v.colours, truth_colours)) / n,
        "background": sum(a == s.background for a, s in zip(v.background, scenes)) / n,
        "style": sum(a == s.style for a, s in zip(v.style, scenes)) / n,
    }
    confusion = {}
    for key, names, truth, seen in (("shape", world.SHAPES, [s.shape for s in scenes], v.shapes),
                                    ("colour", world.COLOURS, [s.colour for s in scenes], v.colours),
                                    ("background", world.BACKGROUNDS, [s.background for s in scenes], v.background),
                                    ("style", world.STYLES, [s.style for s in scenes], v.style)):
        m = torch.zeros(len(names), len(names), dtype=torch.long)
        for s, t, p in zip(scenes, truth, seen):
            if s.shape2 >= 0:
                continue
            guess = p if isinstance(p, int) else (next(iter(p)) if len(p) == 1 else -1)
            if guess >= 0:
                m[t, guess] += 1
        confusion[key] = {"labels": list(names), "matrix": m.tolist()}
    return {"n": n, "accuracy": acc, "confusion": confusion}
