"""The example workflows in workflows/*.json, run end to end on a live ComfyUI server.

For each UI-format (LiteGraph) workflow: every node type is known to the server, every link's
type matches the output and input it joins, it converts with ``ui_to_api`` and runs through
``run_workflow`` on the random-weight model files it names (``TEST_MODELS``); the SaveImage files exist (on disk
and through GET /view) and the solver's ``ui`` output carries ``erasepro_report`` with a train
residual <= 1e-4 (method erasepro). Also checks the pack's node definitions in /object_info
against the node contract (docs/DESIGN.md, *Nodes*).

CPU only: 64x64 latents, 2 steps. The tiny checkpoint's CLIP is full-size CLIP-L, so each solve
takes some seconds. The Flux and Chroma workflows' T5s are small ones: the stock DualCLIPLoader /
CLIPLoader build T5-XXL at full size whatever the file holds, so the server's test-only extension
(tests/server_nodes) passes the file's own config to ComfyUI's loader; every node of the workflow
is the stock one.
"""
from __future__ import annotations

import copy
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import comfy_server as cs

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The node contract (docs/DESIGN.md, *Nodes*): what saved workflow files rely on.
EXPECTED_NODES = {
    "ErasePro_ConceptPair": {
        "display_name": "ErasePro Concept Pair",
        "required": ["target", "anchor", "concept_type"],
        "optional": ["prompts", "concepts"],
        "output": ["ERASEPRO_CONCEPTS"],
    },
    "ErasePro_ProgressiveSolver": {
        "display_name": "ErasePro Progressive Solver",
        "required": ["model", "clip", "concepts", "progressive_layers", "method"],
        "optional": ["preserve"],
        "output": ["ERASEPRO_EDIT", "IMAGE", "STRING"],
    },
    "ErasePro_ApplyErasedUNet": {
        "display_name": "Apply Erased UNet",
        "required": ["model", "edit", "strength"],
        "optional": ["clip"],
        "output": ["MODEL", "CLIP"],
    },
    "ErasePro_Evaluate": {
        "display_name": "ErasePro Evaluate",
        "required": ["original_model", "original_clip", "erased_model", "erased_clip", "vae", "concepts", "seed",
                     "steps", "cfg", "sampler_name", "scheduler", "width", "height"],
        "optional": ["held_out", "unrelated", "clip_vision", "negative", "batch_size"],
        "output": ["IMAGE", "IMAGE", "STRING"],
    },
    "ErasePro_ToyModel": {
        "display_name": "ErasePro Toy Model (no download)",
        "required": [],
        "optional": [],
        "output": ["MODEL", "CLIP", "VAE"],
    },
}
EVALUATE = "ErasePro_Evaluate"
SOLVER = "ErasePro_ProgressiveSolver"
MAX_TRAIN_RESIDUAL = 1e-4
# The model files each shipped workflow names -> the fixture that writes them (random weights)
TEST_MODELS = {"erasepro_tiny_sd15.safetensors": "tiny_checkpoint", "erasepro_tiny_sd3.safetensors": "sd3_checkpoint",
               "erasepro_tiny_flux.safetensors": "flux_workflow_files",
               "erasepro_tiny_flux_clip_l.safetensors": "flux_workflow_files",
               "erasepro_tiny_flux_t5xxl.safetensors": "flux_workflow_files",
               "erasepro_tiny_flux_ae.safetensors": "flux_workflow_files",
               "erasepro_tiny_chroma.safetensors": "chroma_workflow_files",
               "erasepro_tiny_chroma_t5xxl.safetensors": "chroma_workflow_files"}
TOY_LOADER = "ErasePro_ToyModel"  # the pack's trained toy model: no file to choose
# loader node -> its file inputs
MODEL_LOADERS = {"CheckpointLoaderSimple": ("ckpt_name",), "UNETLoader": ("unet_name",),
                 "CLIPLoader": ("clip_name",), "DualCLIPLoader": ("clip_name1", "clip_name2"), "VAELoader": ("vae_name",)}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _spec(info: dict, name: str):
    for section in ("required", "optional"):
        sec = (info.get("input") or {}).get(section) or {}
        if name in sec:
            return sec[name]
    return None


def _input_type(info: dict, name: str):
    spec = _spec(info, name)
    if spec is None:
        return None
    t = spec[0] if isinstance(spec, (list, tuple)) else spec
    return "COMBO" if isinstance(t, list) else t


def _view(base_url: str, item: dict) -> bytes:
    q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                "type": item.get("type", "output")})
    with urllib.request.urlopen(f"{base_url}/view?{q}", timeout=30) as r:
        return r.read()


def test_workflow_files_present():
    names = {p.name for p in WORKFLOWS}
    assert {"erasepro_style_erasure.json", "erasepro_object_erasure.json",
            "erasepro_nudity_erasure.json"} <= names, names


JPEG_MAGIC = b"\xff\xd8\xff"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_thumbnail(path):
    """The template browser shows workflows/<name>.jpg next to each workflow (a 404 otherwise)."""
    from PIL import Image
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} missing: the template browser shows a broken thumbnail"
    data = thumb.read_bytes()
    assert data.startswith(JPEG_MAGIC), f"{thumb.name} is not a JPEG"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and min(im.size) >= 200 and max(im.size) <= 1200, (im.format, im.size)


def test_object_info_lists_erasepro_nodes(object_info):
    for key, want in EXPECTED_NODES.items():
        assert key in object_info, f"{key} missing from /object_info"
        info = object_info[key]
        assert info["display_name"] == want["display_name"], info["display_name"]
        assert info["category"] == "ErasePro", info["category"]
        inp = info["input"]
        for name in want["required"]:
            assert name in (inp.get("required") or {}), f"{key}: required input {name!r} missing"
        for name in want["optional"]:
            assert name in (inp.get("optional") or {}), f"{key}: optional input {name!r} missing"
        assert list(info["output"]) == want["output"], (key, info["output"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_structure(path, object_info):
    """Valid for the real front end: known node types, consistent ids, link types that match."""
    wf = _load(path)
    assert wf.get("version") == 0.4
    for k in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert k in wf, k
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(l[0] for l in wf["links"])
    missing = sorted({n["type"] for n in nodes.values()
                      if n["type"] not in cs.VIRTUAL_NODES and n["type"] not in object_info})
    assert not missing, f"node types not known to the server: {missing}"
    types = {n["type"] for n in nodes.values()}
    assert {"ErasePro_ConceptPair", SOLVER, "ErasePro_ApplyErasedUNet", "SaveImage", "Note"} <= types, types
    assert types & {"CheckpointLoaderSimple", "UNETLoader", TOY_LOADER}, "no model loader"
    assert "KSampler" in types or EVALUATE in types, "neither a before/after KSampler pair nor ErasePro Evaluate"
    for lid, a, aslot, b, bslot, ltype in wf["links"]:
        src, dst = nodes[a], nodes[b]
        out = src["outputs"][aslot]
        inp = dst["inputs"][bslot]
        assert out["type"] == ltype == inp["type"], (lid, out["type"], ltype, inp["type"])
        assert lid in (out.get("links") or []) and inp["link"] == lid, f"link {lid} not mirrored in nodes"
        # against the server's definitions
        assert object_info[src["type"]]["output"][aslot] == ltype, (lid, src["type"])
        assert _input_type(object_info[dst["type"]], inp["name"]) == ltype, (lid, dst["type"], inp["name"])
    for n in nodes.values():
        assert n["properties"].get("Node name for S&R", n["type"]) == n["type"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs(path, request, comfy_server, comfy_server_handle, object_info, artifacts_dir):
    wf = _load(path)
    api = cs.ui_to_api(copy.deepcopy(wf), object_info)

    files = [(n["class_type"], name, n["inputs"][name]) for n in api.values()
             for name in MODEL_LOADERS.get(n["class_type"], ())]
    assert files or any(n["class_type"] == TOY_LOADER for n in api.values()), "no model loader"
    unknown = {f for _, _, f in files} - set(TEST_MODELS)
    assert not unknown, f"{path.name} names {unknown}: not a test model"
    for fixture in {TEST_MODELS[f] for _, _, f in files}:
        request.getfixturevalue(fixture)  # written on first use
    info = cs.object_info(comfy_server)
    for loader, name, f in files:
        assert f in info[loader]["input"]["required"][name][0], (loader, name, f)

    solver_ids = [nid for nid, n in api.items() if n["class_type"] == SOLVER]
    assert len(solver_ids) == 1
    save_ids = {nid: n["inputs"]["filename_prefix"] for nid, n in api.items() if n["class_type"] == "SaveImage"}
    evaluate_ids = [nid for nid, n in api.items() if n["class_type"] == EVALUATE]
    wanted = {"erasepro/evaluate"} if evaluate_ids else {"erasepro/before", "erasepro/after"}
    assert wanted <= set(save_ids.values()), save_ids
    (artifacts_dir / "workflows").mkdir(parents=True, exist_ok=True)
    (artifacts_dir / "workflows" / f"{path.stem}.api.json").write_text(json.dumps(api, indent=2))

    cs.clear_cache(comfy_server)  # e.g. the Evaluate workflow's solver is the bake workflow's: run it again
    t0 = time.time()
    hist = cs.run_workflow(comfy_server, api, timeout=900)
    wall = time.time() - t0
    outputs = hist.get("outputs") or {}

    # SaveImage files: in the history, on disk, and served by /view
    pngs = {}
    for nid, prefix in save_ids.items():
        images = (outputs.get(nid) or {}).get("images") or []
        assert images, f"SaveImage {nid} ({prefix}) wrote nothing: {outputs.get(nid)}"
        for it in images:
            assert it.get("type") == "output" and it.get("filename"), it
            f = Path(comfy_server_handle.output_dir) / it.get("subfolder", "") / it["filename"]
            assert f.is_file() and f.stat().st_size > 0, f
            data = _view(comfy_server, it)
            assert data.startswith(PNG_MAGIC), f"/view did not return a PNG for {it}"
            pngs[prefix] = f

    # ErasePro Evaluate: its grid preview (temp) is served too
    for nid in evaluate_ids:
        previews = (outputs.get(nid) or {}).get("images") or []
        assert previews and all(it.get("type") == "temp" for it in previews), outputs.get(nid)
        assert _view(comfy_server, previews[0]).startswith(PNG_MAGIC)

    # the solver's report
    sol = outputs.get(solver_ids[0]) or {}
    assert "erasepro_report" in sol, f"solver ui output: {sorted(sol)}"
    report = sol["erasepro_report"][0]
    method = api[solver_ids[0]]["inputs"]["method"]
    res = report["train_residual"]
    (artifacts_dir / "workflows" / f"{path.stem}.report.json").write_text(json.dumps(report, indent=2))
    print(f"\n[workflow] {path.name}: method {method}, S={report.get('progressive_layers')}, "
          f"train residual {res:.3e}, deep burden {report.get('deep_burden'):.3e}, "
          f"solve {report.get('solve_seconds', float('nan')):.2f} s, constraints {report.get('constraints')}, "
          f"wall {wall:.1f} s; images: {', '.join(str(p.relative_to(comfy_server_handle.output_dir)) for p in pngs.values())}")
    assert report["sites"], "no edited sites in the report"
    if method == "erasepro":
        assert res <= MAX_TRAIN_RESIDUAL, f"train residual {res} > {MAX_TRAIN_RESIDUAL}: {report.get('warnings')}"
        assert not report.get("warnings"), report.get("warnings")
    if any(n["class_type"] == TOY_LOADER for n in api.values()):
        _judge_toy_erasure(api, outputs, save_ids, Path(comfy_server_handle.output_dir))


def _judge_toy_erasure(api: dict, outputs: dict, save_ids: dict, output_dir: Path) -> None:
    """The toy workflow shows the erasure on its pictures: the judge (trained on the world's
    renders, not on the model) sees the target in the 'before' batch and the anchor in its place
    in the 'after' batch."""
    import numpy as np
    import torch
    from PIL import Image

    from benchmarks.toy import load_judge
    from toyworld.judge import judge_images
    from toyworld.world import SHAPES
    pair = next(n["inputs"] for n in api.values() if n["class_type"] == "ErasePro_ConceptPair")
    target, anchor = SHAPES.index(pair["target"]), SHAPES.index(pair["anchor"])
    judge = load_judge()
    seen = {}
    for nid, prefix in save_ids.items():
        if prefix not in ("erasepro/before", "erasepro/after"):
            continue
        files = [output_dir / it.get("subfolder", "") / it["filename"] for it in outputs[nid]["images"]]
        pictures = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
                                for f in files])
        shapes = judge_images(judge, pictures).shapes
        seen[prefix] = (sum(target in s for s in shapes) / len(shapes), sum(anchor in s for s in shapes) / len(shapes))
    print(f"[workflow] the judge sees {pair['target']} / {pair['anchor']} in {seen['erasepro/before']} of the pictures "
          f"before, {seen['erasepro/after']} after")
    assert seen["erasepro/before"][0] >= 0.75 and seen["erasepro/after"][0] <= 0.25, seen
    assert seen["erasepro/after"][1] >= 0.75, seen
