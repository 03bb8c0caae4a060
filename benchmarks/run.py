"""ErasePro against UCE, side by side, on full-size random-weight SD1.5 / SDXL (and a reduced Flux.1
and Chroma).

    python -m benchmarks.run [--models sd15,sdxl,flux,chroma,sd3,zimage] [--concepts 1,10,100] [--runs 3] [--configs "UCE,ErasePro S=0"]

Models are built from ComfyUI's own classes at full size with random weights (scripts/comfy_host);
Flux.1 and Chroma at reduced widths only (scripts/comfy_dit, ``FLUX_SIZES``: a full T5-XXL alone is
4.7B parameters; Chroma's transformer built in memory, its T5 in fp16 read from a file); SD3 with a
tiny MMDiT, CLIP-L and CLIP-G at full width with 12 layers, and a T5 at full width (4096, which
SD3's encode needs) with a small feed-forward, text encoders in fp16 or fp32, built in memory;
Z-Image with a tiny transformer and a reduced Qwen3 (``ZIMAGE_SIZES``) read through ComfyUI's
load_clip from an fp16 file.
Every configuration runs the solve (``erasepro_ops.pipeline.run_erasure`` on the ComfyUI host) on
the same concepts and preserve set, in one process, models already loaded. "time s" is a first solve
on the model (the retain bank's weightings not kept yet), "again s" the same solve queued again, as a
user who changes the concepts does (or a later session on that model: the weightings are files);
"peak MiB" the memory a solve adds over the loaded models.
Prints a table, writes output/bench/<model>.json and a PNG chart of the per-site relative ΔW. The
metrics are defined in erasepro_ops.metrics.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import dataclasses
import gc
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from erasepro_ops.batches import align_prompts, pair_columns, preserve_ids, prompt_pairs, read_lengths, read_positions
from erasepro_ops.pipeline import run_erasure
from erasepro_ops.request import Request
from erasepro_ops.weighting_cache import RETAIN_WEIGHTINGS
from erasepro_ops.templates import ConceptPair
from erasepro_ops.text import prompt_lines
from scripts import comfy_host as H

H.import_comfy()  # erasepro_comfy imports ComfyUI's comfy package (on the CPU without a GPU)
from erasepro_comfy.apply import apply_edit  # noqa: E402
from erasepro_comfy.host import ComfyHost  # noqa: E402

REPO = H.REPO
NODE_INPUTS = {"shallow_rule": "rule", "context_sentences": "context_templates"}  # node input → Request field

STYLES = ["van gogh", "claude monet", "pablo picasso", "salvador dali", "rembrandt", "frida kahlo", "gustav klimt",
          "edvard munch", "hokusai", "andy warhol", "georgia o'keeffe", "wassily kandinsky", "paul cezanne",
          "henri matisse", "johannes vermeer", "caravaggio", "edward hopper", "rene magritte", "joan miro",
          "jackson pollock", "michelangelo", "raphael", "titian", "el greco", "francisco goya", "william turner",
          "john constable", "egon schiele", "amedeo modigliani", "marc chagall", "paul klee", "piet mondrian",
          "roy lichtenstein", "keith haring", "jean-michel basquiat", "mary cassatt", "berthe morisot",
          "camille pissarro", "edgar degas", "pierre-auguste renoir", "georges seurat", "paul gauguin",
          "alphonse mucha", "gustave courbet", "eugene delacroix", "caspar david friedrich", "hieronymus bosch",
          "pieter bruegel", "albrecht durer", "sandro botticelli"]
OBJECTS = ["golden retriever", "parachute", "french horn", "church", "garbage truck", "chainsaw", "gas pump",
           "golf ball", "cassette player", "tench", "airliner", "bicycle", "teapot", "violin", "lighthouse",
           "umbrella", "tractor", "castle", "pizza", "sunflower", "motorcycle", "piano", "backpack", "helicopter",
           "canoe", "skyscraper", "strawberry", "giraffe", "elephant", "penguin", "cactus", "windmill", "saxophone",
           "typewriter", "hot air balloon", "submarine", "steam locomotive", "grand canyon", "eiffel tower",
           "red fox", "snowman", "telescope", "accordion", "toaster", "wristwatch", "harmonica", "lawn mower",
           "fire truck", "school bus", "ferris wheel"]
ANCHORS = {"style": "a painting", "object": "an object"}
PRESERVE = ["a photo of a dog", "a landscape painting", "a portrait of a woman", "a city street at night",
            "a bowl of fruit", "a mountain lake at sunrise", "an astronaut riding a horse", "a cat sleeping on a sofa"]
HELD_OUT = json.loads((Path(__file__).with_name("held_out.json")).read_text())  # sentences the solve never sees
UNRELATED = ["a red sports car parked by the sea", "a bowl of ramen on a kitchen counter",
             "a snowy forest path in winter", "a lighthouse on a rocky coast at night", "a crowded concert hall",
             "a toddler building a sand castle", "an old map of a harbour town", "a plate of pancakes with syrup",
             "a neon sign in a rainy alley", "a herd of sheep on a green hill", "a medieval knight in armour",
             "a glass skyscraper reflecting clouds", "a close-up of a bee on a flower", "a cozy reading nook",
             "a vintage bicycle leaning on a fence", "a bowl of soup, studio lighting", "an underwater coral reef",
             "a man playing chess in the park", "a spaceship landing on a desert planet", "",
             ]  # prompts nobody listed (the empty one is CFG's unconditional branch)
HELD_OUT_CONCEPTS = 2  # held-out sentences for the first concepts only (every template each)
CONFIGS = [
    ("UCE", dict(method="uce", progressive_layers=0, features="last_token")),
    ("ErasePro S=0", dict(method="erasepro", progressive_layers=0)),
    ("ErasePro S=3 residual", dict(method="erasepro", progressive_layers=3, shallow_rule="residual_schedule")),
    ("ErasePro S=3 anchor", dict(method="erasepro", progressive_layers=3, shallow_rule="anchor_features")),
]
S3 = dict(method="erasepro", progressive_layers=3, template_padding=77)  # every padding position, unless a setting says
SWEEP = [  # --sweep: the settings behind the trade-off chart (keys the node has no widget for go to the Request)
    ("UCE", CONFIGS[0][1]),
    ("S=3 retain 0", dict(S3, retain_strength=0.0)),
    ("S=3 retain 1", dict(S3, retain_strength=1.0)),
    ("S=3 retain 10", dict(S3, retain_strength=10.0)),
    ("S=3 retain 100", dict(S3, retain_strength=100.0)),
    ("S=3 retain 10 pad 8", dict(S3, retain_strength=10.0, retain_padding=8)),
    ("S=3 retain 10 pad 76", dict(S3, retain_strength=10.0, retain_padding=76)),
    ("S=3 ctx 20", dict(S3, context_sentences=20)),
    ("S=3 ctx 20 pad 4", dict(S3, context_sentences=20, context_padding=4)),
    ("S=3 ctx 20 no suffix", dict(S3, context_sentences=20, context_suffix=False)),
    ("S=3 ctx 10", dict(S3, context_sentences=10)),
    ("S=3 tpad 8", dict(S3, template_padding=8)),
    ("S=3 tpad 0", dict(S3, template_padding=0)),
    ("S=3 ctx 20 tpad 8", dict(S3, context_sentences=20, template_padding=8)),
    ("S=3 ctx 20 tpad 0", dict(S3, context_sentences=20, template_padding=0)),
]


def concept_set(n: int, targets=None):
    """n concepts, half styles and half objects (one style for n = 1); ``targets`` (``(target,
    type)`` pairs) first when given, the rest from the lists."""
    if targets:
        chosen = list(targets)[:n]
        rest = [c for c in concept_set(n + len(chosen)) if c not in chosen]
        return chosen + rest[: n - len(chosen)]
    styles = STYLES[: (n + 1) // 2]
    objects = OBJECTS[: n // 2]
    return [(t, "style") for t in styles] + [(t, "object") for t in objects]


_WEIGHTING_FILES = Path(tempfile.mkdtemp(prefix="erasepro-bench-"))
atexit.register(shutil.rmtree, _WEIGHTING_FILES, True)


def _fresh_weighting_files() -> None:
    """An empty folder for the retain bank's weightings (not the user's ComfyUI folder): the next
    solve is a first one on its model."""
    shutil.rmtree(_WEIGHTING_FILES, ignore_errors=True)
    RETAIN_WEIGHTINGS.directory = _WEIGHTING_FILES / "weightings"


_fresh_weighting_files()


def _trim_heap() -> None:
    """Give the memory earlier work freed back to the system (glibc), so the RSS a block adds is
    its own peak, not what the allocator kept from before."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux 4.0+: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """The kernel's high-water mark of this process's RSS since the last reset, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator peak, or on the CPU the process RSS's peak
    over its start, the kernel's own high-water mark where it can be reset (Linux), else sampled
    every 5 ms (which misses short peaks)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil
            gc.collect()
            _trim_heap()
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.kernel = _reset_peak_rss()
            self.running = not self.kernel
            if self.running:
                self.thread = threading.Thread(target=self._sample, daemon=True)
                self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.kernel:
            self.peak = max(_peak_rss() - self.base, 0)
        else:
            self.running = False
            self.thread.join()


class LazyDeltas:
    """The dense ΔW of each site, formed when read (all of SDXL's at once would not fit in 24 GB)."""

    def __init__(self, sites):
        self.sites = sites

    def __len__(self):
        return len(self.sites)

    def __getitem__(self, i):
        return self.sites[i].delta()


def build_chain(concepts) -> tuple[ConceptPair, ...]:
    return tuple(ConceptPair(target, ANCHORS[kind], kind) for target, kind in concepts)


def deep_features(edited: ComfyHost, original: ComfyHost, pairs):
    """``(X', X, Y)`` at the deep sites for aligned prompt pairs, on all constrained columns:
    the targets through the edited and the original encoder, the anchors through the original."""
    from erasepro_ops.chain import inputs_with_partners
    arch = original.architecture()
    alignments, t_ids, a_ids = align_prompts(original, arch, pairs)
    columns = pair_columns(arch, alignments)
    y_cond = original.encode(a_ids).cond
    x_cond = original.encode(t_ids).cond
    x_new = edited.encode(t_ids).cond
    x, y = inputs_with_partners(x_cond, y_cond, columns)
    return inputs_with_partners(x_new, y_cond, columns)[0], x, y


def prompt_pair_features(edited: ComfyHost, original: ComfyHost, pairs):
    """``X'``: the deep sites' input for the targets of ``pairs`` through the edited encoder."""
    from erasepro_ops.chain import gather
    arch = original.architecture()
    alignments, t_ids, _ = align_prompts(original, arch, pairs)
    x_new = edited.encode(t_ids).cond
    return gather(x_new, pair_columns(arch, alignments).target)


def prompt_features(host: ComfyHost, prompts):
    """Deep-site input features (D × 77·P) of whole prompts, as the solver encodes preserve prompts,
    at the positions the model reads."""
    arch = host.architecture()
    ids = preserve_ids(host, arch, prompts)
    lengths = read_lengths(arch, next(i for i, e in zip(ids, arch.encoders) if e.spec.per_token))
    return read_positions(host.encode(ids).cond, lengths).T


def held_out_pairs(concepts):
    """(target sentence, anchor sentence, pair) for every held-out template of the first concepts."""
    return [(tmpl.format(t), tmpl.format(ANCHORS[k]), ConceptPair(t, ANCHORS[k], k))
            for t, k in concepts[:HELD_OUT_CONCEPTS] for tmpl in HELD_OUT[k]]


def column_roles(host: ComfyHost, pairs):
    """The role of each constrained column (keep, concept, suffix, end, pad), in Columns order."""
    arch = host.architecture()
    alignments, _, _ = align_prompts(host, arch, pairs)
    keep = sum(len(al.keep) for al in alignments)
    return ["keep"] * keep + [r for al in alignments for r in al.role if arch.padded or r != "pad"]


def role_residuals(w_list, d_list, x_new, x, y, roles):
    """Held-out residual at the concept tokens, the end token and over the whole tail (every
    moved position), each against the unedited gap."""
    from erasepro_ops.metrics import end_to_end_residual
    groups = {"concept": ("concept",), "end": ("end",), "concept_end": ("concept", "end"),
              "tail": ("concept", "suffix", "end", "pad")}
    out = {}
    for name, wanted in groups.items():
        cols = [j for j, r in enumerate(roles) if r in wanted]
        out[name] = end_to_end_residual(w_list, d_list, x_new[:, cols], x[:, cols], y[:, cols])
    return out


DIT = ("flux", "chroma", "sd3", "zimage")  # a velocity, not eps; 16-channel latents
SD3_SIZES = {"tiny": dict(clip_layers=12, t5_layers=12), "full": dict(clip_layers=12, t5_layers=24)}  # T5 4096 wide
FLUX_SIZES = {  # (Chroma's T5 too) the DiT's width is irrelevant to the solve; T5 sets the gateway's rank budget and the cost
    "tiny": dict(t5_layers=12, t5={"d_model": 512, "d_ff": 1024}),
    "full": dict(t5_layers=24, t5={"d_model": 1024, "d_kv": 64, "num_heads": 16, "d_ff": 2816}),  # T5 v1.1 large's shape
}
ZIMAGE_SIZES = {  # Qwen3's width is the gateway's rank budget (Qwen3-4B: 2560 wide, 36 layers)
    "tiny": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 8,
             "num_key_value_heads": 2},
    "full": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
             "num_key_value_heads": 8},
}


def load_models(kind: str, size: str, dtype: str):
    """fp16: a float16 checkpoint file through ComfyUI's loader, as users run it; fp32: built in memory.
    Flux fp16: float16 files through ComfyUI's Load Diffusion Model / DualCLIPLoader functions (the DiT
    3072 wide with one block of each kind, the smallest its detection loads; the reduced text
    encoders' configs passed to the loader)."""
    if kind == "flux":
        from scripts import comfy_dit
        if dtype == "fp16":
            return comfy_dit.as_users_load(**FLUX_SIZES[size])
        return comfy_dit.build_flux("tiny", **FLUX_SIZES[size])
    if kind == "sd3":  # the MMDiT and its three encoders built in memory, text encoders in fp16 as ComfyUI runs them
        import torch
        from scripts import comfy_dit
        model = comfy_dit.build_sd3_model(seed=0)
        return model, comfy_dit.build_sd3_clip(seed=0, dtype=torch.float16 if dtype == "fp16" else None,
                                               **SD3_SIZES[size])
    if kind == "zimage":  # the transformer in memory; Qwen3 through ComfyUI's load_clip from an fp16 file
        from scripts import comfy_dit
        qwen = ZIMAGE_SIZES[size]
        model = comfy_dit.build_zimage_model(seed=0, cap_feat_dim=qwen["hidden_size"])
        clip = comfy_dit.build_zimage_clip(seed=0, layers=qwen["num_hidden_layers"], qwen=qwen)
        if dtype == "fp16":
            clip = comfy_dit.qwen3_as_users_load(clip, REPO / ".cache" / "zimage" / size)
        return model, clip
    if kind == "chroma":
        from scripts import comfy_dit
        model, clip = comfy_dit.build_chroma(**FLUX_SIZES[size])
        if dtype == "fp16":
            clip = comfy_dit.t5_as_users_load(clip, REPO / ".cache" / "chroma" / size)
        return model, clip
    if dtype == "fp16":
        return H.as_users_load(kind, size)
    return H.build(kind, size)


@dataclasses.dataclass
class Bench:
    """One model loaded for the benchmark, with what every configuration is measured against."""

    kind: str
    dtype: str
    host: ComfyHost
    weights: dict  # the deep sites' original weights
    eps: Callable  # eps(model, clip, prompt): the UNet's noise prediction on fixed latents
    k_pre: object  # the preserve prompts' deep-site features
    k_unrel: object  # the unrelated prompts'

    @classmethod
    def load(cls, kind: str, size: str, dtype: str, eps_size: int) -> Bench:
        import torch
        t0 = time.perf_counter()
        model, clip = load_models(kind, size, dtype)
        print(f"[{kind}] {size} random-weight model, {dtype}, ready in {time.perf_counter() - t0:.1f} s", flush=True)
        host = ComfyHost(model, clip)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 16 if kind in DIT else 4, eps_size, eps_size, generator=g)
        timesteps = torch.tensor([300.0, 800.0])

        def eps(m, c, text):  # Flux: the velocity at sigmas 0.3 and 0.8
            cond, pooled = H.encode(c, text)
            pooled = pooled.expand(2, -1) if pooled is not None else None
            if kind in DIT:
                from scripts import comfy_dit
                return comfy_dit.flux_velocity(m, cond.expand(2, -1, -1), pooled, latents, timesteps / 1000)
            return H.unet_eps(m, cond.expand(2, -1, -1), pooled, latents, timesteps).float()

        weights = host.model_weights(host.architecture().deep_keys)
        return cls(kind, dtype, host, weights, eps, prompt_features(host, PRESERVE), prompt_features(host, UNRELATED))


def measure(kind: str, counts, runs: int, eps_size: int, out_dir: Path, size: str = "full", configs=None,
            dtype: str = "fp16", sweep: bool = False, targets=None):
    import torch
    bench = Bench.load(kind, size, dtype, eps_size)
    rows = []
    for n in counts:
        concepts = concept_set(n, targets)
        uce_time = None
        setup = concept_setup(bench, concepts)
        for label, cfg in [c for c in (SWEEP if sweep else CONFIGS) if configs is None or c[0] in configs]:
            row = measure_config(bench, setup, label, cfg, runs if n < 100 else 1)
            uce_time = row["solve_seconds"] if uce_time is None else uce_time
            row = {"model": kind, "concepts": n, "config": label, **cfg, **row,
                   "ratio_to_uce": row["solve_seconds"] / uce_time}
            rows.append(row)
            print_row(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"device": device_name(bench.host.solve_device()), "torch": torch.__version__, "rows": rows}
    name = f"{kind}_{dtype}{'_sweep' if sweep else ''}{'_' + '_'.join(t.replace(' ', '-') for t, _ in targets) if targets else ''}"
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=1))
    if sweep:
        draw_trade_off(rows, out_dir / f"{name}_trade_off.png")
    else:
        draw_sites(rows, out_dir / f"{name}_sites.png")
    return rows


def concept_setup(bench: Bench, concepts) -> dict:
    """What every configuration on ``concepts`` is measured against: held-out features, the UNet's
    output on the original model."""
    host, eps = bench.host, bench.eps
    model, clip = host.model, host.clip
    chain = build_chain(concepts)
    first_t, first_kind = concepts[0]
    first_a = ANCHORS[first_kind]
    held = held_out_pairs(concepts)
    _, held_x, held_y = deep_features(host, host, held)  # the same for every config
    solve_prompt = f"a painting by {first_t}"
    held_prompt = HELD_OUT[first_kind][2]
    base = {"t": eps(model, clip, solve_prompt), "a": eps(model, clip, f"a painting by {first_a}"),
            "ht": eps(model, clip, held_prompt.format(first_t)), "ha": eps(model, clip, held_prompt.format(first_a)),
            "u": eps(model, clip, UNRELATED[0])}
    return dict(chain=chain, warm_chain=build_chain(concepts[:1]), held=held, held_roles=column_roles(host, held),
                held_x=held_x, held_y=held_y, solve_pairs=prompt_pairs(chain), base=base,
                solve_prompt=solve_prompt, held_target=held_prompt.format(first_t))


def measure_config(bench: Bench, setup: dict, label: str, cfg: dict, runs: int) -> dict:
    """One configuration's timing and figures on one concept set."""
    import torch
    from erasepro_ops.metrics import end_to_end_residual, eps_erasure, eps_preservation, preservation_drift
    host, eps, base = bench.host, bench.eps, setup["base"]
    device = host.solve_device()
    solve = configured_solve(host, cfg)
    solve(setup["warm_chain"])  # warm-up (tokenizer caches, model load): one concept
    times, peak = [], 0
    for _ in range(runs):  # each a first solve on this model: the retain bank's weightings not kept yet
        RETAIN_WEIGHTINGS.entries.clear()
        _fresh_weighting_files()
        with PeakMemory(torch.device(device)) as mem:
            start = time.perf_counter()
            edit = solve(setup["chain"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.peak)
    start = time.perf_counter()
    solve(setup["chain"])  # again on the same model, as a user who changes the concepts and queues again
    again = time.perf_counter() - start
    s = edit.figures
    m2, c2 = apply_edit(host.model, host.clip, edit, 1.0)
    edited = ComfyHost(m2, c2)
    sites = {site.key: site for site in edit.part("model")}
    keys = list(host.architecture().deep_keys)
    w_list = [bench.weights[k] for k in keys]
    d_list = LazyDeltas([sites[k] for k in keys])
    train_all = end_to_end_residual(w_list, d_list, *deep_features(edited, host, setup["solve_pairs"]))
    held_new = prompt_pair_features(edited, host, setup["held"])
    held_res = role_residuals(w_list, d_list, held_new, setup["held_x"], setup["held_y"], setup["held_roles"])
    drift = {name: preservation_drift(w_list, d_list, k_orig, prompt_features(edited, prompts))
             for name, prompts, k_orig in (("preserve", PRESERVE, bench.k_pre), ("unrelated", UNRELATED, bench.k_unrel))}
    return {
        "solve_seconds": statistics.median(times), "runs": len(times), "peak_extra_mib": peak / 2**20,
        "again_seconds": again,
        "train_residual": train_all, "own_columns_residual": s.train_residual,
        "dtype": bench.dtype, "held_out_residual": held_res["tail"], "held_out": held_res,
        "empty_prompt_drift": s.empty_prompt_drift,
        "drift_preserve": drift["preserve"], "drift_unrelated": drift["unrelated"],
        "deep_burden": s.deep_burden, "constraints": s.constraints, "deep_rank": s.deep_rank,
        "width": next(iter(bench.weights.values())).shape[1], "warnings": list(s.warnings),
        "eps_erasure": eps_erasure(eps(m2, c2, setup["solve_prompt"]), base["a"], base["t"]),
        "eps_erasure_held_out": eps_erasure(eps(m2, c2, setup["held_target"]), base["ha"], base["ht"]),
        "eps_preservation": eps_preservation(eps(m2, c2, UNRELATED[0]), base["u"]),
        "sites": [(site.name, site.stage, site.relative_change) for site in s.sites],
    }


def configured_solve(host: ComfyHost, cfg: dict):
    """``solve(chain) -> ErasureEdit`` for one configuration; ``cfg`` holds the solver node's input
    names (``shallow_rule``, ``context_sentences``) or the Request's own field names."""
    settings = {NODE_INPUTS.get(k, k): v for k, v in cfg.items()}
    preserve = prompt_lines("\n".join(PRESERVE)) or ()

    def solve(chain):
        return run_erasure(host, Request(tuple(chain), preserve=preserve, **settings))
    return solve


def device_name(device) -> str:
    import platform

    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


HEADER = (f"{'model':5} {'dtype':5} {'n':>3} {'config':22} {'time s':>8} {'×UCE':>6} {'again s':>8} {'peak MiB':>8} {'train res':>9} "
          f"{'held c+e':>9} {'held tail':>9} {'drift pre':>9} {'drift unr':>9} {'empty':>8} {'burden':>8} "
          f"{'rank/width':>11} {'eps er':>8} {'eps er ho':>9} {'eps pres':>8}")


def _sci(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def print_row(r):
    print(f"{r['model']:5} {r['dtype']:5} {r['concepts']:>3} {r['config']:22} {r['solve_seconds']:8.3f} "
          f"{r['ratio_to_uce']:6.2f} {r['again_seconds']:8.3f} {r['peak_extra_mib']:8.0f} {r['train_residual']:9.2e} "
          f"{r['held_out']['concept_end']:9.2e} {r['held_out']['tail']:9.2e} "
          f"{r['drift_preserve']:9.2e} {r['drift_unrelated']:9.2e} {_sci(r['empty_prompt_drift']):>8} "
          f"{r['deep_burden']:8.4f} {str(r['deep_rank']) + '/' + str(r['width']):>11} {r['eps_erasure']:8.2e} "
          f"{r['eps_erasure_held_out']:9.2e} {r['eps_preservation']:8.2e}", flush=True)


def draw_sites(rows, path: Path):
    """Per-site relative ΔW for each configuration (one panel per concept count), PIL only."""
    from PIL import Image, ImageDraw

    counts = sorted({r["concepts"] for r in rows})
    colours = [(200, 60, 60), (60, 120, 220), (40, 160, 90), (230, 150, 30)]
    w, h, pad = 900, 260, 40
    img = Image.new("RGB", (w, h * len(counts)), "white")
    draw = ImageDraw.Draw(img)
    for panel, n in enumerate(counts):
        top = panel * h
        subset = [r for r in rows if r["concepts"] == n]
        peak = max((v for r in subset for *_, v in r["sites"]), default=1.0) or 1.0
        draw.text((pad, top + 5), f"{subset[0]['model']}, {n} concept(s): per-site ||dW||/||W|| (max {peak:.3g})",
                  fill="black")
        for i, r in enumerate(subset):
            values = [v for *_, v in r["sites"]]
            if len(values) < 2:
                continue
            pts = [(pad + j * (w - 2 * pad) / (len(values) - 1), top + h - pad - v / peak * (h - 2 * pad))
                   for j, v in enumerate(values)]
            draw.line(pts, fill=colours[i % len(colours)], width=2)
            draw.text((w - 220, top + 20 + 14 * i), r["config"], fill=colours[i % len(colours)])
        draw.line([(pad, top + h - pad), (w - pad, top + h - pad)], fill="gray")
    img.save(path)


def draw_trade_off(rows, path: Path):
    """Held-out residual (concept + end tokens) against unlisted-prompt drift, a point per setting
    (one panel per concept count), UCE as a red square. Lower-left is better on both. PIL only."""
    from PIL import Image, ImageDraw

    counts = sorted({r["concepts"] for r in rows})
    w, h, pad, legend = 1000, 560, 70, 330
    img = Image.new("RGB", (w + legend, h * len(counts)), "white")
    draw = ImageDraw.Draw(img)
    for panel, n in enumerate(counts):
        top = panel * h
        subset = [r for r in rows if r["concepts"] == n]
        xs = [r["drift_unrelated"] for r in subset]
        ys = [r["held_out"]["concept_end"] for r in subset]
        x_max, y_max = max(xs) * 1.1 or 1.0, max(ys) * 1.1 or 1.0

        def at(x, y):
            return pad + x / x_max * (w - 2 * pad), top + h - pad - y / y_max * (h - 2 * pad)

        draw.text((pad, top + 10), f"{subset[0]['model']} {subset[0]['dtype']}, {n} concept(s): held-out residual "
                  "(concept + end tokens) vs drift of unlisted prompts; lower-left is better", fill="black")
        draw.line([at(0, 0), at(x_max, 0)], fill="gray")
        draw.line([at(0, 0), at(0, y_max)], fill="gray")
        for k in range(5):
            x, y = x_max * k / 4, y_max * k / 4
            draw.text((at(x, 0)[0] - 12, top + h - pad + 6), f"{x:.3f}", fill="gray")
            draw.text((6, at(0, y)[1] - 6), f"{y:.2f}", fill="gray")
        draw.text((w // 2 - 80, top + h - 24), "unlisted-prompt drift", fill="black")
        draw.text((6, top + 30), "held-out residual", fill="black")
        for i, (r, x, y) in enumerate(zip(subset, xs, ys), start=1):
            cx, cy = at(x, y)
            uce = r["method"] == "uce"
            colour = (200, 40, 40) if uce else (40, 90, 200)
            if uce:
                draw.rectangle([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour)
            else:
                draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
            draw.text((cx + 7, cy - 6 + 12 * (i % 2) - 6), str(i), fill=colour)  # alternate sides: near points
            draw.text((w + 5, top + 40 + 16 * i), f"{i:2}. {r['config']}: {y:.3f} / {x:.3f}", fill=colour)
        draw.text((w + 5, top + 40), "held-out c+e / drift", fill="black")
    img.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15", help="comma list of sd15, sdxl (sdxl needs ~16 GB), flux, chroma, sd3, zimage "
                                                          "(reduced sizes), toy (the trained toy model: erasure judged on pictures)")
    parser.add_argument("--concepts", default="1,10,100")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median); 1 at 100 concepts")
    parser.add_argument("--eps-size", type=int, default=16, help="latent size for the eps metrics")
    parser.add_argument("--out", default=str(REPO / "output" / "bench"))
    parser.add_argument("--size", default="full", choices=["full", "tiny"],
                        help="tiny: a quick smoke run (Flux: see FLUX_SIZES; its 'full' is a T5-large-shaped encoder)")
    parser.add_argument("--dtypes", default="fp16", help="comma list: fp16 (a float16 checkpoint file through ComfyUI's "
                                                          "loader, as users run it), fp32 (built in float32)")
    parser.add_argument("--configs", help=f"comma list of configurations to run (default all: {', '.join(c[0] for c in CONFIGS)}); "
                                          "the first one is the ratio's reference")
    parser.add_argument("--sweep", action="store_true",
                        help=f"run the trade-off settings instead ({', '.join(c[0] for c in SWEEP)}) and chart "
                             "held-out residual against unlisted-prompt drift")
    parser.add_argument("--targets", help="comma list of target:type (style / object) to erase first, e.g. "
                                          "'parachute:object' (the anchor is the type's: 'a painting', 'an object')")
    args = parser.parse_args(argv)
    targets = None if not args.targets else [tuple(t.strip().rsplit(":", 1)) for t in args.targets.split(",")]
    if targets and any(len(t) != 2 or t[1] not in ANCHORS for t in targets):
        parser.error(f"--targets: each entry is target:type with type one of {sorted(ANCHORS)}")
    counts = [int(c) for c in args.concepts.split(",")]
    configs = None if args.configs is None else [c.strip() for c in args.configs.split(",")]
    labels = [label for label, _ in (SWEEP if args.sweep else CONFIGS)]
    unknown = sorted(set(configs or ()) - set(labels))
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {labels}")
    models = [k.strip() for k in args.models.split(",")]
    if "toy" in models:
        from benchmarks import toy
        toy.run(out_dir=Path(args.out) / "toy", counts=[c for c in counts if c in (1, 10)],
                methods=toy.SWEEP if args.sweep else toy.METHODS)
        models.remove("toy")
        if not models:
            return 0
    print(HEADER, flush=True)
    for kind in models:
        for dtype in args.dtypes.split(","):
            measure(kind, counts, args.runs, args.eps_size, Path(args.out), args.size, configs, dtype.strip(),
                    args.sweep, targets)
    print(f"JSON and charts in {args.out}")
    return 0


if __name__ == "__main__":
    main()
