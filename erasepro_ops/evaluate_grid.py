"""Pillow drawings for ErasePro Evaluate: the labelled before/after grid and the score chart.

Pure image work (numpy / Pillow), no ComfyUI import. Images come in as ``H x W x 3`` uint8 arrays
and the drawings go out the same way (``report.report_to_image_tensor`` makes a ComfyUI IMAGE).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .evaluate import GROUPS, EvalRow, group_means
from .report import BACKGROUND, GRID, MUTED, TEXT, _Text

GROUP_COLORS = {"target": (196, 48, 40), "held-out": (222, 120, 30), "unrelated": (40, 120, 200)}
"""Row-label and bar colours per group (exact RGB: bars are drawn without anti-aliasing)."""
COLUMNS = ("original", "erased")
LABEL_W = 240
SCORE_W = 110
HEADER_H = 30
BAND_H = 20
PAD = 8
MIN_CELL = 128


def cell_size(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(cell_w, cell_h, factor)``: images smaller than MIN_CELL are enlarged by an integer factor."""
    h, w = int(image_shape[0]), int(image_shape[1])
    factor = max(1, -(-MIN_CELL // max(1, min(h, w))))
    return w * factor, h * factor, factor


def grid_layout(rows: Sequence[EvalRow], image_shape: Sequence[int], scored: bool) -> dict:
    """Pixel layout of :func:`draw_grid`: total size and each row's top edge (for tests)."""
    cw, ch, factor = cell_size(image_shape)
    width = LABEL_W + len(COLUMNS) * (cw + PAD) + (SCORE_W if scored else 0) + PAD
    y, tops, group = HEADER_H, [], None
    for r in rows:
        if r.group != group:
            group = r.group
            y += BAND_H
        tops.append(y)
        y += ch + PAD
    return {"width": width, "height": y + PAD, "cell": (cw, ch), "factor": factor, "row_tops": tops,
            "column_left": [LABEL_W + i * (cw + PAD) for i in range(len(COLUMNS))]}


def _wrap(t: _Text, text: str, max_w: int, max_lines: int) -> list[str]:
    words, lines, line = t.clean(text).split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if t.width(trial) <= max_w or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [t.fit(" ".join(lines[max_lines - 1:]), max_w)]
    return lines


def _paste(img: Image.Image, arr: np.ndarray, xy: tuple[int, int], factor: int) -> None:
    tile = Image.fromarray(np.asarray(arr, dtype=np.uint8))
    if factor > 1:
        tile = tile.resize((tile.width * factor, tile.height * factor), Image.NEAREST)
    img.paste(tile, xy)


def _score_text(row: EvalRow, score: float | None) -> str:
    kind = "preserved" if row.group == "unrelated" else "erased"
    return f"{kind} {'n/a' if score is None else f'{score:.2f}'}"


def draw_grid(rows: Sequence[EvalRow], originals: Sequence[np.ndarray], erased: Sequence[np.ndarray],
              scores: Sequence[float | None] | None = None, title: str = "") -> np.ndarray:
    """Rows of (label, original image, erased image[, score]) under group bands, with column titles."""
    if not rows or len(originals) != len(rows) or len(erased) != len(rows):
        raise ValueError(f"draw_grid: {len(rows)} rows, {len(originals)} original and {len(erased)} erased images")
    lay = grid_layout(rows, np.asarray(originals[0]).shape, scores is not None)
    img = Image.new("RGB", (lay["width"], lay["height"]), BACKGROUND)
    draw = ImageDraw.Draw(img)
    t, small = _Text(draw, 13), _Text(draw, 11)
    cw, ch = lay["cell"]
    t.put((PAD, 8), title, fill=TEXT, max_w=LABEL_W - 2 * PAD)
    for i, name in enumerate(COLUMNS):
        t.put((lay["column_left"][i], 8), name, fill=TEXT, max_w=cw)
    if scores is not None:
        t.put((lay["column_left"][-1] + cw + PAD, 8), "score", fill=TEXT)
    group = None
    for i, row in enumerate(rows):
        top = lay["row_tops"][i]
        if row.group != group:
            group = row.group
            draw.rectangle([0, top - BAND_H, lay["width"], top - 4], fill=GRID)
            small.put((PAD, top - BAND_H + 3), f"{group} prompts", fill=GROUP_COLORS[group])
        for k, line in enumerate(_wrap(small, row.prompt, LABEL_W - 2 * PAD, max(1, ch // 15))):
            small.put((PAD, top + 2 + 15 * k), line, fill=TEXT)
        _paste(img, originals[i], (lay["column_left"][0], top), lay["factor"])
        _paste(img, erased[i], (lay["column_left"][1], top), lay["factor"])
        if scores is not None:
            small.put((lay["column_left"][-1] + cw + PAD, top + 2), _score_text(row, scores[i]),
                      fill=GROUP_COLORS[row.group])
    return np.asarray(img, dtype=np.uint8).copy()


def draw_score_chart(rows: Sequence[EvalRow], scores: Sequence[float | None], width: int = 512) -> np.ndarray:
    """One horizontal bar per row on a 0..1 axis (values outside are clipped to the axis, the
    number says the true value), group colours, the group means in the header."""
    bar_h, left, right = 14, 74, 56
    height = HEADER_H + len(rows) * (bar_h + 4) + PAD
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    t = _Text(draw, 11)
    means = group_means(rows, scores)
    head = " · ".join(f"{g} {'n/a' if means[g] is None else f'{means[g]:.2f}'}" for g in GROUPS)
    t.put((PAD, 6), f"erasure / preservation: {head}", fill=TEXT, max_w=width - 2 * PAD)
    span = width - left - right
    draw.line([left, HEADER_H - 4, left, height - PAD], fill=MUTED)
    draw.line([left + span, HEADER_H - 4, left + span, height - PAD], fill=GRID)
    for i, (row, s) in enumerate(zip(rows, scores)):
        y = HEADER_H + i * (bar_h + 4)
        t.put((PAD, y), row.group, fill=GROUP_COLORS[row.group], max_w=left - PAD - 2)
        if s is not None:
            length = int(round(min(1.0, max(0.0, s)) * span))
            if length > 0:
                draw.rectangle([left, y, left + length - 1, y + bar_h - 1], fill=GROUP_COLORS[row.group])
        t.put((left + span + 4, y), "n/a" if s is None else f"{s:.2f}", fill=TEXT)
    return np.asarray(img, dtype=np.uint8).copy()
