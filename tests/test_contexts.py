"""The shipped context sentences: well formed, and disjoint from what they are measured against."""

import json
from pathlib import Path

import pytest

from erasepro_ops.templates import TEMPLATES, ConceptPair, expand
from erasepro_ops.contexts import MAX_CONTEXT_TEMPLATES, context_pairs, context_templates
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
