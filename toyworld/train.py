"""`make toy-model`: train the toy world's text encoder, VAE, judge and UNet, and save them.

Stages, as Stable Diffusion was made: the text encoder contrastively against an image tower,
frozen; the VAE; then the UNet on the frozen text features and VAE latents. The judge is
trained apart, on renders only. Deterministic from ``--seed``. Writes::

    toyworld/weights/toy_sd15.safetensors   text encoder + UNet + VAE, float16, ComfyUI key layout
    toyworld/weights/judge.safetensors      the judge (float32)
    toyworld/weights/training.json          what each stage measured, and how long it took

Usage: ``.venv/bin/python -m toyworld.train [--smoke] [--out DIR] [--seed N]``. ``--smoke``
runs every stage for a few steps (a test runs it) and writes nowhere unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
MODEL_FILE, JUDGE_FILE, REPORT_FILE = "toy_sd15.safetensors", "judge.safetensors", "training.json"
FORMAT = "1"

FULL = {"text": 700, "vae": 600, "judge": 800, "unet": 3300}
SMOKE = {"text": 3, "vae": 3, "judge": 3, "unet": 3}


def _import_comfy():
    sys.path.insert(0, str(HERE.parent / "scripts"))
    import comfy_host
    comfy_host.import_comfy()


def model_state_dict(text, ae, model) -> dict[str, torch.Tensor]:
    """One dict in ComfyUI's layout: ``clip_l.transformer.*``, ``model.diffusion_model.*``,
    ``first_stage_model.*``; float16."""
    sd = {}
    for k, v in text.state_dict().items():
        if k == "logit_scale":  # CLIP's learned temperature, where ComfyUI's SD1 CLIP keeps it
            sd["clip_l.logit_scale"] = v
        elif not k.startswith("tower."):
            sd["clip_l.transformer." + k] = v
    for k, v in model.diffusion_model.state_dict().items():
        sd["model.diffusion_model." + k] = v
    for k, v in ae.state_dict().items():
        sd["first_stage_model." + k] = v
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def metadata(seed: int, steps: dict) -> dict[str, str]:
    from . import text_encoder, unet, vae
    return {"erasepro.toy.format": FORMAT, "erasepro.toy.seed": str(seed), "erasepro.toy.steps": json.dumps(steps),
            "erasepro.toy.text_config": json.dumps(text_encoder.CONFIG, sort_keys=True),
            "erasepro.toy.unet_config": json.dumps(unet.UNET_CONFIG, sort_keys=True),
            "erasepro.toy.vae_config": json.dumps({"ddconfig": vae.DDCONFIG, "embed_dim": vae.EMBED_DIM}, sort_keys=True)}


def run(seed: int = 0, steps: dict = FULL, out: Path | None = WEIGHTS, log=print) -> dict:
    _import_comfy()
    from safetensors.torch import save_file

    from . import judge as judge_mod
    from . import text_encoder, unet, vae
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report: dict = {"seed": seed, "steps": steps, "seconds": {}}
    t0 = time.time()
    text = text_encoder.train(seed, steps=steps["text"], log=log)
    report["seconds"]["text"] = time.time() - t0
    report["text"] = text_encoder.semantic_report(text)
    log(f"[text] {report['text']}")
    t = time.time()
    ae = vae.train(seed, steps=steps["vae"], log=log)
    report["seconds"]["vae"] = time.time() - t
    report["vae"] = {"reconstruction_mae": vae.reconstruction_error(ae)}
    log(f"[vae] {report['vae']}")
    t = time.time()
    judge = judge_mod.train(seed, steps=steps["judge"], log=log)
    report["seconds"]["judge"] = time.time() - t
    report["judge"] = judge_mod.accuracy_report(judge)
    log(f"[judge] {report['judge']['accuracy']}")
    t = time.time()
    model = unet.train(text, ae, seed, steps=steps["unet"], log=log)
    report["seconds"]["unet"] = time.time() - t
    report["seconds"]["total"] = time.time() - t0
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(model_state_dict(text, ae, model), str(out / MODEL_FILE), metadata=metadata(seed, steps))
        save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out / JUDGE_FILE),
                  metadata={"erasepro.toy.format": FORMAT, "erasepro.toy.seed": str(seed)})
        (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        log(f"[toy-model] wrote {out / MODEL_FILE} ({(out / MODEL_FILE).stat().st_size / 2**20:.1f} MiB), "
            f"{out / JUDGE_FILE}, {out / REPORT_FILE}")
    log(f"[toy-model] done in {report['seconds']['total'] / 60:.1f} min")
    report["models"] = (text, ae, judge, model)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help=f"folder for the weights (default {WEIGHTS}; --smoke: none)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every stage (checks the script runs)")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else (None if args.smoke else WEIGHTS)
    run(args.seed, SMOKE if args.smoke else FULL, out, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
