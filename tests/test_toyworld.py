"""The toy world: its renders and captions, the training script, the committed model through
ComfyUI, the judge, and a smoke of the model's pictures."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy_host as H
from toyworld import judge as judge_mod
from toyworld import protocol, world
from toyworld.text_encoder import TextTransformer, Tokenizer
from toyworld.train import JUDGE_FILE, MODEL_FILE, WEIGHTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pack():
    return H.load_pack()


@pytest.fixture(scope="module")
def toy(pack):
    """(MODEL, CLIP, VAE) from the ErasePro Toy Model node."""
    return pack.NODE_CLASS_MAPPINGS["ErasePro_ToyModel"]().load()


@pytest.fixture(scope="module")
def judge():
    from safetensors.torch import load_file
    j = judge_mod.Judge()
    j.load_state_dict(load_file(str(WEIGHTS / JUDGE_FILE)))
    return j.eval()


def test_the_world_has_what_erasure_needs():
    assert len(world.SHAPES) >= 6 and len(world.COLOURS) >= 6 and len(world.BACKGROUNDS) >= 3
    assert len(world.STYLES) - 1 >= 6 and len(world.PAINTERS) >= 3
    assert len(world.PLAIN_TEMPLATES) + len(world.PAINTER_TEMPLATES) >= 30
    for table in (world.SHAPE_WORDS, world.COLOUR_WORDS, world.BACKGROUND_WORDS, world.PAINTER_WORDS):
        assert all(len(words) >= 2 for words in table.values())
    assert all(len(before) + len(after) >= 3 for before, after in world.TEXTURE_WORDS.values())
    tok = Tokenizer()
    ids = tok.ids(list(world.PAINTERS))
    assert all(int((row != 49407).sum()) - 1 >= 2 for row in ids[:2]), "painters' names are several tokens"


def test_renders_and_captions_are_deterministic_and_fit_the_context():
    scenes = world.sample_scenes(64, torch.Generator().manual_seed(3))
    assert torch.equal(world.render(scenes, seed=5), world.render(scenes, seed=5))
    assert not torch.equal(world.render(scenes, seed=5), world.render(scenes, seed=6))
    g = torch.Generator().manual_seed(1)
    captions = [world.caption(s, g) for s in scenes for _ in range(4)]
    Tokenizer().ids(captions)  # raises on a caption over 77 tokens
    assert len(set(captions)) > 200


def _pack_texts() -> list[str]:
    from erasepro_ops.contexts import CONTEXT_FILE
    from erasepro_ops.retain import retain_prompts
    from erasepro_ops.templates import TEMPLATES
    texts = [t for ts in TEMPLATES.values() for t in ts] + list(retain_prompts())

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
    for path in (CONTEXT_FILE, REPO / "erasepro_ops" / "data" / "evaluate_prompts.json", REPO / "benchmarks" / "held_out.json"):
        texts += list(strings(json.loads(path.read_text())))
    return texts


def test_held_out_phrasings_are_trained_on_and_used_by_no_pack_text():
    texts = [t.lower() for t in _pack_texts()]
    assert len(texts) > 300
    trained = set(world.PLAIN_TEMPLATES + world.PAINTER_TEMPLATES)
    for phrasing in world.HELD_OUT:
        assert phrasing in trained
        pattern = re.compile(".*".join(re.escape(part.strip().lower()) for part in re.split(r"\{\w+\}", phrasing) if part.strip()))
        hits = [t for t in texts if pattern.search(t)]
        assert not hits, f"{phrasing!r} is used by the pack: {hits[:3]}"


def test_the_training_script_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "toyworld.train", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from erasepro_comfy import toy_model
    model, clip, vae = toy_model.load(tmp_path / MODEL_FILE)
    assert H.family(model) == "sd15"
    assert (tmp_path / JUDGE_FILE).is_file()
    report = json.loads((tmp_path / "training.json").read_text())
    assert set(report["seconds"]) >= {"text", "vae", "judge", "unet", "total"}


def test_the_committed_model_loads_in_comfyui_and_encodes_as_trained(toy):
    from safetensors.torch import load_file
    model, clip, vae = toy
    assert H.family(model) == "sd15"
    sd = load_file(str(WEIGHTS / MODEL_FILE))
    assert (WEIGHTS / MODEL_FILE).stat().st_size <= 30 * 10**6
    trained = TextTransformer()
    trained.load_state_dict({k[len("clip_l.transformer."):]: v.float() for k, v in sd.items()
                             if k.startswith("clip_l.transformer.")})
    text = "a painting of a striped red ball on the beach by Van Gogh"
    with torch.no_grad():
        mine = trained(Tokenizer().ids([text]))[0]
    cond, _ = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    assert torch.allclose(cond.float(), mine, atol=1e-4)
    from erasepro_comfy.host import ComfyHost
    arch = ComfyHost(model, clip).architecture()
    assert arch.family.name == "sd15"


def test_the_judge_reads_unseen_renders(judge):
    report = judge_mod.accuracy_report(judge, seed=12345, n=600)
    assert min(report["accuracy"].values()) >= 0.95, report["accuracy"]


def test_the_model_draws_what_it_is_told(toy, judge):
    """A smoke of the world: a few prompts, one seed each, through ComfyUI's sampler; the judge
    finds the colours and the styles asked for (the full protocol is `--models toy`)."""
    from benchmarks.toy import draw
    model, clip, vae = toy
    scenes = [world.Scene(s % 6, (s * 5) % 6, s % 3, [0, 1, 5, 6][s % 4]) for s in range(8)]
    g = torch.Generator().manual_seed(0)
    probes = [protocol._probe(s, "{obj} {bg}" if not s.painter else "a painting of {obj} {bg} by {painter}", g)
              for s in scenes]
    images = draw(model, clip, vae, [p.prompt for p in probes], seeds=1)
    assert images.shape == (8, 3, 32, 32)
    v = judge_mod.judge_images(judge, images)
    colours = sum(s.colour in v.colours[i] for i, s in enumerate(scenes))
    styles = sum(s.style == v.style[i] for i, s in enumerate(scenes))
    assert colours >= 6 and styles >= 6, (colours, styles, [p.prompt for p in probes])
