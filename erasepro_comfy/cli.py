"""Headless batch erasure with ComfyUI as a library (``python -m erasepro_ops erase ...``).

    python -m erasepro_ops erase --ckpt in.safetensors --pairs pairs.csv --out edit.safetensors \\
        [--bake out.safetensors] [--progressive-layers 3] [--method erasepro] [--concept-type style]
    python -m erasepro_ops info edit.safetensors

The pairs file is CSV, one concept per row: ``target,anchor[,concept_type[,prompts]]`` (an
optional header row starting with ``target``; ``#`` starts a comment line; an empty anchor means
"nothing"; ``prompts`` are extra templates with ``{}``, separated by ``|``). All rows are erased
in one solve. ``--out`` is the LoRA file (Save ErasePro Edit's format); ``--bake`` also writes a
full erased checkpoint through ``comfy.sd.save_checkpoint`` (what ComfyUI's CheckpointSave does).

This module imports nothing from ComfyUI at import time: :func:`main` puts the ComfyUI folder
(``$COMFYUI`` or ``<repo>/.comfyui``) first on ``sys.path``, picks ``--cpu`` when there is no GPU,
then imports ComfyUI's ``comfy`` package and ``erasepro_comfy.host``. It needs neither the node
classes nor ComfyUI's ``nodes`` module.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from erasepro_ops import export
from erasepro_ops.templates import CONCEPT_TYPES, ConceptPair
from erasepro_ops.contexts import (ALL_PADDING, DEFAULT_CONTEXT_TEMPLATES, DEFAULT_TEMPLATE_PADDING, MAX_CONTEXT_TEMPLATES,
                                   PADDING_TEMPLATES)
from erasepro_ops.errors import EraseProError
from erasepro_ops.pipeline import run_erasure
from erasepro_ops.linalg import DEFAULT_OVERFLOW_DAMPING, DEFAULT_OVERFLOW_PRESERVE_WEIGHT
from erasepro_ops.request import Request
from erasepro_ops.retain import DEFAULT_RETAIN_STRENGTH
from erasepro_ops.text import prompt_lines

REPO = Path(__file__).resolve().parents[1]


class CliError(Exception):
    pass


# ----------------------------------------------------------------------------------------
# Concepts file
# ----------------------------------------------------------------------------------------
def read_pairs(path: str | os.PathLike, default_type: str = "object") -> tuple[ConceptPair, ...]:
    """Concept pairs from a CSV of ``target,anchor[,concept_type[,prompts]]`` rows."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"pairs file {path} does not exist")
    pairs: list[ConceptPair] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if not pairs and not seen and cells[0].lower() == "target":
                continue  # header
            if len(cells) > 4:
                raise CliError(f"{path.name}:{lineno}: expected target,anchor[,concept_type[,prompts]], got {len(cells)} columns")
            target = cells[0]
            anchor = cells[1] if len(cells) > 1 else ""
            ctype = (cells[2] if len(cells) > 2 and cells[2] else default_type).lower()
            prompts = tuple(p.strip() for p in cells[3].split("|") if p.strip()) if len(cells) > 3 else ()
            try:
                pair = ConceptPair(target=target, anchor=anchor, concept_type=ctype, prompts=prompts)
            except ValueError as e:
                raise CliError(f"{path.name}:{lineno}: {e}") from None
            low = pair.target.lower()
            if low in seen:
                raise CliError(f"{path.name}:{lineno}: {pair.target!r} already on line {seen[low]}")
            seen[low] = lineno
            pairs.append(pair)
    if not pairs:
        raise CliError(f"{path.name}: no concept rows (expected target,anchor per line)")
    return tuple(pairs)


def read_lines(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    p = Path(path)
    if not p.is_file():
        raise CliError(f"preserve file {p} does not exist")
    return prompt_lines(p.read_text(encoding="utf-8")) or ()


# ----------------------------------------------------------------------------------------
# ComfyUI as a library
# ----------------------------------------------------------------------------------------
def comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI") or (REPO / ".comfyui")).expanduser().resolve()


def setup_comfy(force_cpu: bool = False):
    """Put ComfyUI first on sys.path, choose --cpu without a GPU, import ComfyUI and its host."""
    d = comfy_dir()
    if not (d / "comfy" / "sd.py").is_file():
        raise CliError(f"no ComfyUI at {d}: set COMFYUI=/path/to/ComfyUI (or run scripts/bootstrap.sh)")
    s = str(d)
    if s in sys.path:
        sys.path.remove(s)
    sys.path.insert(0, s)
    if "comfy.model_management" not in sys.modules:
        import torch
        import comfy.cli_args
        if force_cpu or os.environ.get("ERASEPRO_CPU") == "1" or not (
                torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                or torch.backends.mps.is_available()):
            comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401
    import erasepro_comfy.apply
    import erasepro_comfy.host
    return comfy, erasepro_comfy.host, erasepro_comfy.apply


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_erase(args) -> int:
    pairs = read_pairs(args.pairs, args.concept_type)
    preserve = read_lines(args.preserve)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        raise CliError(f"checkpoint {ckpt} does not exist")
    out = Path(args.out)
    for p in (out, Path(args.bake) if args.bake else None):
        if p is not None and p.exists() and not args.force:
            raise CliError(f"{p} exists; pass --force to overwrite")
    comfy, host, apply = setup_comfy(args.cpu)
    from tqdm import tqdm

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"ErasePro: {len(pairs)} concept(s) from {args.pairs}; loading {ckpt.name} with ComfyUI "
        f"({comfy.model_management.get_torch_device()})")
    t0 = time.perf_counter()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt), output_vae=bool(args.bake), output_clip=True)[:4]
    if clip is None:
        raise CliError(f"{ckpt.name} has no text encoder; ErasePro needs the CLIP of the checkpoint")
    load_s = time.perf_counter() - t0
    comfy_host = host.ComfyHost(model, clip)
    total = comfy_host.architecture().site_count(args.progressive_layers)
    request = _request(args, pairs, preserve)
    with tqdm(total=total, desc="erasing", unit="layer", file=sys.stderr, disable=args.quiet) as bar:
        def step(name):
            bar.set_postfix_str(name.split(".weight")[0][-40:], refresh=False)
            bar.update(1)
        t1 = time.perf_counter()
        edit = run_erasure(comfy_host, request, on_site=step)
        solve_s = time.perf_counter() - t1

    # every site must be a LoRA key ComfyUI's own loader maps to that weight
    key_map = apply.comfy_key_map(model, clip)
    family = edit.settings.get("family")
    unmapped = [s.key for s in edit.sites if key_map.get(export.lora_name(s.key, family)) != s.key]
    if unmapped:
        raise CliError(f"ComfyUI's LoRA loader would not map {len(unmapped)} site(s), e.g. {unmapped[0]}")
    apply.save_edit_file(edit, out, args.dtype)
    s = edit.figures
    ckpt_size, lora_size = ckpt.stat().st_size, out.stat().st_size
    say(f"solve {solve_s:.1f} s (load {load_s:.1f} s), {len(edit.sites)} layers, deep rank {s.deep_rank}, "
        f"train residual {s.train_residual:.3e}, deep burden {s.deep_burden:.3e}")
    for w in s.warnings:
        say(f"warning: {w}")
    say(f"wrote {out} ({_mb(lora_size)}, {args.dtype}) — the checkpoint is {_mb(ckpt_size)} "
        f"({lora_size / ckpt_size:.2%})")
    if args.bake:
        _bake(comfy, apply, args, ckpt, edit, model, clip, vae, say)
    return 0


def _request(args, pairs, preserve) -> Request:
    return Request(concepts=pairs, progressive_layers=int(args.progressive_layers), method=args.method,
                   rule=args.rule, preserve=preserve, preserve_strength=float(args.preserve_strength),
                   overflow_damping=float(args.overflow_damping),
                   overflow_preserve_weight=float(args.overflow_preserve_weight),
                   keep_empty_prompt=not args.no_keep_empty, retain_strength=float(args.retain_strength),
                   template_padding=int(args.template_padding), context_templates=int(args.context_sentences),
                   fit_padding=not args.keep_padding)


def _bake(comfy, apply, args, ckpt: Path, edit, model, clip, vae, say) -> None:
    """The full erased checkpoint, through ComfyUI's own checkpoint writer."""
    bake = Path(args.bake)
    bake.parent.mkdir(parents=True, exist_ok=True)
    new_model, new_clip = apply.apply_edit(model, clip, edit, float(args.strength))
    _, meta = export.to_state_dict(edit, args.dtype)
    meta = {k: v for k, v in meta.items() if k.startswith("erasepro.") and k != "erasepro.sites"}
    meta["erasepro.baked_strength"] = repr(float(args.strength))
    meta["erasepro.base_checkpoint"] = ckpt.name
    t2 = time.perf_counter()
    tmp = bake.with_name(bake.name + ".tmp")
    try:
        comfy.sd.save_checkpoint(str(tmp), new_model, new_clip, vae, metadata=meta)
        tmp.replace(bake)
    finally:
        if tmp.exists():
            tmp.unlink()
    say(f"baked {bake} ({_mb(bake.stat().st_size)}) in {time.perf_counter() - t2:.1f} s")


def cmd_info(args) -> int:
    meta = export.read_metadata(args.edit)
    if "erasepro.format" not in meta:
        raise CliError(f"{args.edit} is not an ErasePro edit (no erasepro metadata)")
    export.load(args.edit)  # full validation
    print(export.describe(meta))
    print(f"size: {_mb(Path(args.edit).stat().st_size)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erasepro_ops",
                                description="ErasePro: closed-form concept erasure, headless (ComfyUI as a library).")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("erase", help="erase the concepts of a CSV from a checkpoint; write a LoRA (and a baked checkpoint)")
    e.add_argument("--ckpt", required=True, help="SD1.x / SD2.x / SDXL single-file checkpoint (.safetensors)")
    e.add_argument("--pairs", required=True, help="CSV: target,anchor[,concept_type[,prompts separated by |]] per row")
    e.add_argument("--out", required=True, help="the edit as a LoRA file (.safetensors)")
    e.add_argument("--bake", help="also write the full erased checkpoint here")
    e.add_argument("--progressive-layers", "-S", type=int, default=3, help="shallow text-encoder blocks (of 12) taking part (default 3; 0 = UNet only)")
    e.add_argument("--method", choices=["erasepro", "uce"], default="erasepro")
    e.add_argument("--rule", choices=["residual_schedule", "anchor_features"], default="residual_schedule")
    e.add_argument("--concept-type", choices=list(CONCEPT_TYPES), default="object", help="templates for rows without a type (default object)")
    e.add_argument("--preserve", help="text file: prompts to keep still, one per line")
    e.add_argument("--preserve-strength", type=float, default=0.0,
                   help="extra soft weighting towards the preserve prompts, which are kept exactly anyway (0 = off)")
    e.add_argument("--overflow-damping", type=float, default=DEFAULT_OVERFLOW_DAMPING, metavar="RHO",
                   help="when the constraints exceed the rank budget (many concepts), fit the overflow by ridge "
                        f"(RHO * s_max)^2 instead of exactly (default {DEFAULT_OVERFLOW_DAMPING:g}; 0 = plain least squares)")
    e.add_argument("--overflow-preserve-weight", type=float, default=DEFAULT_OVERFLOW_PRESERVE_WEIGHT, metavar="W",
                   help="when the constraints exceed the rank budget, weight of the preserve prompts against the "
                        f"erasure's overflow in that fit (default {DEFAULT_OVERFLOW_PRESERVE_WEIGHT:g}; larger = they "
                        "move less, the padding is aligned less)")
    e.add_argument("--no-keep-empty", action="store_true",
                   help="do not hold the empty prompt (CFG's unconditional branch) exactly still (erasepro)")
    e.add_argument("--retain-strength", type=float, default=DEFAULT_RETAIN_STRENGTH,
                   help="weight the text-encoder edit away from the built-in retain bank of ordinary prompts "
                        f"(default {DEFAULT_RETAIN_STRENGTH:g}; 0 = off)")
    e.add_argument("--template-padding", type=int, default=DEFAULT_TEMPLATE_PADDING, metavar="N",
                   help="padding positions after each template's end token aligned exactly (erasepro; default "
                        f"{DEFAULT_TEMPLATE_PADDING}; {ALL_PADDING} = all: the templates erased to the last digit, other "
                        "prompts served worse)")
    e.add_argument("--keep-padding", action="store_true",
                   help="keep --template-padding as given (by default all templates share the padding positions of "
                        f"{PADDING_TEMPLATES}, and it is lowered until the concepts' columns take at most half the "
                        "rank budget; the summary says so)")
    e.add_argument("--context-sentences", type=int, default=DEFAULT_CONTEXT_TEMPLATES, metavar="N",
                   help="varied sentences per concept from the built-in bank, aligned at the concept and end tokens "
                        f"(erasepro; default {DEFAULT_CONTEXT_TEMPLATES}, at most {MAX_CONTEXT_TEMPLATES}; 0 = only the templates)")
    e.add_argument("--dtype", choices=list(export.STORAGE_DTYPES), default="float32", help="LoRA storage dtype (float32 = exact)")
    e.add_argument("--strength", type=float, default=1.0, help="strength baked into --bake (default 1)")
    e.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(func=cmd_erase)
    i = sub.add_parser("info", help="check an edit file and print what it holds (no ComfyUI needed)")
    i.add_argument("edit")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, export.EditFileError, EraseProError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
