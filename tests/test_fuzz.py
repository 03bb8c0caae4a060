"""Seeded fuzz of what users hand the pack: edit files, workflow JSON, token-route requests.

Three families of thousands of cases each, drawn from one fixed seed (``SEED``: the same cases on
every run); each test prints its count and outcome tally and asserts it ran at least its floor.

1. **Edit files**: a small synthetic ErasureEdit on the tiny SD1.5 model, saved by Save ErasePro
   Edit as float32, float16 and bfloat16 (header keys sorted: safetensors writes them in another
   order in every process), then damaged: bit flips in the header and in the tensor data,
   truncations, appended bytes, header edits (metadata removed, changed, of the wrong JSON type;
   site entries and their numbers; tensor dtype, shape and offsets, huge shapes such as 2**40),
   tensors rewritten (other dtypes, one ulp, swapped, reshaped, missing, extra), files that are no
   edit at all (pickles, zip archives, text). Each is read by ``export.load`` and Load ErasePro Edit
   (every file that loads, every third refused one); a sample of the loaded ones goes on through
   Apply Erased UNet, with and without ``ignore_fingerprint``.
   Contract: refused with the pack's own error (``EditFileError``; ``EraseProError`` from the nodes)
   whose message says what is wrong, or loaded as exactly the original edit (every site's ``up`` and
   ``down`` bit for bit, its checksummed figures, and the patches Apply puts on MODEL and CLIP). A
   flip in the tensor data is refused by the per-site checksum (by the NaN/Inf or alpha check when
   the value became non-finite or is an alpha). Never a raw ``TypeError``/``RecursionError``/
   ``SafetensorError``/..., never an unpickled file, never a huge allocation.
2. **Workflows**: ``workflows/*.json`` and every version of them in git history. Unmutated, each
   converts with ``comfy_server.ui_to_api``, each ErasePro widget value has its input's own type,
   and it passes ComfyUI's ``execution.validate_prompt`` and the pack's input checks. Mutated
   (widget values of wrong types / out of range / missing, unknown inputs, removed links and nodes,
   muted nodes, rewired slots, API inputs replaced): accepted (then the pack's own checks accept or
   refuse it with an EraseProError) or answered with validation messages; never an exception
   escaping, never one raised in the pack's code while ComfyUI validates.
3. **/erasepro/tokens**: the route's handlers on an in-process aiohttp server, with random and
   malformed query strings and JSON bodies (wrong types, huge and unicode strings, nested objects,
   missing keys, too many lines of any line break, bad UTF-8, deep nesting, chunked bodies).
   Contract: 200 with a well-formed result or 400 with ``{"error": "..."}``, never a 500; where the
   route's documented rules decide (strings within their caps, a known concept type, under 64
   lines), exactly the answer they give.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import pickle
import random
import resource
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import comfy_host as H
from test_export import apply_node, load_node, loras, pack, save_node  # noqa: F401  (fixtures: loras, pack)

REPO = Path(__file__).resolve().parents[1]
SEED = 20251201

# Floors: each family must try at least this many cases (the counts are printed).
EDIT_FLOOR, WORKFLOW_FLOOR, ROUTE_FLOOR = 2500, 1500, 1500


@dataclass
class Tally:
    """Cases run per family and how each ended."""

    family: str
    outcomes: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def report(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return f"[fuzz] {self.family}: {self.total} cases in {time.perf_counter() - self.t0:.1f} s ({parts})"


@contextlib.contextmanager
def quiet_logs():
    """ComfyUI logs every refused prompt and the pack every legacy file: silence them for the loop."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class Raw(str):
    """JSON text put into a document verbatim (a literal Python's json cannot write: 1e400, 5000 digits)."""


def dumps(obj) -> str:
    """``json.dumps`` with :class:`Raw` values written verbatim (and NaN/Infinity allowed)."""
    raws: list[str] = []

    def swap(o):
        if isinstance(o, Raw):
            raws.append(str(o))
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    text = json.dumps(swap(obj), ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00", ensure_ascii=False), raw)
    return text


# JSON values of every wrong kind, for fields that expect something else.
WEIRD_JSON = [None, True, False, 0, -1, 1, 7, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64, -2 ** 63, 1.5, -0.0,
              float("nan"), float("inf"), "", "3", "x", "é\u2028\u202e", [], [1], [1, 2, 3], [[2, 3]], {},
              {"a": 1}, Raw("1e400"), Raw("-1e400"), Raw("1" * 5000), Raw("[" * 3000 + "]" * 3000)]


def weird(rng: random.Random, strings: bool = True):
    """One of WEIRD_JSON (without plain strings: ``strings=False``)."""
    pool = WEIRD_JSON if strings else [v for v in WEIRD_JSON if type(v) is not str]
    return copy.deepcopy(rng.choice(pool))


# =========================================================================================
# 1. Edit files
# =========================================================================================
# (part, weight key, rank) of the synthetic edit on H.build("sd15", clip_layers=2): text-encoder
# sites whose LoRA names differ in one bit (layers_0 / layers_1), two UNet sites of one shape and rank
# (their tensors can be swapped) and a rank-0 site (metadata only).
EDIT_SITES = [
    ("clip", "clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight", 2),
    ("clip", "clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.weight", 2),
    ("model", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 2),
    ("model", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight", 2),
    ("model", "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", 0),
]
STORAGE = ("float32", "float16", "bfloat16")
_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def synthetic_edit(model, clip):
    """A seeded ErasureEdit on EDIT_SITES, fingerprinted on ``model``/``clip`` like a solve's."""
    from erasepro_comfy.weights import fingerprint_of
    from erasepro_ops.edit import ErasureEdit, SiteEdit
    g = torch.Generator().manual_seed(SEED)
    states = {"model": model.model_state_dict(), "clip": clip.patcher.model_state_dict()}
    sites = []
    for part, key, rank in EDIT_SITES:
        out_dim, in_dim = states[part][key].shape
        up = torch.randn(out_dim, rank, generator=g) * 0.01
        down = torch.randn(rank, in_dim, generator=g)
        figures = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        sites.append(SiteEdit(key, part, "shallow" if part == "clip" else "deep", up, down, *figures))
    fp = fingerprint_of([(model, [s.key for s in sites if s.part == "model"]),
                         (clip.patcher, [s.key for s in sites if s.part == "clip"])])
    concepts = [{"target": "van gogh", "anchor": "a painting", "concept_type": "style", "prompts": []}]
    settings = {"family": "sd15", "method": "erasepro", "progressive_layers": 2, "concepts": concepts,
                "preserve": ["a photo of a dog"], "preserve_strength": 0.0, "rule": "residual_schedule"}
    summary = {"family": "sd15", "train_residual": 3.5e-07, "deep_burden": 0.0625, "solve_seconds": 1.5}
    return ErasureEdit(tuple(sites), settings, summary, fp)


def split_file(data: bytes) -> tuple[int, dict, bytes]:
    """(header length, header, tensor data) of a well-formed safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def canonical(data: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted. safetensors (Rust) writes the metadata
    from a hash map, in another order in every process: sorted, a bit position means one thing."""
    _, header, body = split_file(data)
    return join_file(json.dumps(header, sort_keys=True, ensure_ascii=False), body)


def join_file(header_text: str, body: bytes) -> bytes:
    """A safetensors file: header length, the header padded to 8 bytes as safetensors pads it, data."""
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@dataclass
class Base:
    """One pristine edit file and what it loads to."""

    dtype: str
    data: bytes
    n: int  # header length
    header: dict
    body: bytes
    edit: object  # ErasureEdit: export.load of the pristine file
    deltas: dict  # weight key -> ΔW of every rank > 0 site (what Apply adds)

    @property
    def tensors(self) -> list[str]:
        return sorted(k for k in self.header if k != "__metadata__")

    @property
    def meta(self) -> dict:
        return self.header["__metadata__"]

    def holding(self, byte: int) -> str:
        """The tensor whose data holds ``byte`` (an offset into the data after the header)."""
        return next(k for k in self.tensors if self.header[k]["data_offsets"][0] <= byte < self.header[k]["data_offsets"][1])


@dataclass
class EditCase:
    """One file to load, and what it must give."""

    label: str
    data: bytes
    must_refuse: bool = False
    expect: tuple[str, ...] = ()  # with must_refuse: the message contains one of these


# --- mutations of one file --------------------------------------------------------------------
def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def header_flip(rng, base: Base) -> EditCase:
    bit = rng.randrange(8 * (8 + base.n))
    return EditCase(f"header bit {bit}", flip(base.data, bit))


def data_flip(rng, base: Base) -> EditCase:
    """One bit of one tensor: refused by the checksum unless the value became NaN/Inf or is an alpha."""
    bit = rng.randrange(8 * len(base.body))
    name = base.holding(bit // 8)
    b, e = base.header[name]["data_offsets"]
    data = flip(base.data, 8 * (8 + base.n) + bit)
    start = 8 + base.n
    flipped = torch.frombuffer(bytearray(data[start + b:start + e]), dtype=_TORCH_DTYPE[base.header[name]["dtype"]])
    if name.endswith(".alpha"):
        expect = ("alpha must be the rank",)
    elif not torch.isfinite(flipped.float()).all():
        expect = ("NaN/Inf",)
    else:
        expect = ("do not match its checksum",)
    return EditCase(f"data bit {bit} of {name}", data, True, expect)


def truncation(rng, base: Base) -> EditCase:
    n = base.n
    cut = rng.choice([0, 1, 7, 8, 9, 8 + n - 1, 8 + n, len(base.data) - 1,
                      rng.randrange(8 + n), rng.randrange(8 + n, len(base.data))])
    return EditCase(f"truncated to {cut} of {len(base.data)} bytes", base.data[:cut], True)


def appended(rng, base: Base) -> EditCase:
    extra = rng.choice([b"\0", b" ", b"\n", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
                        base.data[8:64]])
    return EditCase(f"{len(extra)} bytes appended", base.data + extra, True)


def _reencode(h: dict, base: Base, label: str, must_refuse: bool, body: bytes | None = None) -> EditCase:
    """The file with header ``h`` (and the original tensor data unless ``body``)."""
    return EditCase(label, join_file(dumps(h), base.body if body is None else body), must_refuse)


def tensor_entry_edit(rng, base: Base) -> EditCase:
    """A tensor's dtype, shape or offsets changed (plausibly or absurdly): always refused."""
    h = copy.deepcopy(base.header)
    name = rng.choice(base.tensors)
    entry = h[name]
    b, e = entry["data_offsets"]
    other = h[rng.choice([t for t in base.tensors if t != name])]
    field_, value = rng.choice([
        ("dtype", rng.choice(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
                              "U16", "U32", "U64", "f32", "F32 ", "", "float32"])),
        ("dtype", weird(rng)),
        ("shape", rng.choice([[2 ** 40], [2 ** 40, 0], [0, 2 ** 40], [2 ** 40, 2 ** 40], [2 ** 64], [-1],
                              list(reversed(entry["shape"])), [math.prod(entry["shape"])], entry["shape"] + [1],
                              [1] + entry["shape"], [], [0], [0, 0]])),
        ("shape", [weird(rng)] + entry["shape"][1:]),
        ("shape", weird(rng)),
        ("data_offsets", rng.choice([[b + 1, e + 1], [b, e - 1], [b - 1, e - 1] if b else [b, e + 4], [e, b],
                                     list(other["data_offsets"]), [0, 2 ** 40], [0, 2 ** 64], [-4, e - b - 4],
                                     [b, e, e], [b]])),
        ("data_offsets", [weird(rng), e]),
        ("data_offsets", weird(rng)),
    ])
    if entry.get(field_) == value:
        value = "F32x"
    entry[field_] = value
    return _reencode(h, base, f"tensor {name}: {field_} = {dumps(value)[:60]}", True)


def tensor_table_edit(rng, base: Base) -> EditCase:
    """Tensor entries removed, added, renamed or duplicated in the header: always refused."""
    h = copy.deepcopy(base.header)
    name = rng.choice(base.tensors)
    kind = rng.choice(["remove", "add", "rename", "duplicate", "entry", "metadata"])
    body = None
    if kind == "remove":
        del h[name]
    elif kind == "add":
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        h[rng.choice(["lora_unet_extra.lora_up.weight", name + "x", "__metadata__x"])] = {
            "dtype": "F32", "shape": [2], "data_offsets": [end, end + 8]}
        body = base.body + bytes(8)
    elif kind == "rename":
        h[rng.choice([name.replace("lora_", "lora_x"), name.upper(), name + " ", "x" + name])] = h.pop(name)
    elif kind == "duplicate":  # JSON with the same key twice (as one flipped bit in layers_0/layers_1 gives)
        text = dumps(h)
        target = rng.choice([t for t in base.tensors if t != name])
        text = text.replace(json.dumps(name), json.dumps(target), 1)
        return EditCase(f"tensor {name} renamed to the existing {target}", join_file(text, base.body), True)
    elif kind == "entry":
        h[name] = weird(rng)
    else:
        h.pop("__metadata__") if rng.random() < 0.5 else h.__setitem__("__metadata__", weird(rng))
    return _reencode(h, base, f"tensor table: {kind} {name}", True, body=body)


_REQUIRED_META = ("erasepro.format", "erasepro.fingerprint", "erasepro.sites", "erasepro.settings", "erasepro.summary")


def metadata_edit(rng, base: Base) -> EditCase:
    """A metadata value removed, replaced by odd text, or by a non-string (refused: safetensors metadata
    is strings only)."""
    h = copy.deepcopy(base.header)
    meta = h["__metadata__"]
    key = rng.choice(sorted(meta))
    kind = rng.choice(["remove", "text", "text", "non-string"])
    if kind == "remove":
        del meta[key]
        return _reencode(h, base, f"metadata {key} removed", key in _REQUIRED_META)
    if kind == "text":
        meta[key] = rng.choice(["", " ", "null", "[]", "{}", "0", "1e400", "1" * 5000, "[" * 5000 + "]" * 5000,
                                "{\"a\": ", "\ufeff" + meta[key], meta[key].upper(), meta[key][:-1], meta[key] + " ",
                                meta[key] + "x", json.dumps(meta[key]), "\u202e" + meta[key][::-1]])
        return _reencode(h, base, f"metadata {key} = {meta[key][:40]!r}", False)
    meta[key] = weird(rng, strings=False)
    return _reencode(h, base, f"metadata {key} = {dumps(meta[key])[:40]} (not a string)", True)


def _edit_inner(rng, base: Base, key: str, mutate) -> EditCase:
    h = copy.deepcopy(base.header)
    value = json.loads(h["__metadata__"][key])
    value, label = mutate(value)
    h["__metadata__"][key] = dumps(value)
    return _reencode(h, base, f"{key}: {label}", False)


SITE_FIELDS = ("name", "key", "part", "stage", "rank", "solver_rank", "shape", "relative_change", "residual", "sha256")


def sites_edit(rng, base: Base) -> EditCase:
    """The site list edited: a field removed or given an odd value, entries swapped, dropped, repeated."""
    def mutate(sites):
        i = rng.randrange(len(sites))
        s = sites[i]
        f = rng.choice(SITE_FIELDS)
        kind = rng.choice(["remove", "weird", "weird", "plausible", "swap", "order", "drop", "repeat", "add", "list"])
        if kind == "remove":
            s.pop(f, None)
        elif kind == "weird":
            s[f] = weird(rng)
        elif kind == "plausible":  # a value of the right kind: another site's, as text, or slightly off
            near = {"rank": 3, "shape": [s["shape"][0], s["shape"][1] + 1], "stage": "deep",
                    "part": "model" if s["part"] == "clip" else "clip", "sha256": s["sha256"].upper(),
                    "relative_change": s["relative_change"] * (1 + 2 ** -50), "residual": repr(s["residual"]),
                    "key": s["key"].replace("to_k", "to_v"), "name": s["name"] + "_"}
            s[f] = rng.choice([sites[rng.randrange(len(sites))].get(f), str(s.get(f)), [s.get(f)], near.get(f, 0)])
        elif kind == "swap":
            j = rng.randrange(len(sites))
            s[f], sites[j][f] = sites[j].get(f), s.get(f)
        elif kind == "order":
            rng.shuffle(sites)
        elif kind == "drop":
            sites.pop(i)
        elif kind == "repeat":
            sites.append(copy.deepcopy(s))
        elif kind == "add":
            sites.append({**s, "key": s["key"].replace(".weight", ".bias"), "rank": 0})
        else:
            return weird(rng), "site list replaced"
        return sites, f"site #{i} {kind} {f}"
    return _edit_inner(rng, base, "erasepro.sites", mutate)


def site_number(rng, base: Base) -> EditCase:
    """A site's rank, a dimension or a figure as another number type, as text, or past float range."""
    def mutate(sites):
        i = rng.randrange(len(sites))
        s = sites[i]
        f = rng.choice(["rank", "shape", "relative_change", "residual"])
        edge = [Raw("1e400"), Raw("-1e400"), Raw("1" + "0" * 400), float("nan"), float("inf"), 2 ** 64, -1, 0, True]
        if f == "shape":
            j = rng.randrange(2)
            s[f][j] = rng.choice(edge + [str(s[f][j]), float(s[f][j])])
        else:
            s[f] = rng.choice(edge + [str(s[f]), float(s[f]), repr(s[f])])
        return sites, f"site #{i} {f} = {dumps(s[f])[:40]}"
    return _edit_inner(rng, base, "erasepro.sites", mutate)


FAMILY_VALUES = ["sdxl", "sd3", "flux", "SD15", "sd1.5", "", None, 15, True, ["sd15"], {"name": "sd15"}, Raw("1e400")]


def settings_edit(rng, base: Base) -> EditCase:
    """Settings or summary (not covered by the checksums) edited: the family, odd values, odd types."""
    key = rng.choice(["erasepro.settings", "erasepro.summary"])

    def mutate(value):
        f = rng.choice(["family", "family", "family", "concepts", "method", "version", "train_residual", "whole"])
        if f == "whole":
            return weird(rng), "replaced"
        value[f] = copy.deepcopy(rng.choice(FAMILY_VALUES)) if f == "family" else weird(rng)
        return value, f"{f} = {dumps(value[f])[:40]}"
    return _edit_inner(rng, base, key, mutate)


def fingerprint_edit(rng, base: Base) -> EditCase:
    h = copy.deepcopy(base.header)
    fp = h["__metadata__"]["erasepro.fingerprint"]
    i = rng.randrange(len(fp))
    h["__metadata__"]["erasepro.fingerprint"] = rng.choice([
        fp[:i] + rng.choice("0123456789abcdef".replace(fp[i], "")) + fp[i + 1:], fp.upper(), fp[:-1], fp + "0",
        "", " " + fp, fp[:i] + "g" + fp[i + 1:]])
    return _reencode(h, base, "fingerprint edited", False)


def legacy(rng, base: Base) -> EditCase:
    """What ErasePro wrote before checksums: loads with a warning, the same edit."""
    h = copy.deepcopy(base.header)
    sites = json.loads(h["__metadata__"]["erasepro.sites"])
    for s in sites:
        del s["sha256"]
    h["__metadata__"]["erasepro.sites"] = json.dumps(sites)
    del h["__metadata__"]["erasepro.checksum_method"]
    return _reencode(h, base, "checksums removed (an older writer's file)", False)


def tensor_rewrite(rng, base: Base) -> EditCase:
    """The tensors rewritten as a well-formed safetensors file (the metadata kept): another dtype, a
    value nudged by one ulp, a tensor swapped, reshaped, removed, added, alpha changed. Always refused."""
    from safetensors.torch import load as st_load, save as st_save
    tensors = st_load(base.data)
    name = rng.choice(base.tensors)
    t = tensors[name]
    kind = rng.choice(["dtype", "ulp", "swap", "shape", "remove", "add", "zeros", "alpha"])
    if kind == "dtype":
        dt = rng.choice([d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int32,
                                     torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn) if d != t.dtype])
        tensors[name] = t.to(dt)
        label = f"{name} as {dt}"
    elif kind == "ulp":
        flat = t.clone().reshape(-1)
        i = rng.randrange(flat.numel())
        flat[i] = torch.nextafter(flat[i], torch.tensor(math.inf, dtype=flat.dtype))
        tensors[name] = flat.reshape(t.shape)
        label = f"{name}[{i}] one ulp up"
    elif kind == "swap":
        same = [k for k in base.tensors if k != name and tensors[k].shape == t.shape and tensors[k].dtype == t.dtype
                and not torch.equal(tensors[k], t)]
        if same:
            other = rng.choice(same)
            tensors[name], tensors[other] = tensors[other], t
            label = f"{name} swapped with {other}"
        else:
            tensors[name] = -t
            label = f"{name} negated"
    elif kind == "shape":
        tensors[name] = rng.choice([t.reshape(-1), t.reshape(1, -1), t.T.contiguous() if t.ndim == 2 else t.reshape(1, 1),
                                    torch.cat([t, t]) if t.ndim else t.reshape(1)])
        label = f"{name} reshaped to {tuple(tensors[name].shape)}"
    elif kind == "remove":
        del tensors[name]
        label = f"{name} removed"
    elif kind == "add":
        extra = rng.choice(["lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
                            name.replace(".weight", ".bias"), "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"])
        tensors[extra] = torch.ones(2)
        label = f"extra tensor {extra}"
    elif kind == "zeros":
        tensors[name] = torch.zeros_like(t)
        label = f"{name} zeroed"
    else:
        alpha = rng.choice([k for k in base.tensors if k.endswith(".alpha")])
        tensors[alpha] = rng.choice([torch.tensor(1.0), tensors[alpha] * 2, tensors[alpha].reshape(1),
                                     tensors[alpha].double(), torch.tensor(float("nan"))])
        label = f"{alpha} = {tensors[alpha].tolist()}"
    return EditCase(f"rewritten: {label}", canonical(st_save(tensors, metadata=base.meta)), True)


def not_an_edit_files(base: Base) -> list[EditCase]:
    """Files that are no ErasePro edit at all."""
    import io
    from safetensors.torch import load as st_load, save as st_save
    rng = random.Random(SEED)
    buf = io.BytesIO()
    torch.save(st_load(base.data), buf)
    n = base.n
    cases = [
        (b"", "empty"), (b"{}", "two bytes"), (bytes(8), "zero header length"),
        (pickle.dumps({"a": torch.zeros(2)}), "pickle"), (buf.getvalue(), "torch.save zip"),
        (bytes(rng.randrange(256) for _ in range(4096)), "random bytes"),
        (struct.pack("<Q", 2 ** 63) + base.data[8:], "header length 2**63"),
        (struct.pack("<Q", n) + b"[" + base.data[9:], "header a JSON list"),
        (join_file("[1, 2]", b""), "header a JSON list (well formed)"),
        (join_file("\"x\"", b""), "header a JSON string"),
        (join_file("{\"a\": {\"dtype\": \"F32\", \"shape\": [1099511627776], \"data_offsets\": [0, 4398046511104]}}", b""),
         "a 4 TiB tensor, not in the file"),
        (st_save({"lora_unet_a.lora_up.weight": torch.zeros(4, 1)}), "plain LoRA"),
        (st_save({"lora_unet_a.lora_up.weight": torch.zeros(4, 1)}, metadata={"erasepro.format": "1"}),
         "plain LoRA claiming to be an edit"),
        (b"hello, this is not a model\n" * 10, "text"),
        (b"PK\x03\x04" + bytes(100), "zip signature"), (b"\x80\x04" + bytes(100), "pickle signature"),
    ]
    return [EditCase(label, data, True) for data, label in cases]


# Every loaded case and every third refused one also goes through Load ErasePro Edit; every 15th loaded
# one through Apply Erased UNet too (every 120th without ignore_fingerprint: the model hashed, slow).
APPLY_EVERY = 15
MUTATIONS = [  # (mutation, cases per stored dtype)
    (header_flip, 300), (data_flip, 250), (truncation, 60), (appended, 15), (tensor_entry_edit, 60),
    (tensor_table_edit, 30), (metadata_edit, 60), (sites_edit, 80), (site_number, 60), (settings_edit, 40),
    (fingerprint_edit, 10), (legacy, 2), (tensor_rewrite, 60),
]


# --- loading one case ---------------------------------------------------------------------------
def applied(edit) -> dict:
    """What Apply adds: weight key -> (part, up, down) of every rank > 0 site (rank 0 adds nothing)."""
    return {s.key: (s.part, s.up, s.down) for s in edit.sites if s.rank}


def same_applied(got, want) -> bool:
    """The same update on the same weights, bit for bit; and the per-site figures, which the checksums
    cover too, unchanged."""
    a, b = applied(got), applied(want)
    figures = [{s.key: (s.relative_change, s.residual) for s in e.sites} for e in (got, want)]
    return (a.keys() == b.keys() and all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1])
                                         and torch.equal(a[k][2], b[k][2]) for k in a)
            and all(figures[0][k] == figures[1][k] for k in figures[0].keys() & figures[1].keys()))


def never_unpickle(*args, **kwargs):
    raise AssertionError("an edit file was unpickled")


def assert_clear(err: Exception, case: EditCase, where: str) -> None:
    """A refusal: the pack's own error type, with a message that says what is wrong."""
    msg = str(err)
    assert len(msg) >= 20 and "Traceback" not in msg, f"{case.label}: unclear message from {where}: {msg!r}"
    if case.must_refuse and case.expect:
        assert any(x in msg for x in case.expect), f"{case.label}: {where} says {msg!r}, expected one of {case.expect}"


@dataclass
class EditEnv:
    """The pack, the MODEL and CLIP the edit was made for, and the loras folder the nodes read."""

    pack: object
    model: object
    clip: object
    folder: Path
    name: str = "fuzz/case.safetensors"

    @property
    def path(self) -> Path:
        return self.folder / self.name


def run_edit_case(env: EditEnv, base: Base, case: EditCase, tally: Tally, node_if_refused: bool) -> object | None:
    """Load ``case`` through export.load and Load ErasePro Edit (a file export.load refused: only with
    ``node_if_refused``); check the contract. The edit the node loaded, or None when it was refused."""
    from erasepro_ops import export
    from erasepro_ops.errors import EraseProError
    env.path.write_bytes(case.data)
    try:
        got = export.load(env.path)
    except export.EditFileError as e:
        assert_clear(e, case, "export.load")
        assert env.path.name in str(e) or "LoRA name" in str(e), f"{case.label}: message does not name the file: {e}"
        refused = str(e)
    except Exception as e:  # noqa: BLE001  (the contract: nothing else escapes)
        raise AssertionError(f"{case.label}: {type(e).__name__} escaped export.load: {e}\n"
                             + "".join(traceback.format_exception(e)[-4:])) from None
    else:
        refused = None
        assert not case.must_refuse, f"{case.label}: loaded, but this damage must be refused"
        assert same_applied(got, base.edit), f"{case.label}: loaded as a DIFFERENT edit"
    if refused is not None and not node_if_refused:
        tally.add("refused")
        return None
    # the node, with ignore_fingerprint: every check of the file, no hashing of the model
    try:
        edit, info = load_node(env.pack, env.name, env.model, env.clip, ignore=True)
    except EraseProError as e:
        # a file export.load accepts can still not fit the MODEL (a rank-0 site's shape is not checksummed)
        assert refused is not None or "another model" in str(e), f"{case.label}: export.load accepted, the node refused: {e}"
        if refused is not None:
            assert str(e) == f"cannot load this ErasePro edit: {refused}", f"{case.label}: {e}"
        assert_clear(e, case, "Load ErasePro Edit")
        tally.add("refused")
        return None
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{case.label}: {type(e).__name__} escaped Load ErasePro Edit: {e}\n"
                             + "".join(traceback.format_exception(e)[-4:])) from None
    assert refused is None, f"{case.label}: export.load refused ({refused}) but the node loaded it"
    assert isinstance(info, str) and same_applied(edit, base.edit), f"{case.label}: the node loaded a DIFFERENT edit"
    tally.add("loaded, same edit")
    return edit


def check_apply(env: EditEnv, base: Base, case: EditCase, edit, with_fingerprint: bool) -> None:
    """Apply Erased UNet on a loaded case: the patches are the original edit's updates, bit for bit, and
    the input MODEL and CLIP stay untouched; ``with_fingerprint``: Load and Apply without the override."""
    from erasepro_ops.errors import EraseProError
    m, c = apply_node(env.pack, env.model, edit, env.clip)
    for part, patcher in (("model", m), ("clip", c.patcher)):
        for s in edit.part(part):
            ((_, (delta,), *_),) = patcher.patches[s.key]  # one "diff" patch: (strength, (ΔW,), ...)
            want = base.deltas.get(s.key)
            assert torch.equal(delta, want if want is not None else torch.zeros(s.shape)), \
                f"{case.label}: Apply patched {s.key} with another update"
    assert not env.model.patches and not env.clip.patcher.patches, f"{case.label}: the input MODEL/CLIP changed"
    if with_fingerprint:
        try:
            edit, info = load_node(env.pack, env.name, env.model, env.clip)
            assert "fingerprint OK" in info, case.label
            apply_node(env.pack, env.model, edit, env.clip)
        except EraseProError as e:  # the fingerprint itself edited
            assert "another base model" in str(e), f"{case.label}: {e}"


@pytest.fixture(scope="module")
def edit_env(pack, loras):
    torch.manual_seed(SEED)
    model, clip = H.build("sd15", clip_layers=2)
    (loras / "fuzz").mkdir(exist_ok=True)
    return EditEnv(pack, model, clip, loras)


@pytest.fixture(scope="module")
def bases(edit_env) -> list[Base]:
    """The synthetic edit saved by Save ErasePro Edit in each storage dtype, and what each loads to."""
    from erasepro_ops import export
    edit = synthetic_edit(edit_env.model, edit_env.clip)
    out = []
    for dtype in STORAGE:
        name, _ = save_node(edit_env.pack, edit, f"fuzz/base_{dtype}", dtype)
        path = edit_env.folder / name
        path.write_bytes(data := canonical(path.read_bytes()))
        loaded = export.load(path)
        if dtype == "float32":  # the pristine float32 file is the edit, bit for bit
            assert same_applied(loaded, edit) and loaded.fingerprint == edit.fingerprint
        n, header, body = split_file(data)
        out.append(Base(dtype, data, n, header, body, loaded, {s.key: s.delta() for s in loaded.sites if s.rank}))
    return out


def test_edit_files(edit_env, bases):
    """Every damaged file refused with a clear message or loaded as exactly the original edit; data
    flips refused by the checksum; nothing unpickled; no huge allocation."""
    tally = Tally("edit files")
    rng = random.Random(SEED)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checksum_catches = loaded = applied_cases = 0
    by_kind: dict[str, list[int]] = {}  # mutation -> [loaded, refused]
    with quiet_logs(), pytest.MonkeyPatch.context() as mp:
        for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            mp.setattr(module, name, never_unpickle)
        for base in bases:
            cases = [(mutate.__name__, mutate(rng, base)) for mutate, count in MUTATIONS for _ in range(count)]
            cases += [("not_an_edit", c) for c in not_an_edit_files(base)] if base.dtype == "float32" else []
            for i, (kind, case) in enumerate(cases):
                case.label = f"[{base.dtype} #{i}] {case.label}"
                edit = run_edit_case(edit_env, base, case, tally, node_if_refused=i % 3 == 0)
                by_kind.setdefault(kind, [0, 0])[edit is None] += 1
                if edit is not None and loaded % APPLY_EVERY == 0:  # Apply is a function of the factors
                    check_apply(edit_env, base, case, edit, with_fingerprint=loaded % (8 * APPLY_EVERY) == 0)
                    applied_cases += 1
                loaded += edit is not None
                checksum_catches += "do not match its checksum" in case.expect
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2 ** 20  # KiB -> GiB
    print(f"\n{tally.report()}; {checksum_catches} data flips refused by the checksum; {applied_cases} loaded "
          f"cases applied; peak RSS grew {grown:.2f} GiB")
    print("  loaded / refused per mutation: " + ", ".join(f"{k} {a}/{r}" for k, (a, r) in by_kind.items()))
    assert tally.total >= EDIT_FLOOR and checksum_catches >= 500
    assert grown < 1.0  # huge shapes were refused, not allocated


# =========================================================================================
# 2. Workflows
# =========================================================================================
# comfy_extras nodes the shipped workflows use (a running ComfyUI loads them at start-up)
EXTRA_NODES = {"EmptySD3LatentImage": ("comfy_extras.nodes_sd3", "EmptySD3LatentImage"),
               "FluxGuidance": ("comfy_extras.nodes_flux", "FluxGuidance"),
               "CheckpointSave": ("comfy_extras.nodes_model_merging", "CheckpointSave")}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".gguf")
PACK_DIRS = tuple(str(REPO / d) for d in ("nodes", "erasepro_ops", "erasepro_comfy"))


def git(*args: str) -> str:
    """git's output in the checkout; "" without git or a history (then only the files as they are)."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    except OSError:
        return ""
    return r.stdout if r.returncode == 0 else ""


def workflow_versions() -> dict[str, dict]:
    """label -> UI workflow: workflows/*.json as checked out, then every other version in git history."""
    out, seen = {}, set()

    def add(label: str, text: str) -> None:
        if text and text not in seen:
            seen.add(text)
            out[label] = json.loads(text)

    for p in sorted((REPO / "workflows").glob("*.json")):
        add(f"{p.name} (checkout)", p.read_text(encoding="utf-8"))
    for rev in git("log", "--all", "--format=%h", "--", "workflows/").split():
        for path in git("ls-tree", "--name-only", rev, "workflows/").split():
            if path.endswith(".json"):
                add(f"{Path(path).name} @ {rev}", git("show", f"{rev}:{path}"))
    return out


def widget_values(node: dict) -> list:
    wv = node.get("widgets_values")
    return list(wv.values()) if isinstance(wv, dict) else list(wv or [])


def node_info(cls) -> dict:
    """A node's /object_info entry as ComfyUI's server builds it (the parts ui_to_api reads)."""
    from comfy_api.internal import _ComfyNodeInternal
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    return {"input": types, "input_order": {k: list(v) for k, v in types.items()}, "output": cls.RETURN_TYPES}


@dataclass
class ComfyEnv:
    """ComfyUI in process, as a server with this pack sees it: node classes, /object_info, validation."""

    pack: object
    execution: object
    info: dict  # class_type -> /object_info entry, for every node type the workflows use
    loop: asyncio.AbstractEventLoop
    versions: dict

    def specs(self, class_type: str) -> dict:
        """input name -> (type, options) of a node type."""
        inp = self.info[class_type]["input"]
        return {k: (v[0], v[1] if len(v) > 1 and isinstance(v[1], dict) else {})
                for sec in ("required", "optional") for k, v in (inp.get(sec) or {}).items()}

    def validate(self, prompt: dict):
        return self.loop.run_until_complete(self.execution.validate_prompt("fuzz", prompt, None))


@pytest.fixture(scope="module")
def comfy_env(pack):
    """ComfyUI's node table with this pack and the extras the workflows use, and every model file the
    workflows name listed in its folders (validation never opens them)."""
    import importlib
    import execution
    import folder_paths
    nodes = H.comfy_nodes()
    versions = workflow_versions()
    mapping = dict(nodes.NODE_CLASS_MAPPINGS)
    mapping.update(pack.NODE_CLASS_MAPPINGS)
    for name, (module, cls) in EXTRA_NODES.items():
        mapping.setdefault(name, getattr(importlib.import_module(module), cls))
    files = {v for wf in versions.values() for n in wf["nodes"] for v in widget_values(n)
             if isinstance(v, str) and v.endswith(MODEL_SUFFIXES)}
    listed = folder_paths.get_filename_list
    used = {n["type"] for wf in versions.values() for n in wf["nodes"]}
    loop = asyncio.new_event_loop()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nodes, "NODE_CLASS_MAPPINGS", mapping)
        mp.setattr(folder_paths, "get_filename_list", lambda folder: sorted(set(listed(folder)) | files))
        info = {t: node_info(mapping[t]) for t in used if t in mapping}
        yield ComfyEnv(pack, execution, info, loop, versions)
    loop.close()


def validation_outcome(label: str, result) -> str:
    """Check ComfyUI's answer: a verdict, every refusal with a message, no exception from the pack's
    code. The outcome's name for the tally."""
    assert isinstance(result, tuple) and len(result) == 4, f"{label}: validate_prompt returned {result!r}"
    ok, error, _, node_errors = result
    if ok is not True:
        assert isinstance(error, dict) and error.get("message"), f"{label}: refused without a message: {error!r}"
    comfy_exception = False
    for nid, entry in node_errors.items():
        for reason in entry["errors"]:
            assert reason.get("message"), f"{label}: node {nid} refused without a message: {reason!r}"
            if reason["type"].startswith("exception_"):
                frames = (reason.get("extra_info") or {}).get("traceback") or []
                pack_frames = [f for f in frames if any(f'File "{d}/' in f for d in PACK_DIRS)]
                assert not pack_frames, f"{label}: the pack raised while ComfyUI validated: {reason}"
                comfy_exception = True
    if ok is True:  # ComfyUI runs the outputs that validate and names the nodes of the others
        return "partly valid" if node_errors else "valid"
    return "refused (ComfyUI's own exception, as a message)" if comfy_exception else f"refused: {error['type']}"


class Linked:
    """A linked input the checks cannot evaluate (a MODEL, CLIP, ...)."""


def upstream(prompt: dict, outputs) -> set[str]:
    """The nodes ComfyUI runs for ``outputs``: those and every node they are linked from."""
    seen, todo = set(), [str(o) for o in outputs]
    while todo:
        nid = todo.pop()
        if nid not in seen and nid in prompt:
            seen.add(nid)
            todo += [str(v[0]) for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


def pack_checks(env: ComfyEnv, prompt: dict, outputs) -> str:
    """The pack's own input checks on the nodes of a prompt ComfyUI accepted (those it would run for
    its valid ``outputs``), as the nodes run them before any model work: each Concept Pair's build
    (through its chain), the solver's request and its check, Evaluate's sampler setup and prompt rows.
    "valid", or "refused by the pack" for an EraseProError."""
    from erasepro_ops.errors import EraseProError
    from erasepro_ops.evaluate import evaluation_rows, prompt_lines
    m = env.pack.NODE_CLASS_MAPPINGS
    setup_cls = sys.modules[f"{H.PACK_MODULE}.nodes.evaluate_run"].SamplerSetup
    built: dict[str, tuple] = {}

    def args(nid: str) -> dict:
        node = prompt[nid]
        declared = env.specs(node["class_type"])
        out = {}
        for k, v in node["inputs"].items():
            if k not in declared:
                continue  # ComfyUI passes only declared inputs
            if isinstance(v, list):
                out[k] = concepts(v[0]) if prompt[v[0]]["class_type"] == "ErasePro_ConceptPair" else Linked
            elif declared[k][0] == "ERASEPRO_CONCEPTS":
                out[k] = Linked  # a constant on a socket: ComfyUI 0.3.75 lets it through validation
            else:
                out[k] = v
        return out

    def concepts(nid: str):
        if nid not in built:
            a = args(nid)
            built[nid] = Linked if Linked in a.values() else m["ErasePro_ConceptPair"]().build(**a)[0]
        return built[nid]

    try:
        for nid in sorted(upstream(prompt, outputs)):
            ct = prompt[nid]["class_type"]
            if ct == "ErasePro_ConceptPair":
                concepts(nid)
            elif ct == "ErasePro_ProgressiveSolver":
                a = {k: v for k, v in args(nid).items() if k not in ("model", "clip")}
                if Linked not in a.values():
                    m[ct].request(**a).check()
            elif ct == "ErasePro_Evaluate":
                a = args(nid)
                keys = ("seed", "steps", "cfg", "sampler_name", "scheduler", "width", "height")
                if Linked not in [a.get(k) for k in keys] + [a.get("concepts")]:
                    setup_cls(*(a[k] for k in keys), a.get("negative") or "", a.get("batch_size", 4)).check()
                    try:
                        evaluation_rows(tuple(a.get("concepts") or ()), prompt_lines(a.get("held_out", "")),
                                        prompt_lines(a.get("unrelated", "")))
                    except ValueError as e:  # as the node words it
                        raise EraseProError(f"ErasePro Evaluate: {e}") from e
    except EraseProError as e:
        assert len(str(e)) >= 20, f"unclear refusal: {e!r}"
        return "refused by the pack"
    return "valid"


STRICT_TYPES = {"INT": lambda v: type(v) is int, "FLOAT": lambda v: type(v) in (int, float),
                "BOOLEAN": lambda v: type(v) is bool, "STRING": lambda v: type(v) is str}


def test_shipped_workflows_and_their_history_validate(comfy_env):
    """Every version of every shipped workflow (users' saved files) loads on today's nodes: it converts,
    ComfyUI validates it, the pack's checks pass, and each ErasePro widget value has its input's own
    type (a widget list shifted by a changed input order would pass ComfyUI's lenient checks)."""
    import comfy_server as cs
    n_history = sum("@" in k for k in comfy_env.versions)
    for label, wf in comfy_env.versions.items():
        prompt = cs.ui_to_api(copy.deepcopy(wf), comfy_env.info)
        for nid, node in prompt.items():  # as saved: validation converts the values in place
            if node["class_type"].startswith("ErasePro_"):
                for k, v in node["inputs"].items():
                    typ = comfy_env.specs(node["class_type"])[k][0]
                    ok = isinstance(v, list) or (v in typ if isinstance(typ, list) else STRICT_TYPES.get(typ, bool)(v))
                    assert ok, f"{label}: node {nid} {node['class_type']}.{k} = {v!r} is not a {typ}"
        result = comfy_env.validate(prompt)
        assert validation_outcome(label, result) == "valid" and not result[3], f"{label} no longer validates: {result}"
        assert pack_checks(comfy_env, prompt, result[2]) == "valid", label
    print(f"\n[fuzz] workflows: {len(comfy_env.versions)} distinct versions ({n_history} from git history) validate")
    assert len(comfy_env.versions) >= len(list((REPO / "workflows").glob("*.json")))


# --- mutations -----------------------------------------------------------------------------------
WORKFLOW_VALUES = [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 70, -2 ** 70, 0.5, -0.0, 1e308, -1e308, float("nan"),
                   float("inf"), float("-inf"), "", " ", "0", "3.5", "true", "abc", "é\u202e日本🙂", "\ud800",
                   "{}", "(((x)))", "\n" * 100, "x" * 100_000, [], [1], [1, 2], [1, 2, 3], ["1", 0], ["99999", 0],
                   {}, {"a": 1}, {"__value__": "x"}, {"__value__": [1, 2]}]


def short(v) -> str:
    return repr(v)[:40]


def new_value(rng: random.Random, old):
    """A wrong, odd or out-of-range replacement for a widget value."""
    if rng.random() < 0.3 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return rng.choice([old * 10 ** 6, -old - 1, old + 0.5, float(old), int(old), str(old), old * 1e300])
    if rng.random() < 0.3 and isinstance(old, str):
        return rng.choice([old * 200, old.upper(), old + "\n" * 80, old + " {}", old.replace(" ", ""), "(" * 600 + old])
    return copy.deepcopy(rng.choice(WORKFLOW_VALUES))


def _pick_node(rng, wf, pred=lambda n: True):
    """A node for which ``pred`` holds, an ErasePro one more often than not."""
    nodes = [n for n in wf["nodes"] if pred(n)]
    ours = [n for n in nodes if str(n.get("type")).startswith("ErasePro_")]
    return rng.choice(ours if ours and rng.random() < 0.6 else nodes)


def ui_widget_value(rng, wf, env):
    n = _pick_node(rng, wf, lambda n: isinstance(n.get("widgets_values"), list) and n["widgets_values"])
    i = rng.randrange(len(n["widgets_values"]))
    n["widgets_values"][i] = new_value(rng, n["widgets_values"][i])
    return f"node {n['id']} {n['type']} widget {i} = {short(n['widgets_values'][i])}"


def ui_widget_list(rng, wf, env):
    n = _pick_node(rng, wf, lambda n: n.get("widgets_values"))
    wv = n["widgets_values"]
    kind = rng.choice(["truncate", "empty", "none", "extend", "dict", "string"])
    if kind == "truncate" and isinstance(wv, list):
        del wv[rng.randrange(len(wv)):]
    elif kind == "extend" and isinstance(wv, list):
        wv.extend(new_value(rng, None) for _ in range(rng.randrange(1, 4)))
    elif kind == "dict":
        names = list(env.specs(n["type"])) if n["type"] in env.info else ["x"]
        n["widgets_values"] = {rng.choice(names): new_value(rng, None) for _ in range(2)}
    else:
        n["widgets_values"] = {"empty": [], "none": None, "string": "abc"}.get(kind, [])
    return f"node {n['id']} {n['type']} widgets {kind}"


def ui_remove_link(rng, wf, env):
    link = wf["links"].pop(rng.randrange(len(wf["links"])))
    return f"link {link[0] if isinstance(link, list) else link['id']} removed"


def ui_unlink_input(rng, wf, env):
    n = _pick_node(rng, wf, lambda n: n.get("inputs"))
    i = rng.choice(n["inputs"])
    i["link"] = rng.choice([None, 10 ** 6])
    return f"node {n['id']} input {i.get('name')} link = {i['link']}"


def ui_unknown_input(rng, wf, env):
    n = _pick_node(rng, wf)
    links = [link[0] for link in wf["links"] if isinstance(link, list)]
    n.setdefault("inputs", []).append({"name": rng.choice(["fuzz_unknown", "model", "concepts", "strength"]),
                                       "type": rng.choice(["INT", "MODEL", "*", "ERASEPRO_EDIT"]),
                                       "link": rng.choice(links + [None])})
    return f"node {n['id']} unknown input {n['inputs'][-1]['name']}"


def ui_mode(rng, wf, env):
    n = _pick_node(rng, wf)
    n["mode"] = rng.choice([1, 2, 4])
    return f"node {n['id']} mode {n['mode']}"


def ui_remove_node(rng, wf, env):
    n = wf["nodes"].pop(rng.randrange(len(wf["nodes"])))
    return f"node {n['id']} {n['type']} removed"


def ui_rewire(rng, wf, env):
    link = rng.choice(wf["links"])
    if rng.random() < 0.5:
        link[2] = rng.choice([0, 1, 2, 3, 99])
    else:
        link[1] = rng.choice(wf["nodes"])["id"]
    return f"link {link[0]} rewired from node {link[1]} slot {link[2]}"


UI_MUTATIONS = [ui_widget_value, ui_widget_value, ui_widget_value, ui_widget_list, ui_remove_link, ui_unlink_input,
                ui_unknown_input, ui_mode, ui_remove_node, ui_rewire]


def _pick_id(rng, prompt):
    ours = sorted(n for n in prompt if prompt[n]["class_type"].startswith("ErasePro_"))
    return rng.choice(ours if ours and rng.random() < 0.6 else sorted(prompt))


def api_value(rng, prompt, env):
    nid = _pick_id(rng, prompt)
    node = prompt[nid]
    names = sorted(set(node["inputs"]) | set(env.specs(node["class_type"])))
    k = rng.choice(names)
    node["inputs"][k] = new_value(rng, node["inputs"].get(k))
    if rng.random() < 0.2:
        node["inputs"][k] = rng.choice([[nid, 0], [rng.choice(sorted(prompt)), rng.choice([0, 1, 2, 7])], [nid], [1, 2, 3]])
    return f"{nid}.{k} = {short(node['inputs'][k])}"


def api_range(rng, prompt, env):
    """A number widget at, just past or far past its limits, or of the other number type."""
    choices = [(nid, k, o) for nid, node in prompt.items() for k, (t, o) in env.specs(node["class_type"]).items()
               if t in ("INT", "FLOAT")]
    nid, k, o = rng.choice(choices)
    lo, hi = o.get("min", -2 ** 63), o.get("max", 2 ** 63)
    prompt[nid]["inputs"][k] = rng.choice([lo, hi, lo - 1, hi + 1, lo - 0.5, hi + 0.5, (lo + hi) / 2 + 0.25,
                                           str(hi), hi * 10, -abs(hi) * 10, True])
    return f"{nid}.{k} = {short(prompt[nid]['inputs'][k])} (min {lo}, max {hi})"


def api_combo(rng, prompt, env):
    choices = [(nid, k, t) for nid, node in prompt.items() for k, (t, o) in env.specs(node["class_type"]).items()
               if isinstance(t, list) and t]
    nid, k, t = rng.choice(choices)
    v = rng.choice(t)
    prompt[nid]["inputs"][k] = rng.choice([v.upper(), " " + v, v + " ", "", rng.choice(["erasepro", "uce", "euler", "style"])])
    return f"{nid}.{k} = {short(prompt[nid]['inputs'][k])}"


def api_drop(rng, prompt, env):
    nid = rng.choice([n for n in sorted(prompt) if prompt[n]["inputs"]] or sorted(prompt))
    if prompt[nid]["inputs"]:
        k = rng.choice(sorted(prompt[nid]["inputs"]))
        del prompt[nid]["inputs"][k]
        return f"{nid}.{k} removed"
    return "nothing to remove"


def api_unknown(rng, prompt, env):
    nid = rng.choice(sorted(prompt))
    prompt[nid]["inputs"][rng.choice(["fuzz_unknown", "__value__", "", "class_type"])] = new_value(rng, None)
    return f"{nid}: unknown input"


API_MUTATIONS = [api_value, api_value, api_range, api_range, api_combo, api_drop, api_unknown]
WORKFLOW_CASES = 2400


def test_mutated_workflows_are_validated_not_crashed(comfy_env):
    """Each case: a version, one to three mutations of the UI file and/or of the API prompt it converts
    to, then ComfyUI's validation and, for what it accepts, the pack's own checks."""
    import comfy_server as cs
    tally = Tally("mutated workflows")
    rng = random.Random(SEED)
    versions = sorted(comfy_env.versions.items())
    with quiet_logs():
        for i in range(WORKFLOW_CASES):
            name, wf = versions[i % len(versions)]
            wf = copy.deepcopy(wf)
            n_ui, n_api = rng.choice([(1, 0), (2, 0), (3, 0), (0, 1), (0, 2), (1, 1), (2, 1)])
            labels = [m(rng, wf, comfy_env) for m in rng.sample(UI_MUTATIONS, n_ui)]
            label = f"case {i} ({name}): " + "; ".join(labels)
            try:
                prompt = cs.ui_to_api(wf, comfy_env.info)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{label}: ui_to_api raised {type(e).__name__}: {e}") from None
            if prompt:
                labels += [m(rng, prompt, comfy_env) for m in rng.sample(API_MUTATIONS, n_api)]
            label = f"case {i} ({name}): " + "; ".join(labels)
            try:
                result = comfy_env.validate(prompt)
                outcome = validation_outcome(label, result)
                if result[0] is True and pack_checks(comfy_env, prompt, result[2]) != "valid":
                    outcome += ", refused by the pack"
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{label}: {type(e).__name__} escaped: {e}\n"
                                     + "".join(traceback.format_exception(e)[-4:])) from None
            tally.add(outcome)
    print(f"\n{tally.report()}")
    assert tally.total >= WORKFLOW_FLOOR
    assert tally.outcomes.get("valid", 0) >= 100 and tally.total - tally.outcomes.get("valid", 0) >= 800


# =========================================================================================
# 3. /erasepro/tokens
# =========================================================================================
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
