"""The in-process Flux.1 dev host (scripts/comfy_dit.py): real ComfyUI objects, tiny widths,
ComfyUI's tokenizer / apply_model / sampler / loaders."""
from __future__ import annotations

import pytest
import torch

import comfy_host  # noqa: F401  (ComfyUI first on sys.path, imported; see conftest)
from scripts import comfy_dit

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def flux(host):
    return comfy_dit.build_flux("tiny", seed=0)


def _latents(seed=0, shape=(1, 16, 16, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_tiny_flux_is_real_comfy_flux(flux):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.t5
    model, clip = flux
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert type(model.model) is comfy.model_base.Flux
    assert type(model.model.model_config) is comfy.supported_models.Flux
    assert model.model.model_config.unet_config["guidance_embed"] is True
    assert model.model.model_type == comfy.model_base.ModelType.FLUX
    assert isinstance(clip, comfy.sd.CLIP)
    cs = clip.cond_stage_model
    assert isinstance(cs, comfy.text_encoders.flux.FluxClipModel)
    assert isinstance(clip.tokenizer, comfy.text_encoders.flux.FluxTokenizer)
    assert type(cs.clip_l) is comfy.sd1_clip.SDClipModel
    assert type(cs.t5xxl) is comfy.text_encoders.sd3_clip.T5XXLModel
    assert type(cs.t5xxl.transformer) is comfy.text_encoders.t5.T5
    assert cs.t5xxl.num_layers == 2 and cs.clip_l.num_layers == comfy_dit.TINY_CLIP_L_LAYERS
    ff = cs.t5xxl.transformer.encoder.block[0].layer[1].DenseReluDense
    assert type(ff) is comfy.text_encoders.t5.T5DenseGatedActDense  # gated-gelu, as T5-XXL
    assert cs.t5xxl.transformer.shared.weight.shape == (32128, 64)
    assert cs.t5xxl.enable_attention_masks is False  # Flux's T5 attends to the padding too

    d_t5, w_clip, hidden = 64, 768, 128
    dm = model.model.diffusion_model
    assert dm.txt_in.weight.shape == (hidden, d_t5)
    assert dm.vector_in.in_layer.weight.shape == (hidden, w_clip)
    mkeys = model.model_state_dict()
    assert mkeys["diffusion_model.txt_in.weight"].shape == (hidden, d_t5)
    assert mkeys["diffusion_model.vector_in.in_layer.weight"].shape == (hidden, w_clip)

    ckeys = set(clip.patcher.model_state_dict())
    assert ckeys == set(clip.get_key_patches())
    for i in range(2):
        assert f"t5xxl.transformer.encoder.block.{i}.layer.1.DenseReluDense.wo.weight" in ckeys
    assert "t5xxl.transformer.encoder.block.2.layer.1.DenseReluDense.wo.weight" not in ckeys
    assert "t5xxl.transformer.encoder.final_layer_norm.weight" in ckeys
    assert "t5xxl.transformer.shared.weight" in ckeys
    assert "clip_l.transformer.text_model.final_layer_norm.weight" in ckeys


def test_seeded_builds_are_deterministic(flux):
    model, clip = flux
    model2, clip2 = comfy_dit.build_flux("tiny", seed=0)
    for a, b in ((model.model.diffusion_model, model2.model.diffusion_model),
                 (clip.cond_stage_model, clip2.cond_stage_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = comfy_dit.build_flux_model("tiny", seed=1)
    assert not torch.equal(other.model.diffusion_model.txt_in.weight, model.model.diffusion_model.txt_in.weight)


def test_tokenize_and_encode(flux):
    _, clip = flux
    toks = clip.tokenize(PROMPT)
    assert set(toks) == {"l", "t5xxl"}
    t5 = toks["t5xxl"][0]
    assert len(toks["t5xxl"]) == 1 and len(t5) == 256  # FluxTokenizer: T5 min_length 256
    ids = [t for t, _ in t5]
    assert ids[:8] == [3, 9, 1202, 13, 3, 9, 1712, 1]  # "▁", "a", ..., "cat", </s>=1; no start token
    assert set(ids[8:]) == {0}  # padded with pad id 0, not with the end token
    assert toks["l"][0][0][0] == 49406 and len(toks["l"][0]) == 77

    cond, pooled = comfy_dit.encode_flux(clip, PROMPT)
    assert cond.shape == (1, 256, 64) and pooled.shape == (1, 768)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
    cond2, pooled2 = comfy_dit.encode_flux(clip, "a photo of a dog")
    assert not torch.allclose(cond, cond2) and not torch.allclose(pooled, pooled2)


def test_t5_block_inputs_for_a_pre_hook(flux):
    """T5Block.forward(x, mask, past_bias, optimized_attention), all positional."""
    _, clip = flux
    seen = []

    def hook(mod, args, kwargs):
        seen.append((args[0].clone(), args[1:], dict(kwargs)))

    block0 = clip.cond_stage_model.t5xxl.transformer.encoder.block[0]
    h = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        comfy_dit.encode_flux(clip, PROMPT)
    finally:
        h.remove()
    (x, rest, kwargs), = seen
    assert x.shape == (1, 256, 64) and x.dtype == torch.float32
    assert rest[0] is None and rest[1] is None and callable(rest[2]) and kwargs == {}
    # block 0's input is the token embedding (mask None: no attention mask)
    ids = torch.tensor([[t for t, _ in clip.tokenize(PROMPT)["t5xxl"][0]]])
    assert torch.equal(x, clip.cond_stage_model.t5xxl.transformer.shared.weight[ids].float())


def test_flux_velocity(flux):
    model, clip = flux
    cond, pooled = comfy_dit.encode_flux(clip, PROMPT)
    x = _latents()
    v, den = comfy_dit.flux_velocity(model, cond, pooled, x, 0.7, return_denoised=True)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.isfinite(v).all() and v.abs().mean() > 0
    torch.testing.assert_close(den, x - 0.7 * v)  # apply_model's CONST (flow) denoised
    assert torch.equal(comfy_dit.flux_velocity(model, cond, pooled, x, 0.7), v)

    cond2, pooled2 = comfy_dit.encode_flux(clip, "a photo of a dog")
    assert not torch.allclose(comfy_dit.flux_velocity(model, cond2, pooled2, x, 0.7), v)
    assert not torch.allclose(comfy_dit.flux_velocity(model, cond, pooled, x, 0.7, guidance=1.0), v)
    assert not torch.allclose(comfy_dit.flux_velocity(model, cond, pooled, x, 0.3), v)
    vb = comfy_dit.flux_velocity(model, cond, pooled, torch.cat([x, _latents(1)]), torch.tensor([0.7, 0.5]))
    assert vb.shape == (2, 16, 16, 16)
    torch.testing.assert_close(vb[:1], v, rtol=1e-4, atol=1e-5)


def test_comfy_sampler_runs_tiny_flux(flux, host):
    model, clip = flux
    cond, pooled = comfy_dit.encode_flux(clip, PROMPT)
    pos = [[cond, {"pooled_output": pooled, "guidance": 3.5}]]
    neg = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled)}]]
    out = host.ksample(model, pos, neg, latent=host.empty_latent(64, 64), seed=0, steps=2, cfg=1.0,
                       scheduler="simple")
    assert out["samples"].shape == (1, 16, 8, 8) and torch.isfinite(out["samples"]).all()


def test_tiny_flux_file_is_refused_by_comfy_detection(flux, tmp_path):
    model, clip = flux
    paths = comfy_dit.save_flux_files(model, clip, tmp_path)
    with pytest.raises(ValueError, match="3072"):
        comfy_dit.load_flux_files(paths)
    import comfy.sd
    with pytest.raises(ValueError):  # what ComfyUI itself does with hidden 128: 128 % 24 heads
        comfy.sd.load_diffusion_model(str(paths["diffusion_model"]))


def test_loader_round_trip(tmp_path, host):
    """size="loader" (hidden 3072, 1+1 blocks): fp16 files read back by ComfyUI's loaders."""
    from safetensors import safe_open
    import comfy.model_base
    import comfy.text_encoders.flux
    model, clip = comfy_dit.build_flux("loader", seed=0)
    x = _latents()
    cond, pooled = comfy_dit.encode_flux(clip, PROMPT)
    v = comfy_dit.flux_velocity(model, cond, pooled, x, 0.7)
    ckeys = set(clip.patcher.model_state_dict())

    paths = comfy_dit.save_flux_files(model, clip, tmp_path)
    with safe_open(str(paths["diffusion_model"]), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("txt_in.weight").get_shape() == [3072, 64]
        assert f.get_slice("img_in.weight").get_dtype() == "F16"
    assert {"img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight",
            "guidance_in.in_layer.weight", "vector_in.in_layer.weight"} <= keys
    with safe_open(str(paths["t5xxl"]), framework="pt") as f:
        assert {"shared.weight", "encoder.final_layer_norm.weight",
                "encoder.block.1.layer.1.DenseReluDense.wo.weight"} <= set(f.keys())
    with safe_open(str(paths["clip_l"]), framework="pt") as f:
        assert "text_model.encoder.layers.1.mlp.fc1.weight" in f.keys()
    del model

    model2, clip2 = comfy_dit.load_flux_files(tmp_path)
    assert type(model2.model) is comfy.model_base.Flux
    assert model2.model.diffusion_model.params.hidden_size == 3072
    assert isinstance(clip2.cond_stage_model, comfy.text_encoders.flux.FluxClipModel)
    assert set(clip2.patcher.model_state_dict()) == ckeys
    cond2, pooled2 = comfy_dit.encode_flux(clip2, PROMPT)
    torch.testing.assert_close(cond2, cond, rtol=1e-2, atol=1e-2 * cond.abs().max().item())
    torch.testing.assert_close(pooled2, pooled, rtol=1e-2, atol=1e-2 * pooled.abs().max().item())
    v2 = comfy_dit.flux_velocity(model2, cond, pooled, x, 0.7)
    torch.testing.assert_close(v2, v, rtol=1e-2, atol=1e-2 * v.abs().max().item())
