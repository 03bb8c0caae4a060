"""The three nodes on tiny random-weight SD1.5 / SD2 / SDXL models built from ComfyUI's classes.

Erasure is measured with ComfyUI's own CLIP encode and UNet (comfy_host), not the pack's code.
"""

import time

import pytest
import torch

import comfy_host as H
from erasepro_comfy.host import ComfyHost
from erasepro_ops.templates import ConceptPair
from erasepro_ops.errors import EraseProError
from erasepro_ops.pipeline import run_erasure
from erasepro_ops.request import Request

TARGET, SAME_LENGTH_ANCHOR = "van gogh", "claude monet"  # two BPE tokens each
SOLVE_PROMPT = "a painting by {}"  # one of the style templates
UNRELATED = ["a photo of a dog", "a city street at night"]


@pytest.fixture(scope="module")
def pack():
    return H.load_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    m = pack.NODE_CLASS_MAPPINGS
    return m["ErasePro_ConceptPair"](), m["ErasePro_ProgressiveSolver"](), m["ErasePro_ApplyErasedUNet"]()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family_models(request):
    model, clip = H.build(request.param)
    return request.param, model, clip


LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TIMESTEPS = torch.tensor([400.0, 900.0])


def eps(model, clip, text):
    cond, pooled = H.encode(clip, text)
    batch = LATENTS.shape[0]
    pooled = pooled.expand(batch, -1) if pooled is not None else None
    return H.unet_eps(model, cond.expand(batch, -1, -1), pooled, LATENTS, TIMESTEPS).float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


ALL_PADDING = 77  # these tests check the template prompts erased to the last digit: every position aligned


def erase(nodes, model, clip, target, anchor, S=0, method="erasepro", concept_type="style", preserve="",
          template_padding=ALL_PADDING):
    pair, solver, apply = nodes
    (concepts,) = pair.build(target, anchor, concept_type)
    out = solver.solve(model, clip, concepts, S, method, preserve=preserve, template_padding=template_padding)
    edit, image, summary = out["result"]
    new_model, new_clip = apply.apply(model, edit, 1.0, clip)
    return edit, new_model, new_clip, out


def eps_erasure(model, clip, new_model, new_clip, target_prompt, anchor_prompt):
    """docs/DESIGN.md, *Metrics*: ‖ε'(target) − ε(anchor)‖ / ‖ε(target) − ε(anchor)‖."""
    e_t, e_a = eps(model, clip, target_prompt), eps(model, clip, anchor_prompt)
    return float((eps(new_model, new_clip, target_prompt) - e_a).norm() / (e_t - e_a).norm())


def test_same_length_pair_erased_exactly_and_uce_leaves_a_gap(nodes, family_models):
    kind, model, clip = family_models
    t_prompt, a_prompt = SOLVE_PROMPT.format(TARGET), SOLVE_PROMPT.format(SAME_LENGTH_ANCHOR)
    figures = {}
    for method in ("erasepro", "uce"):
        edit, m2, c2, out = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, method=method)
        s = edit.summary
        erasure = eps_erasure(model, clip, m2, c2, t_prompt, a_prompt)
        preservation = max(rel(eps(m2, c2, p), eps(model, clip, p)) for p in UNRELATED)
        figures[method] = (s["train_residual"], erasure, preservation, s["pooled_residual"])
        print(f"{kind} {method}: train residual {s['train_residual']:.2e}, pooled residual {s['pooled_residual']}, "
              f"eps erasure {erasure:.2e}, eps preservation (unrelated) {preservation:.2e}, "
              f"deep burden {s['deep_burden']:.3f}, {s['solve_seconds']:.2f} s")
        assert out["ui"]["erasepro_report"][0]["train_residual"] == s["train_residual"]
    ep, uce = figures["erasepro"], figures["uce"]
    assert ep[0] <= 1e-4
    assert uce[0] > 10 * ep[0]
    assert ep[1] <= 1e-3
    if kind == "sdxl":
        assert ep[3] is not None and ep[3] <= 1e-4


def test_multi_token_target_erased_better_than_uce(nodes, family_models):
    kind, model, clip = family_models
    target, anchor = "vincent van gogh", "claude monet"  # 3 tokens vs 2
    t_prompt, a_prompt = SOLVE_PROMPT.format(target), SOLVE_PROMPT.format(anchor)
    erasure = {}
    for method in ("erasepro", "uce"):
        _, m2, c2, _ = erase(nodes, model, clip, target, anchor, method=method)
        erasure[method] = eps_erasure(model, clip, m2, c2, t_prompt, a_prompt)
    print(f"{kind} multi-token eps erasure: erasepro {erasure['erasepro']:.3e}, uce {erasure['uce']:.3e}")
    assert erasure["erasepro"] < erasure["uce"]


def test_progressive_layers_edit_clip_and_keep_zero_residual(nodes):
    model, clip = H.build("sd15")
    edit0, *_ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, S=0)
    edit, m2, c2, _ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, S=3)
    shallow = edit.part("clip")
    burden0, burden3 = edit0.summary["deep_burden"], edit.summary["deep_burden"]
    print(f"sd15 S=3: train residual {edit.summary['train_residual']:.2e}, shallow sites {len(shallow)}, "
          f"deep burden S=0 {burden0:.3f} vs S=3 {burden3:.3f}; shallow ΔW/W "
          f"{[round(s.relative_change, 4) for s in shallow]}")
    assert len(shallow) == 1  # 3 of 12 blocks scaled to the tiny encoder's 4 layers
    assert edit.summary["train_residual"] <= 1e-4
    assert burden3 < burden0
    erasure = eps_erasure(model, clip, m2, c2, SOLVE_PROMPT.format(TARGET), SOLVE_PROMPT.format(SAME_LENGTH_ANCHOR))
    print(f"sd15 S=3 eps erasure {erasure:.2e}")
    assert erasure <= 1e-3


def lora_like(model, seed=5, scale=0.05):
    """A clone of MODEL carrying random low-rank "diff" patches on every K/V weight, like a LoRA."""
    g = torch.Generator().manual_seed(seed)
    patched = model.clone()
    patches = {}
    for key, w in model.model_state_dict().items():
        if "attn2.to_k" in key or "attn2.to_v" in key:
            a, b = torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g)
            patches[key] = ((a @ b) * scale / 4,)
    patched.add_patches(patches, 1.0)
    return patched


def test_lora_loaded_before_the_solver_is_respected(nodes, pack):
    model, clip = H.build("sd15")
    with_lora = lora_like(model)
    edit, m2, c2, _ = erase(nodes, with_lora, clip, TARGET, SAME_LENGTH_ANCHOR)
    t_prompt, a_prompt = SOLVE_PROMPT.format(TARGET), SOLVE_PROMPT.format(SAME_LENGTH_ANCHOR)
    with_lora_erasure = eps_erasure(with_lora, clip, m2, c2, t_prompt, a_prompt)
    # The same edit on the model without its LoRA no longer matches (it was solved on patched
    # weights): Apply refuses it, and forced on anyway it no longer erases exactly.
    with pytest.raises(ValueError, match="another base model"):
        nodes[2].apply(model, edit, 1.0, clip)
    from erasepro_comfy.apply import apply_edit
    bare_model, _ = apply_edit(model, clip, edit, 1.0)
    bare_erasure = eps_erasure(model, clip, bare_model, c2, t_prompt, a_prompt)
    print(f"LoRA: eps erasure with the LoRA {with_lora_erasure:.2e}, edit moved onto the bare model {bare_erasure:.2e}")
    assert edit.summary["train_residual"] <= 1e-4
    assert with_lora_erasure <= 1e-3
    assert bare_erasure > 10 * with_lora_erasure


def test_strength_zero_gives_bit_identical_sampler_output(nodes):
    model, clip = H.build("sd15")
    edit, *_ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, S=3)
    m0, c0 = nodes[2].apply(model, edit, 0.0, clip)
    positive, negative = H.conditioning(clip, SOLVE_PROMPT.format(TARGET)), H.conditioning(clip, "")
    reference = H.ksample(model, positive, negative, seed=3, steps=2)
    positive0, negative0 = H.conditioning(c0, SOLVE_PROMPT.format(TARGET)), H.conditioning(c0, "")
    again = H.ksample(m0, positive0, negative0, seed=3, steps=2)
    ref_t = reference["samples"] if isinstance(reference, dict) else reference
    again_t = again["samples"] if isinstance(again, dict) else again
    assert torch.equal(ref_t, again_t)
    m1, c1 = nodes[2].apply(model, edit, 1.0, clip)  # S = 3: the erasure is in the text encoder
    erased = H.ksample(m1, H.conditioning(c1, SOLVE_PROMPT.format(TARGET)), H.conditioning(c1, ""), seed=3, steps=2)
    erased_t = erased["samples"] if isinstance(erased, dict) else erased
    assert not torch.equal(ref_t, erased_t)


def test_input_model_and_clip_untouched_by_solve_and_apply(nodes):
    model, clip = H.build("sd15")
    before_m = {k: v.clone() for k, v in model.model_state_dict().items() if "attn2" in k}
    before_c = {k: v.clone() for k, v in clip.patcher.model_state_dict().items() if "fc2" in k}
    n_patches_m, n_patches_c = len(model.patches), len(clip.patcher.patches)
    edit, m2, c2, _ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, S=3)
    eps(m2, c2, "anything")  # loads the clones: ComfyUI patches the shared modules in place
    eps(model, clip, "anything")  # loading the originals again must restore them exactly
    assert len(model.patches) == n_patches_m and len(clip.patcher.patches) == n_patches_c
    for k, v in model.model_state_dict().items():
        if k in before_m:
            assert torch.equal(v, before_m[k]), k
    for k, v in clip.patcher.model_state_dict().items():
        if k in before_c:
            assert torch.equal(v, before_c[k]), k


@pytest.mark.parametrize("target,anchor,message", [
    ("", "a painting", "target"),
    ("   ", "a painting", "target"),
    ("Van Gogh", "van gogh", "same"),
])
def test_bad_concepts_are_refused_in_the_node(nodes, target, anchor, message):
    with pytest.raises(ValueError, match=f"(?i){message}"):
        nodes[0].build(target, anchor, "style")


def test_clip_that_does_not_match_the_model_is_refused(nodes):
    model, _ = H.build("sd15")
    _, sdxl_clip = H.build("sdxl")
    (concepts,) = nodes[0].build(TARGET, SAME_LENGTH_ANCHOR, "style")
    with pytest.raises(ValueError, match="does not match the MODEL"):
        nodes[1].solve(model, sdxl_clip, concepts, 0, "erasepro")


def test_unsupported_architecture_is_named(nodes, pack):
    import comfy.supported_models

    model, clip = H.build("sd15")
    other = model.clone()
    other.model = type("Wrapper", (), {"model_config": comfy.supported_models.Lumina2({"image_model": "lumina2"})})()
    (concepts,) = nodes[0].build(TARGET, SAME_LENGTH_ANCHOR, "style")
    with pytest.raises(ValueError, match=r"not supported yet: Lumina2. ErasePro supports SD1.x, SD2.x, SDXL, SD3 / SD3.5, "
                                         r"Flux.1, Chroma and Z-Image"):
        nodes[1].solve(other, clip, concepts, 0, "erasepro")


def test_nan_weights_are_refused_and_nothing_changes(nodes):
    model, clip = H.build("sd15")
    broken = model.clone()
    key = next(k for k in model.model_state_dict() if k.endswith("attn2.to_k.weight"))
    w = model.model_state_dict()[key]
    bad = torch.zeros_like(w)
    bad[0, 0] = float("nan")
    broken.add_patches({key: (bad,)}, 1.0)
    (concepts,) = nodes[0].build(TARGET, SAME_LENGTH_ANCHOR, "style")
    with pytest.raises(ValueError, match="NaN"):
        nodes[1].solve(broken, clip, concepts, 0, "erasepro")
    assert torch.isfinite(model.model_state_dict()[key]).all()


def test_concept_past_the_token_limit_is_refused_clearly(nodes):
    model, clip = H.build("sd15")
    filler = " ".join(["red"] * 74)  # the 3-token concept starts at token 75 of a 75-token chunk
    pair, solver, _ = nodes
    (concepts,) = pair.build("vincent van gogh", "monet", "custom", prompts=filler + " {}")
    with pytest.raises(ValueError, match="(?i)chunk|shorten|straddl|split"):
        solver.solve(model, clip, concepts, 0, "erasepro")


def test_edit_for_another_model_is_refused_by_apply(nodes):
    model, clip = H.build("sd15")
    edit, *_ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR)
    other, other_clip = H.build("sdxl")
    with pytest.raises(ValueError, match="another model"):
        nodes[2].apply(other, edit, 1.0, other_clip)


def test_sd2_family_solves(nodes):
    model, clip = H.build("sd2")
    edit, *_ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, S=3)
    print(f"sd2: train residual {edit.summary['train_residual']:.2e}, sites {len(edit.sites)}")
    assert edit.summary["train_residual"] <= 1e-4
    assert edit.part("clip")


def test_preserve_prompts_drift_less_at_equal_residual(nodes):
    model, clip = H.build("sd15")
    pair, solver, _ = nodes
    (concepts,) = pair.build(TARGET, SAME_LENGTH_ANCHOR, "style")
    preserve = "a photo of a dog\na city street at night\na portrait of a woman"
    drift = {}
    for strength in (0.0, 10.0):
        edit = solver.solve(model, clip, concepts, 0, "erasepro", preserve=preserve,
                            preserve_strength=strength, template_padding=ALL_PADDING)["result"][0]
        drift[strength] = edit.summary["preservation_drift"]
        print(f"preserve_strength {strength}: drift {drift[strength]:.4f}, "
              f"train residual {edit.summary['train_residual']:.2e}")
        assert edit.summary["train_residual"] <= 1e-4
    assert drift[10.0] < drift[0.0]


def test_preserve_prompts_stay_exactly_still_end_to_end(nodes):
    """ErasePro keeps the preserve prompts exactly (V* = W_o K, after the concept and end tokens). With
    S = 3 the wide fc2 sites fit them and the erasure together, so in ComfyUI's own encode + UNet the
    preserve prompts denoise as before while the target denoises like the anchor."""
    model, clip = H.build("sd15")
    t_prompt, a_prompt = SOLVE_PROMPT.format(TARGET), SOLVE_PROMPT.format(SAME_LENGTH_ANCHOR)
    figures = {}
    for preserve in ("", "\n".join(UNRELATED)):
        edit, m2, c2, _ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, S=3, preserve=preserve)
        moved = max(rel(eps(m2, c2, p), eps(model, clip, p)) for p in UNRELATED)
        figures[bool(preserve)] = (edit.summary, moved, eps_erasure(model, clip, m2, c2, t_prompt, a_prompt))
        print(f"preserve prompts given: {bool(preserve)}: eps change on them {moved:.2e}, eps erasure "
              f"{figures[bool(preserve)][2]:.2e}, train residual {edit.summary['train_residual']:.2e}, "
              f"drift {edit.summary['preservation_drift']}, deep burden {edit.summary['deep_burden']:.2e}")
    summary, moved, erasure = figures[True]
    assert summary["preserve_constraints"] == (len(UNRELATED) + 1) * 77  # and the empty prompt
    assert summary["empty_prompt_drift"] <= 1e-6
    assert summary["train_residual"] <= 1e-5 and summary["preservation_drift"] <= 1e-5
    assert moved <= 1e-4 and erasure <= 1e-3
    assert figures[False][1] > 100 * moved  # the same edit without them moves those prompts


def test_a_preserve_prompt_naming_the_target_is_flagged_and_the_erasure_wins(nodes):
    model, clip = H.build("sd15")
    preserve = f"a photo of a dog\na portrait in the style of {TARGET}"
    edit, *_ = erase(nodes, model, clip, TARGET, SAME_LENGTH_ANCHOR, preserve=preserve)
    s = edit.summary
    flagged = [w for w in s["warnings"] if "contains the erased concept" in w]
    print(f"train residual {s['train_residual']:.2e}; warnings {s['warnings']}")
    assert len(flagged) == 1 and TARGET in flagged[0] and "a photo of a dog" not in flagged[0]
    assert s["train_residual"] <= 1e-5


def twelve_concepts(pair):
    """12 concepts, one prompt each: 12 × 77 positions exceed the 768-wide deep sites."""
    concepts = None
    for target in ("van gogh", "claude monet", "pablo picasso", "salvador dali", "rembrandt", "frida kahlo",
                   "andy warhol", "hokusai", "gustav klimt", "mickey mouse", "pikachu", "snoopy"):
        (concepts,) = pair.build(target, "a painter", "custom", "{}", concepts)
    return concepts


def test_many_concepts_overflow_the_rank_budget_and_are_damped_not_wrecked(nodes):
    """12 concepts × 77 positions > 768: the overflow is damped least squares (the default), which
    keeps every deep site's change well below plain least squares' at a modestly larger residual."""
    model, clip = H.build("sd15")
    pair, solver, _ = nodes
    concepts = twelve_concepts(pair)
    summaries = {}
    for rho in (0.0, 1e-3):  # every padding position, not lowered to fit: the overflow is the point here
        summaries[rho] = s = run_erasure(ComfyHost(model, clip), Request(
            tuple(concepts), progressive_layers=0, overflow_damping=rho, template_padding=ALL_PADDING,
            fit_padding=False)).summary
        print(f"overflow_damping {rho}: train residual {s['train_residual']:.3e}, deep burden {s['deep_burden']:.3f}, "
              f"rank {s['deep_rank']}/{s['rank_budget']}, unaligned energy {s['unaligned_energy']:.2e}")
        assert s["constraints"] > s["rank_budget"] and any("rank budget" in w for w in s["warnings"])
    plain, damped = summaries[0.0], summaries[1e-3]
    for s in (plain, damped):  # only the padding overflows, and the summary says which parts are exact
        assert s["exact_parts"] == ["prefixes", "concept tokens", "end tokens", "empty prompt"]
        assert s["least_squares_parts"] == ["padding", "empty-prompt padding"]
        assert any("exact: prefixes, concept tokens, end tokens, empty prompt;" in w for w in s["warnings"])
    assert damped["overflow_damped"] and not plain["overflow_damped"]
    assert damped["deep_burden"] < 0.5 * plain["deep_burden"]
    assert plain["train_residual"] < damped["train_residual"] < 1.0
    # the padding overflowed either way: the same share of the features lies outside the exact span
    assert 0 < plain["unaligned_energy"] == pytest.approx(damped["unaligned_energy"], rel=1e-6)


def test_concept_tokens_past_the_budget_are_not_called_exact(nodes):
    """17 custom prompts with 50 template words after the concept: the concept group alone (concept
    tokens and the words after them) exceeds 768 columns, so only the prefixes are exact and the
    summary must say so rather than promise exact concept tokens."""
    import random
    words = ("red blue green small large old new bright dark quiet loud soft hard warm cold wooden metal glass "
             "stone river mountain forest city street house window door garden flower tree bird cat dog horse boat "
             "car train bridge tower castle market harbor field cloud rain snow sun moon star night morning").split()
    rng = random.Random(0)
    lines = tuple("{} " + " ".join(rng.sample(words, 50)) for _ in range(17))
    model, clip = H.build("sd15")
    concepts = (ConceptPair("van gogh", "a painter", "custom", lines),)
    s = run_erasure(ComfyHost(model, clip), Request(concepts, progressive_layers=0,
                                                    template_padding=ALL_PADDING, fit_padding=False)).summary
    print(f"{s['constraints']} columns: exact {s['exact_parts']}, least squares {s['least_squares_parts']}, "
          f"train residual {s['train_residual']:.3e}")
    assert s["exact_parts"] == ["prefixes"]
    assert s["least_squares_parts"] == ["concept tokens", "end tokens", "empty prompt", "padding", "empty-prompt padding"]
    (warning,) = [w for w in s["warnings"] if "rank budget" in w]
    assert "exact: prefixes;" in warning
    assert "least squares: concept tokens, end tokens, empty prompt, padding, empty-prompt padding" in warning


def test_preserve_prompts_share_the_overflow_and_drift_no_more_than_uce(nodes):
    """Past the rank budget the preserve prompts' padding joins the erasure's damped fit, weighted by
    ``overflow_preserve_weight``: they drift no more than under UCE (official: last token, its own soft
    preserve term), far less than with weight 1, and the edit stays gentle."""
    model, clip = H.build("sd15")
    pair, _, _ = nodes
    concepts = twelve_concepts(pair)
    preserve = ("a photo of a dog", "a landscape painting", "a portrait of a woman", "a city street at night",
                "a bowl of fruit", "a mountain lake at sunrise")
    every = dict(template_padding=ALL_PADDING, fit_padding=False)  # the overflow is the templates' padding
    runs = {"uce": dict(method="uce", features="last_token"), "w=1": dict(overflow_preserve_weight=1.0, **every),
            "default": every}
    s = {}
    for label, kw in runs.items():
        s[label] = run_erasure(ComfyHost(model, clip), Request(tuple(concepts), preserve=preserve, **kw)).summary
        print(f"{label}: train residual {s[label]['train_residual']:.3e}, preserve drift "
              f"{s[label]['preservation_drift']:.3e}, deep burden {s[label]['deep_burden']:.3f}")
    assert s["default"]["overflow_damped"] and s["default"]["constraints"] > s["default"]["rank_budget"]
    assert s["default"]["preservation_drift"] <= s["uce"]["preservation_drift"]
    assert s["default"]["preservation_drift"] < 0.5 * s["w=1"]["preservation_drift"]
    assert s["default"]["train_residual"] < 0.5 and s["default"]["deep_burden"] < 1.0
    with pytest.raises(EraseProError, match="overflow_preserve_weight"):
        run_erasure(ComfyHost(model, clip), Request(tuple(concepts), overflow_preserve_weight=0.0, **every))
    for name in ("overflow_damping", "retain_strength", "preserve_strength"):  # NaN passes ComfyUI's min/max
        with pytest.raises(EraseProError, match=f"{name} must be a finite number"):
            run_erasure(ComfyHost(model, clip), Request(tuple(concepts), **{name: float("nan")}))


def test_long_prompt_is_quoted_short(nodes):
    """A 300-word target that cannot be aligned: the message quotes a few words, not all 300."""
    model, clip = H.build("sd15")
    words = [f"word{i}" for i in range(300)]
    pair, solver, _ = nodes
    (concepts,) = pair.build(" ".join(words), "a painting", "style")
    with pytest.raises(ValueError, match="straddles") as e:
        solver.solve(model, clip, concepts, 3, "erasepro")
    msg = str(e.value)
    print(f"\n300-word target: {len(msg)} characters: {msg}")
    assert len(msg) < 400
    assert "word0 word1" in msg and "…" in msg and "(300 words)" in msg
    assert "word10 " not in msg and "word299" not in msg


def _nan_at(clip, attr: str, fn) -> None:
    enc = getattr(clip.cond_stage_model, attr).transformer.text_model
    with torch.no_grad():
        fn(enc)


@pytest.mark.parametrize("kind,attr", [("sd15", "clip_l"), ("sdxl", "clip_g")])
def test_nan_in_an_untouched_text_encoder_weight_names_encoder_and_prompt(nodes, pack, kind, attr):
    """NaN in a text-encoder weight the edit does not touch (an attention projection of the last
    block: the shallow sites are fc2 of the first blocks) stops the solve at the first encode,
    naming the encoder and a prompt, in a short message. Two concepts: 16 prompts a batch, more than
    host.PROBE_BATCH, so one prompt is encoded first and named alone."""
    import erasepro_comfy.host as host
    model, clip = H.build(kind)
    _nan_at(clip, attr, lambda t: t.encoder.layers[-1].self_attn.q_proj.weight.__setitem__((0, 0), float("nan")))
    pair, solver, _ = nodes
    (first,) = pair.build("pablo picasso", "a painter", "style")
    (concepts,) = pair.build(TARGET, SAME_LENGTH_ANCHOR, "style", concepts=first)
    assert 2 * len(concepts[0].templates) > host.PROBE_BATCH
    t0 = time.perf_counter()
    with pytest.raises(host.EraseProError) as e:
        solver.solve(model, clip, concepts, 3, "erasepro")
    seconds = time.perf_counter() - t0
    msg = str(e.value)
    print(f"\n[{kind}] NaN in {attr} q_proj: after {seconds:.2f} s: {msg}")
    assert f"the text encoder {attr} gives NaN/Inf features for '" in msg
    assert "corrupt" in msg and len(msg) < 400
    assert "more prompt" not in msg  # the probe's one prompt


def test_nan_in_one_token_embedding_names_the_prompts_that_use_it(nodes, pack):
    """NaN in the token embedding row of a word only the target uses: the anchors encode fine,
    the target prompts do not, and the message quotes one of them."""
    import erasepro_comfy.host as host
    model, clip = H.build("sd15")
    token = clip.tokenize("gogh")["l"][0][1][0]
    _nan_at(clip, "clip_l", lambda t: t.embeddings.token_embedding.weight[token].fill_(float("nan")))
    pair, solver, _ = nodes
    (concepts,) = pair.build(TARGET, SAME_LENGTH_ANCHOR, "style")
    with pytest.raises(host.EraseProError, match="the text encoder clip_l gives NaN/Inf features for") as e:
        solver.solve(model, clip, concepts, 3, "erasepro")
    msg = str(e.value)
    print(f"\nNaN in the embedding of 'gogh' ({token}): {msg}")
    quoted = msg.split("features for ", 1)[1]
    assert quoted.startswith("'") and "van gogh" in quoted.split(":")[0]
    assert "claude monet" not in msg


def test_context_sentences_join_the_solve_and_are_recorded(nodes):
    """context_sentences adds the built-in varied sentences per concept to the constraints (concept,
    suffix and end columns only) and the settings record says so, so the file reproduces the edit."""
    model, clip = H.build("sd15")
    pair, solver, _ = nodes
    (concepts,) = pair.build(TARGET, "a painting", "style")
    plain = solver.solve(model, clip, concepts, 3, "erasepro")["result"][0]
    more = solver.solve(model, clip, concepts, 3, "erasepro", context_sentences=20)["result"][0]
    assert more.summary["templates"] == plain.summary["templates"] + 20
    added = more.summary["constraints"] - plain.summary["constraints"]
    assert 20 * 3 <= added <= 20 * 40  # a few columns each, never their 77 positions
    assert more.settings["context_templates"] == 20 and plain.settings["context_templates"] == 0
    with pytest.raises(Exception, match="between 0 and 20"):
        solver.solve(model, clip, concepts, 3, "erasepro", context_sentences=21)
