"""The toy world: scenes drawn by code from attributes, and the captions that describe them.

A scene is one or two objects (a shape in a colour) on a background, drawn in a style. A style
is either a texture on the objects (striped, dotted, checkered, wavy) or a named painter whose
rendering covers the whole picture (Van Gogh's swirls, Mondrian's grid, Seurat's dots,
Hokusai's waves), or none. Renders are 32 × 32 RGB in [0, 1], the model's own picture size.

Every attribute word has synonyms, and captions come from many phrasings. :data:`HELD_OUT`
names phrasings the model is trained on that no solve template, context sentence or retain
prompt of the pack uses: the evaluation's held-out prompts are made from them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIZE = 32

SHAPES = ("ball", "box", "tent", "cross", "ring", "star")
SHAPE_WORDS = {
    "ball": ("ball", "sphere", "orb"),
    "box": ("box", "cube", "crate"),
    "tent": ("tent", "pyramid", "triangle"),
    "cross": ("cross", "plus sign", "cross shape"),
    "ring": ("ring", "donut", "hoop"),
    "star": ("star", "five-pointed star", "star shape"),
}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "jade"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "tangerine", "amber"),
}
COLOUR_RGB = {
    "red": (0.86, 0.10, 0.10), "green": (0.10, 0.68, 0.16), "blue": (0.14, 0.26, 0.92),
    "yellow": (0.96, 0.86, 0.10), "purple": (0.56, 0.16, 0.76), "orange": (1.00, 0.50, 0.04),
}
BACKGROUNDS = ("white", "night", "beach")
BACKGROUND_WORDS = {
    "white": ("on a white background", "on white", "on a plain white backdrop"),
    "night": ("at night", "on a dark background", "against a black sky"),
    "beach": ("on the beach", "on sand", "on a sandy shore"),
}
BACKGROUND_RGB = {"white": (0.95, 0.95, 0.93), "night": (0.05, 0.06, 0.16), "beach": (0.86, 0.76, 0.52)}
TEXTURES = ("striped", "dotted", "checkered", "wavy")
TEXTURE_WORDS = {  # (adjective before the noun, phrase after it)
    "striped": (("striped", "stripy", "banded"), ("with stripes", "with bands")),
    "dotted": (("dotted", "spotted", "polka-dot"), ("with polka dots", "with spots")),
    "checkered": (("checkered", "chequered", "checked"), ("with a checkerboard pattern", "with checks")),
    "wavy": (("wavy", "rippled", "squiggly"), ("with wavy lines", "with ripples")),
}
PAINTERS = ("Van Gogh", "Mondrian", "Seurat", "Hokusai")
PAINTER_WORDS = {
    "Van Gogh": ("Van Gogh", "Vincent van Gogh"),
    "Mondrian": ("Mondrian", "Piet Mondrian"),
    "Seurat": ("Seurat", "Georges Seurat"),
    "Hokusai": ("Hokusai", "Katsushika Hokusai"),
}
STYLES = ("none",) + TEXTURES + PAINTERS  # index 0: no style

# Phrasings. {obj}: the object noun phrase(s) with article; {bg}: a background phrase;
# {painter}: a painter's name. The first group describes pictures without a painter.
PLAIN_TEMPLATES = (
    "{obj} {bg}",
    "a picture of {obj} {bg}",
    "a photo of {obj} {bg}",
    "an image of {obj} {bg}",
    "a drawing of {obj} {bg}",
    "{obj}",
    "a photo of {obj}",
    "a picture of {obj}",
    "an image showing {obj} {bg}",
    "there is {obj} {bg}",
    "{bg}, {obj}",
    "{obj} {bg}, simple drawing",
    "a rendering of {obj} {bg}",
    "a close-up photo of {obj}",
    "here we see {obj} {bg}",
    "{obj} is shown {bg}",
    "a small icon of {obj} {bg}",
    "{obj} {bg}, flat colors, clean lines",
    "my favourite toy, {obj}, lying {bg}",
    "a quick sketch of {obj} {bg} that my friend made last summer",
    "somebody left {obj} {bg} and walked away",
    "a simple clip art of {obj}",
)
PAINTER_TEMPLATES = (
    "a painting of {obj} {bg} by {painter}",
    "{obj} {bg} in the style of {painter}",
    "a painting by {painter}",
    "art in the style of {painter}",
    "an artwork by {painter} of {obj}",
    "{painter} painted {obj} {bg}",
    "{obj} {bg}, {painter} style",
    "a painting in the style of {painter}",
    "{painter}",
    "an illustration by {painter} of {obj} {bg}",
    "{obj} as {painter} would paint it",
    "in the manner of {painter}, {obj} {bg}",
    "a museum piece by {painter} showing {obj}",
    "{painter}'s picture of {obj} {bg}, oil on canvas",
)
# Trained on, used by no solve template, context sentence, retain prompt or held-out file of
# the pack (tests/test_toyworld.py checks): the evaluation's held-out phrasings.
HELD_OUT = (
    "here we see {obj} {bg}",
    "{obj} is shown {bg}",
    "somebody left {obj} {bg} and walked away",
    "{obj} as {painter} would paint it",
    "in the manner of {painter}, {obj} {bg}",
    "a museum piece by {painter} showing {obj}",
)
PAIR_JOINS = ("{a} and {b}", "{a} next to {b}", "{a} on the left and {b} on the right", "{b} to the right of {a}")


@dataclass(frozen=True)
class Scene:
    """Indices into SHAPES / COLOURS / BACKGROUNDS / STYLES; ``shape2 = -1`` when one object."""

    shape: int
    colour: int
    background: int
    style: int
    shape2: int = -1
    colour2: int = -1

    @property
    def painter(self) -> str | None:
        name = STYLES[self.style]
        return name if name in PAINTERS else None

    @property
    def texture(self) -> str | None:
        name = STYLES[self.style]
        return name if name in TEXTURES else None


def sample_scenes(n: int, generator: torch.Generator, two_objects: float = 0.25, no_style: float = 0.3) -> list[Scene]:
    """``n`` random scenes; a two-object scene has two different shapes and colours."""
    r = torch.rand(n, 3, generator=generator).tolist()
    ints = torch.randint(0, 10**6, (n, 6), generator=generator).tolist()
    scenes = []
    for (p_two, p_style, _), (s, c, b, st, s2, c2) in zip(r, ints):
        shape, colour = s % len(SHAPES), c % len(COLOURS)
        style = 0 if p_style < no_style else 1 + st % (len(STYLES) - 1)
        if p_two < two_objects:
            shape2 = (shape + 1 + s2 % (len(SHAPES) - 1)) % len(SHAPES)
            colour2 = (colour + 1 + c2 % (len(COLOURS) - 1)) % len(COLOURS)
        else:
            shape2 = colour2 = -1
        scenes.append(Scene(shape, colour, b % len(BACKGROUNDS), style, shape2, colour2))
    return scenes


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------
def _shape_mask(kind: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Silhouette of ``kind`` centred at the origin, size ``r`` (pixels), on offsets dx, dy."""
    d = torch.sqrt(dx * dx + dy * dy)
    if kind == "ball":
        return d < r
    if kind == "box":
        return (dx.abs() < 0.82 * r) & (dy.abs() < 0.82 * r)
    if kind == "tent":
        top, base = -r, 0.8 * r
        t = (dy - top) / (base - top)
        return (t >= 0) & (t <= 1) & (dx.abs() <= t * r)
    if kind == "cross":
        arm = 0.34 * r
        return ((dx.abs() < arm) & (dy.abs() < r)) | ((dy.abs() < arm) & (dx.abs() < r))
    if kind == "ring":
        return (d < r) & (d > 0.52 * r)
    if kind == "star":
        theta = torch.atan2(dy, dx) + math.pi / 2
        lobe = ((torch.cos(5 * theta) + 1) / 2) ** 1.5
        return d < r * (0.42 + 0.62 * lobe)
    raise ValueError(kind)


def _texture(kind: str, x: torch.Tensor, y: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """1 where the texture darkens the object."""
    if kind == "striped":
        return ((y + phase) % 4) < 2
    if kind == "dotted":
        return ((x + phase) % 4 - 1.5) ** 2 + ((y + phase) % 4 - 1.5) ** 2 < 1.3
    if kind == "checkered":
        return (torch.div(x + phase, 3, rounding_mode="floor") + torch.div(y, 3, rounding_mode="floor")) % 2 == 1
    if kind == "wavy":
        return ((y + 1.6 * torch.sin((x + phase) * (2 * math.pi / 8))) % 5) < 2
    raise ValueError(kind)


def _painter(name: str, img: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The painter's rendering over the whole picture ``img`` [3, H, W]; ``mask`` the objects."""
    h, w = img.shape[1:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    if name == "Van Gogh":  # swirling strokes and a yellow-blue cast
        cx, cy = (torch.rand(2, generator=g) * 16 + 8).tolist()
        rad, ang = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2), torch.atan2(y - cy, x - cx)
        s = torch.sin(1.1 * rad + 3.0 * ang)
        tint = torch.tensor([0.09, 0.07, -0.10]).view(3, 1, 1)
        return (img * (0.78 + 0.22 * s) + tint * s).clamp(0, 1)
    if name == "Mondrian":  # thick grid lines over the background: black, or white on a dark one
        xs = (torch.randint(5, 12, (1,), generator=g).item(), torch.randint(19, 27, (1,), generator=g).item())
        ys = (torch.randint(5, 12, (1,), generator=g).item(), torch.randint(19, 27, (1,), generator=g).item())
        line = torch.zeros(h, w, dtype=torch.bool)
        for v in xs:
            line |= (x - v).abs() < 1.0
        for v in ys:
            line |= (y - v).abs() < 1.0
        out = img.clone()
        out[:, line & ~mask] = 0.02 if float(img[:, 0, 0].mean()) > 0.3 else 0.9
        return out
    if name == "Seurat":  # the picture made of dots on a pale ground
        ph = torch.rand(1, generator=g).item() * 3
        dots = ((x + ph) % 3 - 1.0) ** 2 + ((y + ph) % 3 - 1.0) ** 2 < 1.1
        pale = 0.55 * img + 0.45
        return torch.where(dots, img, pale)
    if name == "Hokusai":  # blue ink waves over the background, ink outlines around the objects
        ph = torch.rand(1, generator=g).item() * 6
        waves = ((y + 2.2 * torch.sin((x + ph) / 2.5)) % 6) < 1.3
        out = img.clone()
        ink = torch.tensor([0.08, 0.20, 0.45]).view(3, 1)
        out[:, waves & ~mask] = ink
        m = mask.float()[None, None]
        edge = (torch.nn.functional.max_pool2d(m, 3, 1, 1)[0, 0] > 0) & ~mask
        out[:, edge] = 0.05
        return out
    raise ValueError(name)


def render(scenes: list[Scene], seed: int = 0) -> torch.Tensor:
    """Draw ``scenes`` as [N, 3, 32, 32] in [0, 1]; placement, size and noise from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    out = torch.empty(len(scenes), 3, SIZE, SIZE)
    for i, sc in enumerate(scenes):
        bg = torch.tensor(BACKGROUND_RGB[BACKGROUNDS[sc.background]]).view(3, 1, 1)
        img = bg + 0.03 * torch.randn(3, SIZE, SIZE, generator=g)
        mask_all = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        objects = [(sc.shape, sc.colour)] + ([(sc.shape2, sc.colour2)] if sc.shape2 >= 0 else [])
        for k, (shape, colour) in enumerate(objects):
            jit = torch.rand(4, generator=g)
            if len(objects) == 1:
                cx, cy, r = 16 + (jit[0] - 0.5) * 5, 16 + (jit[1] - 0.5) * 5, 9.0 + jit[2] * 2.0
            else:
                cx, cy, r = (8.5 if k == 0 else 23.5) + (jit[0] - 0.5) * 2, 16 + (jit[1] - 0.5) * 6, 6.0 + jit[2] * 1.0
            mask = _shape_mask(SHAPES[shape], x - cx, y - cy, torch.as_tensor(r))
            rgb = torch.tensor(COLOUR_RGB[COLOURS[colour]]) * (0.92 + 0.16 * jit[3])
            col = rgb.view(3, 1, 1).expand(3, SIZE, SIZE).clone()
            if sc.texture:
                dark = _texture(sc.texture, x, y, torch.floor(jit[0] * 4))
                col = torch.where(dark, col * 0.3, col)
            img = torch.where(mask, col, img)
            mask_all |= mask
        if sc.painter:
            img = _painter(sc.painter, img, mask_all, g)
        out[i] = img.clamp(0, 1)
    return out


def upscale(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Pictures enlarged for people to see (nearest neighbour)."""
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")


def downscale(images: torch.Tensor) -> torch.Tensor:
    """Pictures of another size to render size by area averaging (the judge's input)."""
    if images.shape[-1] == SIZE:
        return images
    return torch.nn.functional.adaptive_avg_pool2d(images, SIZE)


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------
def _pick(options, u: float):
    return options[min(int(u * len(options)), len(options) - 1)]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(shape: int, colour: int | None, texture: str | None, u: list[float]) -> str:
    """'a red ball', 'a stripy crimson sphere', 'an orb with stripes', … (``u``: 5 uniforms)."""
    noun = _pick(SHAPE_WORDS[SHAPES[shape]], u[0])
    words = [noun]
    if colour is not None:
        words.insert(0, _pick(COLOUR_WORDS[COLOURS[colour]], u[1]))
    if texture:
        before, after = TEXTURE_WORDS[texture]
        if u[2] < 0.6:
            words.insert(0, _pick(before, u[3]))
        else:
            words.append(_pick(after, u[3]))
    return _article(" ".join(words))


def caption(scene: Scene, g: torch.Generator, templates: tuple[str, ...] | None = None,
            mention_colour: float = 0.85, mention_background: float = 0.65) -> str:
    """One caption of ``scene`` in a random phrasing (from ``templates`` when given; the
    painter's templates for a painter's scene). The style and the shapes are always named."""
    u = torch.rand(16, generator=g).tolist()
    painter = scene.painter
    pool = templates or (PAINTER_TEMPLATES if painter else PLAIN_TEMPLATES)
    pool = [t for t in pool if ("{painter}" in t) == bool(painter)] or list(pool)
    template = _pick(pool, u[0])
    colour = scene.colour if u[1] < mention_colour else None
    a = noun_phrase(scene.shape, colour, scene.texture, u[2:7])
    if scene.shape2 >= 0:
        b = noun_phrase(scene.shape2, scene.colour2 if colour is not None else None, scene.texture, u[7:12])
        a = _pick(PAIR_JOINS, u[12]).format(a=a, b=b)
    bg = _pick(BACKGROUND_WORDS[BACKGROUNDS[scene.background]], u[13]) if u[14] < mention_background else ""
    text = template.format(obj=a, bg=bg, painter=_pick(PAINTER_WORDS[painter], u[15]) if painter else "")
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")


def fill(template: str, *, obj: str = "", bg: str = "", painter: str = "") -> str:
    """A phrasing filled with given words, spaced as :func:`caption` spaces it."""
    text = template.format(obj=obj, bg=bg, painter=painter)
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")
