"""`python -m benchmarks.run --models toy`: erasure judged on the trained toy model's pictures.

The toy model (toyworld/, loaded as the ErasePro Toy Model node loads it) draws each probe of
:mod:`toyworld.protocol` with ComfyUI's own sampler at fixed steps and CFG, several seeds per
prompt, before and after each method's edit (solved and applied through the pack's nodes, as a
workflow would); the judge reads the pictures. One table, every method side by side.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import comfy_host as host  # noqa: E402

# (label, Concept Pair's template override, solver inputs)
METHODS = (
    ("UCE official", "{}", {"progressive_layers": 0, "method": "uce", "features": "last_token"}),
    ("UCE templates", None, {"progressive_layers": 0, "method": "uce"}),
    ("ErasePro S=0", None, {"progressive_layers": 0, "method": "erasepro"}),
    ("ErasePro defaults", None, {}),
)
# --sweep: the settings that chose today's defaults, each against the defaults
SWEEP = (
    ("ErasePro defaults", None, {}),
    ("template_padding 0", None, {"template_padding": 0}),
    ("template_padding 77", None, {"template_padding": 77}),
    ("retain_strength 0", None, {"retain_strength": 0.0}),
    ("context_sentences 8", None, {"context_sentences": 8}),
)
GROUPS = ("templates", "held_out", "compositional", "within", "unrelated")
SAMPLER = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}


def load_judge():
    from safetensors.torch import load_file

    from toyworld.judge import Judge
    from toyworld.train import JUDGE_FILE, WEIGHTS
    judge = Judge()
    judge.load_state_dict(load_file(str(WEIGHTS / JUDGE_FILE)))
    return judge.eval()


def encode(clip, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True) for p in prompts]


@torch.no_grad()
def draw(model, clip, vae, prompts: list[str], seeds: int, batch: int = 24, conds=None) -> torch.Tensor:
    """Pictures [len(prompts)·seeds, 3, 32, 32] in [0, 1]: ``comfy.sample.sample`` (what the
    KSampler node runs), each prompt at seeds 0 … seeds−1, the empty prompt as the negative.
    ``conds``: the prompts' encodings, when they are given already."""
    import comfy.sample
    conds = conds if conds is not None else encode(clip, prompts)
    neg, neg_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    items = [(c, s) for c in conds for s in range(seeds)]
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        cond = torch.cat([c[0] for c, _ in chunk])
        pooled = torch.cat([c[1] for c, _ in chunk])
        noise = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for _, s in chunk])
        latent = torch.zeros_like(noise)
        samples = comfy.sample.sample(model, noise, SAMPLER["steps"], SAMPLER["cfg"], SAMPLER["sampler_name"],
                                      SAMPLER["scheduler"], [[cond, {"pooled_output": pooled}]],
                                      [[neg.repeat(len(chunk), 1, 1), {"pooled_output": neg_pooled.repeat(len(chunk), 1)}]],
                                      latent, disable_pbar=True, seed=0)
        out.append(vae.decode(samples).movedim(-1, 1).float().cpu())
    return torch.cat(out)


def fidelity_probes(n: int, held_out: bool, seed: int) -> list:
    """One-object scenes, every attribute said, in trained (not held-out) or held-out phrasings."""
    from toyworld import protocol, world
    g = torch.Generator().manual_seed(seed)
    pool = [t for t in (world.HELD_OUT if held_out else world.PLAIN_TEMPLATES + world.PAINTER_TEMPLATES)
            if "{obj}" in t and "{bg}" in t and (held_out or t not in world.HELD_OUT)]
    out = []
    for i, scene in enumerate(world.sample_scenes(4 * n, g, two_objects=0.0)):
        fitting = [t for t in pool if ("{painter}" in t) == (scene.painter is not None)]
        if fitting and len(out) < n:
            out.append(protocol._probe(scene, fitting[i % len(fitting)], g))
    return out


def attribute_accuracy(verdict, probes_, seeds: int) -> dict:
    """Per attribute, the fraction of pictures in which the judge sees what the prompt said."""
    scenes = [p.scene for p in probes_ for _ in range(seeds)]
    n = len(scenes)
    return {"shape": sum(s.shape in verdict.shapes[i] for i, s in enumerate(scenes)) / n,
            "colour": sum(s.colour in verdict.colours[i] for i, s in enumerate(scenes)) / n,
            "background": sum(s.background == verdict.background[i] for i, s in enumerate(scenes)) / n,
            "style": sum(s.style == verdict.style[i] for i, s in enumerate(scenes)) / n, "n": n}


def padding_swapped(clip, conds, prompts):
    """The prompts' encodings with every position after the end token replaced by the empty
    prompt's features there: does the model read the padding?"""
    empty = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)[0]
    out = []
    for (c, pooled), p in zip(conds, prompts):
        end = len([t for t, _ in clip.tokenize(p)["l"][0] if t != 49407]) + 1  # start + words, then the end token
        c = c.clone()
        c[:, end:] = empty[:, end:]
        out.append((c, pooled))
    return out


def fidelity(model, clip, vae, judge, n: int = 48, seeds: int = 2, out_dir: Path | None = None, log=print) -> dict:
    """Does the original model draw what it is told? Per-attribute accuracy on trained and on
    held-out phrasings, and on the trained ones again with the padding positions swapped for the
    empty prompt's (the padding regime)."""
    from toyworld.judge import judge_images
    result = {}
    for label, held in (("trained", False), ("held_out", True)):
        probes_ = fidelity_probes(n, held, seed=7 if held else 3)
        prompts = [p.prompt for p in probes_]
        conds = encode(clip, prompts)
        images = draw(model, clip, vae, prompts, seeds, conds=conds)
        result[label] = attribute_accuracy(judge_images(judge, images), probes_, seeds)
        if out_dir is not None:
            save_grid(images, Path(out_dir) / f"original_{label}.png", seeds)
        if not held:
            swapped = draw(model, clip, vae, prompts, seeds, conds=padding_swapped(clip, conds, prompts))
            result["padding_swapped"] = attribute_accuracy(judge_images(judge, swapped), probes_, seeds)
            result["padding_swapped"]["pixel_change"] = float((swapped - images).abs().mean())
        log(f"[toy] original model, {label} phrasings: {result[label]}")
    log(f"[toy] trained phrasings with the padding swapped for the empty prompt's: {result['padding_swapped']}")
    return result


def erase(pack, model, clip, pairs, template, solver_inputs: dict):
    """(MODEL, CLIP) with every (target, anchor) of ``pairs`` erased in one solve, through
    Concept Pair (chained) → Solver → Apply, as a workflow would."""
    m = pack.NODE_CLASS_MAPPINGS
    concepts = None
    for target, anchor in pairs:
        concept_type = "custom" if template else target.concept_type
        concepts = m["ErasePro_ConceptPair"]().build(target.word, anchor.word if anchor else "", concept_type,
                                                     template or "", concepts)[0]
    inputs = {"progressive_layers": 3, "method": "erasepro", **solver_inputs}
    edit = m["ErasePro_ProgressiveSolver"]().solve(model, clip, concepts, **inputs)["result"][0]
    return m["ErasePro_ApplyErasedUNet"]().apply(model, edit, 1.0, clip)


def scenarios(counts=(1, 10)):
    """(name, the pairs erased in one solve, the targets judged) for 1 and 10 concepts."""
    from toyworld.protocol import Concept
    gogh, ball, box = Concept("painter", "Van Gogh"), Concept("shape", "ball"), Concept("shape", "box")
    out = []
    if 1 in counts:
        out += [("Van Gogh", ((gogh, None),), (gogh,)), ("ball", ((ball, box),), (ball,))]
    if 10 in counts:
        ring, star = Concept("shape", "ring"), Concept("shape", "star")
        ten = ((gogh, None), (Concept("painter", "Mondrian"), None), (Concept("painter", "Seurat"), None),
               (Concept("texture", "striped"), None), (Concept("texture", "dotted"), None),
               (Concept("texture", "checkered"), None), (ball, ring), (box, ring),
               (Concept("shape", "tent"), star), (Concept("shape", "cross"), star))
        out.append(("ten concepts", ten, (gogh, ball)))
    return out


def probe_sets(target, erased, seeds_: int, per_group: int) -> dict:
    from erasepro_ops.templates import TEMPLATES
    from toyworld import protocol
    sets = {"templates": protocol.template_probes(target, TEMPLATES[target.concept_type])}
    for k, group in enumerate(GROUPS[1:]):
        sets[group] = protocol.probes(target, group, per_group, seed=100 + k, exclude=erased)
    return sets


@torch.no_grad()
def judged_row(judge, images, original, sets, seeds, target, anchor) -> dict:
    from toyworld import protocol
    from toyworld.judge import judge_images
    verdict = judge_images(judge, images)
    row, start = {}, 0
    for group in GROUPS:
        n = len(sets[group]) * seeds
        sub = type(verdict)(*(getattr(verdict, f)[start:start + n] for f in verdict.__dataclass_fields__))
        row[group] = protocol.score(sub, sets[group], seeds, target, anchor, group)
        start += n
    u = len(sets["unrelated"]) * seeds
    a, b = images[-u:], original[-u:]
    fa, fb = judge.features(a), judge.features(b)
    row["unrelated"]["pixel_change"] = float((a - b).abs().mean())
    row["unrelated"]["feature_change"] = float(((fa - fb).norm(dim=1) / fb.norm(dim=1)).mean())
    return row


def run(seeds: int = 3, per_group: int = 10, out_dir: Path | None = None, counts=(1, 10), methods=METHODS,
        with_fidelity: bool = True, log=print) -> dict:
    from erasepro_comfy import toy_model
    host.import_comfy()
    pack = host.load_pack()
    model, clip, vae = toy_model.load()
    judge = load_judge()
    results = {"sampler": SAMPLER, "seeds": seeds, "per_group": per_group, "rows": []}
    if with_fidelity:
        results["fidelity"] = fidelity(model, clip, vae, judge, out_dir=out_dir, log=log)
    for name, pairs, judged in scenarios(counts):
        erased = [t for t, _ in pairs]
        anchors = dict((t, a) for t, a in pairs)
        sets = {t: probe_sets(t, erased, seeds, per_group) for t in judged}
        prompts = {t: [p.prompt for g in GROUPS for p in sets[t][g]] for t in judged}
        t0 = time.time()
        original = {t: draw(model, clip, vae, prompts[t], seeds) for t in judged}
        log(f"[toy] {name}: {sum(map(len, prompts.values()))} prompts × {seeds} seeds drawn in {time.time() - t0:.0f}s")
        variants = [("original", None, None)] + list(methods)
        for label, template, inputs in variants:
            t0 = time.time()
            em, ec = (model, clip) if label == "original" else erase(pack, model, clip, pairs, template, inputs)
            solve_s = time.time() - t0
            for t in judged:
                images = original[t] if label == "original" else draw(em, ec, vae, prompts[t], seeds)
                row = {"scenario": name, "target": t.word, "anchor": anchors[t].word if anchors[t] else "",
                       "method": label, "solve_s": solve_s,
                       **judged_row(judge, images, original[t], sets[t], seeds, t, anchors[t])}
                results["rows"].append(row)
                log(format_row(row))
                if out_dir is not None:
                    slug = f"{name}_{t.name}_{label}".replace(" ", "_").replace("=", "")
                    save_grid(images, Path(out_dir) / f"{slug}.png", seeds)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "toy.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def format_row(r: dict) -> str:
    t, h, c = r["templates"], r["held_out"], r["compositional"]
    return (f"{r['scenario']:>12} {r['target']:>9} {r['method']:<18} target seen: templates {t['target_seen']:5.0%} held-out "
            f"{h['target_seen']:5.0%} compositional {c['target_seen']:5.0%} | anchor {t.get('anchor_seen', 0):5.0%} "
            f"{h.get('anchor_seen', 0):5.0%} | rest right {h['rest_right']:5.0%} {c['rest_right']:5.0%} | "
            f"within {r['within']['right']:5.0%} unrelated {r['unrelated']['right']:5.0%} "
            f"change px {r['unrelated'].get('pixel_change', 0):.3f} feat {r['unrelated'].get('feature_change', 0):.3f}")


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    import numpy as np
    from PIL import Image

    from toyworld.world import upscale
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(images)
    rows = (n + per_row * 8 - 1) // (per_row * 8)
    cols = per_row * 8
    big = upscale(images, 2)
    s = big.shape[-1]
    grid = torch.ones(3, rows * (s + 2), cols * (s + 2))
    for i, im in enumerate(big):
        r, c = divmod(i, cols)
        grid[:, r * (s + 2):r * (s + 2) + s, c * (s + 2):c * (s + 2) + s] = im
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
