"""The image-level protocol: which prompts are drawn for an erasure, and how the judge scores them.

In the manner of UnlearnCanvas: for an erased target (a painter, a texture or an object) and its
anchor, prompts in five groups, each a list of :class:`Probe` (a prompt and what a faithful
picture of it shows):

* ``templates`` — the solve's own templates filled with the target word (what the solve saw);
* ``held_out`` — phrasings from :data:`world.HELD_OUT` (trained on, never solved on);
* ``compositional`` — the target with other colours, backgrounds, textures, in two-object scenes;
* ``within`` — other concepts of the target's kind (other painters / other objects);
* ``unrelated`` — prompts that name nothing of the target's kind's target (for the change
  against the original model at the same seeds).

Scores, each a fraction of pictures: ``erased`` (the judge no longer sees the target),
``anchor`` (it sees the anchor in its place), ``right`` (every attribute the prompt names is
seen; for target prompts, every attribute but the erased one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import world
from .judge import Verdict


@dataclass(frozen=True)
class Concept:
    """An erasable concept of the world: ``kind`` painter / texture / shape, ``name`` its key."""

    kind: str
    name: str

    @property
    def word(self) -> str:
        if self.kind == "painter":
            return world.PAINTER_WORDS[self.name][0]
        if self.kind == "texture":
            return world.TEXTURE_WORDS[self.name][0][0]
        return world.SHAPE_WORDS[self.name][0]

    @property
    def concept_type(self) -> str:
        """The pack's Concept Pair type whose templates fit it."""
        return "object" if self.kind == "shape" else "style"

    def index(self) -> int:
        return world.SHAPES.index(self.name) if self.kind == "shape" else world.STYLES.index(self.name)


@dataclass(frozen=True)
class Probe:
    """A prompt and the scene a faithful picture of it shows; ``said`` names the attributes the
    prompt states (shape, colour, background, style), the ones the judge checks."""

    prompt: str
    scene: world.Scene
    said: frozenset = field(default_factory=frozenset)


def _probe(scene: world.Scene, template: str, g: torch.Generator, colour: bool = True, background: bool = True) -> Probe:
    text = world.caption(scene, g, (template,), mention_colour=1.0 if colour else 0.0,
                         mention_background=1.0 if background and "{bg}" in template else 0.0)
    said = {"shape"} if "{obj}" in template else set()
    if "{obj}" in template and colour:
        said.add("colour")
    if "{bg}" in template and background:
        said.add("background")
    if scene.style:
        said.add("style")
    if not said & {"shape"} and scene.shape2 >= 0:
        raise ValueError("a two-object scene needs a phrasing that names its objects")
    return Probe(text, scene, frozenset(said))


def _scene_with(target: Concept, shape: int, colour: int, background: int, style: int, shape2: int = -1,
                colour2: int = -1) -> world.Scene:
    if target.kind == "shape":
        return world.Scene(target.index(), colour, background, style, shape2, colour2)
    return world.Scene(shape, colour, background, target.index(), shape2, colour2)


def template_probes(target: Concept, templates: tuple[str, ...]) -> list[Probe]:
    """The pack's templates filled with the bare target word: the judge checks the target only."""
    scene = _scene_with(target, 0, 0, 0, 0)
    return [Probe(t.replace("{}", target.word), scene, frozenset({"style"} if target.kind != "shape" else {"shape"}))
            for t in templates]


def _templates_for(target: Concept, held_out: bool) -> list[str]:
    if held_out:
        pool = world.HELD_OUT
    else:
        pool = tuple(t for t in world.PLAIN_TEMPLATES + world.PAINTER_TEMPLATES if t not in world.HELD_OUT)
    painter = target.kind == "painter"
    return [t for t in pool if ("{painter}" in t) == painter and "{obj}" in t]


def probes(target: Concept, group: str, n: int, seed: int = 0, exclude=()) -> list[Probe]:
    """``n`` probes of ``group`` (held_out / compositional / within / unrelated) for ``target``;
    ``exclude``: concepts erased with it, which no other group's prompt names."""
    banned_styles = {world.STYLES.index(c.name) for c in exclude if c.kind != "shape"}
    banned_shapes = {world.SHAPES.index(c.name) for c in exclude if c.kind == "shape"}
    free_styles = [i for i in range(len(world.STYLES)) if i not in banned_styles]
    free_shapes = [i for i in range(len(world.SHAPES)) if i not in banned_shapes]
    g = torch.Generator().manual_seed(seed)
    out: list[Probe] = []
    ints = torch.randint(0, 10**6, (n, 8), generator=g).tolist()
    for i, (a, b, c, d, e, f, h, k) in enumerate(ints):
        shape, colour, bg = free_shapes[a % len(free_shapes)], b % len(world.COLOURS), c % len(world.BACKGROUNDS)
        if group == "held_out":
            style = 0 if d % 2 else free_styles[d % len(free_styles)]
            scene = _scene_with(target, shape, colour, bg, style if target.kind == "shape" else 0)
            templates = _templates_for(target, held_out=True)
        elif group == "compositional":
            two = i % 2 == 1
            first = target.index() if target.kind == "shape" else shape
            others = [k for k in free_shapes if k != first]
            textures = [k for k in free_styles if world.STYLES[k] in world.TEXTURES]
            style = textures[d % len(textures)] if target.kind == "shape" and d % 3 == 0 and textures else 0
            scene = _scene_with(target, shape, colour, bg, style,
                                others[e % len(others)] if two else -1, (colour + 1 + f % 5) % 6 if two else -1)
            templates = _templates_for(target, held_out=False)
        elif group in ("within", "unrelated"):
            if target.kind == "shape":
                others = [k for k in free_shapes if k != target.index()]
                scene = world.Scene(others[d % len(others)], colour, bg,
                                    0 if group == "unrelated" else free_styles[e % len(free_styles)])
            else:
                kinds = world.PAINTERS if target.kind == "painter" else world.TEXTURES
                others = [k for k in free_styles if world.STYLES[k] in kinds and world.STYLES[k] != target.name]
                style = others[d % len(others)] if group == "within" else 0
                scene = world.Scene(shape, colour, bg, style)
            painter = scene.painter is not None
            templates = [t for t in world.PLAIN_TEMPLATES + world.PAINTER_TEMPLATES
                         if t not in world.HELD_OUT and "{obj}" in t and ("{painter}" in t) == painter]
        else:
            raise ValueError(f"unknown group {group!r}")
        template = templates[h % len(templates)]
        out.append(_probe(scene, template, g, colour=k % 4 != 0))
    return out


def seen(verdict: Verdict, i: int, concept: Concept) -> bool:
    """Does the judge see ``concept`` in picture ``i``?"""
    if concept.kind == "shape":
        return concept.index() in verdict.shapes[i]
    return verdict.style[i] == concept.index()


def attributes_right(verdict: Verdict, i: int, probe: Probe, skip: Concept | None = None) -> bool:
    """Every attribute the probe states is what the judge sees (the erased concept's own
    attribute excepted: shape for an object, style for a style)."""
    s = probe.scene
    shapes = {s.shape} | ({s.shape2} if s.shape2 >= 0 else set())
    colours = {s.colour} | ({s.colour2} if s.colour2 >= 0 else set())
    skip_kind = None if skip is None else ("shape" if skip.kind == "shape" else "style")
    if skip_kind == "shape":
        shapes = shapes - {skip.index()}  # the other object of a two-object scene still counts
    checks = {
        "shape": lambda: shapes <= verdict.shapes[i],
        "colour": lambda: colours <= verdict.colours[i],
        "background": lambda: verdict.background[i] == s.background,
        "style": lambda: verdict.style[i] == s.style if skip_kind != "style" else True,
    }
    return all(checks[a]() for a in probe.said)


def score(verdict: Verdict, probes_: list[Probe], seeds: int, target: Concept, anchor: Concept | None,
          group: str) -> dict:
    """Fractions over the pictures of ``probes_`` (``seeds`` pictures each, in probe order)."""
    n = len(probes_) * seeds
    idx = [(i, p) for i, p in enumerate(probes_) for _ in range(seeds)]
    out = {"n": n}
    if group in ("templates", "held_out", "compositional"):
        out["target_seen"] = sum(seen(verdict, j, target) for j in range(n)) / n
        if anchor is not None:
            out["anchor_seen"] = sum(seen(verdict, j, anchor) for j in range(n)) / n
        elif target.kind != "shape":
            out["anchor_seen"] = sum(verdict.style[j] == 0 for j in range(n)) / n  # the empty anchor: no style
        if group != "templates":
            out["rest_right"] = sum(attributes_right(verdict, j, p, skip=target) for j, (_, p) in enumerate(idx)) / n
    else:
        out["right"] = sum(attributes_right(verdict, j, p) for j, (_, p) in enumerate(idx)) / n
    return out
