"""Server route for the Concept Pair node's token readout: ``/erasepro/tokens``.

    GET  /erasepro/tokens?target=..&anchor=..&concept_type=..[&prompts=..]
    POST /erasepro/tokens   {"target": .., "anchor": .., "concept_type": .., "prompts": ..}
    -> 200 {"target_tokens": n, "anchor_tokens": m, "overflow": [template, ...],
            "chunk_tokens": 75, "error": null | "why the pair is not valid"}
    -> 400 {"error": "..."} for a malformed request (not a string, too long, unknown type, 64 line
       breaks or more of any kind, a lone surrogate, JSON or "(" nested too deeply)

Token counts are the concept's own tokens (no start / end token) from ComfyUI's CLIP BPE
tokenizer (``comfy.sd1_clip.SDTokenizer``: CLIP-L; SD2's CLIP-H and SDXL's CLIP-G use the
same vocabulary and the same 77-token chunks, so the counts hold for them too). ``overflow``
lists the templates (as ``erasepro_ops.templates.expand`` fills them) whose target or anchor
prompt needs more than one 77-token chunk. Nothing is evaluated: the strings are only
tokenised, exactly as CLIP Text Encode would.

The route is registered only inside a running ComfyUI server (``server.PromptServer.instance``
already exists when custom nodes load); importing this module anywhere else does nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict

from erasepro_ops.templates import CONCEPT_TYPES, ConceptPair, expand, fill
from erasepro_ops.tokens import overflow

ROUTE = "/erasepro/tokens"
MAX_CHARS = 1000  # target, anchor, concept_type
MAX_PROMPTS_CHARS = 8000  # custom templates (several lines)
MAX_PROMPT_LINES = 64
MAX_BODY_BYTES = 32 * 1024
CACHE_SIZE = 256

_lock = threading.Lock()
_tokenizer = None
_cache: OrderedDict = OrderedDict()
_registered = False


class BadRequest(ValueError):
    """The request itself is malformed (answered with HTTP 400)."""


def line_breaks(text: str) -> int:
    """How many line breaks ``text`` holds, counted as the templates are split (``str.splitlines``:
    \\n, \\r, \\r\\n, \\u2028, ...), so no separator gets more templates past the cap."""
    return len((text + "x").splitlines()) - 1


def tokenizer():
    """ComfyUI's CLIP tokenizer, built once (loads the BPE files bundled with ComfyUI)."""
    global _tokenizer
    with _lock:
        if _tokenizer is None:
            import comfy.sd1_clip
            # No embedding directory: "embedding:name" is never resolved to a file.
            _tokenizer = comfy.sd1_clip.SDTokenizer(embedding_directory=None)
        return _tokenizer


def _special_ids(tok) -> set:
    return {t for t in (getattr(tok, "start_token", None), getattr(tok, "end_token", None),
                        getattr(tok, "pad_token", None)) if t is not None}


def _chunks(text: str):
    return tokenizer().tokenize_with_weights(text)


def count_tokens(text: str) -> int:
    """How many tokens ``text`` takes in a prompt (start, end and padding not counted)."""
    if not text.strip():
        return 0
    special = _special_ids(tokenizer())
    n = 0
    for chunk in _chunks(text):
        for item in chunk:
            tid = item[0]
            if isinstance(tid, int) and tid in special:
                continue
            n += 1
    return n


def validate(params) -> dict:
    """The request's fields, checked: strings only, sizes capped, concept_type known.
    Raises :class:`BadRequest`."""
    if not hasattr(params, "get"):
        raise BadRequest("expected a JSON object or query parameters")
    out = {}
    for name, default, cap in (("target", None, MAX_CHARS), ("anchor", "", MAX_CHARS),
                               ("concept_type", "object", MAX_CHARS), ("prompts", "", MAX_PROMPTS_CHARS)):
        value = params.get(name, default)
        if value is None:
            raise BadRequest(f"'{name}' is required")
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string")
        if len(value) > cap:
            raise BadRequest(f"'{name}' is longer than {cap} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): the tokenizer cannot read it
            raise BadRequest(f"'{name}' is not valid Unicode text (it holds a lone surrogate)") from None
        out[name] = value
    out["concept_type"] = out["concept_type"].strip().lower()
    if out["concept_type"] not in CONCEPT_TYPES:
        raise BadRequest(f"'concept_type' must be one of {', '.join(CONCEPT_TYPES)}")
    if line_breaks(out["prompts"]) >= MAX_PROMPT_LINES:
        raise BadRequest(f"'prompts' has more than {MAX_PROMPT_LINES} lines")
    return out


def token_report(target: str, anchor: str = "", concept_type: str = "object", prompts: str = "") -> dict:
    """Token counts of target and anchor and the templates that overflow one 77-token chunk.
    Arguments must already be validated (:func:`validate`)."""
    key = (target, anchor, concept_type, prompts)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return dict(_cache[key])
    tok = tokenizer()
    result = {"target_tokens": count_tokens(target), "anchor_tokens": count_tokens(anchor),
              "overflow": [], "chunk_tokens": int(tok.max_length) - 2, "error": None}
    try:
        pair = ConceptPair(target=target, anchor=anchor, concept_type=concept_type, prompts=prompts)
    except ValueError as e:  # a pair the Concept Pair node would reject: say why, counts still shown
        result["error"] = str(e)
    else:
        prompts_to_template = {}
        for template in pair.templates:  # the same order and de-duplication as expand()
            prompts_to_template.setdefault((fill(template, pair.target), fill(template, pair.anchor)), template)
        for target_prompt, anchor_prompt in expand(pair):
            if any(p and overflow(_chunks(p)) for p in (target_prompt, anchor_prompt)):
                result["overflow"].append(prompts_to_template.get((target_prompt, anchor_prompt), target_prompt))
    with _lock:
        _cache[key] = dict(result)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def _register(routes) -> None:
    import asyncio

    from aiohttp import web

    async def answer(params):
        try:
            args = validate(params)
        except BadRequest as e:
            return web.json_response({"error": str(e)}, status=400)
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, lambda: token_report(args["target"], args["anchor"], args["concept_type"], args["prompts"]))
        except RecursionError:  # ComfyUI's prompt parser recurses once per "(" level
            return web.json_response({"error": "the text nests '(' too deeply for ComfyUI's prompt parser"},
                                     status=400)
        except Exception as e:  # never a traceback to the browser
            logging.warning("[ErasePro] %s failed: %s", ROUTE, e)
            return web.json_response({"error": f"tokenizer failed: {type(e).__name__}"}, status=500)
        return web.json_response(data)

    @routes.get(ROUTE)
    async def get_tokens(request):
        if len(request.query_string) > 4 * (3 * MAX_CHARS + MAX_PROMPTS_CHARS):
            return web.json_response({"error": "query too long"}, status=400)
        for name in request.query:
            if len(request.query.getall(name)) > 1:
                return web.json_response({"error": f"'{name}' given more than once"}, status=400)
        return await answer(request.query)

    @routes.post(ROUTE)
    async def post_tokens(request):
        if request.content_length is None or request.content_length > MAX_BODY_BYTES:
            return web.json_response({"error": f"body missing or over {MAX_BODY_BYTES} bytes"}, status=400)
        raw = await request.content.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            return web.json_response({"error": f"body over {MAX_BODY_BYTES} bytes"}, status=400)
        import json
        try:
            params = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return web.json_response({"error": "body is not JSON"}, status=400)
        except RecursionError:
            return web.json_response({"error": "body is JSON nested too deeply"}, status=400)
        if not isinstance(params, dict):
            return web.json_response({"error": "expected a JSON object"}, status=400)
        return await answer(params)


def register_routes() -> bool:
    """Add the route to ComfyUI's PromptServer when one is running in this process (the
    ``server`` module already imported by ComfyUI's main.py); otherwise do nothing."""
    global _registered
    if _registered:
        return True
    srv = sys.modules.get("server")
    instance = getattr(getattr(srv, "PromptServer", None), "instance", None)
    routes = getattr(instance, "routes", None)
    if routes is None:
        return False
    try:
        _register(routes)
    except Exception as e:  # the nodes work without the readout
        logging.warning("[ErasePro] token route not registered: %s", e)
        return False
    _registered = True
    return True
