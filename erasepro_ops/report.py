"""The solver's report: a Pillow-drawn chart (ComfyUI IMAGE output) and a plain-text summary.

``report`` is the dict the Progressive Solver builds (the same dict goes to the browser)::

    {"method": "erasepro" | "uce", "progressive_layers": 3, "concepts": ["Van Gogh → a painting", ...],
     "sites": [{"name": "clip_l.0.fc2", "stage": "shallow", "relative_change": 0.0123, "residual": 1e-9},
               ..., {"name": "in.1.0.k", "stage": "deep", "relative_change": 0.004, "residual": 2e-8}, ...],
     "train_residual": 3.1e-7, "deep_burden": 0.0041, "solve_seconds": 0.52,
     "preservation_drift": 0.002 | None, "constraints": 364, "rank_budget": 768, "unaligned_energy": 0.0,
     "warnings": ["..."]}

Every key is optional here; missing, ``None``, NaN or infinite numbers show as "n/a". The per-site
``relative_change`` is ``‖ΔW‖_F / ‖W_o‖_F`` (docs/DESIGN.md, *Metrics*). Numbers are formatted like the browser badge
(``web/erasepro.js``): residual ``3.1e-7``, burden ``0.41%``, time ``0.52 s``.
No ComfyUI import here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "draw_report",
    "report_to_image_tensor",
    "summary_text",
    "format_sci",
    "format_percent",
    "format_seconds",
    "STAGE_COLORS",
]

# Colours (RGB). Bars are drawn without anti-aliasing, so these exact values appear in the image.
BACKGROUND = (250, 250, 252)
TEXT = (30, 32, 38)
MUTED = (110, 114, 124)
GRID = (226, 228, 234)
AXIS = (150, 154, 162)
WARN = (196, 48, 40)
NA_COLOR = (185, 188, 196)
STAGE_COLORS = {
    "shallow": (52, 120, 230),  # text-encoder fc2 sites
    "deep": (232, 118, 36),  # the diffusion model's sites (cross-attention K/V, a DiT's text gateway)
    "other": (140, 110, 190),
}
STAGE_LABELS = {
    "shallow": "text encoder (shallow fc2)",
    "deep": "diffusion model: cross-attn K/V or text gateway (deep)",
    "other": "other",
}

_ASCII_FALLBACK = {
    "\u2192": "->", "\u2190": "<-", "\u21d2": "=>", "\u0394": "d", "\u00d7": "x", "\u2014": "-",
    "\u2013": "-", "\u2026": "...", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u2248": "~", "\u2264": "<=", "\u2265": ">=", "\u00b7": ".", "\u2016": "||", "\u00a0": " ",
}


# ----------------------------------------------------------------------------- number formatting
def _num(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / infinite values."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def format_sci(x: Any, digits: int = 2) -> str:
    """Compact scientific notation with ``digits`` significant digits: 3.1e-7, 1.2e-2, 0; "n/a" if missing."""
    v = _num(x)
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    mant, exp = f"{v:.{max(1, digits) - 1}e}".split("e")
    return f"{mant}e{int(exp)}"


def format_percent(x: Any) -> str:
    """A fraction as a percentage with two significant digits: 0.0041 -> 0.41%; tiny values in sci."""
    v = _num(x)
    if v is None:
        return "n/a"
    p = v * 100.0
    if p == 0:
        return "0%"
    if abs(p) < 0.01:
        return f"{format_sci(p)}%"
    if abs(p) >= 100:
        return f"{p:.0f}%"
    return f"{float(f'{p:.2g}'):g}%"


def format_seconds(x: Any) -> str:
    """0.52 s, 12.3 s, 4.1 ms; "n/a" if missing."""
    v = _num(x)
    if v is None:
        return "n/a"
    if abs(v) < 0.1:
        return f"{v * 1000:.1f} ms"
    if abs(v) < 10:
        return f"{v:.2f} s"
    return f"{v:.1f} s"


def _format_count(x: Any) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{int(round(v))}"


def _method_label(report: dict) -> str:
    m = str(report.get("method") or "").lower()
    return {"erasepro": "ErasePro", "uce": "UCE baseline"}.get(m, m or "unknown method")


def _stage(site: dict) -> str:
    s = str(site.get("stage") or "").lower()
    return s if s in ("shallow", "deep") else "other"


def _sites(report: dict) -> list[dict]:
    sites = report.get("sites") or []
    return [s for s in sites if isinstance(s, dict)]


def _concepts(report: dict) -> list[str]:
    c = report.get("concepts") or []
    if isinstance(c, str):
        c = [c]
    return [str(x) for x in c]


def _warnings(report: dict) -> list[str]:
    w = report.get("warnings") or []
    if isinstance(w, str):
        w = [w]
    return [str(x) for x in w]


def _stage_max(sites: list[dict]) -> dict[str, tuple[float | None, str, int]]:
    """stage -> (max finite relative change or None, site name of the max, number of sites)."""
    out: dict[str, tuple[float | None, str, int]] = {}
    for s in sites:
        st = _stage(s)
        best, name, n = out.get(st, (None, "", 0))
        v = _num(s.get("relative_change"))
        if v is not None and (best is None or v > best):
            best, name = v, str(s.get("name") or "?")
        out[st] = (best, name, n + 1)
    return out


# ----------------------------------------------------------------------------- summary
def _preserve_count(report: dict) -> str:
    n = report.get("preserve_constraints")
    return f" (+{_format_count(n)} preserve)" if isinstance(n, int) and n > 0 else ""


def summary_text(report: dict | None) -> str:
    """A multi-line human summary of the report (the solver's STRING output)."""
    report = report if isinstance(report, dict) else {}
    sites = _sites(report)
    concepts = _concepts(report)
    lines = []
    s_layers = report.get("progressive_layers")
    lines.append(
        f"{_method_label(report)} erasure, S={_format_count(s_layers)} progressive text-encoder layers, "
        f"{len(concepts)} concept{'s' if len(concepts) != 1 else ''}:"
    )
    for c in concepts:
        lines.append(f"  - {c}")
    lines.append(
        f"train residual {format_sci(report.get('train_residual'))} | "
        f"deep burden {format_percent(report.get('deep_burden'))} | "
        f"solve time {format_seconds(report.get('solve_seconds'))}"
    )
    lines.append(
        f"constraints {_format_count(report.get('constraints'))}{_preserve_count(report)} / rank budget "
        f"{_format_count(report.get('rank_budget'))} | "
        f"preservation drift {format_sci(report.get('preservation_drift'))} | "
        f"unaligned energy {format_sci(report.get('unaligned_energy'))}"
    )
    if report.get("empty_prompt_drift") is not None:
        lines.append(f"empty prompt (CFG's negative) drift {format_sci(report.get('empty_prompt_drift'))}")
    if not sites:
        lines.append("no edited sites")
    else:
        per_stage = _stage_max(sites)
        for st in ("shallow", "deep", "other"):
            if st not in per_stage:
                continue
            best, name, n = per_stage[st]
            where = f" at {name}" if best is not None else ""
            lines.append(
                f"max relative dW, {STAGE_LABELS[st]}: {format_sci(best)}{where} ({n} site{'s' if n != 1 else ''})"
            )
    warnings = _warnings(report)
    if warnings:
        lines.append(f"warnings ({len(warnings)}):")
        lines.extend(f"  ! {w}" for w in warnings)
    else:
        lines.append("warnings: none")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- drawing helpers
def _load_font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: fixed bitmap font


class _Text:
    """Font + glyph-support aware text measurement and ASCII fallback for missing glyphs."""

    def __init__(self, draw: ImageDraw.ImageDraw, size: int):
        self.draw = draw
        self.font = _load_font(size)
        self._notdef = self._mask_key("\U0010fffd")
        self._ok: dict[str, bool] = {}

    def _mask_key(self, ch: str):
        try:
            m = self.font.getmask(ch)
            return (m.size, bytes(m))
        except Exception:
            return None

    def _supported(self, ch: str) -> bool:
        if ch.isascii():
            return True
        if ch not in self._ok:
            key = self._mask_key(ch)
            self._ok[ch] = key is not None and key != self._notdef
        return self._ok[ch]

    def clean(self, text: str) -> str:
        out = []
        for ch in str(text):
            if ch in "\r\n\t":
                out.append(" ")
            elif self._supported(ch):
                out.append(ch)
            else:
                out.append(_ASCII_FALLBACK.get(ch, "?"))
        return "".join(out)

    def width(self, text: str) -> int:
        try:
            box = self.draw.textbbox((0, 0), text, font=self.font)
            return int(box[2] - box[0])
        except Exception:
            try:
                return int(self.font.getsize(text)[0])  # very old Pillow
            except Exception:
                return 6 * len(text)

    def height(self) -> int:
        try:
            box = self.draw.textbbox((0, 0), "Ag|", font=self.font)
            return int(box[3])
        except Exception:
            return 11

    def fit(self, text: str, max_w: int) -> str:
        """Clean ``text`` and truncate it with "..." to fit ``max_w`` pixels."""
        text = self.clean(text)
        if max_w <= 0:
            return ""
        if self.width(text) <= max_w:
            return text
        lo, hi = 0, len(text)
        while lo < hi:  # longest prefix that fits with the ellipsis
            mid = (lo + hi + 1) // 2
            if self.width(text[:mid].rstrip() + "...") <= max_w:
                lo = mid
            else:
                hi = mid - 1
        return (text[:lo].rstrip() + "...") if lo > 0 else ""

    def put(self, xy, text: str, fill=TEXT, max_w: int | None = None, anchor_right: bool = False):
        text = self.fit(text, max_w) if max_w is not None else self.clean(text)
        if not text:
            return 0
        x, y = xy
        w = self.width(text)
        if anchor_right:
            x -= w
        self.draw.text((int(x), int(y)), text, font=self.font, fill=fill)
        return w


# ----------------------------------------------------------------------------- chart
class _Canvas:
    """The image being drawn, its two text sizes and the spacing derived from its size."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.img = Image.new("RGB", (width, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.img)
        scale = min(width / 768.0, height / 384.0)
        self.big = _Text(self.draw, max(9, int(round(15 * scale))))
        self.small = _Text(self.draw, max(8, int(round(12 * scale))))
        self.hb, self.hs = self.big.height(), self.small.height()
        self.pad = max(4, int(round(12 * scale)))
        self.line_gap = max(2, int(round(4 * scale)))


def _draw_title(c: _Canvas, report: dict, concepts: list[str], y: int) -> int:
    """Method, S and the concepts on one line; returns the y below it."""
    s_txt = _format_count(report.get("progressive_layers"))
    head = f"{_method_label(report)}  S={s_txt}  "
    hw = c.big.put((c.pad, y), head, fill=TEXT, max_w=c.width - 2 * c.pad)
    if concepts:
        ctext = f"{len(concepts)} concept{'s' if len(concepts) != 1 else ''}: " + "; ".join(concepts)
    else:
        ctext = "no concepts"
    c.big.put((c.pad + hw, y), ctext, fill=MUTED, max_w=c.width - 2 * c.pad - hw)
    return y + c.hb + c.line_gap


def _draw_legend(c: _Canvas, sites: list[dict], y: int) -> int:
    """One swatch per stage present (both when there are no sites), and "n/a" when a value is
    missing; returns the y below it."""
    present = []
    for s in sites:
        st = _stage(s)
        if st not in present:
            present.append(st)
    order = [st for st in ("shallow", "deep", "other") if st in present] or ["shallow", "deep"]
    lx = c.pad
    sw = max(6, c.hs - 2)
    for st in order:
        c.draw.rectangle([lx, y + 2, lx + sw, y + 2 + sw], fill=STAGE_COLORS[st])
        lx += sw + c.line_gap + 2
        lx += c.small.put((lx, y), STAGE_LABELS[st], fill=TEXT, max_w=max(0, c.width - c.pad - lx)) + 3 * c.pad
    if any(_num(s.get("relative_change")) is None for s in sites):
        c.draw.rectangle([lx, y + 2, lx + sw, y + 2 + sw], fill=NA_COLOR)
        lx += sw + c.line_gap + 2
        c.small.put((lx, y), "n/a", fill=TEXT, max_w=max(0, c.width - c.pad - lx))
    return y + c.hs + c.line_gap * 2


def _footer_lines(c: _Canvas, report: dict, warnings: list[str]) -> list[tuple[str, tuple, _Text]]:
    footer1 = (
        f"train residual {format_sci(report.get('train_residual'))}   "
        f"deep burden {format_percent(report.get('deep_burden'))}   "
        f"solve {format_seconds(report.get('solve_seconds'))}   "
        f"constraints {_format_count(report.get('constraints'))} / rank budget {_format_count(report.get('rank_budget'))}"
    )
    footer2 = (
        f"preservation drift {format_sci(report.get('preservation_drift'))}   "
        f"unaligned energy {format_sci(report.get('unaligned_energy'))}"
    )
    lines = [(footer1, TEXT, c.small), (footer2, MUTED, c.small)]
    if warnings:
        more = f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else ""
        lines.append((f"warning: {warnings[0]}{more}", WARN, c.small))
    return lines


class _Plot:
    """The chart area: ``x0..x1`` by ``y0`` (top, the largest value) ``..y1`` (zero), the value
    scale and the room left under it for names (``name_h``, 0 on a tiny image)."""

    def __init__(self, c: _Canvas, values: list[float | None], y: int, footer_top: int):
        finite = [max(0.0, v) for v in values if v is not None]
        self.finite = bool(finite)
        self.vmax = max(finite) if finite else 0.0
        self.top_label = f"max {format_sci(self.vmax, 3)}" if finite else "max n/a"
        y_axis_w = max(c.small.width(self.top_label), c.small.width("relative dW")) + c.line_gap * 2
        self.x0 = c.pad + y_axis_w
        self.x1 = c.width - c.pad
        self.name_h = c.hs + c.line_gap  # room under the bars for site names or stage brackets
        self.y0 = y + c.hs + c.line_gap  # headroom for the value label above the tallest bar
        self.y1 = footer_top - self.name_h - c.line_gap * 2
        if self.y1 - self.y0 < 8:  # tiny image: squeeze the name row away
            self.y1 = max(self.y0 + 4, footer_top - c.line_gap)
            self.name_h = 0


def _draw_axes(c: _Canvas, plot: _Plot) -> None:
    """Grid lines at 0, 1/2 and the maximum, their labels, and the y axis."""
    for frac in (0.0, 0.5, 1.0):
        gy = int(round(plot.y1 - frac * (plot.y1 - plot.y0)))
        c.draw.line([plot.x0, gy, plot.x1, gy], fill=GRID if frac > 0 else AXIS, width=1)
    c.small.put((plot.x0 - c.line_gap, plot.y0 - c.hs // 2), plot.top_label, fill=TEXT, anchor_right=True)
    if plot.finite and plot.vmax > 0:
        c.small.put((plot.x0 - c.line_gap, (plot.y0 + plot.y1) // 2 - c.hs // 2), format_sci(plot.vmax / 2),
                    fill=MUTED, anchor_right=True)
    c.small.put((plot.x0 - c.line_gap, plot.y1 - c.hs // 2), "0", fill=MUTED, anchor_right=True)
    c.draw.line([plot.x0, plot.y0, plot.x0, plot.y1], fill=AXIS, width=1)


def _draw_bars(c: _Canvas, plot: _Plot, sites: list[dict], values: list[float | None], y: int) -> float:
    """One bar per site, coloured by stage, with its value above when there is room; returns the
    width of a site's slot."""
    cx0, cy0, cy1, small, hs = plot.x0, plot.y0, plot.y1, c.small, c.hs
    slot = max(1, plot.x1 - cx0 - 2) / len(sites)
    gap = 0 if slot < 4 else max(1, int(slot * 0.2))
    denom = plot.vmax if plot.vmax > 0 else 1.0
    show_values = slot >= small.width("0.0e-0") + 4 and cy1 - cy0 > 3 * hs
    for i, (site, v) in enumerate(zip(sites, values)):
        x0 = cx0 + 2 + int(math.floor(i * slot))
        x1 = cx0 + 2 + int(math.floor((i + 1) * slot)) - 1 - gap
        x1 = max(x0, x1)
        if v is None:
            # a short grey stub marks a missing value; labelled when there is room
            c.draw.rectangle([x0, cy1 - 3, x1, cy1 - 1], fill=NA_COLOR)
            if show_values:
                small.put(((x0 + x1) // 2 - small.width("n/a") // 2, cy1 - 3 - hs - 1), "n/a", fill=MUTED)
            continue
        h = (max(0.0, v) / denom) * (cy1 - cy0)
        top = int(round(cy1 - h))
        if v > 0 and top >= cy1:
            top = cy1 - 1  # a positive value stays visible
        if top < cy1:
            c.draw.rectangle([x0, top, x1, cy1 - 1], fill=STAGE_COLORS[_stage(site)])
        if show_values:
            lab = format_sci(v)
            ty = max(y, top - hs - 1)
            small.put(((x0 + x1) // 2 - small.width(lab) // 2, ty), lab, fill=MUTED)
    return slot


def _draw_names(c: _Canvas, plot: _Plot, sites: list[dict], slot: float) -> None:
    """Under the bars: site names when they fit, else one bracket per contiguous stage run."""
    cx0, small = plot.x0, c.small
    ny = plot.y1 + c.line_gap
    names = [str(s.get("name") or "?") for s in sites]
    if slot >= max(small.width(small.clean(nm)) for nm in names) + 4:
        for i, nm in enumerate(names):
            xc = cx0 + 2 + (i + 0.5) * slot
            small.put((xc - small.width(small.clean(nm)) / 2, ny), nm, fill=MUTED)
        return
    runs = []  # (stage, start, end)
    for i, s in enumerate(sites):
        st = _stage(s)
        if runs and runs[-1][0] == st:
            runs[-1][2] = i
        else:
            runs.append([st, i, i])
    for st, a, b in runs:
        rx0 = cx0 + 2 + int(a * slot)
        rx1 = cx0 + 2 + int((b + 1) * slot) - 1
        c.draw.line([rx0, ny, rx1, ny], fill=STAGE_COLORS[st], width=2)
        count = b - a + 1
        lab = f"{'fc2' if st == 'shallow' else 'K/V' if st == 'deep' else 'sites'} x{count}"
        lw = small.width(lab)
        if lw + 2 <= rx1 - rx0:
            small.put(((rx0 + rx1) // 2 - lw // 2, ny + 2), lab, fill=MUTED)


def _draw_footer(c: _Canvas, lines: list[tuple[str, tuple, _Text]], top: int) -> None:
    fy = top
    c.draw.line([c.pad, fy - c.line_gap, c.width - c.pad, fy - c.line_gap], fill=GRID, width=1)
    for text, color, t in lines:
        t.put((c.pad, fy), text, fill=color, max_w=c.width - 2 * c.pad)
        fy += c.hs + c.line_gap


def draw_report(report: dict | None, width: int = 768, height: int = 384) -> np.ndarray:
    """Draw ``report`` as a chart: H x W x 3 uint8 (title, per-site relative dW bars, legend, footer)."""
    c = _Canvas(max(64, int(width)), max(64, int(height)))
    report = report if isinstance(report, dict) else {}
    sites = _sites(report)

    y = _draw_title(c, report, _concepts(report), c.pad)
    y = _draw_legend(c, sites, y)
    footer = _footer_lines(c, report, _warnings(report))  # laid out first: the chart takes the rest
    footer_top = c.height - c.pad - len(footer) * (c.hs + c.line_gap)

    values = [_num(s.get("relative_change")) for s in sites]
    plot = _Plot(c, values, y, footer_top)
    _draw_axes(c, plot)
    if not sites:
        msg = "no sites"
        c.big.put(((plot.x0 + plot.x1) // 2 - c.big.width(msg) // 2, (plot.y0 + plot.y1) // 2 - c.hb // 2), msg,
                  fill=MUTED)
    else:
        slot = _draw_bars(c, plot, sites, values, y)
        if plot.name_h:
            _draw_names(c, plot, sites, slot)
    c.small.put((c.pad, plot.y0 + c.hs), "relative dW", fill=MUTED, max_w=max(0, plot.x0 - c.pad - c.line_gap))
    _draw_footer(c, footer, footer_top)
    return np.asarray(c.img, dtype=np.uint8).copy()


def report_to_image_tensor(arr: np.ndarray):
    """H x W x 3 uint8 -> 1 x H x W x 3 float32 in [0, 1] (ComfyUI IMAGE layout)."""
    import torch

    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    else:
        f = np.clip(a.astype(np.float32), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(f)).unsqueeze(0)
