#!/usr/bin/env python3
"""`make demo`: run an example workflow headless on a real ComfyUI.

* ComfyUI folder: $COMFYUI or <repo>/.comfyui (made by scripts/bootstrap.sh); the pack is
  linked into its custom_nodes when it is not there yet.
* Model: by default the pack's trained toy model (workflows/erasepro_toy_erasure.json: the
  ball erased to a box, pictures you can judge by eye). With ``CKPT=/path/to/model.safetensors``
  (linked, or copied when linking fails, into <comfyui>/models/checkpoints under its own file
  name) workflows/erasepro_style_erasure.json on that checkpoint. A workflow given with
  ``--workflow`` that loads a checkpoint without CKPT gets the random-weight tiny SD1.5 from
  scripts/make_checkpoint.py (its pictures are noise).
* Starts ComfyUI on a free loopback port (scripts/comfy_server.py), queues the workflow through
  POST /prompt, waits on /history, stops the server on exit (errors and Ctrl-C included).
* Writes <repo>/output/: before.png, after.png, report.png and summary.json (the solver's
  report: train residual, deep burden, time, per-site changes; image paths).

Usage::

    .venv/bin/python scripts/run_demo.py [--workflow workflows/x.json] [--out output] [--seed N]
    CKPT=~/models/v1-5-pruned-emaonly.safetensors make demo
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(1, str(REPO))  # erasepro_ops (this runs as a script: only scripts/ is on the path)

import comfy_server as cs  # noqa: E402
from erasepro_ops.summary import Summary  # noqa: E402

TOY_WORKFLOW = REPO / "workflows" / "erasepro_toy_erasure.json"
CHECKPOINT_WORKFLOW = REPO / "workflows" / "erasepro_style_erasure.json"
SOLVER = "ErasePro_ProgressiveSolver"
PACK_LINK = "ComfyUI-ErasePro"


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def ensure_pack_linked(comfy: Path) -> None:
    cn = comfy / "custom_nodes"
    cn.mkdir(parents=True, exist_ok=True)
    for entry in cn.iterdir():
        try:
            if entry.resolve() == REPO:
                return
        except OSError:
            continue
    link = cn / PACK_LINK
    if link.is_symlink() or link.exists():
        raise RuntimeError(f"{link} exists but is not this repository ({REPO}); remove it or set COMFYUI")
    link.symlink_to(REPO, target_is_directory=True)
    log(f"linked the pack: {link} -> {REPO}")


def ensure_checkpoint(comfy: Path) -> str:
    """The ckpt_name to use (a file name in <comfyui>/models/checkpoints)."""
    ckdir = comfy / "models" / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    user = os.environ.get("CKPT")
    if user:
        src = Path(user).expanduser().absolute()  # keep the given file name (even for a link)
        if not src.is_file():
            raise FileNotFoundError(f"CKPT={user}: no such file")
        dst = ckdir / src.name
        if dst.exists() or dst.is_symlink():
            if dst.resolve() != src.resolve() and not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
                raise RuntimeError(f"{dst} exists and is a different file; rename {src.name} or remove {dst}")
        else:
            try:
                dst.symlink_to(src)
                log(f"linked {dst} -> {src}")
            except OSError:
                log(f"copying {src} -> {dst}")
                shutil.copy2(src, dst)
        return src.name
    os.environ.setdefault("COMFYUI", str(comfy))  # make_checkpoint writes where this server reads
    import make_checkpoint  # noqa: E402  (imports ComfyUI in this process; only needed here)
    t0 = time.time()
    path = make_checkpoint.ensure_checkpoint()
    log(f"checkpoint {path.name} ready ({time.time() - t0:.1f} s)")
    return path.name


def _images(hist: dict, nid: str, output_dir: Path) -> list[Path]:
    return [Path(output_dir) / it.get("subfolder", "") / it["filename"]
            for it in ((hist.get("outputs") or {}).get(nid) or {}).get("images") or []
            if it.get("type", "output") == "output"]


def _save_strip(paths: list[Path], dst: Path, smallest: int = 128) -> None:
    """Small pictures (the toy model's 32 × 32) side by side, enlarged to ``smallest`` pixels
    high with nearest-neighbour; larger ones: the first, copied."""
    from PIL import Image
    with Image.open(paths[0]) as first:
        if first.height >= smallest:
            shutil.copy2(paths[0], dst)
            return
    images = [Image.open(p).convert("RGB") for p in paths]
    scale = -(-smallest // images[0].height)
    w, h = images[0].width * scale, images[0].height * scale
    strip = Image.new("RGB", (len(images) * (w + 4) - 4, h), "white")
    for i, im in enumerate(images):
        strip.paste(im.resize((w, h), Image.NEAREST), (i * (w + 4), 0))
    strip.save(dst)


def prepare_prompt(wf: dict, info: dict, ckpt_name: str, seed):
    """The workflow as an API prompt on ``ckpt_name`` (and ``seed``, if given): ``(prompt, the
    solver's node id, SaveImage node id by filename label)``."""
    api = cs.ui_to_api(wf, info)
    solver_id = next(nid for nid, n in api.items() if n["class_type"] == SOLVER)
    saves = {}
    for nid, n in api.items():
        ct, inputs = n["class_type"], n["inputs"]
        if ct == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        elif ct == "KSampler" and seed is not None:
            inputs["seed"] = seed
        elif ct == "SaveImage":
            saves[inputs["filename_prefix"].rsplit("/", 1)[-1]] = nid
    return api, solver_id, saves


def before_after(before: Path, after: Path, dst: Path) -> None:
    """One picture: the 'before' strip above the 'after' strip, each labelled (README, thumbnail)."""
    from PIL import Image, ImageDraw
    top, bottom = Image.open(before).convert("RGB"), Image.open(after).convert("RGB")
    label_w, gap = 70, 6
    w = label_w + max(top.width, bottom.width)
    canvas = Image.new("RGB", (w, top.height + bottom.height + gap), "white")
    canvas.paste(top, (label_w, 0))
    canvas.paste(bottom, (label_w, top.height + gap))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, top.height // 2 - 6), "before", fill="black")
    draw.text((6, top.height + gap + bottom.height // 2 - 6), "after", fill="black")
    canvas.save(dst)


def copy_images(hist: dict, saves: dict, output_dir: Path, out: Path) -> dict:
    """Copy the before / after / report images to ``<out>/<label>.png``; label → path."""
    images = {}
    for label in ("before", "after", "report"):
        nid = saves.get(label)
        srcs = [p for p in (_images(hist, nid, output_dir) if nid else []) if p.is_file()]
        if not srcs:
            log(f"warning: no '{label}' image in the results")
            continue
        dst = out / f"{label}.png"
        _save_strip(srcs, dst)
        images[label] = str(dst)
    if "before" in images and "after" in images:
        both = out / "before_after.png"
        before_after(Path(images["before"]), Path(images["after"]), both)
        images["before_after"] = str(both)
    return images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", type=Path, default=None,
                    help=f"default: {TOY_WORKFLOW.name}, or {CHECKPOINT_WORKFLOW.name} when CKPT is set")
    ap.add_argument("--out", type=Path, default=REPO / "output")
    ap.add_argument("--seed", type=int, default=None, help="KSampler seed (default: the workflow's)")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args(argv)

    comfy = cs.comfy_dir()
    if not (comfy / "main.py").is_file():
        log(f"no ComfyUI in {comfy}: run `make setup` (scripts/bootstrap.sh) or set COMFYUI")
        return 2
    ensure_pack_linked(comfy)
    if a.workflow is None:
        a.workflow = CHECKPOINT_WORKFLOW if os.environ.get("CKPT") else TOY_WORKFLOW
    wf = json.loads(a.workflow.read_text(encoding="utf-8"))
    loads_checkpoint = any(n["type"] == "CheckpointLoaderSimple" for n in wf["nodes"])
    ckpt_name = ensure_checkpoint(comfy) if loads_checkpoint else "the toy model"
    random_weights = loads_checkpoint and not os.environ.get("CKPT")

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "comfy"  # the server's own output/temp/user folders and log

    srv = cs.ComfyServer(comfy=comfy, output_dir=run_dir / "output", temp_dir=run_dir / "temp",
                         user_dir=run_dir / "user", log_path=run_dir / "comfyui.log")
    log(f"starting ComfyUI {comfy} ({'CPU' if srv.cpu else 'GPU'}) ...")
    t_start = time.time()
    try:
        srv.start(timeout=300)
        log(f"ComfyUI up at {srv.base_url} in {time.time() - t_start:.1f} s")
        info = srv.object_info()
        missing = sorted({n["type"] for n in wf["nodes"]
                          if n["type"] not in cs.VIRTUAL_NODES and n["type"] not in info})
        if missing:
            raise RuntimeError(f"node types missing on the server: {missing} (see {srv.log_path})")
        api, solver_id, saves = prepare_prompt(wf, info, ckpt_name, a.seed)
        log(f"running {a.workflow.relative_to(REPO) if a.workflow.is_relative_to(REPO) else a.workflow} "
            f"on {ckpt_name} ...")
        t0 = time.time()
        hist = cs.run_workflow(srv.base_url, api, timeout=a.timeout)
        wall = time.time() - t0
    except BaseException as e:
        if isinstance(e, cs.WorkflowError):
            log(str(e))
        tail = srv.log_text()[-3000:]
        if tail and not isinstance(e, KeyboardInterrupt):
            log(f"ComfyUI log tail ({srv.log_path}):\n{tail}")
        raise
    finally:
        srv.stop()

    images = copy_images(hist, saves, srv.output_dir, out)
    sol = (hist.get("outputs") or {}).get(solver_id) or {}
    report = (sol.get("erasepro_report") or [None])[0]
    if report is None:
        raise RuntimeError(f"the solver returned no erasepro_report (outputs: {sorted(sol)})")
    figures = Summary.from_dict(report)
    info = {"workflow": str(a.workflow), "checkpoint": ckpt_name, "random_weights": random_weights}
    write_summary(out, figures, report, info, images, wall)
    print_summary(out, figures, images, wall, random_weights)
    return 0


def write_summary(out: Path, figures: Summary, report: dict, info: dict, images: dict, wall: float) -> None:
    """<out>/summary.json: the run and the solver's figures."""
    summary = {
        **info,
        "concepts": list(figures.concepts),
        "method": figures.method,
        "progressive_layers": figures.progressive_layers,
        "train_residual": figures.train_residual,
        "deep_burden": figures.deep_burden,
        "solve_seconds": figures.solve_seconds,
        "workflow_seconds": wall,
        "sites": [{"name": s.name, "stage": s.stage, "relative_change": s.relative_change, "residual": s.residual}
                  for s in figures.sites],
        "warnings": list(figures.warnings),
        "images": images,
        "report": report,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def print_summary(out: Path, figures: Summary, images: dict, wall: float, random_weights: bool) -> None:
    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    deep, shallow = figures.deep_sites(), figures.shallow_sites()
    print()
    print("ErasePro demo")
    print(f"  erased         : {', '.join(figures.concepts)} ({figures.method}, "
          f"S={figures.progressive_layers} progressive layers)")
    print(f"  train residual : {figures.train_residual:.2e}  (0 = the target's features now equal the anchor's)")
    print(f"  deep burden    : {figures.deep_burden:.2%}  (mean change per deep site "
          f"{mean(s.relative_change for s in deep):.2%}, per shallow site "
          f"{mean(s.relative_change for s in shallow):.2%}; {len(deep)} deep / {len(shallow)} shallow sites)")
    print(f"  solve time     : {figures.solve_seconds:.1f} s  (whole workflow {wall:.1f} s)")
    for w in figures.warnings:
        print(f"  warning        : {w}")
    for k, v in images.items():
        print(f"  {k + ' image':<15}: {os.path.relpath(v, Path.cwd())}")
    print(f"  summary        : {os.path.relpath(out / 'summary.json', Path.cwd())}")
    if random_weights:
        print("  NOTE: the checkpoint has random weights, so the before/after images are noise.")
        print("        The meaningful output is the report (residual, burden, per-layer change).")
        print("        Run with CKPT=/path/to/an/sd15.safetensors to see a real erasure.")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
