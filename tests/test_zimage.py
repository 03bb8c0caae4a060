"""Z-Image through its text gateway: a tiny random-weight Z-Image from ComfyUI's own classes
(scripts/comfy_dit.py: Lumina 2's NextDiT as ``supported_models.ZImage`` sets it, Qwen3 as
``z_image.te()`` builds it, reduced), solved by the same pipeline and nodes as the other families.

Qwen3 is a causal decoder LLM under a chat template; ComfyUI gives Z-Image the hidden state after
its second-to-last layer for the prompt's own tokens (no padding), and the transformer reads it
through ``cap_embedder``: an RMSNorm, then the linear gateway. What is measured goes through
ComfyUI's own encode and the model's own forward.
"""
from __future__ import annotations

import pytest
import torch

import comfy_host as H
import dit_checks
from scripts import comfy_dit

TARGET, ANCHOR = "cat", "dog"  # one Qwen token each: the two prompts have one length
GATEWAY = "diffusion_model.cap_embedder.1.weight"


@pytest.fixture(scope="module")
def zimage():
    return comfy_dit.build_zimage(seed=0)


@pytest.fixture(scope="module")
def pack():
    return H.load_pack()


def _request(**kw):
    return dit_checks.request(TARGET, ANCHOR, **kw)


def _velocity(model, clip, text, latents):
    cond = clip.encode_from_tokens(clip.tokenize(text), return_dict=True)["cond"]
    return comfy_dit.flux_velocity(model, cond, None, latents, 0.5)


def _latents():
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def _photo_concept():
    from erasepro_ops.templates import ConceptPair
    return ConceptPair(TARGET, ANCHOR, "custom", "a photo of {}")


def test_zimage_is_detected_with_its_gateway(zimage):
    import comfy.model_base
    from erasepro_comfy.host import ComfyHost
    model, clip = zimage
    assert type(model.model) is comfy.model_base.Lumina2
    arch = ComfyHost(model, clip).architecture()
    assert arch.name == "zimage" and arch.family.gateway_norm == "cap_embedder.0"
    (qwen,) = arch.encoders
    assert (qwen.name, qwen.spec.causal, qwen.spec.padded, qwen.depth, qwen.width) == ("qwen3_4b", True, False, 6, 256)
    assert (qwen.special.start, qwen.special.end, qwen.special.pad) == (None, None, 151643)
    assert arch.deep_keys == (GATEWAY,) and arch.pooled_site is None
    assert arch.context_width == 256 and qwen.shallow_depth(3) == 2


def test_the_solves_batches_give_what_the_gateway_reads(zimage):
    """Prompts of different lengths padded to one batch with the mask on: every real position's
    feature is ComfyUI's for the prompt alone, through the model's own cap_embedder norm."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import preserve_ids, read_lengths
    model, clip = zimage
    host = ComfyHost(model, clip)
    arch = host.architecture()
    prompts = ["cat", "a photo of a cat on a sofa", ""]
    (ids,) = preserve_ids(host, arch, prompts)
    assert {len(c) for c in ids} == {256}
    cond = host.encode([ids]).cond
    norm = model.model.diffusion_model.cap_embedder[0]
    for row, (text, n) in enumerate(zip(prompts, read_lengths(arch, ids))):
        alone = clip.encode_from_tokens(clip.tokenize(text), return_dict=True)["cond"]
        assert alone.shape[1] == n  # the chat template around the prompt, nothing after it
        with torch.no_grad():
            want = norm(alone)[0]
        err = float((cond[row, :n] - want).abs().max() / want.abs().max())
        assert err <= 1e-5, (text, err)


@pytest.mark.parametrize("layers", [0, 3])
def test_gateway_erasure_is_exact_and_keeps_the_empty_prompt(zimage, layers):
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    model, clip = zimage
    edit = run_erasure(ComfyHost(model, clip), _request(progressive_layers=layers))
    s = edit.summary
    assert {e.key for e in edit.sites if e.stage != "shallow"} == {GATEWAY}
    shallow = sorted(e.key for e in edit.sites if e.stage == "shallow")
    assert shallow == [f"qwen3_4b.transformer.model.layers.{b}.mlp.down_proj.weight" for b in range(2 if layers else 0)]  # 3 of 12 blocks, scaled to 6
    assert s["family"] == "zimage" and s["pooled_residual"] is None
    assert s["train_residual"] <= 1e-5, s["train_residual"]
    assert s["empty_prompt_drift"] <= 1e-5, s["empty_prompt_drift"]
    erased, erased_clip = apply_edit(model, clip, edit, 1.0)
    latents = _latents()
    v0, v1 = _velocity(model, clip, "", latents), _velocity(erased, erased_clip, "", latents)
    assert float((v1 - v0).norm() / v0.norm()) <= 1e-5


@pytest.mark.parametrize("layers", [0, 3])
def test_velocity_of_an_erased_prompt_is_the_anchors(zimage, layers):
    """The erased model's velocity for the target prompt is the original model's for the anchor
    prompt, through ComfyUI's own encode and the DiT's forward; strength 0 changes nothing."""
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    model, clip = zimage
    edit = run_erasure(ComfyHost(model, clip), _request(concept=_photo_concept(), progressive_layers=layers))
    erased, erased_clip = apply_edit(model, clip, edit, 1.0)
    same_model, same_clip = apply_edit(model, clip, edit, 0.0)
    latents = _latents()

    def velocity(m, c, text):
        return _velocity(m, c, text, latents)

    for target, anchor in (("a photo of cat", "a photo of dog"), ("cat", "dog")):
        err = dit_checks.erased_gap(velocity, model, clip, erased, erased_clip, target, anchor)
        assert err <= 1e-3, (target, err)
    assert torch.equal(_velocity(same_model, same_clip, "a photo of cat", latents),
                       _velocity(model, clip, "a photo of cat", latents))


def test_qwen3_loaded_by_comfyui_in_fp16(zimage, tmp_path):
    """The Qwen3 saved as a float16 file and loaded by ComfyUI's own load_clip, which runs it in
    float16: S = 3 erases through the applied edit."""
    model, clip32 = zimage
    clip = comfy_dit.qwen3_as_users_load(clip32, tmp_path)
    down = "qwen3_4b.transformer.model.layers.0.mlp.down_proj.weight"
    assert clip.patcher.model_state_dict()[down].dtype == torch.float16
    edit, erased, erased_clip = dit_checks.solve_and_apply(model, clip, _request(concept=_photo_concept(),
                                                                                   progressive_layers=3))
    assert edit.part("clip")
    latents = _latents()
    err = dit_checks.erased_gap(lambda m, c, text: _velocity(m, c, text, latents), model, clip, erased, erased_clip,
                                "a photo of cat", "a photo of dog")
    assert err <= 1e-3, err


def test_nodes_solve_zimage_and_the_lora_loads_through_the_stock_loader(zimage, pack, tmp_path, monkeypatch):
    model, clip = zimage
    edit = dit_checks.solve_with_nodes(pack, model, clip, TARGET, ANCHOR)
    assert any(e.stage == "shallow" for e in edit.sites)
    dit_checks.lora_round_trip(pack, model, clip, edit, "test/zimage_cat", tmp_path, monkeypatch)


def test_a_zimage_edit_refuses_an_sd15_model(zimage, pack):
    model, clip = zimage
    edit = dit_checks.solve_with_nodes(pack, model, clip, TARGET, ANCHOR, layers=0)
    sd_model, sd_clip = H.tiny_sd15()
    dit_checks.refused_on(pack, edit, sd_model, sd_clip, r"another model family \(Z-Image\); this MODEL is SD1.x")
