"""/erasepro/tokens (nodes/routes.py): the Concept Pair node's token readout.

In process: validation, counts with ComfyUI's CLIP tokenizer, the overflow list, registration
only inside a server. Live: the route on the real ComfyUI server (GET and POST, with and without
the /api prefix) and its 400 answers for malformed input.
"""
from __future__ import annotations

import json
import sys
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest

import comfy_host


@pytest.fixture(scope="module")
def routes():
    comfy_host.load_pack()
    return sys.modules[comfy_host.PACK_MODULE + ".nodes.routes"]


# ---------------------------------------------------------------------------------------
# In process
# ---------------------------------------------------------------------------------------
def test_counts_with_comfy_clip_tokenizer(routes):
    import comfy.sd1_clip
    tok = comfy.sd1_clip.SDTokenizer()
    ids = tok.tokenizer("Van Gogh")["input_ids"][1:-1]  # without start / end
    r = routes.token_report("Van Gogh", "a painting", "style")
    assert r == {"target_tokens": len(ids), "anchor_tokens": 2, "overflow": [], "chunk_tokens": 75, "error": None}
    assert routes.token_report("", "", "object")["target_tokens"] == 0
    # ComfyUI's prompt syntax is tokenised as CLIP Text Encode would (weights are not tokens)
    assert routes.token_report("(Van Gogh:1.3)", "", "style")["target_tokens"] == len(ids)


def test_overflow_lists_templates_over_one_chunk(routes):
    word = " ".join(["word"] * 70)  # 70 tokens: fits alone, not inside the longer templates
    r = routes.token_report(word, "a dog", "object")
    assert r["target_tokens"] == 70 and r["error"] is None
    assert r["overflow"] and "{}" not in r["overflow"], r
    assert all("{}" in t for t in r["overflow"])
    assert "a close-up photo of {}" in r["overflow"]  # 6 template tokens + 70 > 75
    # anchor overflow counts too; custom templates are checked
    assert routes.token_report("cat", word, "object")["overflow"]
    long_tpl = "a {} " + " ".join(["long"] * 80)
    r = routes.token_report("cat", "dog", "custom", long_tpl)
    assert r["overflow"] == [" ".join(long_tpl.split())], r


def test_invalid_pair_reports_why(routes):
    r = routes.token_report("Van Gogh", "van  gogh", "style")
    assert "same concept" in r["error"] and r["target_tokens"] == 2
    assert "custom" in routes.token_report("x", "", "custom")["error"]
    assert "exactly once" in routes.token_report("x", "", "object", "no placeholder")["error"]


@pytest.mark.parametrize("params, message", [
    ({"anchor": "a"}, "'target' is required"),
    ({"target": 5}, "must be a string"),
    ({"target": "x", "anchor": ["a"]}, "must be a string"),
    ({"target": "x", "concept_type": None}, "is required"),
    ({"target": "x" * 1001}, "longer than 1000"),
    ({"target": "x", "anchor": "y" * 1001}, "longer than 1000"),
    ({"target": "x", "concept_type": "styles"}, "must be one of"),
    ({"target": "x", "concept_type": "__import__('os')"}, "must be one of"),
    ({"target": "x", "prompts": "{}\n" * 100}, "more than 64 lines"),
    ({"target": "x", "prompts": "y" * 8001}, "longer than 8000"),
])
def test_validate_rejects(routes, params, message):
    with pytest.raises(routes.BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        routes.validate(params)


def test_validate_accepts_and_normalises(routes):
    v = routes.validate({"target": "x" * 1000, "concept_type": " Style "})
    assert v == {"target": "x" * 1000, "anchor": "", "concept_type": "style", "prompts": ""}
    with pytest.raises(routes.BadRequest):
        routes.validate(["target"])


def test_cache_is_bounded(routes, monkeypatch):
    monkeypatch.setattr(routes, "CACHE_SIZE", 3)
    for i in range(6):
        routes.token_report(f"thing{i}", "", "object")
    assert len(routes._cache) <= 3


def test_registers_only_inside_a_server(routes, monkeypatch):
    monkeypatch.setattr(routes, "_registered", False)
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert routes.register_routes() is False  # plain import / CLI / tests: nothing to register on

    from aiohttp import web
    table = web.RouteTableDef()
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(routes=table)})
    monkeypatch.setitem(sys.modules, "server", fake)
    assert routes.register_routes() is True
    assert routes.register_routes() is True  # once only
    assert sorted((r.method, r.path) for r in table) == [("GET", routes.ROUTE), ("POST", routes.ROUTE)]


# ---------------------------------------------------------------------------------------
# Live, on the real ComfyUI server
# ---------------------------------------------------------------------------------------
def _call(base, path, body=None, method=None, raw=None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers=headers or ({"Content-Type": "application/json"} if data else {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "null")


def test_live_get_and_post(comfy_server, routes):
    want = routes.token_report("golden retriever", "a dog", "object")
    q = urllib.parse.urlencode({"target": "golden retriever", "anchor": "a dog", "concept_type": "object"})
    for prefix in ("", "/api"):
        assert _call(comfy_server, f"{prefix}/erasepro/tokens?{q}") == (200, want)
        assert _call(comfy_server, f"{prefix}/erasepro/tokens",
                     {"target": "golden retriever", "anchor": "a dog", "concept_type": "object"}) == (200, want)


def test_live_rejects_malformed(comfy_server):
    base = comfy_server + "/api/erasepro/tokens"
    cases = [
        _call(base, "?" + urllib.parse.urlencode({"target": "x", "concept_type": "nope"})),
        _call(base, "?" + urllib.parse.urlencode({"target": "x" * 1001})),
        _call(base, "?target=a&target=b"),
        _call(base, "", {"target": 5}),
        _call(base, "", {"target": "x", "anchor": {"__class__": "y"}}),
        _call(base, "", ["x"]),
        _call(base, "", raw=b"{not json", method="POST", headers={"Content-Type": "application/json"}),
        _call(base, "", raw=json.dumps({"target": "x", "prompts": "y" * 40000}).encode(), method="POST",
              headers={"Content-Type": "application/json"}),
    ]
    for status, payload in cases:
        assert status == 400 and isinstance(payload.get("error"), str) and payload["error"], (status, payload)


def test_live_never_evaluates(comfy_server):
    code = "__import__('os').system('touch /tmp/erasepro-pwned')"
    status, payload = _call(comfy_server, "/api/erasepro/tokens", {"target": code, "concept_type": "object"})
    assert status == 200 and payload["target_tokens"] > 5 and payload["error"] is None
    import os
    assert not os.path.exists("/tmp/erasepro-pwned")
