"""The pipeline's plain values: the settings record an edit stores, the summary's dict form, the
model-family descriptions. No ComfyUI model needed."""

import json

from erasepro_ops.templates import ConceptPair
from erasepro_ops.family import FAMILIES, SDXL
from erasepro_ops.linalg import DEFAULT_RTOL
from erasepro_ops.request import Request
from erasepro_ops.summary import SiteFigure, Summary

CONCEPTS = (ConceptPair("van gogh", "a painting", "style"), ConceptPair("nudity", "", "nudity", ("{} on a beach",)))


def test_the_settings_record_holds_every_setting_and_gives_the_request_back():
    request = Request(CONCEPTS, progressive_layers=2, features="last_token", rtol=1e-6, preserve=("a cat",),
                      template_padding=77, context_templates=3, retain_strength=0.0)
    record = json.loads(json.dumps(request.settings_record("sd15")))  # as stored in the file
    assert record["features"] == "last_token" and record["rtol"] == 1e-6 and record["family"] == "sd15"
    assert Request.from_settings(record) == request


def test_a_settings_record_from_an_older_version_takes_the_defaults_it_was_made_with():
    record = Request(CONCEPTS[:1]).settings_record("sd15")
    for key in ("features", "rtol", "context_templates", "template_padding", "fit_padding"):
        del record[key]
    old = Request.from_settings(record)
    assert old.features == "all" and old.rtol == DEFAULT_RTOL
    assert not old.fit_padding  # older versions never lowered the template padding
    assert old == Request(CONCEPTS[:1], fit_padding=False)


def test_the_summary_dict_round_trips_and_has_no_erasepro_keys_for_uce():
    site = SiteFigure("in.1.k", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "deep", 0.1, 0.0)
    ours = Summary(method="erasepro", family="sd15", concepts=("a → b",), sites=(site,), train_residual=1e-7,
                   deep_burden=0.2, unaligned_energy=0.0, overflow_damped=False, exact_parts=("prefixes",),
                   least_squares_parts=(), warnings=("w",))
    d = json.loads(json.dumps(ours.to_dict()))
    assert d["sites"][0]["name"] == "in.1.k" and d["exact_parts"] == ["prefixes"] and d["warnings"] == ["w"]
    assert Summary.from_dict(d) == ours
    uce = Summary(method="uce").to_dict()
    assert not {"unaligned_energy", "overflow_damped", "exact_parts", "least_squares_parts"} & set(uce)
    assert Summary.from_dict({"method": "uce", "unknown_key": 1}).method == "uce"  # older or newer files


def test_the_families_describe_their_text_path():
    assert [e.name for e in SDXL.encoders] == ["clip_l", "clip_g"] and {e.segment for e in SDXL.encoders} == {0}
    assert SDXL.text_width is None and SDXL.pooled_encoders == ("clip_g",)
    assert SDXL.pooled_site.endswith("label_emb.0.0.weight")
    sd3 = FAMILIES["sd3"]  # CLIP-L‖G (one segment), then T5 along the tokens, 4096 wide
    assert [(e.name, e.segment, e.optional, e.context) for e in sd3.encoders] == [
        ("clip_l", 0, False, 77), ("clip_g", 0, False, 77), ("t5xxl", 1, True, 77)]
    assert sd3.text_width == 4096 and sd3.pooled_encoders == ("clip_l", "clip_g")
    assert FAMILIES["sd15"].encoders[0].shallow_key(3) == "clip_l.transformer.text_model.encoder.layers.3.mlp.fc2.weight"
    assert FAMILIES["sd2"].pooled_site is None
