"""The shipped context sentences: well formed, and disjoint from what they are measured against."""

import json
from pathlib import Path

import pytest

from erasepro_ops.templates import TEMPLATES, ConceptPair, expand
from erasepro_ops.contexts import MAX_CONTEXT_TEMPLATES, context_pairs, context_templates
from erasepro_ops.alignment import ROLE_PRIORITY
from erasepro_ops.retain import retain_prompts

HELD_OUT = json.loads((Path(__file__).parents[1] / "benchmarks" / "held_out.json").read_text())


@pytest.mark.parametrize("kind", ["object", "style", "nudity"])
def test_every_built_in_type_has_distinct_well_formed_sentences_none_held_out(kind):
    sentences = context_templates(kind, MAX_CONTEXT_TEMPLATES)
    assert len(sentences) == MAX_CONTEXT_TEMPLATES == len(set(sentences))
    assert all(s.count("{}") == 1 for s in sentences)
    assert not set(sentences) & set(TEMPLATES[kind])
    assert not set(sentences) & set(HELD_OUT[kind])  # the benchmark's held-out residual stays held out
    assert not {s.replace("{}", "").strip() for s in sentences} & set(retain_prompts())


def test_custom_pairs_get_none_and_a_pairs_own_templates_are_not_repeated():
    assert context_templates("custom", 5) == ()
    pair = ConceptPair("cat", "dog", "object", prompts=(context_templates("object", 1)[0],))
    extra = context_pairs(pair, 3, set(expand(pair)))
    assert len(extra) == 2 and not set(extra) & set(expand(pair))
    with pytest.raises(ValueError, match="between 0 and"):
        context_templates("object", MAX_CONTEXT_TEMPLATES + 1)


def test_padding_shrinks_only_when_the_erasure_overflows_the_rank_budget():
    from erasepro_ops.contexts import PADDING_BUDGET_SHARE, fitted_padding
    budget, templates = 768, 80
    assert fitted_padding(8, 560, templates, budget) == 0  # ten concepts: no padding fits half the budget
    p = fitted_padding(8, 200, templates, budget)
    assert 200 + p * templates <= PADDING_BUDGET_SHARE * budget < 200 + (p + 1) * templates
    assert fitted_padding(3, 0, 8, budget) == 3  # never above what was asked


def test_templates_share_one_concepts_padding():
    from erasepro_ops.contexts import PADDING_TEMPLATES, spread_padding
    assert PADDING_TEMPLATES == 8
    assert spread_padding(8, 8) == 8  # one concept: its 8 templates keep the default 8 positions
    assert spread_padding(77, 8) == 77  # and every position when asked for
    assert spread_padding(8, 5) == 8  # never above what was asked
    assert spread_padding(8, 24) == 2 and spread_padding(8, 40) == 1  # three and five concepts
    assert spread_padding(8, 80) == 0  # ten
    assert spread_padding(77, 24) == 25
    assert spread_padding(0, 1) == 0


def test_three_concepts_spread_their_template_padding(host):
    """Three concepts (24 templates) align 2 padding positions each instead of 8, well inside the
    rank budget, and the summary says why."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import build_batches
    from erasepro_ops.request import Request

    model, clip = host.build("sd15", "tiny", seed=0)
    h = ComfyHost(model, clip)
    concepts = (ConceptPair("van gogh", "a painting", "style"), ConceptPair("golden retriever", "an object", "object"),
                ConceptPair("french horn", "an object", "object"))  # two tokens each, as their anchors
    b = build_batches(h, h.architecture(), Request(concepts, template_padding=8))
    assert b.n_target == 24
    assert sum(g == ROLE_PRIORITY["pad"] for g in b.columns.groups.tolist()) == 2 * 24
    assert [w for w in b.warnings() if "lowered" in w] == [
        "template_padding 8 lowered to 2: the 24 templates of 3 concept(s) share the padding positions of 8 (64 in all)"]
    kept = build_batches(h, h.architecture(), Request(concepts, template_padding=8, fit_padding=False))
    assert sum(g == ROLE_PRIORITY["pad"] for g in kept.columns.groups.tolist()) == 8 * 24


def test_ten_concepts_drop_their_template_padding_and_say_so(host):
    """On SD1.5 (768 directions) ten concepts with 8 padding positions per template would overflow;
    one concept keeps its padding."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import build_batches
    from erasepro_ops.request import Request

    model, clip = host.build("sd15", "tiny", seed=0)
    h = ComfyHost(model, clip)
    arch = h.architecture()
    names = ["van gogh", "monet", "picasso", "dali", "rembrandt", "bicycle", "teapot", "violin", "castle", "pizza"]
    concepts = tuple(ConceptPair(n, "a painting" if i < 5 else "an object", "style" if i < 5 else "object")
                     for i, n in enumerate(names))
    many = build_batches(h, arch, Request(concepts, template_padding=8))
    assert many.columns.n_erasure <= arch.context_width  # fits now
    assert not any(g == ROLE_PRIORITY["pad"] for g in many.columns.groups.tolist())
    assert any("template_padding 8 lowered to 0" in w for w in many.warnings())
    one = build_batches(h, arch, Request(concepts[:1], template_padding=8))
    assert sum(g == ROLE_PRIORITY["pad"] for g in one.columns.groups.tolist()) == 8 * one.n_target
    assert not one.warnings()


def test_a_pair_of_different_token_counts_aligns_no_padding(host):
    """"parachute" (one token) → "an object" (two): its padding columns would be the anchor's one
    position along; they are dropped unless every padding position is asked for."""
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.batches import build_batches
    from erasepro_ops.request import Request

    model, clip = host.build("sd15", "tiny", seed=0)
    h = ComfyHost(model, clip)
    arch = h.architecture()
    pads = lambda b: sum(g == ROLE_PRIORITY["pad"] for g in b.columns.groups.tolist())  # noqa: E731
    same = (ConceptPair("golden retriever", "an object", "object"),)
    shifted = (ConceptPair("parachute", "an object", "object"),)
    both = build_batches(h, arch, Request(same + shifted, template_padding=8))
    assert [al.shifted for al in both.alignments] == [False] * 8 + [True] * 8
    assert pads(build_batches(h, arch, Request(same, template_padding=8))) == 8 * 8
    assert pads(build_batches(h, arch, Request(shifted, template_padding=8))) == 0
    assert pads(both) == 4 * 8  # two concepts share one concept's padding; the shifted one's is dropped
    every = build_batches(h, arch, Request(shifted, template_padding=77))
    assert pads(every) > 8 * 60  # every position, as asked
