"""An ErasureEdit as a LoRA file and back: exact low-rank factors, kohya key names, metadata.

Pure (no ComfyUI import). ErasePro's updates are exact low-rank products ``ΔW = up @ down``
(docs/DESIGN.md, *Edit file*), so every site is stored as its own factors with ``alpha = rank`` (LoRA scale 1):
the file *is* the edit, with no approximation beyond the storage dtype.

Key layout (kohya / A1111 / Forge, and ComfyUI's ``comfy.lora.model_lora_keys_*``):

* UNet weight ``diffusion_model.<path>.weight`` → ``lora_unet_<path with . → _>`` — ComfyUI maps
  every ``diffusion_model.*.weight`` this way; A1111 falls back to ``lora_unet → diffusion_model``
  for these (SDXL-style) names; the SDXL pooled site becomes ``lora_unet_label_emb_0_0``.
* Text encoder ``clip_X.transformer.text_model.encoder.layers.<b>.mlp.fc2.weight`` →
  ``lora_te_text_model_encoder_layers_<b>_mlp_fc2`` (SD1.x CLIP-L, SD2.x CLIP-H) or
  ``lora_te1_...`` (SDXL CLIP-L) / ``lora_te2_...`` (SDXL CLIP-G).
* Flux's T5 ``t5xxl.transformer.<path>.weight`` → ``lora_te2_<path with . → _>`` (kohya's Flux
  names: te1 is CLIP-L, te2 T5; ComfyUI maps them for a CLIP holding CLIP-L and T5); Chroma's,
  its only text encoder, → ``lora_te1_<path>``; SD3's → ``lora_te3_<path>`` after CLIP-L (te1) and
  CLIP-G (te2) (ComfyUI numbers T5 after the CLIPs present).
* Z-Image's Qwen3 ``qwen3_4b.<path>.weight`` → ``text_encoders.qwen3_4b.<path>`` (ComfyUI's generic
  text-encoder LoRA names: it has no kohya names for an LLM encoder).
* Tensors ``<name>.lora_up.weight`` (out × r), ``<name>.lora_down.weight`` (r × in),
  ``<name>.alpha`` (scalar, = r). Rank-0 sites (no change) are listed in the metadata only.

Reading never unpickles: the file's header is checked to be a safetensors header (and the file
complete) before ``safetensors`` parses it; then every tensor is checked against the metadata,
and every site's stored data against the SHA-256 checksum its metadata entry records
(:func:`site_checksum`). Files written before checksums existed load with a logged warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from pathlib import Path

import torch

from . import __version__
from .edit import ErasureEdit, SiteEdit
from .fingerprint import hash_exact

FORMAT = "1"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya ss_base_model_version
_TE_RE = re.compile(r"^(clip_[lgh])\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)\.weight$")
_T5_RE = re.compile(r"^t5xxl\.transformer\.(.+)\.weight$")
_T5_PREFIX = {"flux": "lora_te2_", "chroma": "lora_te1_", "sd3": "lora_te3_"}  # T5 numbered after the CLIPs present
_LLM_RE = re.compile(r"^(qwen3_4b\..+)\.weight$")
_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")
CHECKSUM_METHOD = ("sha256 per site over its LoRA name, each stored tensor's (lora_up, lora_down, alpha) "
                   "dtype, shape and little-endian bytes, then repr() of its relative_change and residual")
FINGERPRINT_METHOD = ("sha256 over the edited sites' original effective weights "
                      "(key, shape, float16 bytes), sorted by key")
log = logging.getLogger("ErasePro")


class EditFileError(ValueError):
    """The file is not a well-formed ErasePro edit; the message says what is wrong."""


# ----------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------
def lora_name(key: str, family: str | None = None) -> str:
    """The kohya LoRA module name for a ModelPatcher weight key (see module docstring)."""
    if key.startswith("diffusion_model.") and key.endswith(".weight"):
        return "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
    m = _TE_RE.match(key)
    if m:
        enc, block, module = m.groups()
        rest = f"text_model_encoder_layers_{block}_{module.replace('.', '_')}"
        if family in ("sdxl", "sd3"):
            prefix = {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}.get(enc)
            if prefix is None:
                raise EditFileError(f"an SDXL edit cannot have a {enc} site ({key})")
            return prefix + rest
        if enc == "clip_g":
            raise EditFileError(f"a clip_g site ({key}) needs family 'sdxl', got {family!r}")
        return "lora_te_" + rest
    t5, llm = _T5_RE.match(key), _LLM_RE.match(key)
    if t5 and family in _T5_PREFIX:
        return _T5_PREFIX[family] + t5.group(1).replace(".", "_")
    if llm and family == "zimage":
        return "text_encoders." + llm.group(1)
    raise EditFileError(f"no LoRA name for the weight {key!r}" + (f" in a {family} edit" if t5 or llm else ""))


def edit_family(edit: ErasureEdit) -> str:
    """The model family an edit was solved on (read from its settings; inferred for old files)."""
    fam = edit.settings.get("family") or edit.summary.get("family")
    if isinstance(fam, str) and fam:  # a loaded file's settings are not checksummed: never trust their type
        return fam
    if any(s.key.startswith("clip_g.") for s in edit.sites) or any("label_emb" in s.key for s in edit.sites):
        return "sdxl"
    return "sd2" if any(s.key.startswith("clip_h.") for s in edit.sites) else "sd15"


def _lambda(settings: dict) -> float:
    if "lambda" in settings:
        return float(settings["lambda"])
    if "lam" in settings:
        return float(settings["lam"])
    from .chain import SolverSettings  # the defaults the solve used
    d = SolverSettings()
    return float(d.uce_lam if settings.get("method") == "uce" else d.lam)


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=_json_default)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def site_checksum(name: str, tensors, relative_change: float, residual: float) -> str:
    """SHA-256 of one site's stored data: its factors and alpha exactly as stored, and its figures.

    ``tensors`` are the site's ``(lora_up, lora_down, alpha)`` in the file's dtype (empty for a
    rank-0 site). Any changed byte, or a changed per-site figure, gives another checksum.
    """
    h = hashlib.sha256()
    h.update(name.encode())
    for t in tensors:
        hash_exact(h, t)
    h.update(f"|{float(relative_change)!r}|{float(residual)!r}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Edit → tensors + metadata
# ----------------------------------------------------------------------------------------
def _balanced(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product, each rank-1 term split so both factors carry equal norm (for half dtypes)."""
    u, d = up.double(), down.double()
    nu, nd = u.norm(dim=0), d.norm(dim=1)
    s = torch.where((nu > 0) & (nd > 0), (nd / nu.clamp_min(1e-300)).sqrt(), torch.ones_like(nu))
    return u * s, d / s[:, None]


def compact(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the same ``ΔW`` with rank at most ``min(out, in)``, exactly.

    The solver's factors have the rank of its compressed constraint matrix, which can exceed a
    narrow layer's width (e.g. several hundred constraints on a 320-wide K/V projection). Then ``ΔW`` is
    stored as ``I @ ΔW`` (or ``ΔW @ I``) with ``ΔW = (up @ down)`` multiplied in float64 and cast
    to float32 — the very tensor :meth:`SiteEdit.delta` gives, so applying it is bit-identical,
    and ComfyUI's float32 ``lora_up @ lora_down`` with an identity factor is exact too.
    """
    out_dim, rank, in_dim = int(up.shape[0]), int(up.shape[1]), int(down.shape[1])
    if rank <= min(out_dim, in_dim):
        return up, down
    dense = (up.to(torch.float64) @ down.to(torch.float64)).to(torch.float32)
    if out_dim <= in_dim:
        return torch.eye(out_dim, dtype=torch.float32), dense
    return dense, torch.eye(in_dim, dtype=torch.float32)


def _stored_factors(s: SiteEdit, tdtype: torch.dtype, dtype: str) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """``(solver_rank, up, down, rank)``: a site's factors checked, compacted and cast to the
    storage dtype (half dtypes get balanced factors)."""
    up, down = s.up.detach().cpu(), s.down.detach().cpu()
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise EditFileError(f"{s.key}: factors {tuple(up.shape)} and {tuple(down.shape)} do not multiply")
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise EditFileError(f"{s.key}: the edit contains NaN/Inf; refusing to save it")
    solver_rank = int(up.shape[1])
    up, down = compact(up, down)
    rank = int(up.shape[1])
    if rank > 0 and tdtype != torch.float32:
        u, d = _balanced(up, down)
        up, down = u.to(tdtype), d.to(tdtype)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise EditFileError(f"{s.key}: the factors overflow {dtype}; save as float32")
    elif rank > 0:
        up, down = up.to(torch.float32), down.to(torch.float32)
    return solver_rank, up, down, rank


def _site_entry(s: SiteEdit, name: str, tdtype: torch.dtype, dtype: str,
                tensors: dict[str, torch.Tensor]) -> dict:
    """Store one site's tensors in ``tensors``; its entry in the metadata's site list."""
    solver_rank, up, down, rank = _stored_factors(s, tdtype, dtype)
    if rank > 0:
        # copies: the returned tensors never alias the edit's factors
        tensors[f"{name}.lora_up.weight"] = up.to(tdtype).contiguous().clone()
        tensors[f"{name}.lora_down.weight"] = down.to(tdtype).contiguous().clone()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
    stored = [tensors[name + x] for x in _SUFFIXES] if rank > 0 else []
    return {"name": name, "key": s.key, "part": s.part, "stage": s.stage, "rank": rank,
            "solver_rank": solver_rank,
            "shape": [int(up.shape[0]), int(down.shape[1])],
            "relative_change": float(s.relative_change), "residual": float(s.residual),
            "sha256": site_checksum(name, stored, s.relative_change, s.residual)}


def _metadata(edit: ErasureEdit, family: str, sites: list[dict], dtype: str) -> dict[str, str]:
    settings = dict(edit.settings)
    max_rank = max(x["rank"] for x in sites)
    meta = {
        "erasepro.format": FORMAT,
        "erasepro.version": str(settings.get("version", __version__)),
        "erasepro.exporter_version": __version__,
        "erasepro.fingerprint": edit.fingerprint,
        "erasepro.fingerprint_method": FINGERPRINT_METHOD,
        "erasepro.checksum_method": CHECKSUM_METHOD,
        "erasepro.family": family,
        "erasepro.concepts": _json(settings.get("concepts", [])),
        "erasepro.method": str(settings.get("method", "")),
        "erasepro.progressive_layers": str(settings.get("progressive_layers", "")),
        "erasepro.lambda": repr(_lambda(settings)),
        "erasepro.preserve": _json(settings.get("preserve", [])),
        "erasepro.preserve_strength": str(settings.get("preserve_strength", "")),
        "erasepro.rule": str(settings.get("rule", "")),
        "erasepro.storage_dtype": dtype,
        "erasepro.settings": _json(settings),
        "erasepro.summary": _json(edit.summary),
        "erasepro.sites": _json(sites),
        # informational keys kohya-style tools show and filter on
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max_rank),
        "ss_network_alpha": str(max_rank),
        "ss_network_args": _json({"erasepro": "per-site rank; alpha = rank (scale 1)"}),
    }
    if family in _BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = _BASE_MODEL_VERSION[family]
    for k in ("train_residual", "deep_burden", "deep_rank", "pooled_residual", "solve_seconds"):
        if edit.summary.get(k) is not None:
            meta[f"erasepro.{k}"] = repr(edit.summary[k])
    return meta


def to_state_dict(edit: ErasureEdit, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the LoRA file for ``edit``; float32 keeps the factors bit-exact."""
    if dtype not in STORAGE_DTYPES:
        raise EditFileError(f"storage dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if not edit.sites:
        raise EditFileError("the edit has no sites: nothing to save")
    tdtype = STORAGE_DTYPES[dtype]
    family = edit_family(edit)
    tensors: dict[str, torch.Tensor] = {}
    sites = []
    for s in edit.sites:
        name = lora_name(s.key, family)
        if any(x["name"] == name for x in sites):
            raise EditFileError(f"two sites map to the LoRA name {name}")
        sites.append(_site_entry(s, name, tdtype, dtype, tensors))
    return tensors, _metadata(edit, family, sites, dtype)


def save(edit: ErasureEdit, path: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write ``edit`` to ``path`` (atomically: a temporary file, then rename)."""
    from safetensors.torch import save_file

    tensors, meta = to_state_dict(edit, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------------------
# File → checked header → tensors → ErasureEdit
# ----------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike) -> dict:
    """The safetensors JSON header of ``path``, after checking the file *is* one and is complete.

    Refuses (EditFileError) a missing/short file, a pickle or PyTorch zip archive, a header that
    is not JSON, tensors with bad offsets, and a truncated file — without unpickling anything.
    """
    path = Path(path)
    if not path.is_file():
        raise EditFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            raise EditFileError(f"{path.name} is a PyTorch/zip (pickle) archive, not a safetensors file; "
                                "ErasePro never unpickles files (they can run code). Re-export it as safetensors.")
        if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
            raise EditFileError(f"{path.name} is a Python pickle, not a safetensors file; "
                                "ErasePro never unpickles files (they can run code).")
        if len(head) < 8:
            raise EditFileError(f"{path.name} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER:
            raise EditFileError(f"{path.name} is not a safetensors file (header length {n} is impossible)")
        if 8 + n > size:
            raise EditFileError(f"{path.name} is truncated: its header needs {n} bytes, the file has {size - 8}")
        raw = f.read(n)
    if raw[:1] != b"{":
        raise EditFileError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, a 5000-digit number, [[[[…]]]] nested too deep
        raise EditFileError(f"{path.name} is not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise EditFileError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    data = size - 8 - n
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise EditFileError(f"{path.name}: malformed safetensors metadata")
            continue
        entry = _tensor_entry(info)
        if entry is None:
            raise EditFileError(f"{path.name}: malformed safetensors entry for tensor {key!r}")
        dt, shape, b, e = entry
        if dt not in _ST_DTYPES or any(x < 0 for x in shape) or not (0 <= b <= e):
            raise EditFileError(f"{path.name}: malformed safetensors entry for tensor {key!r}")
        if e - b != math.prod(shape) * _ST_DTYPES[dt]:
            raise EditFileError(f"{path.name}: tensor {key!r} has {e - b} bytes for shape {shape} {dt}")
        end = max(end, e)
    if end > data:
        raise EditFileError(f"{path.name} is truncated: its tensors need {end} bytes of data, the file has {data}")
    if end < data:
        raise EditFileError(f"{path.name} is not a well-formed safetensors file ({data - end} stray bytes after the tensors)")
    return header


def _tensor_entry(info) -> tuple[str, list[int], int, int] | None:
    """``(dtype, shape, begin, end)`` of a header's tensor entry, or None unless it has safetensors'
    own types: a dtype string, a list of integer dimensions, two integer offsets."""
    if not isinstance(info, dict):
        return None
    dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")

    def integers(xs) -> bool:
        return isinstance(xs, list) and all(type(x) is int for x in xs)  # not bool, float or str

    if not (isinstance(dt, str) and integers(shape) and integers(offsets) and len(offsets) == 2):
        return None
    return dt, shape, offsets[0], offsets[1]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a checked safetensors file (no tensors read)."""
    return dict(read_header(path).get("__metadata__") or {})


def load(path: str | os.PathLike) -> ErasureEdit:
    """Read and validate an ErasePro LoRA file (see :func:`from_state_dict`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header = read_header(path)
    meta = dict(header.get("__metadata__") or {})
    if "erasepro.format" not in meta:
        raise EditFileError(f"{path.name} is a safetensors file but not an ErasePro edit (no erasepro metadata); "
                            "load ordinary LoRAs with ComfyUI's Load LoRA node")
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise EditFileError(f"{path.name}: not a well-formed safetensors file ({e})") from None
    return from_state_dict(tensors, meta, source=path.name)


def _loads(meta: dict, key: str, source: str):
    try:
        return json.loads(meta[key])
    except KeyError:
        raise EditFileError(f"{source}: metadata {key!r} is missing") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit number, nested too deep
        raise EditFileError(f"{source}: metadata {key!r} is not valid JSON ({e})") from None


def _check_meta(meta: dict[str, str], source: str) -> tuple[str, list, dict, dict]:
    """``(fingerprint, site entries, settings, summary)`` after checking the format and the JSON."""
    fmt = meta.get("erasepro.format")
    if fmt is None:
        raise EditFileError(f"{source}: not an ErasePro edit (no erasepro metadata)")
    if fmt != FORMAT:
        raise EditFileError(f"{source}: ErasePro edit format {fmt!r} is not supported (this version reads {FORMAT!r})")
    fp = meta.get("erasepro.fingerprint", "")
    if not re.fullmatch(r"[0-9a-f]{64}", fp or ""):
        raise EditFileError(f"{source}: metadata 'erasepro.fingerprint' is missing or malformed")
    sites_meta = _loads(meta, "erasepro.sites", source)
    settings = _loads(meta, "erasepro.settings", source)
    summary = _loads(meta, "erasepro.summary", source)
    if not isinstance(sites_meta, list) or not sites_meta or not isinstance(settings, dict) or not isinstance(summary, dict):
        raise EditFileError(f"{source}: malformed ErasePro metadata (sites/settings/summary)")
    return fp, sites_meta, settings, summary


def _site_header(i: int, sm, family: str | None, source: str, seen_keys: set[str]):
    """``(name, key, part, stage, rank, out_dim, in_dim, relative_change, residual)`` of site entry
    ``i``, checked against the entries before it and its LoRA name."""
    try:
        name, key, part, stage = str(sm["name"]), str(sm["key"]), str(sm["part"]), str(sm["stage"])
        rank = int(sm["rank"])
        out_dim, in_dim = (int(x) for x in sm["shape"])
        rel, res = float(sm["relative_change"]), float(sm["residual"])
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(1e400), float(10**400)
        raise EditFileError(f"{source}: malformed site entry #{i} in the metadata") from None
    dims_ok = 0 < out_dim < 2 ** 63 and 0 < in_dim < 2 ** 63  # a tensor's dimensions (a rank-0 site makes zeros)
    if part not in ("model", "clip") or rank < 0 or not dims_ok or key in seen_keys:
        raise EditFileError(f"{source}: malformed site entry #{i} ({key})")
    if (part == "model") != key.startswith("diffusion_model."):
        raise EditFileError(f"{source}: site {key} is marked part={part!r}")
    seen_keys.add(key)
    if lora_name(key, family) != name:
        raise EditFileError(f"{source}: LoRA name {name} does not belong to the weight {key}")
    return name, key, part, stage, rank, out_dim, in_dim, rel, res


def _site_tensors(tensors: dict[str, torch.Tensor], name: str, key: str, rank: int, out_dim: int, in_dim: int,
                  source: str, used: set[str]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(up, down, stored)`` of a site with rank > 0: its float32 factors after checking each
    stored tensor (``stored``: up, down, alpha as in the file)."""
    names = [name + s for s in _SUFFIXES]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise EditFileError(f"{source}: tensor(s) {missing} missing for {key}")
    up_t, down_t, alpha_t = (tensors[n] for n in names)
    used.update(names)
    for n, t in zip(names, (up_t, down_t, alpha_t)):
        if not t.is_floating_point():
            raise EditFileError(f"{source}: {n} has dtype {t.dtype}, expected a float tensor")
    if tuple(up_t.shape) != (out_dim, rank) or tuple(down_t.shape) != (rank, in_dim):
        raise EditFileError(
            f"{source}: wrong shapes for {key}: lora_up {tuple(up_t.shape)}, lora_down {tuple(down_t.shape)}; "
            f"expected ({out_dim}, {rank}) and ({rank}, {in_dim})")
    if alpha_t.numel() != 1 or float(alpha_t.reshape(())) != float(rank):
        raise EditFileError(f"{source}: {name}.alpha must be the rank {rank} (scale 1), "
                            f"got {alpha_t.reshape(-1)[:1].tolist()}")
    up, down = up_t.to(torch.float32), down_t.to(torch.float32)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise EditFileError(f"{source}: {name} contains NaN/Inf values; the file is corrupt")
    return up, down, [up_t, down_t, alpha_t]


def from_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str = "edit") -> ErasureEdit:
    """An ErasureEdit from LoRA tensors + metadata, after checking every tensor.

    Checks: the format version, the site list, each site's up/down/alpha present, 2-D, floating,
    shapes ``(out, r)``/``(r, in)`` matching the recorded site shape and rank, ``alpha == r``,
    finite values, each site's data against its checksum (:func:`site_checksum`; a file without
    checksums, from an older ErasePro, loads with a warning), the LoRA name matching the weight
    key, and no tensor left over.
    """
    fp, sites_meta, settings, summary = _check_meta(meta, source)
    family = meta.get("erasepro.family") or settings.get("family")
    if family is not None and not isinstance(family, str):
        raise EditFileError(f"{source}: malformed ErasePro metadata (the family is a {type(family).__name__}, not a name)")
    # Files from before checksums existed have neither the method nor per-site checksums.
    checksummed = "erasepro.checksum_method" in meta or any(isinstance(sm, dict) and "sha256" in sm
                                                            for sm in sites_meta)
    if not checksummed:
        log.warning("ErasePro: %s has no checksums (written by an older ErasePro): its data cannot be "
                    "verified; re-save it to add them", source)
    used: set[str] = set()
    sites = []
    seen_keys: set[str] = set()
    for i, sm in enumerate(sites_meta):
        name, key, part, stage, rank, out_dim, in_dim, rel, res = _site_header(i, sm, family, source, seen_keys)
        if rank == 0:
            up, down, stored = torch.zeros(out_dim, 0), torch.zeros(0, in_dim), []
        else:
            up, down, stored = _site_tensors(tensors, name, key, rank, out_dim, in_dim, source, used)
        if checksummed and site_checksum(name, stored, rel, res) != sm.get("sha256"):
            raise EditFileError(f"{source}: the edit file is damaged: site {key}'s data do not match its checksum; "
                                "save the edit again from the solver (or restore the file)")
        sites.append(SiteEdit(key, part, stage, up.contiguous(), down.contiguous(), rel, res))
    extra = sorted(set(tensors) - used)
    if extra:
        raise EditFileError(f"{source}: unexpected tensor(s) not described by the metadata: {extra[:5]}"
                            + (" …" if len(extra) > 5 else ""))
    return ErasureEdit(tuple(sites), settings, summary, fp)


def _listed(meta: dict[str, str], key: str) -> list:
    """The JSON list at metadata ``key``; [] when it is missing, not JSON or not a list (these keys are
    informational, not covered by the checksums: a damaged one must not stop a good edit loading)."""
    try:
        value = json.loads(meta.get(key) or "[]")
    except (TypeError, ValueError, RecursionError):
        return []
    return value if isinstance(value, list) else []


def describe(meta: dict[str, str]) -> str:
    """A short human-readable summary of an edit file's metadata."""
    concepts = [c for c in _listed(meta, "erasepro.concepts") if isinstance(c, dict)]
    sites = [s for s in _listed(meta, "erasepro.sites") if isinstance(s, dict)]
    pairs = ", ".join(f"{c.get('target')} → {c.get('anchor') or '(nothing)'}" for c in concepts)
    n_model = sum(1 for s in sites if s.get("part") == "model")
    n_clip = sum(1 for s in sites if s.get("part") == "clip")
    max_rank = max((s["rank"] for s in sites if type(s.get("rank")) is int), default=0)
    lines = [
        f"ErasePro edit v{meta.get('erasepro.version', '?')} ({meta.get('erasepro.family', '?')}), "
        f"method {meta.get('erasepro.method', '?')}, S={meta.get('erasepro.progressive_layers', '?')}, "
        f"λ={meta.get('erasepro.lambda', '?')}, stored as {meta.get('erasepro.storage_dtype', '?')}",
        f"concepts: {pairs or '(none)'}",
        f"sites: {n_model} UNet, {n_clip} text encoder; max rank {max_rank}",
        f"train residual {meta.get('erasepro.train_residual', '?')}, deep burden {meta.get('erasepro.deep_burden', '?')}",
        f"base-model fingerprint {meta.get('erasepro.fingerprint', '?')[:16]}…",
    ]
    preserve = _listed(meta, "erasepro.preserve")
    if preserve:
        lines.append(f"preserve: {len(preserve)} prompt(s)")
    return "\n".join(lines)
