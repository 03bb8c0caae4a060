"""The solve as users run it: a float16 checkpoint file through ComfyUI's own loader (text encoder in
float16, ComfyUI's default on CPU and GPU alike), beside the same model in float32.

The random-weight tiny SD1.5 keeps the real 12-layer CLIP-L (the loader builds it at full depth),
so the shallow chain, its rounding and the re-encode are the real ones; only the UNet is small.
"""

import struct

import pytest
import torch

import comfy_host as H

CASES = [("van gogh", "a painting", "style"), ("parachute", "an object", "object")]
EMPTY = ""
UNRELATED_KEY = "clip_l.transformer.text_model.encoder.layers.8.self_attn.out_proj.weight"  # no edit reads it


@pytest.fixture(scope="module")
def nodes():
    m = H.load_pack().NODE_CLASS_MAPPINGS
    return m["ErasePro_ConceptPair"](), m["ErasePro_ProgressiveSolver"](), m["ErasePro_ApplyErasedUNet"]()


@pytest.fixture(scope="module")
def users_model():
    """(MODEL, CLIP) of a float16 checkpoint file loaded with ComfyUI's loader."""
    model, clip = H.as_users_load("sd15", "tiny")
    fc2 = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc2
    assert fc2.weight.dtype == torch.float16  # what users get
    return model, clip


def solve(nodes, model, clip, case, method="erasepro", S=3):
    pair, solver, _ = nodes
    (concepts,) = pair.build(*case)
    return solver.solve(model, clip, concepts, S, method)["result"][0]


def deep_changes(edit):
    return [site.relative_change for site in edit.part("model")]


def edit_distance(a, b) -> float:
    """‖ΔW_a − ΔW_b‖ / ‖ΔW_a‖ over every site of the two edits together."""
    b_sites = {s.key: s for s in b.sites}
    diff = sum(float((s.delta().double() - b_sites[s.key].delta().double()).norm() ** 2) for s in a.sites)
    norm = sum(float(s.delta().double().norm() ** 2) for s in a.sites)
    return (diff / norm) ** 0.5


def empty_prompt_change(model, clip, edit, nodes) -> float:
    """Relative change of the empty prompt's conditioning through ComfyUI's own encode, edit applied."""
    _, _, apply = nodes
    _, new_clip = apply.apply(model, edit, 1.0, clip)
    before, _ = H.encode(clip, EMPTY)
    after, _ = H.encode(new_clip, EMPTY)
    return float((after.float() - before.float()).norm() / before.float().norm())


@pytest.mark.parametrize("case", CASES, ids=[c[2] for c in CASES])
def test_fp16_defaults_leave_the_unet_below_one_percent_and_below_uce(nodes, users_model, case):
    """The shallow chain closes the gap; the deep sites must not fit what the float16 encoder's
    rounding leaves behind (they did: 28 % per K/V on a style)."""
    model, clip = users_model
    ours = solve(nodes, model, clip, case)
    uce = solve(nodes, model, clip, case, method="uce", S=0)
    print(f"{case[0]}: deep change per K/V max {max(deep_changes(ours)):.2e} (UCE {max(deep_changes(uce)):.2e}), "
          f"train residual {ours.summary['train_residual']:.2e}, empty drift {ours.summary['empty_prompt_drift']:.2e}")
    assert max(deep_changes(ours)) <= max(deep_changes(uce))
    # Same token count: the shallow chain closes every column. "parachute" is one token, "an object"
    # two: the encoder's later blocks reopen the gap and the block ComfyUI reads (the last) closes it.
    assert max(deep_changes(ours)) <= 1e-2
    last = "clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
    assert (last in {s.key for s in ours.part("clip")}) == (case[2] == "object")
    assert ours.summary["train_residual"] <= 1e-2  # through the float16 encoder; 1e-5 in float32 (below)
    assert ours.summary["empty_prompt_drift"] <= 1e-6


@pytest.fixture(scope="module")
def fp32_model():
    """The same family built in float32 with the full 12-layer CLIP-L."""
    return H.build("sd15", clip_layers=12)


def test_edit_is_stable_under_a_nudge_to_an_unrelated_weight(nodes, fp32_model):
    """A 1e-6 relative change to a weight no edit reads (a LoRA loaded vs baked, a re-save) must not
    change the edit by more than 1 % (it changed the deep edit by 16 % when it fitted rounding noise).
    In float32: a float16 weight cannot hold a 1e-6 nudge (ComfyUI rounds the patched weight back)."""
    model, clip = fp32_model
    case = CASES[0]
    base = solve(nodes, model, clip, case)
    weight = clip.patcher.model_state_dict()[UNRELATED_KEY].float()
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(weight.shape, generator=g)
    nudged = clip.clone()
    nudged.add_patches({UNRELATED_KEY: (1e-6 * weight.norm() * direction / direction.norm(),)}, 1.0)
    import erasepro_comfy.host as host
    (moved_weight,) = host.effective_weights(nudged.patcher, [UNRELATED_KEY]).values()
    assert 0 < float((moved_weight.float() - weight).norm() / weight.norm()) < 2e-6  # the nudge is really there
    moved = solve(nodes, model, nudged, case)
    change = edit_distance(base, moved)
    print(f"edit change under a 1e-6 nudge: {change:.2e}")
    assert change <= 1e-2


def test_fp16_empty_prompt_is_unchanged_to_float16_rounding(nodes, users_model):
    """CFG's unconditional branch: the empty prompt through the user's own (float16) edited CLIP moves
    no more than re-rounding the edited weights to float16 can explain."""
    model, clip = users_model
    edit = solve(nodes, model, clip, CASES[0])
    change = empty_prompt_change(model, clip, edit, nodes)
    print(f"empty prompt through the edited float16 CLIP: {change:.2e}")
    assert change <= 2e-3  # float16 keeps 11 significant bits (4.9e-4); the edited layers are re-rounded


def test_fp32_empty_prompt_is_unchanged_and_the_train_residual_is_exact(nodes, fp32_model):
    model, clip = fp32_model
    edit = solve(nodes, model, clip, CASES[0])
    change = empty_prompt_change(model, clip, edit, nodes)
    print(f"float32: empty prompt {change:.2e}, train residual {edit.summary['train_residual']:.2e}")
    assert change <= 1e-6
    assert edit.summary["train_residual"] <= 1e-5


def test_the_bank_is_captured_a_batch_at_a_time_as_one_capture_gives_it(users_model):
    """The retain bank's first-block inputs are taken a batch of prompts at a time (never the whole
    bank at 77 positions) and give the batches one capture of the whole bank gives, on the fp16 CLIP."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import preserve_alignments, preserve_ids, select_inputs
    from erasepro_ops.request import Request
    from erasepro_ops.retain import retain_prompts
    from erasepro_ops.shallow import RETAIN_BATCH, RETAIN_TOKENS, _retain_batches, soft_weighting
    from erasepro_ops.templates import ConceptPair

    host = ComfyHost(*users_model)
    arch = host.architecture()
    request = Request((ConceptPair("van gogh", "a painting", "style"),))
    sizes = []
    capture = host.first_block_inputs

    def counted(chunks):
        sizes.append(len(chunks[0]))
        return capture(chunks)
    host.first_block_inputs = counted
    batches = soft_weighting(host, arch, request, None).batches(0)
    prompts = retain_prompts()
    assert sum(sizes) == len(prompts) and max(sizes) <= RETAIN_BATCH < len(prompts)
    ids = preserve_ids(host, arch, prompts)
    whole = capture(ids)
    expected = _retain_batches(arch, lambda rows: [select_inputs(c, torch.tensor(rows)) for c in whole],
                               preserve_alignments(arch, prompts, ids), request.retain_padding)[0]
    assert len(batches) == len(expected) > 1
    for got, want in zip(batches, expected):
        assert torch.equal(got.index, want.index) and torch.equal(got.hidden, want.hidden)
    # a batch of long prompts holds fewer of them: none runs more padded positions than the budget
    assert max(b.hidden.shape[0] * b.hidden.shape[1] for b in batches) <= RETAIN_TOKENS
    assert len({b.hidden.shape[0] for b in batches}) > 1

    # once a site's weightings are built from them, the batches are let go (a float32 factor each)
    from erasepro_ops.chain import SolverSettings
    from erasepro_ops.shallow import _weightings
    soft = soft_weighting(host, arch, request, None)
    soft.key = None  # built here, not read back from the cache's files
    enc = arch.encoders[0]
    keys = [enc.shallow_key(l) for l in range(2)]
    bias_keys = [k.replace(".weight", ".bias") for k in keys]
    weights, biases = host.text_weights(keys, as_stored=True), host.text_weights(bias_keys)
    blocks = host.shallow_blocks(enc, keys, [weights[k] for k in keys], [biases[k] for k in bias_keys], whole[0])
    built = _weightings(host, enc, blocks, [0, 1], soft, 0, SolverSettings(preserve_strength=request.retain_strength))
    assert not soft.held and [w.chol.dtype for w in built] == [torch.float32] * 2


def test_retain_bank_batches_cut_short_give_the_whole_context_features(users_model):
    """The retain bank runs in batches that stop after their last position used (CLIP is causal):
    at those positions the shallow sites' inputs equal a whole 77-token run's, on the fp16 CLIP."""
    import dataclasses

    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import preserve_alignments, preserve_ids
    from erasepro_ops.chain import kept_features, kept_moments
    from erasepro_ops.retain import retain_prompts
    from erasepro_ops.shallow import _retain_batches

    host = ComfyHost(*users_model)
    arch = host.architecture()
    prompts = retain_prompts()[:80]
    ids = preserve_ids(host, arch, prompts)
    captured = host.first_block_inputs(ids)
    spans = preserve_alignments(arch, prompts, ids)

    def first_inputs(rows):
        return [(c[0][rows], *c[1:]) for c in captured]
    short = _retain_batches(arch, first_inputs, spans, 2)[0]
    assert len(short) == 2 and all(b.hidden.shape[1] < arch.context for b in short)
    enc = arch.encoders[0]
    bidirectional = dataclasses.replace(arch, encoders=(dataclasses.replace(enc, spec=dataclasses.replace(enc.spec, causal=False)),))
    whole = _retain_batches(bidirectional, first_inputs, spans, 2)[0]
    assert all(b.hidden.shape[1] == arch.context for b in whole)
    keys = [enc.shallow_key(l) for l in range(3)]
    bias_keys = [k.replace(".weight", ".bias") for k in keys]
    weights, biases = host.text_weights(keys), host.text_weights(bias_keys)
    blocks = host.shallow_blocks(enc, keys, [weights[k] for k in keys], [biases[k] for k in bias_keys], captured[0])
    for s, w in zip(kept_features(blocks, short), kept_features(blocks, whole)):
        assert s.shape == w.shape and s.shape[1] == sum(b.index.numel() for b in short)
        gap = float((s.float() - w.float()).norm() / w.float().norm())
        print(f"cut short vs whole context: {gap:.1e}")
        assert gap <= 1e-5  # only the summation order differs
    for s, m in zip(kept_features(blocks, short), kept_moments(blocks, short)):  # a batch at a time
        s = s.double()
        assert m.count == s.shape[1] and m.sum_sq == pytest.approx(float(s.square().sum()), rel=1e-9)
        assert float((m.gram.tril() - (s @ s.T).tril()).norm() / (s @ s.T).norm()) <= 1e-6  # float32 products


def test_a_second_solve_reuses_the_retain_weightings_and_gives_the_same_edit(nodes, users_model, tmp_path, monkeypatch,
                                                                           caplog):
    """The retain bank's weightings are kept per text encoder as files: queued again (or in a later
    session), the solve reads them instead of building them and gives the identical edit; one whose
    numbers were changed is built again (one warning, the identical edit); a patch
    on one of the first S blocks (a LoRA) is another model."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.weighting_cache import RETAIN_WEIGHTINGS, WeightingCache

    model, clip = users_model
    monkeypatch.setattr(RETAIN_WEIGHTINGS, "directory", tmp_path)
    stored = []
    real_store = WeightingCache._store
    monkeypatch.setattr(WeightingCache, "_store", lambda self, key, w: (stored.append(key), real_store(self, key, w))[1])
    first = solve(nodes, model, clip, CASES[1])
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(stored) == len(files) >= 3  # one retain weighting per site: S = 3 shallow sites (and a bridge)
    assert not RETAIN_WEIGHTINGS.entries  # none held in memory
    again = solve(nodes, model, clip, CASES[1])
    assert len(stored) == len(files) and sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    assert edit_distance(first, again) == 0.0

    damaged = tmp_path / files[0]  # finite numbers changed in place: the header still matches
    data = bytearray(damaged.read_bytes())
    data[-64:-60] = struct.pack("<f", struct.unpack("<f", data[-64:-60])[0] * 1.5 + 0.25)
    damaged.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="ErasePro"):
        rebuilt = solve(nodes, model, clip, CASES[1])
    assert caplog.text.count("does not match its checksum") == 1 and len(stored) == len(files) + 1
    assert edit_distance(first, rebuilt) == 0.0 and damaged.read_bytes() != bytes(data)

    host = ComfyHost(model, clip)
    enc = host.architecture().encoders[0]
    patched = clip.clone()
    key = "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    weight = host.text_weights([key])[key]
    patched.add_patches({key: (1e-3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)),)}, 1.0)
    before, after = host.text_digests(enc, [1, 2, 3]), ComfyHost(model, patched).text_digests(enc, [1, 2, 3])
    assert after[1] == before[1]  # block 1 is not in the first one
    assert after[2] != before[2] and after[3] != before[3]
    assert len(set(before.values())) == 3


def test_a_prompt_repeated_in_a_batch_is_encoded_once(users_model):
    """Every concept of a type shares its anchor prompts: the batch encodes each once and copies it."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import encode_once

    host = ComfyHost(*users_model)
    arch = host.architecture()
    texts = ["a painting in the style of a painting", "a photo of a dog", "a painting in the style of a painting"]
    chunks = [[host.tokenize(t, enc)[0] for t in texts] for enc in arch.encoders]
    sizes = []
    encode = host.encode
    host.encode = lambda batch, **kw: sizes.append(len(batch[0])) or encode(batch, **kw)
    once = encode_once(host, chunks, capture=True)
    assert sizes == [2]
    whole = encode(chunks, capture=True)
    assert torch.equal(once.cond[0], once.cond[2])
    assert once.cond.shape == whole.cond.shape and once.captured[0][0].shape == whole.captured[0][0].shape
    assert float((once.cond - whole.cond).norm() / whole.cond.norm()) <= 1e-5  # batch size changes only the blocking
    assert float((once.captured[0][0] - whole.captured[0][0]).norm()) == 0.0


def test_the_fingerprint_of_an_fp16_checkpoint_is_the_loaders(nodes, users_model):
    """The solve hashes the text-encoder weights as the float16 checkpoint stores them and the UNet's
    one at a time: the same fingerprint as the float32 copies give, and the one Load / Apply check."""
    from erasepro_comfy.weights import effective_weights, fingerprint_of
    from erasepro_ops.fingerprint import fingerprint
    model, clip = users_model
    edit = solve(nodes, model, clip, CASES[0])
    model_keys, clip_keys = [s.key for s in edit.part("model")], [s.key for s in edit.part("clip")]
    assert model_keys and clip_keys
    assert edit.fingerprint == fingerprint({**effective_weights(model, model_keys),
                                            **effective_weights(clip.patcher, clip_keys)})
    assert edit.fingerprint == fingerprint_of([(model, model_keys), (clip.patcher, clip_keys)])
