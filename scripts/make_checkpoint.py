#!/usr/bin/env python3
"""Write a random-weight Stable Diffusion 1.5 checkpoint in the original single-file format.

The models are ComfyUI's own classes (``comfy.supported_models.SD15`` config ->
``comfy.model_base.BaseModel``, the CLIP from ``model_config.clip_target()``, ``comfy.sd.VAE``)
with a deterministic sane init, saved through ComfyUI's own conversion
(``BaseModel.state_dict_for_saving``, as the CheckpointSave node does). ComfyUI's
``load_checkpoint_guess_config`` detects the file as SD15.

* CLIP-L is full size (ComfyUI's SD1 loader always builds the 12-layer text encoder).
* The UNet is tiny by default (model_channels 320, context 768, conv proj, channel_mult (1,2),
  one res block per level, transformer depth 1); ``--full-unet`` gives the real 860M SD1.5 UNet.
* The VAE is the standard KL-f8 VAE.

Random weights: sampled images are noise. Usage::

    .venv/bin/python scripts/make_checkpoint.py                  # tiny -> <comfyui>/models/checkpoints/
    .venv/bin/python scripts/make_checkpoint.py --full-unet --fp16
    .venv/bin/python scripts/make_checkpoint.py --out /tmp/x.safetensors --seed 3 --force
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import comfy_host as host  # noqa: E402  (scripts/, on sys.path when this runs as a script)

FORMAT_VERSION = "1"


def wanted_metadata(seed: int, full_unet: bool, dtype: str) -> dict:
    return {
        "erasepro.generator": "scripts/make_checkpoint.py",
        "erasepro.format": FORMAT_VERSION,
        "erasepro.family": "sd15",
        "erasepro.unet": "full" if full_unet else "tiny",
        "erasepro.seed": str(seed),
        "erasepro.dtype": dtype,
        "erasepro.unet_config": json.dumps(host.unet_config("sd15", "full" if full_unet else "tiny"),
                                           sort_keys=True),
        "erasepro.note": "random weights, for tests and demos only: images are noise",
    }


def existing_metadata(path: Path) -> dict | None:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def build_and_save(out: Path, seed: int, full_unet: bool, dtype_name: str, metadata: dict) -> float:
    import torch
    c = host.import_comfy()
    size = "full" if full_unet else "tiny"
    t0 = time.time()
    model = host.build_model("sd15", size, seed=seed, dtype=torch.float32)
    clip = host.build_clip("sd15", "full", seed=seed, dtype=torch.float32)  # full 12-layer CLIP-L
    vae = host.build_vae(seed)
    # Same steps as comfy.sd.save_checkpoint, with a final cast to the requested dtype.
    c.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    for k, t in list(sd.items()):
        if t.is_floating_point() and not k.endswith("position_ids"):
            t = t.to(dtype)
        sd[k] = t.detach().cpu().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    c.utils.save_torch_file(sd, str(tmp), metadata=metadata)
    tmp.replace(out)
    return time.time() - t0


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def verify(path: Path, steps: int = 1, size: int = 64) -> dict:
    """Load with ComfyUI's loader, check SD15 + no missing keys, sample and decode."""
    import torch
    c = host.import_comfy()
    cap = _Capture()
    root = logging.getLogger()
    root.addHandler(cap)
    try:
        t0 = time.time()
        model, clip, vae, _ = c.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        load_s = time.time() - t0
    finally:
        root.removeHandler(cap)
    msgs = [r.getMessage() for r in cap.records]
    # ComfyUI warns (WARNING level) on missing unet/clip/VAE keys and failed detection
    problems = [m for m in msgs if "missing" in m.lower() or "unexpected" in m.lower()
                or "not a checkpoint" in m or "no CLIP" in m or "not initalized" in m]
    family = host.family(model)
    if family != "sd15" or not isinstance(model.model.model_config, c.supported_models.SD15):
        raise SystemExit(f"loaded as {type(model.model.model_config).__name__}, expected SD15")
    if problems:
        raise SystemExit("loader reported problems:\n  " + "\n  ".join(problems))
    t0 = time.time()
    with torch.inference_mode():
        pos = host.conditioning(clip, "a photo of a cat")
        neg = host.conditioning(clip, "")
        lat = host.ksample(model, pos, neg, host.empty_latent(size, size), seed=0, steps=steps, cfg=7.0)
        img = vae.decode(lat["samples"])
    sample_s = time.time() - t0
    ok = bool(torch.isfinite(lat["samples"]).all() and torch.isfinite(img).all())
    if not ok:
        raise SystemExit("non-finite latent or image")
    return {"load_s": load_s, "sample_decode_s": sample_s, "image_shape": tuple(img.shape),
            "model_type": model.model.model_type.name, "config": type(model.model.model_config).__name__,
            "image_std": float(img.float().std())}


def default_out(full_unet: bool = False) -> Path:
    return (host.comfy_dir() / "models" / "checkpoints" /
            ("erasepro_full_sd15.safetensors" if full_unet else host.TINY_CHECKPOINT_NAME))


def ensure_checkpoint(out: Path | None = None, seed: int = 0, full_unet: bool = False, dtype: str = "fp32",
                      force: bool = False, verify_after: bool = False) -> Path:
    """Library entry point: the checkpoint path, written only when missing or different."""
    out = Path(out or default_out(full_unet)).resolve()
    meta = wanted_metadata(seed, full_unet, dtype)
    have = existing_metadata(out) if out.exists() else None
    if force or have is None or any(have.get(k) != v for k, v in meta.items()):
        build_and_save(out, seed, full_unet, dtype, meta)
        if verify_after:
            verify(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="output file (default <comfyui>/models/checkpoints/erasepro_tiny_sd15.safetensors, "
                         "or erasepro_full_sd15.safetensors with --full-unet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-unet", action="store_true", help="the real 860M SD1.5 UNet (benchmarks)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--fp16", dest="dtype", action="store_const", const="fp16")
    g.add_argument("--fp32", dest="dtype", action="store_const", const="fp32")
    ap.add_argument("--force", action="store_true", help="rewrite even if an identical file exists")
    ap.add_argument("--no-verify", action="store_true", help="skip the load / sample check after writing")
    ap.add_argument("--verify", action="store_true", help="check an up-to-date file too")
    args = ap.parse_args(argv)
    dtype = args.dtype or "fp32"
    out = (args.out or default_out(args.full_unet)).resolve()
    meta = wanted_metadata(args.seed, args.full_unet, dtype)

    have = existing_metadata(out) if out.exists() else None
    if have is not None and not args.force and all(have.get(k) == v for k, v in meta.items()):
        print(f"[make_checkpoint] up to date: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
        if args.verify:
            _report(verify(out))
        return 0

    print(f"[make_checkpoint] building SD1.5 ({'full' if args.full_unet else 'tiny'} UNet, seed {args.seed}, {dtype})")
    build_s = build_and_save(out, args.seed, args.full_unet, dtype, meta)
    print(f"[make_checkpoint] wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {build_s:.1f} s")
    if not args.no_verify:
        _report(verify(out))
    return 0


def _report(r: dict) -> None:
    print(f"[make_checkpoint] verified: {r['config']} {r['model_type']}, load {r['load_s']:.1f} s, "
          f"1 step 64x64 + VAE decode {r['sample_decode_s']:.1f} s, image {r['image_shape']} finite")


if __name__ == "__main__":
    sys.exit(main())
