"""Concept expansion, token ids and token alignment (docs/DESIGN.md, *Prompts* and *Columns*) on
hand-made CLIP-style token ids."""

from __future__ import annotations

import pytest
import torch

from erasepro_ops.alignment import ROLE_PRIORITY, PromptAlignment, align_chunks
from erasepro_ops.templates import CONCEPT_TYPES, TEMPLATES, ConceptPair, expand, fill
from erasepro_ops.tokens import SpecialTokens, overflow, token_chunks
from reference_ops import CLIP_G, CLIP_L, align

S, E = 49406, 49407
C = 77
A, PHOTO, OF, IN, SCENE = 320, 1125, 539, 530, 3562
VAN, GOGH, DYCK, PAINTING = 2451, 19697, 31247, 3086
CAT, TABBY, HOUSE, KITTEN = 2368, 27962, 1212, 29471

SPECIALS = pytest.mark.parametrize("special", [CLIP_L, CLIP_G], ids=["clip_l", "clip_g"])


def chunk(real: list[int], special: SpecialTokens, length: int = C) -> list[int]:
    """One padded context chunk: start, the real tokens, end, padding."""
    ids = [S, *real, E]
    assert len(ids) <= length
    return ids + [special.pad] * (length - len(ids))


def comfy_chunks(stream: list[int], special: SpecialTokens) -> list[list[int]]:
    """ComfyUI's split of a long prompt: 75 real tokens per chunk, each wrapped and padded."""
    pieces = [stream[i : i + C - 2] for i in range(0, len(stream), C - 2)] or [[]]
    return [chunk(piece, special) for piece in pieces]


def filler(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def check_invariants(al: PromptAlignment, context_length: int = C) -> None:
    assert len(al.partner) == len(al.move) == len(al.role)
    assert not set(al.keep) & set(al.move)
    assert sorted(al.keep + al.move) == list(range(context_length))
    assert al.keep == tuple(range(len(al.keep)))
    assert all(0 <= p < context_length for p in al.partner)
    assert set(al.role) <= {"concept", "suffix", "end", "pad"}
    assert al.role.count("end") == 1
    assert al.role[0] == "concept"
    order = [ROLE_PRIORITY[r] if r != "suffix" else 1.5 for r in al.role]
    assert order == sorted(order), "roles must run concept, suffix, end, pad"


# ---- (1) multi-token target vs single-token anchor ------------------------------------------


@SPECIALS
def test_multi_token_target_single_token_anchor(special):
    target = chunk([A, PHOTO, OF, VAN, GOGH, IN, A, SCENE], special)
    anchor = chunk([A, PHOTO, OF, PAINTING, IN, A, SCENE], special)
    al = align(target, anchor, special, target_prompt="a photo of van gogh in a scene",
               anchor_prompt="a photo of painting in a scene")

    assert al.target_chunk == al.anchor_chunk == 0
    assert al.keep == (0, 1, 2, 3)
    assert al.move == tuple(range(4, 77))
    assert al.partner == (4, 4) + tuple(range(5, 76))
    assert al.role == ("concept",) * 2 + ("suffix",) * 3 + ("end",) + ("pad",) * 67
    assert al.positions("end") == (9,)
    assert al.partner[al.move.index(9)] == 8
    check_invariants(al)


def test_shared_leading_concept_token_is_kept():
    target = chunk([A, PHOTO, OF, VAN, GOGH], CLIP_L)
    anchor = chunk([A, PHOTO, OF, VAN, DYCK], CLIP_L)
    al = align(target, anchor, CLIP_L)
    assert al.keep == (0, 1, 2, 3, 4)
    assert al.positions("concept") == (5,)
    assert al.partner[:2] == (5, 6)
    check_invariants(al)


def test_unpadded_ids_are_padded_positions():
    al = align([S, VAN, GOGH, E], [S, PAINTING, E], CLIP_L)
    assert al.keep == (0,)
    assert al.partner[:3] == (1, 1, 2)
    assert al.role[:4] == ("concept", "concept", "end", "pad")
    check_invariants(al)


# ---- (2) empty anchor ---------------------------------------------------------------------


@SPECIALS
def test_empty_anchor_pairs_with_last_prefix_position(special):
    target = chunk([A, PHOTO, OF, VAN, GOGH, IN, A, SCENE], special)
    anchor = chunk([A, PHOTO, OF, IN, A, SCENE], special)
    al = align(target, anchor, special, anchor_empty=True)

    assert al.keep == (0, 1, 2, 3)
    assert al.partner == (3, 3) + tuple(range(4, 75))  # position 3: "of", the last prefix token
    assert al.role == ("concept",) * 2 + ("suffix",) * 3 + ("end",) + ("pad",) * 67
    check_invariants(al)

    assert align(target, anchor, special) == al


@SPECIALS
def test_bare_template_empty_anchor(special):
    al = align(chunk([VAN, GOGH], special), chunk([], special), special, anchor_empty=True)
    assert al.keep == (0,)
    assert al.partner == (0, 0) + tuple(range(1, 75))  # the start token
    assert al.role[:4] == ("concept", "concept", "end", "pad")
    check_invariants(al)


def test_anchor_empty_flag_overrides_anchor_tokens():
    target = chunk([A, VAN, GOGH], CLIP_L)
    anchor = chunk([A, PAINTING], CLIP_L)
    assert align(target, anchor, CLIP_L).partner[:3] == (2, 2, 3)
    assert align(target, anchor, CLIP_L, anchor_empty=True).partner[:3] == (1, 1, 3)


# ---- (3) single-token target vs multi-token anchor ----------------------------------------


@SPECIALS
def test_single_token_target_multi_token_anchor(special):
    target = chunk([A, PHOTO, OF, CAT], special)
    anchor = chunk([A, PHOTO, OF, TABBY, HOUSE, KITTEN], special)
    al = align(target, anchor, special)

    assert al.keep == (0, 1, 2, 3)
    assert al.move == tuple(range(4, 77))
    assert al.partner == (6,) + tuple(range(7, 77)) + (76, 76)
    assert al.role == ("concept", "end") + ("pad",) * 71
    check_invariants(al)


def test_three_token_target_pairs_with_one_anchor_token():
    al = align(chunk([A, TABBY, HOUSE, KITTEN], CLIP_L), chunk([A, CAT], CLIP_L), CLIP_L)
    assert al.partner[:4] == (2, 2, 2, 3)


def test_pairing_counts_from_the_last_token():
    al = align(chunk([A, VAN, GOGH, TABBY], CLIP_L), chunk([A, HOUSE, KITTEN], CLIP_L), CLIP_L)
    assert al.partner[:4] == (2, 2, 3, 4)


# ---- (4) concept at the end of a full chunk -----------------------------------------------


@SPECIALS
def test_concept_at_end_of_full_chunk(special):
    prefix = filler(73)
    target = chunk(prefix + [VAN, GOGH], special)
    anchor = chunk(prefix + [PAINTING], special)
    assert len(target) == 77 and target[-1] == E

    al = align(target, anchor, special)
    assert al.keep == tuple(range(74))
    assert al.move == (74, 75, 76)
    assert al.partner == (74, 74, 75)
    assert al.role == ("concept", "concept", "end")
    check_invariants(al)


# ---- (5) prompts longer than one chunk ----------------------------------------------------


@SPECIALS
def test_concept_in_second_of_three_chunks(special):
    head, tail = filler(85), filler(85, base=5000)
    target = comfy_chunks(head + [VAN, GOGH] + tail, special)
    anchor = comfy_chunks(head + [PAINTING] + tail, special)
    assert len(target) == len(anchor) == 3
    assert overflow(target) and not overflow(target[:1])

    al = align_chunks(target, anchor, special)
    assert al.target_chunk == al.anchor_chunk == 1
    assert al.keep == tuple(range(11))
    assert al.move == tuple(range(11, 77))
    assert al.partner == (11, 11) + tuple(range(12, 76))
    assert al.role == ("concept",) * 2 + ("suffix",) * 63 + ("end",)
    check_invariants(al)


@SPECIALS
def test_single_chunk_align_chunks_matches_align(special):
    target = chunk([A, PHOTO, OF, VAN, GOGH, IN, A, SCENE], special)
    anchor = chunk([A, PHOTO, OF, IN, A, SCENE], special)
    assert align_chunks([target], [anchor], special, anchor_empty=True) == align(
        target, anchor, special, anchor_empty=True
    )


def test_anchor_with_fewer_chunks_uses_same_chunk_index():
    head = filler(70)
    target = comfy_chunks(head + [TABBY, HOUSE, KITTEN] + [A, IN, SCENE], CLIP_L)
    anchor = comfy_chunks(head + [CAT] + [A, IN, SCENE], CLIP_L)
    assert (len(target), len(anchor)) == (2, 1)

    al = align_chunks(target, anchor, CLIP_L)
    assert al.target_chunk == al.anchor_chunk == 0
    assert al.keep == tuple(range(71))
    assert al.partner == (71, 71, 71, 72, 73, 74)
    assert al.role == ("concept",) * 3 + ("suffix",) * 2 + ("end",)
    check_invariants(al)


def test_anchor_lacking_the_concept_chunk_is_rejected():
    head = filler(75)
    target = comfy_chunks(head + [VAN, GOGH], CLIP_L)
    anchor = comfy_chunks(head, CLIP_L)
    with pytest.raises(ValueError, match="chunk 1"):
        align_chunks(target, anchor, CLIP_L, anchor_empty=True)


def test_straddling_concept_is_rejected():
    head = filler(74)
    target = comfy_chunks(head + [VAN, GOGH], CLIP_L)
    anchor = comfy_chunks(head + [PAINTING], CLIP_L)
    with pytest.raises(ValueError, match="straddles"):
        align_chunks(target, anchor, CLIP_L, target_prompt="... van gogh")


def test_different_chunking_before_concept_is_rejected():
    target = [chunk(filler(70), CLIP_L), chunk([VAN], CLIP_L)]
    anchor = [chunk(filler(75), CLIP_L), chunk(filler(3, 8000), CLIP_L)]
    with pytest.raises(ValueError, match="differently"):
        align_chunks(target, anchor, CLIP_L)


# ---- (6) errors ---------------------------------------------------------------------------


@SPECIALS
def test_identical_tokens_rejected(special):
    ids = chunk([A, PHOTO, OF, CAT], special)
    with pytest.raises(ValueError, match="tokenize identically.*'a photo of cat'.*'a photo of Cat'"):
        align(ids, list(ids), special, target_prompt="a photo of cat", anchor_prompt="a photo of Cat")
    with pytest.raises(ValueError, match="tokenize identically"):
        align_chunks([ids, ids], [ids, ids], special)


def test_target_without_own_tokens_rejected():
    with pytest.raises(ValueError, match="no tokens of its own"):
        align(chunk([A], CLIP_L), chunk([A, CAT], CLIP_L), CLIP_L)


def test_malformed_chunks_rejected():
    with pytest.raises(ValueError, match="no end token"):
        align([S, A, CAT], [S, A, KITTEN, E], CLIP_L)
    with pytest.raises(ValueError, match="longer than one context chunk"):
        align([S] + filler(80) + [E], [S, E], CLIP_L)


def test_tokenizer_without_start_token():
    special = SpecialTokens(start=None, end=1, pad=0)
    al = align([CAT, 1, 0, 0, 0], [KITTEN, HOUSE, 1, 0, 0], special, context_length=5)
    assert al.keep == ()
    assert al.partner == (1, 2, 3, 4, 4)
    assert al.role == ("concept", "end", "pad", "pad", "pad")


# ---- (7) token formats --------------------------------------------------------------------


def test_token_chunks_formats():
    l_chunk = [(S, 1.0), (A, 1.0), (CAT, 1.2), (E, 1.0)] + [(E, 1.0)] * 73
    g_chunk = [(S, 1.0, 0), (A, 1.0, 1), (CAT, 1.2, 2), (E, 1.0, 0)] + [(0, 1.0, 0)] * 73
    tokens = {"l": [l_chunk], "g": [g_chunk, g_chunk]}

    assert token_chunks(tokens) == [[S, A, CAT, E] + [E] * 73]
    assert token_chunks(tokens, "g") == [[S, A, CAT, E] + [0] * 73] * 2
    assert token_chunks([S, A, CAT, E]) == [[S, A, CAT, E]]
    assert token_chunks([[S, E], [S, A, E]]) == [[S, E], [S, A, E]]
    assert token_chunks([(S, 1.0), (E, 1.0)]) == [[S, E]]
    assert token_chunks(torch.tensor([[S, E]])) == [[S, E]]
    assert not overflow(tokens) and overflow(tokens, "g")
    with pytest.raises(ValueError, match="no tokens for encoder 'h'"):
        token_chunks(tokens, "h")


def test_align_chunks_reads_comfy_dicts():
    def comfy(real):
        return {"l": [[(t, 1.0, 0) for t in chunk(real, CLIP_L)]]}

    al = align_chunks(comfy([A, VAN, GOGH]), comfy([A, PAINTING]), CLIP_L)
    assert al.keep == (0, 1) and al.partner[:3] == (2, 2, 3)


def test_embeddings_rejected():
    tokens = {"l": [[(S, 1.0), (torch.zeros(768), 1.0), (E, 1.0)]]}
    with pytest.raises(ValueError, match="textual-inversion embeddings are not supported in concepts"):
        token_chunks(tokens)
    with pytest.raises(ValueError, match="integer token id"):
        token_chunks([[S, "cat", E]])


# ---- (8) concept pairs and templates ------------------------------------------------------


def test_templates_shape():
    assert set(TEMPLATES) == set(CONCEPT_TYPES)
    for kind, templates in TEMPLATES.items():
        assert "{}" in templates, kind
        assert len(set(templates)) == len(templates)
        assert all(t.count("{}") == 1 for t in templates)
    assert 6 <= len(TEMPLATES["object"]) <= 8 and 6 <= len(TEMPLATES["style"]) <= 8
    assert 5 <= len(TEMPLATES["nudity"]) <= 8


def test_expand_style():
    pairs = expand(ConceptPair("Van Gogh", "a painting", "style"))
    assert len(pairs) == len(TEMPLATES["style"])
    assert pairs[0] == ("Van Gogh", "a painting")
    assert ("a painting by Van Gogh", "a painting by a painting") in pairs
    assert ("art in the style of Van Gogh", "art in the style of a painting") in pairs


def test_expand_empty_anchor_strips_the_slot():
    pairs = dict(expand(ConceptPair("cat", "", "object")))
    assert pairs["cat"] == ""
    assert pairs["a photo of a cat"] == "a photo of a"
    assert pairs["cat in a scene"] == "in a scene"
    assert fill("an image of {}, detailed", "") == "an image of, detailed"
    nudity = dict(expand(ConceptPair("nude", concept_type="nudity")))
    assert nudity["a nude person"] == "a person"
    assert nudity["nude body"] == "body"


def test_expand_custom_lines():
    custom = ConceptPair("cat", "dog", "custom", ("a {} on a sofa", "  a  {}  on a sofa ", "{}"))
    assert expand(custom) == [("cat", "dog"), ("a cat on a sofa", "a dog on a sofa")]

    added = ConceptPair("cat", "dog", "object", "a photo of a {}\n\na {} on a sofa\n")
    pairs = expand(added)
    assert added.prompts == ("a photo of a {}", "a {} on a sofa")
    assert len(pairs) == len(TEMPLATES["object"]) + 1
    assert pairs[-1] == ("a cat on a sofa", "a dog on a sofa")
    assert len(set(pairs)) == len(pairs)


def test_concept_pair_normalises():
    pair = ConceptPair("  Van   Gogh ", None, "Style", ["a {} print"])
    assert (pair.target, pair.anchor, pair.concept_type, pair.prompts) == (
        "Van Gogh", "", "style", ("a {} print",))
    hash(pair)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target=""), "target concept is empty"),
        (dict(target="   "), "target concept is empty"),
        (dict(target="Van Gogh", anchor=" van  gogh"), "same concept"),
        (dict(target="cat", concept_type="animal"), "unknown concept_type"),
        (dict(target="cat", prompts=("a photo of a cat",)), "exactly once"),
        (dict(target="cat", prompts=("{} and {}",)), "exactly once"),
        (dict(target="cat", concept_type="custom"), "needs prompt templates"),
        (dict(target="cat", concept_type="custom", prompts="\n \n"), "needs prompt templates"),
    ],
)
def test_concept_pair_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConceptPair(**kwargs)


# ---- (9) end to end with a word-level test tokenizer --------------------------------------


class WordTokenizer:
    """A stand-in for ComfyUI's tokenizer: one id per lower-cased word, 75 per chunk."""

    def __init__(self, special: SpecialTokens):
        self.special = special
        self.vocab: dict[str, int] = {}

    def __call__(self, prompt: str) -> dict[str, list]:
        words = prompt.lower().replace(",", " ,").split()
        stream = [self.vocab.setdefault(w, 100 + len(self.vocab)) for w in words]
        return {"l": [[(t, 1.0) for t in c] for c in comfy_chunks(stream, self.special)]}


@SPECIALS
@pytest.mark.parametrize(
    "pair",
    [
        ConceptPair("Van Gogh", "a painting", "style"),
        ConceptPair("Van Gogh", "", "style"),
        ConceptPair("cat", "tabby house kitten", "object", ("{} " + "very " * 80 + "detailed",)),
        ConceptPair("nude", "", "nudity"),
    ],
)
def test_every_template_aligns(special, pair):
    tokenize = WordTokenizer(special)
    n_target = len(pair.target.split())
    for target_prompt, anchor_prompt in expand(pair):
        al = align_chunks(
            tokenize(target_prompt), tokenize(anchor_prompt), special,
            anchor_empty=not pair.anchor, target_prompt=target_prompt, anchor_prompt=anchor_prompt,
        )
        check_invariants(al)
        assert al.role.count("concept") == n_target
        cols = al.columns()
        assert len(cols) == C
        assert [ROLE_PRIORITY[r] for _, _, r in cols] == sorted(ROLE_PRIORITY[r] for _, _, r in cols)
        if not pair.anchor:
            assert al.partner[:n_target] == (al.keep[-1],) * n_target


# ---- bidirectional encoders (T5): the prefix is paired with the anchor's, not kept ----------

T5 = SpecialTokens(start=None, end=1, pad=0)


def test_bidirectional_prefix_is_paired_with_the_anchors_prefix():
    length = 256  # ComfyUI pads T5 prompts to 256 tokens, without a start token
    target = [A, PHOTO, OF, VAN, GOGH, IN, A, SCENE, T5.end] + [T5.pad] * 247
    anchor = [A, PHOTO, OF, PAINTING, IN, A, SCENE, T5.end] + [T5.pad] * 248
    causal = align_chunks([target], [anchor], T5, context_length=length)
    al = align_chunks([target], [anchor], T5, context_length=length, bidirectional=True)
    assert causal.keep == (0, 1, 2) and al.keep == ()
    assert al.move == tuple(range(length))
    # the prefix pairs position for position; everything after it exactly as in a causal encoder
    assert al.partner[:3] == (0, 1, 2) and al.role[:3] == ("prefix",) * 3
    assert al.partner[3:] == causal.partner and al.role[3:] == causal.role
    assert al.partner[3:6] == (3, 3, 4)  # van → painting, gogh → painting, in → in
    assert al.role[8] == "end" and al.partner[8] == 7
    assert ROLE_PRIORITY["prefix"] == ROLE_PRIORITY["keep"]  # fitted first, as the kept prefix is
