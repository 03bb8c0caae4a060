"""Flux.1 through its text gateway: a tiny random-weight Flux from ComfyUI's own classes
(scripts/comfy_dit.py), solved by the same pipeline and nodes as the UNet families.

The deep site is ``txt_in`` (T5's per-token output → the transformer's width), the pooled site
``vector_in.in_layer`` (CLIP-L's pooled output), the shallow sites T5's ``wo`` in its first blocks.
Measured with ComfyUI's own encode and the model's own forward (``flux_velocity``).
"""
from __future__ import annotations


import pytest
import torch

import comfy_host as H
import dit_checks
from scripts import comfy_dit

T5 = {"d_model": 512, "d_ff": 1024}  # the gateway's rank budget is T5's width
TARGET, ANCHOR = "cat", "dog"


@pytest.fixture(scope="module")
def flux():
    return comfy_dit.build_flux("tiny", seed=0, t5_layers=12, t5=T5)


@pytest.fixture(scope="module")
def pack():
    return H.load_pack()


def _request(**kw):
    return dit_checks.request(TARGET, ANCHOR, **kw)


def test_flux_is_detected_with_its_gateway_sites(flux):
    from erasepro_comfy.host import ComfyHost
    model, clip = flux
    arch = ComfyHost(model, clip).architecture()
    assert arch.name == "flux"
    clip_l, t5 = arch.encoders
    assert (clip_l.name, clip_l.spec.per_token) == ("clip_l", False)  # only its pooled output is read
    assert (t5.name, t5.spec.causal, t5.depth, t5.width) == ("t5xxl", False, 12, 512)
    assert t5.special.start is None and (t5.special.end, t5.special.pad) == (1, 0)
    assert arch.deep_keys == ("diffusion_model.txt_in.weight",)
    assert arch.pooled_site == "diffusion_model.vector_in.in_layer.weight" and arch.pooled_width == 768
    assert arch.context == 256 and arch.context_width == 512
    assert [t5.shallow_depth(3), clip_l.shallow_depth(3)] == [3, 0]


@pytest.mark.parametrize("layers", [0, 3])
def test_gateway_erasure_is_exact_and_keeps_the_empty_prompt(flux, layers):
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    model, clip = flux
    edit = run_erasure(ComfyHost(model, clip), _request(progressive_layers=layers, template_padding=0))
    s = edit.summary
    keys = {e.key for e in edit.sites}
    assert {"diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"} <= keys
    shallow = sorted(e.key for e in edit.sites if e.stage == "shallow")
    assert shallow == [f"t5xxl.transformer.encoder.block.{b}.layer.1.DenseReluDense.wo.weight" for b in range(layers)]
    assert s["family"] == "flux"
    assert s["train_residual"] <= 1e-5, s["train_residual"]
    assert s["pooled_residual"] <= 1e-5, s["pooled_residual"]
    assert s["empty_prompt_drift"] <= 1e-5, s["empty_prompt_drift"]


def test_velocity_of_an_erased_prompt_is_the_anchors(flux):
    """Every T5 position of the concept's prompts up to the first padding one constrained (the
    family's cap; the rest of T5's padding repeats it): the erased model's velocity for the target
    prompt is the original
    model's for the anchor prompt, through ComfyUI's own encode and the DiT's forward."""
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    from erasepro_ops.templates import ConceptPair
    model, clip = flux
    concept = ConceptPair(TARGET, ANCHOR, "custom", "a photo of {}")
    edit = run_erasure(ComfyHost(model, clip), _request(concept=concept, progressive_layers=0, template_padding=8,
                                                        keep_empty_prompt=False, fit_padding=False))
    erased, erased_clip = apply_edit(model, clip, edit, 1.0)
    same_model, same_clip = apply_edit(model, clip, edit, 0.0)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def velocity(m, c, text):
        cond, pooled = comfy_dit.encode_flux(c, text)
        return comfy_dit.flux_velocity(m, cond, pooled, latents, 0.5)

    for target, anchor in (("a photo of cat", "a photo of dog"), ("cat", "dog")):
        err = dit_checks.erased_gap(velocity, model, clip, erased, erased_clip, target, anchor)
        assert err <= 1e-3, (target, err)
    # strength 0 leaves the model as it was
    assert torch.equal(velocity(same_model, same_clip, "a photo of cat"), velocity(model, clip, "a photo of cat"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn], ids=["fp16", "fp8_e4m3fn"])
def test_t5_as_users_load_it_fp16_or_fp8(flux, dtype):
    """The same T5 stored in fp16 or fp8 (as t5xxl_fp8_e4m3fn), ComfyUI casting it as it runs:
    S = 3 erases through the applied edit (fp16), or, in fp8, whose steps would round the shallow
    edits away, the gateway holds the whole erasure and the summary says so."""
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    from erasepro_ops.templates import ConceptPair
    model, clip32 = flux
    clip = comfy_dit.build_flux_clip(seed=0, dtype=dtype, t5_layers=12, t5=T5)
    t5 = clip32.cond_stage_model.t5xxl.state_dict()
    stored = {k: v.to(dtype) if "layer_norm" not in k else v for k, v in t5.items()}
    clip.cond_stage_model.t5xxl.load_state_dict(stored, strict=False)
    clip.cond_stage_model.clip_l.load_state_dict(clip32.cond_stage_model.clip_l.state_dict())
    wo = "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert clip.patcher.model_state_dict()[wo].dtype == dtype

    concept = ConceptPair(TARGET, ANCHOR, "custom", "a photo of {}")
    edit = run_erasure(ComfyHost(model, clip), _request(concept=concept, progressive_layers=3, template_padding=8,
                                                        keep_empty_prompt=False, fit_padding=False))
    fp8 = dtype == torch.float8_e4m3fn
    assert bool(edit.part("clip")) != fp8
    assert any("8-bit floats" in w for w in edit.summary["warnings"]) == fp8
    erased, erased_clip = apply_edit(model, clip, edit, 1.0)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def velocity(m, c, text):
        cond, pooled = comfy_dit.encode_flux(c, text)
        return comfy_dit.flux_velocity(m, cond, pooled, latents, 0.5)

    err = dit_checks.erased_gap(velocity, model, clip, erased, erased_clip, "a photo of cat", "a photo of dog")
    assert err <= 1e-3, err


def test_nodes_solve_flux_and_the_lora_loads_through_the_stock_loader(flux, pack, tmp_path, monkeypatch):
    model, clip = flux
    edit = dit_checks.solve_with_nodes(pack, model, clip, TARGET, ANCHOR)
    assert any(e.stage == "shallow" for e in edit.sites)

    dit_checks.lora_round_trip(pack, model, clip, edit, "test/flux_cat", tmp_path, monkeypatch)
    assert edit.part("clip") and all(s.rank for s in edit.part("clip"))


def test_a_prompt_longer_than_t5s_context_is_refused_clearly(flux):
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.errors import EraseProError
    from erasepro_ops.pipeline import run_erasure
    model, clip = flux
    long = "a photo of a cat " + "in a very long and winding sentence " * 40
    with pytest.raises(EraseProError, match="t5xxl tokens long; at most 256 fit: shorten it"):
        run_erasure(ComfyHost(model, clip), _request(preserve=(long,)))
