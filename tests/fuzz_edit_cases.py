"""The edit-file fuzz's cases (tests/test_fuzz_edit_files.py): the safetensors file format, one
pristine edit file, and its mutations, each an :class:`EditCase` that says whether it must be refused.
"""
from __future__ import annotations

import copy
import json
import math
import pickle
import random
import struct
from dataclasses import dataclass

import torch

from fuzz_support import SEED, Raw, dumps

# JSON values of every wrong kind, for fields that expect something else.
WEIRD_JSON = [None, True, False, 0, -1, 1, 7, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64, -2 ** 63, 1.5, -0.0,
              float("nan"), float("inf"), "", "3", "x", "é\u2028\u202e", [], [1], [1, 2, 3], [[2, 3]], {},
              {"a": 1}, Raw("1e400"), Raw("-1e400"), Raw("1" * 5000), Raw("[" * 3000 + "]" * 3000)]


def weird(rng: random.Random, strings: bool = True):
    """One of WEIRD_JSON (without plain strings: ``strings=False``)."""
    pool = WEIRD_JSON if strings else [v for v in WEIRD_JSON if type(v) is not str]
    return copy.deepcopy(rng.choice(pool))


_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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


MUTATIONS = [  # (mutation, cases per stored dtype)
    (header_flip, 300), (data_flip, 250), (truncation, 60), (appended, 15), (tensor_entry_edit, 60),
    (tensor_table_edit, 30), (metadata_edit, 60), (sites_edit, 80), (site_number, 60), (settings_edit, 40),
    (fingerprint_edit, 10), (legacy, 2), (tensor_rewrite, 60),
]
