"""The solver report: Pillow chart (ComfyUI IMAGE), tensor layout and text summary."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasepro_ops.report import (
    STAGE_COLORS,
    draw_report,
    format_percent,
    format_seconds,
    format_sci,
    report_to_image_tensor,
    summary_text,
)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

SD15_DEEP = [f"{blk}.{kv}" for blk in (
    "in.1.0", "in.2.0", "in.4.0", "in.5.0", "in.7.0", "in.8.0", "mid.0",
    "out.3.0", "out.4.0", "out.5.0", "out.6.0", "out.7.0", "out.8.0", "out.9.0", "out.10.0", "out.11.0",
) for kv in ("k", "v")]


def make_report(shallow=3, deep=32, seed=0, **over):
    rng = np.random.default_rng(seed)
    sites = [
        {"name": f"clip_l.{i}.fc2", "stage": "shallow", "relative_change": float(rng.uniform(0.004, 0.015)),
         "residual": 1e-9}
        for i in range(shallow)
    ]
    deep_names = (SD15_DEEP * (deep // len(SD15_DEEP) + 1))[:deep]
    sites += [
        {"name": nm, "stage": "deep", "relative_change": float(rng.uniform(0.001, 0.006)), "residual": 2e-8}
        for nm in deep_names
    ]
    rep = {
        "method": "erasepro",
        "progressive_layers": shallow,
        "concepts": ["Van Gogh \u2192 a painting", "Claude Monet \u2192 a painting"],
        "sites": sites,
        "train_residual": 3.1e-7,
        "deep_burden": 0.0041,
        "solve_seconds": 0.52,
        "preservation_drift": 0.002,
        "constraints": 364,
        "rank_budget": 768,
        "unaligned_energy": 0.0,
        "warnings": ["concept 'Claude Monet' needs 3 tokens; 1 template overflowed 77 tokens"],
    }
    rep.update(over)
    return rep


def has_color(arr, rgb):
    return bool(np.all(arr == np.array(rgb, dtype=np.uint8), axis=-1).any())


def count_color(arr, rgb):
    return int(np.all(arr == np.array(rgb, dtype=np.uint8), axis=-1).sum())


def test_shape_dtype_default_and_custom_size():
    arr = draw_report(make_report())
    assert arr.shape == (384, 768, 3) and arr.dtype == np.uint8
    arr2 = draw_report(make_report(), width=512, height=300)
    assert arr2.shape == (300, 512, 3) and arr2.dtype == np.uint8
    assert arr.std() > 5  # not a blank canvas


def test_tensor_layout():
    arr = draw_report(make_report())
    t = report_to_image_tensor(arr)
    assert isinstance(t, torch.Tensor)
    assert t.shape == (1, 384, 768, 3) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert torch.allclose(t[0], torch.from_numpy(arr).float() / 255.0)


def test_both_stage_colors_appear():
    arr = draw_report(make_report())
    assert has_color(arr, STAGE_COLORS["shallow"])
    assert has_color(arr, STAGE_COLORS["deep"])
    # the bars themselves, not only the legend swatches: many pixels of each colour
    assert count_color(arr, STAGE_COLORS["shallow"]) > 500
    assert count_color(arr, STAGE_COLORS["deep"]) > 500


def test_only_deep_has_no_shallow_colour():
    arr = draw_report(make_report(shallow=0, deep=32, method="uce", progressive_layers=0))
    assert has_color(arr, STAGE_COLORS["deep"])
    assert not has_color(arr, STAGE_COLORS["shallow"])


def test_bar_heights_follow_data():
    """The shallow bar area grows when the shallow changes grow."""
    rep = make_report()
    arr = draw_report(rep)
    bigger = copy.deepcopy(rep)
    for s in bigger["sites"]:
        if s["stage"] == "deep":
            s["relative_change"] *= 0.25  # deep shrink relative to the max
    arr2 = draw_report(bigger)
    assert count_color(arr2, STAGE_COLORS["deep"]) < count_color(arr, STAGE_COLORS["deep"])


def test_image_differs_when_data_differ():
    a = draw_report(make_report(seed=0))
    b = draw_report(make_report(seed=1))
    c = draw_report(make_report(seed=0, train_residual=4.2e-3))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(a, draw_report(make_report(seed=0)))  # deterministic


@pytest.mark.parametrize(
    "rep",
    [
        make_report(shallow=1, deep=0),
        make_report(shallow=0, deep=1),
        make_report(shallow=0, deep=0),
        make_report(shallow=8, deep=192),  # 200 thin bars
        make_report(shallow=3, deep=2000),  # more bars than pixels
        {},
        {"sites": None, "concepts": None, "warnings": None},
    ],
    ids=["one-shallow", "one-deep", "no-sites", "200-sites", "2000-sites", "empty", "nones"],
)
def test_edge_cases_do_not_raise(rep):
    arr = draw_report(rep)
    assert arr.shape == (384, 768, 3) and arr.dtype == np.uint8


def test_none_report_and_tiny_size():
    assert draw_report(None).shape == (384, 768, 3)
    assert draw_report(make_report(), width=10, height=10).shape == (64, 64, 3)  # clamped, no crash
    assert draw_report(make_report(), width=200, height=100).shape == (100, 200, 3)


def test_nan_none_zero_values():
    rep = make_report(shallow=3, deep=6)
    rep["sites"][0]["relative_change"] = float("nan")
    rep["sites"][1]["relative_change"] = None
    rep["sites"][2]["relative_change"] = 0.0
    rep["sites"][3]["relative_change"] = float("inf")
    rep["sites"][4]["relative_change"] = "garbage"
    rep.update(train_residual=float("nan"), deep_burden=None, solve_seconds=None, preservation_drift=None,
               constraints=None, rank_budget=float("nan"))
    arr = draw_report(rep)
    assert arr.shape == (384, 768, 3)
    txt = summary_text(rep)
    assert "train residual n/a" in txt and "deep burden n/a" in txt and "solve time n/a" in txt

    zeros = make_report(shallow=2, deep=4)
    for s in zeros["sites"]:
        s["relative_change"] = 0.0
    zeros.update(train_residual=0.0, deep_burden=0.0)
    draw_report(zeros)
    assert "train residual 0 " in summary_text(zeros)

    all_nan = make_report(shallow=2, deep=2)
    for s in all_nan["sites"]:
        s["relative_change"] = float("nan")
    draw_report(all_nan)
    assert "n/a" in summary_text(all_nan)


def test_formatting():
    assert format_sci(3.1e-7) == "3.1e-7"
    assert format_sci(0.0123) == "1.2e-2"
    assert format_sci(0) == "0"
    assert format_sci(None) == "n/a" and format_sci(float("nan")) == "n/a"
    assert format_percent(0.0041) == "0.41%"
    assert format_percent(0.123) == "12%"
    assert format_percent(None) == "n/a"
    assert format_seconds(0.52) == "0.52 s"
    assert format_seconds(0.0042) == "4.2 ms"
    assert not math.isnan(float(format_sci(2.5e-3)))


def test_summary_text_contents():
    rep = make_report()
    txt = summary_text(rep)
    assert "ErasePro" in txt and "S=3" in txt
    assert "Van Gogh \u2192 a painting" in txt and "Claude Monet \u2192 a painting" in txt
    assert "train residual 3.1e-7" in txt
    assert "deep burden 0.41%" in txt
    assert "0.52 s" in txt
    assert "364" in txt and "768" in txt
    shallow_max = max(s["relative_change"] for s in rep["sites"] if s["stage"] == "shallow")
    deep_max = max(s["relative_change"] for s in rep["sites"] if s["stage"] == "deep")
    assert format_sci(shallow_max) in txt and format_sci(deep_max) in txt
    assert "3 tokens; 1 template overflowed" in txt
    assert "UCE" in summary_text(make_report(method="uce"))
    assert "no edited sites" in summary_text(make_report(shallow=0, deep=0))
    assert "warnings: none" in summary_text(make_report(warnings=[]))
    assert "constraints 364 (+154 preserve) / rank budget 768" in summary_text(make_report(preserve_constraints=154))
    assert "preserve)" not in txt


def test_save_example_png():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_report(make_report())).save(ARTIFACTS / "report_example.png")
    Image.fromarray(draw_report(make_report(shallow=8, deep=192))).save(ARTIFACTS / "report_200_sites.png")
    few = make_report(shallow=2, deep=4)
    few["sites"][1]["relative_change"] = None
    Image.fromarray(draw_report(few)).save(ARTIFACTS / "report_few_sites.png")
    Image.fromarray(draw_report(make_report(shallow=0, deep=0, warnings=[]))).save(ARTIFACTS / "report_no_sites.png")
    assert (ARTIFACTS / "report_example.png").stat().st_size > 1000
