"""Chroma through its text gateway: a tiny random-weight Chroma from ComfyUI's own classes
(scripts/comfy_dit.py), solved by the same pipeline and nodes as the other families.

Chroma is Flux's transformer without ``vector_in``, reading one T5 whose prompts are not padded
(the prompt's tokens and its end token). The solve pads them with the attention mask on; what is
measured goes through ComfyUI's own unpadded encode and the model's own forward.
"""
from __future__ import annotations

import pytest
import torch

import comfy_host as H
import dit_checks
from scripts import comfy_dit

T5 = {"d_model": 256, "d_ff": 512}  # the gateway's rank budget is T5's width
TARGET, ANCHOR = "cat", "dog"  # one T5 token each: the two prompts have one length


@pytest.fixture(scope="module")
def chroma():
    return comfy_dit.build_chroma(seed=0, t5_layers=12, t5=T5)


@pytest.fixture(scope="module")
def pack():
    return H.load_pack()


def _request(**kw):
    return dit_checks.request(TARGET, ANCHOR, **kw)


def _velocity(model, clip, text, latents):
    cond, _ = comfy_dit.encode_flux(clip, text)
    return comfy_dit.flux_velocity(model, cond, None, latents, 0.5)


def _latents():
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def test_chroma_is_detected_with_its_gateway(chroma):
    import comfy.model_base
    from erasepro_comfy.host import ComfyHost
    model, clip = chroma
    assert type(model.model) is comfy.model_base.Chroma
    arch = ComfyHost(model, clip).architecture()
    assert arch.name == "chroma"
    (t5,) = arch.encoders
    assert (t5.name, t5.spec.causal, t5.spec.padded, t5.depth, t5.width) == ("t5xxl", False, False, 12, 256)
    assert t5.special.start is None and (t5.special.end, t5.special.pad) == (1, 0)
    assert arch.deep_keys == ("diffusion_model.txt_in.weight",)
    assert arch.pooled_site is None and not arch.padded
    assert arch.context_width == 256 and t5.shallow_depth(3) == 3


def test_the_solves_padded_batches_give_comfyuis_unpadded_features(chroma):
    """Prompts of different lengths padded to one batch with the mask on: every real position's
    features are ComfyUI's for the prompt alone (which has no padding)."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import preserve_ids
    model, clip = chroma
    host = ComfyHost(model, clip)
    arch = host.architecture()
    prompts = ["cat", "a photo of a cat on a sofa", ""]
    (ids,) = preserve_ids(host, arch, prompts)
    assert {len(c) for c in ids} == {256}
    cond = host.encode([ids]).cond
    for row, text in enumerate(prompts):
        alone, _ = comfy_dit.encode_flux(clip, text)
        n = alone.shape[1]
        assert n == ids[row].index(1) + 1  # the prompt's tokens and its end token
        err = float((cond[row, :n] - alone[0]).abs().max() / alone.abs().max())
        assert err <= 1e-5, (text, err)


@pytest.mark.parametrize("layers", [0, 3])
def test_gateway_erasure_is_exact_and_keeps_the_empty_prompt(chroma, layers):
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    model, clip = chroma
    edit = run_erasure(ComfyHost(model, clip), _request(progressive_layers=layers))
    s = edit.summary
    assert {e.key for e in edit.sites if e.stage != "shallow"} == {"diffusion_model.txt_in.weight"}
    shallow = sorted(e.key for e in edit.sites if e.stage == "shallow")
    assert shallow == [f"t5xxl.transformer.encoder.block.{b}.layer.1.DenseReluDense.wo.weight" for b in range(layers)]
    assert s["family"] == "chroma" and s["pooled_residual"] is None
    assert s["train_residual"] <= 1e-5, s["train_residual"]
    assert s["empty_prompt_drift"] <= 1e-5, s["empty_prompt_drift"]
    # no padding position is constrained: the object templates' own tokens only
    assert s["constraints"] < 4 * len(edit.summary["concepts"]) * 16
    # CFG's empty prompt ("" is T5's end token alone) reaches the transformer as it did
    erased, erased_clip = apply_edit(model, clip, edit, 1.0)
    latents = _latents()
    v0, v1 = _velocity(model, clip, "", latents), _velocity(erased, erased_clip, "", latents)
    assert float((v1 - v0).norm() / v0.norm()) <= 1e-5


def test_velocity_of_an_erased_prompt_is_the_anchors(chroma):
    """The erased model's velocity for the target prompt is the original model's for the anchor
    prompt, through ComfyUI's own (unpadded) encode and the DiT's forward."""
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    from erasepro_ops.templates import ConceptPair
    model, clip = chroma
    concept = ConceptPair(TARGET, ANCHOR, "custom", "a photo of {}")
    edit = run_erasure(ComfyHost(model, clip), _request(concept=concept, progressive_layers=0))
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


def test_t5_loaded_by_comfyui_in_fp16(chroma, tmp_path):
    """The T5 saved as a float16 file and loaded by ComfyUI's CLIPLoader path (type chroma), which
    runs it in float16: S = 3 erases through the applied edit."""
    from erasepro_ops.templates import ConceptPair
    model, clip32 = chroma
    clip = comfy_dit.t5_as_users_load(clip32, tmp_path)
    wo = "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert clip.patcher.model_state_dict()[wo].dtype == torch.float16
    concept = ConceptPair(TARGET, ANCHOR, "custom", "a photo of {}")
    edit, erased, erased_clip = dit_checks.solve_and_apply(model, clip, _request(concept=concept, progressive_layers=3))
    assert edit.part("clip")
    latents = _latents()
    err = dit_checks.erased_gap(lambda m, c, text: _velocity(m, c, text, latents), model, clip, erased, erased_clip,
                                "a photo of cat", "a photo of dog")
    assert err <= 1e-3, err


def test_nodes_solve_chroma_and_the_lora_loads_through_the_stock_loader(chroma, pack, tmp_path, monkeypatch):
    model, clip = chroma
    edit = dit_checks.solve_with_nodes(pack, model, clip, TARGET, ANCHOR)
    assert any(e.stage == "shallow" for e in edit.sites)

    dit_checks.lora_round_trip(pack, model, clip, edit, "test/chroma_cat", tmp_path, monkeypatch)


def test_a_chroma_edit_refuses_a_flux_model(chroma, pack):
    """An edit solved on Chroma does not apply to another family's model."""
    model, clip = chroma
    edit = dit_checks.solve_with_nodes(pack, model, clip, TARGET, ANCHOR, layers=0)
    flux_model, flux_clip = comfy_dit.build_flux("tiny", seed=0, t5_layers=12, t5=T5)
    dit_checks.refused_on(pack, edit, flux_model, flux_clip, r"another model family \(Chroma\); this MODEL is Flux.1")
