"""SD3 / SD3.5 through its text gateway: a tiny random-weight SD3 from ComfyUI's own classes
(scripts/comfy_dit.py: the MMDiT, SD3ClipModel with CLIP-L, CLIP-G and a T5), solved by the same
pipeline and nodes as the other families.

SD3's transformer reads CLIP-L‖CLIP-G side by side (2048 wide, zero-padded to 4096), then T5's 77
tokens after them, through one linear layer, ``context_embedder``; the CLIPs' pooled outputs side by
side through ``y_embedder.mlp.0``. Measured with ComfyUI's own encode and the model's own forward.
"""
from __future__ import annotations

import pytest
import torch

import comfy_host as H
import dit_checks
from scripts import comfy_dit

TARGET, ANCHOR = "cat", "dog"
GATEWAY, POOLED = "diffusion_model.context_embedder.weight", "diffusion_model.y_embedder.mlp.0.weight"


@pytest.fixture(scope="module")
def sd3():
    return comfy_dit.build_sd3(seed=0)


@pytest.fixture(scope="module")
def pack():
    return H.load_pack()


def _request(**kw):
    return dit_checks.request(TARGET, ANCHOR, **kw)


def _every_position(**kw):
    """One two-prompt concept with every position constrained: every CLIP position, T5's prompt
    tokens and its first padding position (SD3's T5 caps its padding columns at one)."""
    from erasepro_ops.templates import ConceptPair
    return _request(concept=ConceptPair(TARGET, ANCHOR, "custom", "a photo of {}"), template_padding=77,
                    keep_empty_prompt=False, fit_padding=False, **kw)


def _velocity(model, clip, text, latents):
    cond, pooled = comfy_dit.encode_flux(clip, text)
    return comfy_dit.flux_velocity(model, cond, pooled, latents, 0.5)


def _latents():
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def _erasure_error(model, clip, erased, erased_clip, target, anchor):
    latents = _latents()
    v_anchor, v_target = _velocity(model, clip, anchor, latents), _velocity(model, clip, target, latents)
    gap = float((v_target - v_anchor).norm())
    assert gap > 1e-4 * float(v_anchor.norm())  # the prompts do differ
    return float((_velocity(erased, erased_clip, target, latents) - v_anchor).norm()) / gap


def test_sd3_is_detected_with_its_segments(sd3):
    import comfy.model_base
    from erasepro_comfy.host import ComfyHost
    model, clip = sd3
    assert type(model.model) is comfy.model_base.SD3
    arch = ComfyHost(model, clip).architecture()
    assert arch.name == "sd3"
    assert [(e.name, e.width, e.spec.causal) for e in arch.encoders] == [
        ("clip_l", 768, True), ("clip_g", 1280, True), ("t5xxl", 4096, False)]
    assert arch.segments == ((0, 1), (2,)) and arch.segment_offsets == (0, 77) and arch.context == 154
    assert arch.deep_keys == (GATEWAY,) and arch.context_width == 4096
    assert arch.pooled_site == POOLED and arch.pooled_width == 2048


def test_the_solves_encode_is_comfyuis(sd3):
    """The features the solve reads for a batch are CLIPTextEncode's: CLIP-L‖G padded to 4096, then
    T5 along the tokens, and the two pooled outputs side by side."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import preserve_ids
    model, clip = sd3
    host = ComfyHost(model, clip)
    prompts = ["a photo of a cat", ""]
    encoded = host.encode(preserve_ids(host, host.architecture(), prompts))
    for row, text in enumerate(prompts):
        cond, pooled = comfy_dit.encode_flux(clip, text)
        assert encoded.cond[row:row + 1].shape == cond.shape == (1, 154, 4096)
        assert torch.equal(encoded.cond[row:row + 1], cond)
        assert torch.allclose(encoded.pooled[row:row + 1], pooled, rtol=1e-5, atol=1e-6 * float(pooled.abs().max()))


@pytest.mark.parametrize("layers", [0, 3])
def test_gateway_erasure_is_exact(sd3, layers):
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    model, clip = sd3
    edit = run_erasure(ComfyHost(model, clip), _request(progressive_layers=layers))
    s = edit.summary
    assert {e.key for e in edit.sites if e.stage != "shallow"} == {GATEWAY, POOLED}
    shallow = sorted(e.key for e in edit.sites if e.stage == "shallow")
    assert len(shallow) == (3 if layers else 0)  # one block of each 4-block encoder
    assert all(k.startswith(("clip_l.", "clip_g.", "t5xxl.")) for k in shallow)
    assert s["family"] == "sd3"
    assert s["train_residual"] <= 1e-5, s["train_residual"]
    # against the unedited pooled gap: at S = 3 the shallow stage has closed most of it already
    assert s["pooled_residual"] <= 1e-5, s["pooled_residual"]
    assert s["empty_prompt_drift"] <= 1e-4, s["empty_prompt_drift"]


@pytest.mark.parametrize("layers", [0, 3])
def test_velocity_of_an_erased_prompt_is_the_anchors(sd3, layers):
    """The erased model's velocity for the target prompt is the original model's for the anchor
    prompt (ComfyUI's encode, the MMDiT's forward), up to what T5's unconstrained padding carries:
    measured 6.2e-4 / 1.1e-4 (one token, S = 0 / 3) and 1.8e-3 / 1.6e-3 ("a photo of cat")."""
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    model, clip = sd3
    edit = run_erasure(ComfyHost(model, clip), _every_position(progressive_layers=layers))
    erased, erased_clip = apply_edit(model, clip, edit, 1.0)
    for target, anchor, bound in (("a photo of cat", "a photo of dog", 5e-3), ("cat", "dog", 1e-3)):
        err = _erasure_error(model, clip, erased, erased_clip, target, anchor)
        assert err <= bound, (target, err)
    same_model, same_clip = apply_edit(model, clip, edit, 0.0)
    latents = _latents()
    assert torch.equal(_velocity(same_model, same_clip, "a photo of cat", latents),
                       _velocity(model, clip, "a photo of cat", latents))


def test_sd3_without_t5_and_in_fp16():
    """A CLIP with CLIP-L and CLIP-G only (a checkpoint with its CLIPs, or DualCLIPLoader type sd3)
    in float16, as ComfyUI runs text encoders on the CPU: the CLIP tokens alone, erased exactly."""
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    model = comfy_dit.build_sd3_model(seed=0)
    clip = comfy_dit.build_sd3_clip(seed=0, dtype=torch.float16, t5_layers=None)
    arch = ComfyHost(model, clip).architecture()
    assert [e.name for e in arch.encoders] == ["clip_l", "clip_g"] and arch.context == 77
    edit = run_erasure(ComfyHost(model, clip), _every_position(progressive_layers=3))
    assert edit.part("clip")
    erased, erased_clip = apply_edit(model, clip, edit, 1.0)
    err = _erasure_error(model, clip, erased, erased_clip, "a photo of cat", "a photo of dog")
    assert err <= 1e-3, err


def test_nodes_solve_sd3_and_the_lora_loads_through_the_stock_loader(sd3, pack, tmp_path, monkeypatch):
    model, clip = sd3
    edit = dit_checks.solve_with_nodes(pack, model, clip, TARGET, ANCHOR)
    assert {s.key.split(".")[0] for s in edit.part("clip")} == {"clip_l", "clip_g", "t5xxl"}

    dit_checks.lora_round_trip(pack, model, clip, edit, "test/sd3_cat", tmp_path, monkeypatch)


def test_an_sdxl_clip_is_refused_on_sd3(sd3, pack):
    """SDXL's CLIP holds CLIP-L and CLIP-G too, but encodes them for a UNet, not for SD3's gateway."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.errors import EraseProError
    model, _ = sd3
    _, sdxl_clip = H.build("sdxl")
    with pytest.raises(EraseProError, match="the CLIP does not match the MODEL: SD3 models need the text encoder"):
        ComfyHost(model, sdxl_clip).architecture()


def test_a_prompt_longer_than_t5s_77_tokens_is_refused(sd3):
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.errors import EraseProError
    from erasepro_ops.pipeline import run_erasure
    model, clip = sd3
    long = "a photo of a cat " + "in a long and winding sentence " * 12
    with pytest.raises(EraseProError, match="t5xxl tokens long; at most 77 fit: shorten it"):
        run_erasure(ComfyHost(model, clip), _request(preserve=(long,)))


def test_ten_concepts_refit_the_gateway_with_a_coarser_tolerance(sd3):
    """Ten concepts' exact gateway update on this SD3 comes out ~115× its weight (near-duplicate
    T5 columns): the gateway is solved again dropping singular values below 1e-3 of the largest;
    the update is then ~2.3× the weight, and the empty prompt still holds."""
    from benchmarks.run import PRESERVE, build_chain, concept_set
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import FALLBACK_CHANGE, run_erasure
    from erasepro_ops.request import Request
    model, clip = sd3
    edit = run_erasure(ComfyHost(model, clip), Request(build_chain(concept_set(10)), progressive_layers=0,
                                                       preserve=tuple(PRESERVE)))
    s = edit.summary
    notes = [w for w in s["warnings"] if "solved again" in w]
    assert len(notes) == 1 and "×" in notes[0], s["warnings"]
    assert not any("contradict" in w for w in s["warnings"])
    gateway = next(e for e in edit.sites if e.key == GATEWAY)
    assert gateway.relative_change < FALLBACK_CHANGE  # measured 2.29
    assert s["empty_prompt_drift"] <= 1e-4  # measured 8.8e-6
