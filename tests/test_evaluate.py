"""ErasePro Evaluate on tiny random-weight models built from ComfyUI's classes, with ComfyUI's own
CLIP vision class (random weights, a tiny config). The images and scores mean nothing here; the
tests check the grid's layout, the seed's determinism, that identical models score preservation
1.0 and erasure 0, progress and Cancel, and that mismatched inputs are refused with a message.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import comfy_host as H
from erasepro_ops.templates import CONCEPT_TYPES, TEMPLATES, ConceptPair, fill
from erasepro_ops.evaluate import (EvalRow, default_prompts, erasure_scores, evaluation_rows,
                                   preservation_scores, prompt_lines)
from erasepro_ops.evaluate_grid import COLUMNS, grid_layout
from erasepro_ops.retain import retain_prompts

REPO = H.REPO
HELD = "a quiet harbour at dawn, painted by {}"
UNRELATED = "a lighthouse on a rocky coast\na bowl of ramen"
TINY_VISION = {"hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 64, "intermediate_size": 128,
               "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 4,
               "num_channels": 3, "num_hidden_layers": 2, "patch_size": 16, "projection_dim": 32}


@pytest.fixture(scope="module")
def pack():
    return H.load_pack()


@pytest.fixture(scope="module")
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["ErasePro_Evaluate"]()


def tiny_vae():
    """ComfyUI's VAE class around a narrow AutoencoderKL (8x downscale, 4 latent channels), random init."""
    H.import_comfy()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                           "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                                           "attn_resolutions": [], "dropout": 0.0}}
    ae = AutoencoderKL(**params)
    H.init_weights_(ae, seed=3)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})


@pytest.fixture(scope="module")
def sd15():
    model, clip = H.build("sd15")
    return model, clip, tiny_vae()


@pytest.fixture(scope="module")
def concepts(pack):
    return pack.NODE_CLASS_MAPPINGS["ErasePro_ConceptPair"]().build("Van Gogh", "a painting", "style")[0]


@pytest.fixture(scope="module")
def erased(pack, sd15, concepts):
    model, clip, _ = sd15
    m = pack.NODE_CLASS_MAPPINGS
    edit = m["ErasePro_ProgressiveSolver"]().solve(model, clip, concepts, 1, "erasepro")["result"][0]
    return m["ErasePro_ApplyErasedUNet"]().apply(model, edit, 1.0, clip)


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    H.import_comfy()
    import comfy.clip_vision
    path = tmp_path_factory.mktemp("clip_vision") / "tiny_vision.json"
    path.write_text(json.dumps(TINY_VISION))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    H.init_weights_(cv.model, seed=5)
    return cv


def run(node, original, erased, vae, concepts, **kw):
    args = dict(seed=7, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=64,
                held_out=HELD, unrelated=UNRELATED)
    args.update(kw)
    return node.evaluate(original[0], original[1], erased[0], erased[1], vae, concepts, **args)


def cells(grid: torch.Tensor, rows, column: int) -> list[np.ndarray]:
    """Each row's image in ``column`` (0 original, 1 erased), cut out of the grid IMAGE."""
    g = (grid[0].numpy() * 255).round().astype(np.uint8)
    lay = grid_layout(rows, (64, 64, 3), scored=g.shape[1] > grid_layout(rows, (64, 64, 3), False)["width"])
    cw, ch = lay["cell"]
    x = lay["column_left"][column]
    return [g[t:t + ch, x:x + cw] for t in lay["row_tops"]]


# ------------------------------------------------------------------------------- prompts
def test_default_prompts_are_held_out():
    """Defaults exist for every concept type, hold '{}' once, and are none of the solver's templates,
    the benchmark's held-out sentences, or the retain bank's prompts."""
    d = default_prompts()
    solver = {t for ts in TEMPLATES.values() for t in ts}
    extra = json.loads((REPO / "erasepro_ops" / "data" / "extra_templates.json").read_text())
    bench = json.loads((REPO / "benchmarks" / "held_out.json").read_text())
    seen = solver | {t for ts in list(extra.values()) + list(bench.values()) for t in ts}
    for kind in CONCEPT_TYPES:
        assert d["held_out"][kind], kind
        for t in d["held_out"][kind]:
            assert t.count("{}") == 1 and t not in seen, t
    assert d["unrelated"] and not set(d["unrelated"]) & set(retain_prompts())


def test_rows_grouped_with_anchor_sentences():
    pair = ConceptPair("Van Gogh", "a painting", "style")
    rows = evaluation_rows([pair], None, None)
    groups = [r.group for r in rows]
    assert groups == sorted(groups, key=["target", "held-out", "unrelated"].index)
    assert groups.count("target") == 2 and groups.count("held-out") == len(default_prompts()["held_out"]["style"])
    for r in rows:
        if r.group == "unrelated":
            assert r.anchor is None
        else:
            assert "Van Gogh" in r.prompt and r.anchor == r.prompt.replace("Van Gogh", "a painting")
    held = [r for r in evaluation_rows([pair], [HELD], ["x"]) if r.group == "held-out"]
    assert held == [EvalRow("held-out", fill(HELD, "Van Gogh"), fill(HELD, "a painting"))]
    assert prompt_lines("  \n ") is None and prompt_lines("a\n\n b ") == ("a", "b")
    for bad, msg in (([], "empty"), (["no placeholder"], "exactly once")):
        with pytest.raises(ValueError, match=msg):
            evaluation_rows([pair], bad, None)
    with pytest.raises(ValueError, match="no concepts"):
        evaluation_rows([], None, None)


def test_scores_formulas():
    o = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    a = torch.tensor([[0.0, 1.0], [0.0, 1.0], [3.0, 0.0]])  # the last: anchor embeds like the original
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    s = erasure_scores(o, e, a)
    assert s[0] == 0.0 and s[1] == pytest.approx(1.0) and s[2] is None
    assert preservation_scores(o, e) == pytest.approx([1.0, 0.0, 0.0])


# ------------------------------------------------------------------------------- the node
def test_grid_layout_and_seed_determinism(node, sd15, erased, concepts):
    model, clip, vae = sd15
    out = run(node, (model, clip), erased, vae, concepts)
    grid, chart, summary = out["result"]
    rows = evaluation_rows(concepts, [HELD], prompt_lines(UNRELATED))
    lay = grid_layout(rows, (64, 64, 3), scored=False)
    assert tuple(grid.shape) == (1, lay["height"], lay["width"], 3) and len(COLUMNS) == 2
    assert [r.group for r in rows] == ["target", "target", "held-out", "unrelated", "unrelated"]
    assert summary.count("\n  [") == len(rows) and "connect a CLIP vision model" in summary
    assert out["ui"]["images"] and out["ui"]["images"][0]["type"] == "temp"
    # run again, one image per batch: the same pictures (one seed per image, whatever the batch; the
    # identical-models test below checks two renders are bit-identical)
    again = run(node, (model, clip), erased, vae, concepts, batch_size=1)["result"][0]
    assert again.shape == grid.shape and (again - grid).abs().max() <= 2 / 255
    before, after = cells(grid, rows, 0), cells(grid, rows, 1)
    assert any(not np.array_equal(b, a) for b, a in zip(before[:3], after[:3])), "the erasure changed no target image"
    other = run(node, (model, clip), erased, vae, concepts, seed=8, unrelated="a bowl of ramen")["result"][0]
    assert not np.array_equal(cells(other, rows[:3], 0)[0], before[0]), "the seed does not reach the sampler"


def test_identical_models_score_perfect_preservation(node, sd15, concepts, clip_vision):
    model, clip, vae = sd15
    out = run(node, (model, clip), (model, clip), vae, concepts, clip_vision=clip_vision)
    grid, chart, summary = out["result"]
    rows = evaluation_rows(concepts, [HELD], prompt_lines(UNRELATED))
    for b, a in zip(cells(grid, rows, 0), cells(grid, rows, 1)):
        assert np.array_equal(b, a)
    assert "preservation (cosine to the original, 1 = unchanged): unrelated 1.000" in summary, summary
    assert "erasure (0 = unchanged, 1 = reached the anchor): target 0.000, held-out 0.000" in summary, summary
    assert len(out["ui"]["images"]) == 2 and chart.shape[0] == 1 and chart.shape[-1] == 3


def test_scores_on_erased_model(node, sd15, erased, concepts, clip_vision):
    model, clip, vae = sd15
    summary = run(node, (model, clip), erased, vae, concepts, clip_vision=clip_vision)["result"][2]
    lines = [line for line in summary.splitlines() if line.startswith("  [")]
    assert len(lines) == 5 and all(("erasure" in line) != ("[unrelated]" in line) for line in lines), lines


def test_progress_and_cancel(node, sd15, erased, concepts, clip_vision):
    import comfy.model_management as mm
    import comfy.utils
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        run(node, sd15[:2], erased, sd15[2], concepts, clip_vision=clip_vision, batch_size=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    n = 5 + 3  # rows, then anchor images of the 3 rows that name the target
    assert seen[-1] == (n + 5, n + 5) and len(seen) >= 6, seen
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(node, sd15[:2], erased, sd15[2], concepts)
    finally:
        mm.interrupt_current_processing(False)


def test_refuses_mismatched_inputs(node, sd15, erased, concepts):
    model, clip, vae = sd15
    xl_model, xl_clip = H.build("sdxl")
    cases = [
        (dict(), (model, clip), (xl_model, xl_clip), "different architectures"),
        (dict(), (model, clip), (model, xl_clip), "erased_model / erased_clip: the CLIP does not match"),
        (dict(width=60), (model, clip), erased, "multiples of 8"),
        (dict(cfg=float("nan")), (model, clip), erased, "cfg must be a finite number"),
        (dict(held_out="a photo without the slot"), (model, clip), erased, "exactly once"),
    ]
    for kw, original, other, msg in cases:
        with pytest.raises(ValueError, match=msg):
            run(node, original, other, vae, concepts, **kw)
    with pytest.raises(ValueError, match="no concepts"):
        run(node, (model, clip), erased, vae, None)


def test_sdxl_batches_pooled_conditioning(node, pack):
    model, clip = H.build("sdxl")
    vae = tiny_vae()
    concepts = pack.NODE_CLASS_MAPPINGS["ErasePro_ConceptPair"]().build("a cat", "a dog", "object")[0]
    grid = run(node, (model, clip), (model, clip), vae, concepts, held_out="", batch_size=3)["result"][0]
    rows = evaluation_rows(concepts, None, prompt_lines(UNRELATED))
    assert grid.shape[1] == grid_layout(rows, (64, 64, 3), False)["height"]
