"""Fingerprint a fixed set of edits, to show a refactor leaves every edit bit-identical.

    python -m scripts.edit_snapshot OUT.json           # write the snapshot
    python -m scripts.edit_snapshot OUT.json --compare BEFORE.json

Each case runs the Concept Pair and Progressive Solver nodes on a random-weight model from
ComfyUI's own classes (SD1.5 / SD2 / SDXL, float32 in memory and float16 through ComfyUI's
loader) and records, per edited site, a SHA-256 of the exact bytes of ΔW's low-rank factors, plus the
summary without its timing. ``--compare`` lists every case whose fingerprint differs.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
from pathlib import Path

import torch

from scripts import comfy_host as H

STYLE = ("Van Gogh", "a painting", "style")
OBJECT = ("golden retriever", "a dog", "object")
NUDITY = ("nudity", "", "nudity")
PRESERVE = "a photo of a person wearing clothes\na portrait of a woman"
CASES = [  # (name, model kind, load, concepts, solver inputs)
    ("sd15 fp32 style S3", "sd15", "memory", [STYLE], dict(progressive_layers=3, method="erasepro")),
    ("sd15 fp32 two S0 preserve", "sd15", "memory", [STYLE, OBJECT],
     dict(progressive_layers=0, method="erasepro", preserve=PRESERVE)),
    ("sd15 fp32 uce", "sd15", "memory", [STYLE, OBJECT], dict(progressive_layers=0, method="uce")),
    ("sd15 fp32 nudity anchor rule", "sd15", "memory", [NUDITY],
     dict(progressive_layers=3, method="erasepro", shallow_rule="anchor_features", preserve=PRESERVE)),
    ("sd15 fp32 last token pad 77", "sd15", "memory", [OBJECT],
     dict(progressive_layers=2, method="erasepro", features="last_token", template_padding=77)),
    ("sd2 fp32 S3", "sd2", "memory", [OBJECT], dict(progressive_layers=3, method="erasepro", preserve_strength=1.0)),
    ("sdxl fp32 S3", "sdxl", "memory", [STYLE], dict(progressive_layers=3, method="erasepro")),
    ("sdxl fp32 uce", "sdxl", "memory", [OBJECT], dict(progressive_layers=0, method="uce")),
    ("sd15 fp16 style S3 (workflow)", "sd15", "users", [STYLE], dict(progressive_layers=3, method="erasepro")),
    ("sd15 fp16 object S3 (workflow)", "sd15", "users", [OBJECT], dict(progressive_layers=3, method="erasepro")),
    ("sd15 fp16 nudity S3 (workflow)", "sd15", "users", [NUDITY],
     dict(progressive_layers=3, method="erasepro", preserve=PRESERVE + "\na man walking in the street\n"
                                                                       "a family at the beach")),
    ("sd15 fp16 context sentences", "sd15", "users", [STYLE],
     dict(progressive_layers=3, method="erasepro", context_sentences=5, retain_strength=0.0)),
]
UNTIMED = ("time", "seconds")


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _model(kind: str, load: str):
    if load == "users":
        return H.as_users_load(kind, "tiny")
    return getattr(H, f"tiny_{kind}")()


def snapshot() -> dict:
    mappings = H.load_pack().NODE_CLASS_MAPPINGS
    pair, solver = mappings["ErasePro_ConceptPair"](), mappings["ErasePro_ProgressiveSolver"]()
    out, loaded, models = {}, None, None
    for name, kind, load, concepts, inputs in CASES:
        if (kind, load) != loaded:  # one model in memory at a time (the cases come grouped by model)
            models = model = clip = None
            gc.collect()
            loaded, models = (kind, load), _model(kind, load)
        model, clip = models
        chained = None
        for target, anchor, ctype in concepts:
            (chained,) = pair.build(target, anchor, ctype, "", chained)
        edit = solver.solve(model, clip, chained, **inputs)["result"][0]
        sites = {s.key: _digest(s.up, s.down) for s in edit.sites}
        summary = {k: v for k, v in edit.summary.items() if not any(u in k for u in UNTIMED)}
        out[name] = {"sites": sites, "summary": json.loads(json.dumps(summary, default=str))}
        print(f"{name}: {len(sites)} sites", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--compare", help="an earlier snapshot; exit 1 when any case differs")
    args = parser.parse_args(argv)
    H.import_comfy()
    snap = snapshot()
    Path(args.out).write_text(json.dumps(snap, indent=1, sort_keys=True))
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    differ = [name for name in before if before[name] != snap.get(name)]
    for name in differ:
        b, a = before[name], snap.get(name) or {}
        keys = [k for k in set(b["sites"]) | set(a.get("sites", {})) if b["sites"].get(k) != a.get("sites", {}).get(k)]
        skeys = [k for k in set(b["summary"]) | set(a.get("summary", {}))
                 if b["summary"].get(k) != a.get("summary", {}).get(k)]
        print(f"DIFFERS {name}: sites {sorted(keys)[:4]} summary {sorted(skeys)[:6]}")
    print("bit-identical" if not differ else f"{len(differ)} of {len(before)} case(s) differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
