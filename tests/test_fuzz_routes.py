"""Seeded fuzz of /erasepro/tokens requests (one of three fuzz families; the shared parts:
fuzz_support.py).

The route's handlers on an in-process aiohttp server, with random and
malformed query strings and JSON bodies (wrong types, huge and unicode strings, nested objects,
missing keys, too many lines of any line break, bad UTF-8, deep nesting, chunked bodies).
Contract: 200 with a well-formed result or 400 with ``{"error": "..."}``, never a 500; where the
route's documented rules decide (strings within their caps, a known concept type, under 64
lines), exactly the answer they give.

The requests are drawn from ``SEED``, the same on every run; the test prints its count and outcome
tally and asserts it ran at least its floor.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
from dataclasses import dataclass

import comfy_host as H
from fuzz_support import SEED, Tally, dumps, quiet_logs
from test_export import pack  # noqa: F401  (fixture)

# Floor: the family must try at least this many cases (the count is printed).
ROUTE_FLOOR = 1500

FIELDS = ("target", "anchor", "concept_type", "prompts")
TEXT_ATOMS = ["van gogh", "a painting", "golden retriever", "nudity", "a", "the", " ", "  ", ",", ".", "(", ")",
              "(van gogh:1.3)", "[x]", "\\(", "\\)", "embedding:easynegative", "{}", "{}", "{", "}", "{} by {}", "\n",
              "\r", "\r\n", "\u2028", "\x85", "\x0b", "\x0c", "\t", "\0", "é", "日本語", "🙂", "👨‍👩‍👧", "\u202e",
              "\ufeff", "z\u0338\u0322", "ﷺ", "<|endoftext|>", "</w>", "%20", "&", "=", "+", "#", "?", "\\", "\"",
              "'", "Object", "STYLE", " style ", "custom", "word " * 12]


def text(rng: random.Random, cap: int) -> str:
    """A string of random atoms; now and then right at, just past or far past ``cap``."""
    s = "".join(rng.choice(TEXT_ATOMS) for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 8])))
    r = rng.random()
    if r < 0.015:
        s = (s or "x") * (cap // max(len(s), 1) + 1)
        s = s[:rng.choice([cap - 1, cap, cap + 1, cap + 2])]
    elif r < 0.025:
        s = "w" * (cap * 5)
    return s


def json_value(rng: random.Random, depth: int = 0):
    """Any JSON value, nested now and then."""
    kind = rng.choice(["str", "str", "int", "float", "bool", "null", "list", "dict"] if depth < 4 else ["str", "int"])
    if kind == "str":
        return text(rng, 1000)
    if kind == "int":
        return rng.choice([0, -1, 7, 2 ** 64, -2 ** 70])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-320])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [json_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(FIELDS + ("x", "")): json_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def request_fields(rng: random.Random) -> dict:
    """Query or body fields: some of the route's, of the right type mostly, plus unknown ones."""
    caps = {"target": 1000, "anchor": 1000, "concept_type": 1000, "prompts": 8000}
    out = {}
    for name in FIELDS:
        r = rng.random()
        if r < 0.15 and name != "target":
            continue  # missing (a default)
        if r < 0.04:
            continue  # target missing
        if name == "concept_type" and rng.random() < 0.85:
            out[name] = rng.choice(["object", "style", "nudity", "custom", " Style ", "STYLE", "styles", "", "obj"])
        elif name == "prompts" and rng.random() < 0.3:  # templates, one a line, at and around the line cap
            sep = rng.choice(["\n", "\r", "\r\n", "\u2028", "\x85", "\x0b", "\n\n"])
            n = rng.choice([1, 2, 3, 64, 64, 65, 66, 200, 1300] + [63] * (rng.random() < 0.1))
            out[name] = sep.join(f"{rng.choice(['a photo of', 'art by', ''])} {{}} {i}" for i in range(n))[:8000]
        else:
            out[name] = text(rng, caps[name])
    if rng.random() < 0.1:
        out[rng.choice(["x", "Target", "__proto__", ""])] = text(rng, 20)
    return out


def expected_status(routes, params) -> int:
    """The route's answer for parsed fields, from its documented rules: 400 unless a JSON object whose
    fields are strings within their caps (target present), concept_type known, prompts under 64 lines."""
    if not isinstance(params, dict):
        return 400
    caps = {"target": routes.MAX_CHARS, "anchor": routes.MAX_CHARS, "concept_type": routes.MAX_CHARS,
            "prompts": routes.MAX_PROMPTS_CHARS}
    for name, cap in caps.items():
        v = params.get(name, "" if name != "target" else None)
        if not isinstance(v, str) or len(v) > cap or any(0xD800 <= ord(ch) <= 0xDFFF for ch in v):
            return 400
    from erasepro_ops.templates import CONCEPT_TYPES
    if params.get("concept_type", "object").strip().lower() not in CONCEPT_TYPES:
        return 400
    if len((params.get("prompts", "") + "x").splitlines()) - 1 >= routes.MAX_PROMPT_LINES:  # line breaks of any kind
        return 400
    return 200


@dataclass
class RouteCase:
    """One request and, where the route's rules decide it, its status."""

    label: str
    method: str
    target: str  # path and query (GET)
    body: bytes | None = None
    expect: int | None = None  # 200 or 400 when the rules decide it (None: either)
    chunked: bool = False


def get_case(rng: random.Random, routes) -> RouteCase:
    from urllib.parse import quote, urlencode
    r = rng.random()
    if r < 0.75:
        params = request_fields(rng)
        target = f"{routes.ROUTE}?{urlencode(params, quote_via=quote)}"
        return RouteCase(f"GET {sorted(params)}", "GET", target,
                         expect=expected_status(routes, params) if len(target) <= 8190 else 400)
    if r < 0.85:  # a field twice
        name = rng.choice(FIELDS)
        return RouteCase(f"GET {name} twice", "GET", f"{routes.ROUTE}?target=x&{name}=a&{name}=b", expect=400)
    raw = rng.choice(["", "?", "?&&&", "?=", "?=x", "?target", "?target=", "?target=%", "?target=%G1", "?target=%%",
                      "?target=%FF%FE", "?target=%ED%A0%80", "?target=%00", "?target=a%00b&concept_type=STYLE",
                      "?target=x&concept_type=%E2%80%AE", "?target=" + "%28" * 600 + "x",
                      "?target=x&prompts=" + "%7B%7D%0D" * 300, "?target=" + "a" * 40_000, "?" + "&" * 5000])
    return RouteCase(f"GET raw {raw[:40]!r}", "GET", routes.ROUTE + raw)


def post_case(rng: random.Random, routes) -> RouteCase:
    r = rng.random()
    if r < 0.7:
        params = request_fields(rng)
        if rng.random() < 0.15:  # a field of another JSON type
            params[rng.choice(FIELDS)] = json_value(rng)
        body = json.dumps(params).encode()
        return RouteCase(f"POST {dumps(params)[:80]}", "POST", routes.ROUTE, body,
                         expected_status(routes, params) if len(body) <= routes.MAX_BODY_BYTES else 400)
    if r < 0.8:
        value = json_value(rng)
        return RouteCase(f"POST {dumps(value)[:60]}", "POST", routes.ROUTE, json.dumps(value).encode(),
                         expected_status(routes, value))
    n = rng.choice([100, 1000, 5000, 16000])
    raw, expect = rng.choice([
        (b"", 400), (b"{", 400), (b"{not json", 400), (b"\xff\xfe{}", 400), (b"\xef\xbb\xbf{\"target\": \"x\"}", 400),
        (b"[" * n + b"]" * n, 400), (b"{\"target\": " + b"[" * n + b"]" * n + b"}", 400),
        (b"{\"target\": \"x\", \"anchor\": {\"a\": " * 200 + b"1" + b"}" * 400, 400),
        (b"{\"target\": " + b"1" * 5000 + b"}", 400), (b"{\"target\": NaN}", 400), (b"{\"target\": \"\\ud800\"}", 400),
        (b"{\"target\": \"x\", \"target\": \"y\"}", 200), (b"{\"target\": \"x\"}" + b" " * 40_000, 400),
        (json.dumps({"target": "x", "prompts": "(" * 3990 + "{}" + ")" * 3990}).encode(), None),
        (json.dumps({"target": "x", "prompts": "\r".join(f"{{}}{i}" for i in range(1300))[:8000]}).encode(), 400),
        (b"null", 400), (b"\"target\"", 400), (b"7", 400), (b"[]", 400), (b"{}", 400),
    ])
    if rng.random() < 0.05:  # sent chunked, without a Content-Length: refused before it is read
        return RouteCase(f"POST chunked {raw[:40]!r}", "POST", routes.ROUTE, raw, 400, chunked=True)
    return RouteCase(f"POST raw {raw[:40]!r}", "POST", routes.ROUTE, raw, expect)


def check_answer(case: RouteCase, status: int, text_: str) -> str:
    assert status in (200, 400), f"{case.label}: HTTP {status}: {text_[:300]}"
    try:
        body = json.loads(text_)
    except ValueError:
        # aiohttp's own HTTP parser refuses a request line over 8190 bytes before any route runs (as it
        # does in ComfyUI's server, which keeps the default)
        assert status == 400 and len(case.target) > 8190 and "8190 bytes" in text_, \
            f"{case.label}: HTTP {status} without a JSON body: {text_[:300]!r}"
        return "400 (aiohttp: request line over 8190 bytes)"
    if status == 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], f"{case.label}: {body}"
        return "400"
    assert set(body) == {"target_tokens", "anchor_tokens", "overflow", "chunk_tokens", "error"}, f"{case.label}: {body}"
    assert all(type(body[k]) is int and body[k] >= 0 for k in ("target_tokens", "anchor_tokens")), case.label
    assert body["chunk_tokens"] == 75 and all(isinstance(t, str) for t in body["overflow"]), case.label
    assert body["error"] is None or (isinstance(body["error"], str) and body["error"]), case.label
    return "200, the pair refused" if body["error"] else "200"


ROUTE_CASES = 2000


def test_token_route_answers_200_or_400(pack):
    """The route's own handlers on an in-process aiohttp server: every request answered 200 or 400."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from yarl import URL
    routes = sys.modules[f"{H.PACK_MODULE}.nodes.routes"]
    table = web.RouteTableDef()
    routes._register(table)
    app = web.Application()
    app.add_routes(table)
    rng = random.Random(SEED)
    cases = [(get_case if rng.random() < 0.45 else post_case)(rng, routes) for _ in range(ROUTE_CASES)]
    tally = Tally("/erasepro/tokens requests")

    async def run():
        async with TestClient(TestServer(app)) as client:
            for i, case in enumerate(cases):
                case.label = f"case {i}: {case.label}"
                if case.method == "GET":
                    resp = await client.get(URL(case.target, encoded=True))
                else:
                    async def chunks(data=case.body):
                        yield data
                    resp = await client.post(case.target, data=chunks() if case.chunked else case.body,
                                             headers={"Content-Type": "application/json"})
                status, text_ = resp.status, await resp.text()
                outcome = check_answer(case, status, text_)
                if case.expect is not None:
                    assert status == case.expect, f"{case.label}: HTTP {status} {text_[:200]}, expected {case.expect}"
                tally.add(outcome)

    with quiet_logs():
        asyncio.run(run())
    print(f"\n{tally.report()}")
    ok = sum(v for k, v in tally.outcomes.items() if k.startswith("200"))
    assert tally.total >= ROUTE_FLOOR and ok >= 300 and tally.total - ok >= 300
