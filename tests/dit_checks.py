"""What the DiT families' tests (Flux.1, Chroma, SD3) check alike: a one-concept request, and an
edit's LoRA file through ComfyUI's stock LoRA loader."""
from __future__ import annotations

import torch

import comfy_host as H
from log_capture import Warnings


def request(target: str, anchor: str, **kw):
    """A Request for one concept (``concept`` overrides the object pair) with ``kw`` settings."""
    from erasepro_ops.request import Request
    from erasepro_ops.templates import ConceptPair
    concept = kw.pop("concept", ConceptPair(target, anchor, "object"))
    return Request((concept,), **kw)


def solve_with_nodes(pack, model, clip, target: str, anchor: str, layers: int = 3):
    """The edit ErasePro Concept Pair (an object concept) and the Progressive Solver make."""
    m = pack.NODE_CLASS_MAPPINGS
    (concepts,) = m["ErasePro_ConceptPair"]().build(target, anchor, "object")
    return m["ErasePro_ProgressiveSolver"]().solve(model, clip, concepts, layers, "erasepro")["result"][0]


def lora_round_trip(pack, model, clip, edit, name: str, tmp_path, monkeypatch) -> None:
    """Save ``edit`` with Save ErasePro Edit, load it with ComfyUI's LoraLoader: every key applied
    (no "not loaded"), every changed site patched, the effective weights equal Apply Erased UNet's."""
    import folder_paths
    from erasepro_comfy.host import effective_weights
    m = pack.NODE_CLASS_MAPPINGS
    loras = tmp_path / "loras"
    loras.mkdir()
    old = folder_paths.folder_names_and_paths["loras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], old[1]))
    folder_paths.filename_list_cache.clear()
    saved = m["ErasePro_SaveEdit"]().save(edit, name, "float32")["result"][0]
    assert (loras / saved).is_file()
    with Warnings() as w:
        lora_model, lora_clip = H.comfy_nodes().LoraLoader().load_lora(model, clip, saved, 1.0, 1.0)
    folder_paths.filename_list_cache.clear()
    assert not [x for x in w.messages if "not loaded" in x.lower()], w.messages
    # every site the edit changes is patched (a site the shallow stage left settled has rank 0 and no tensors)
    assert {s.key for s in edit.part("model") if s.rank} <= set(lora_model.patches)
    assert {s.key for s in edit.part("clip") if s.rank} <= set(lora_clip.patcher.patches)

    applied, applied_clip = m["ErasePro_ApplyErasedUNet"]().apply(model, edit, 1.0, clip)
    for part, (a, b) in (("model", (lora_model, applied)), ("clip", (lora_clip.patcher, applied_clip.patcher))):
        sites = {s.key: s for s in edit.part(part)}
        wa, wb = effective_weights(a, list(sites)), effective_weights(b, list(sites))
        for k, site in sites.items():
            # float32 rounding: of the sum W + ΔW, and of ΔW = up @ down summed over the rank
            # (the two paths multiply the factors in different kernels)
            products = float((site.up.abs() @ site.down.abs()).max()) if site.rank else 0.0
            tol = torch.finfo(torch.float32).eps * (4 * float(wb[k].abs().max()) + site.rank * products)
            assert float((wa[k] - wb[k]).abs().max()) <= tol, (k, float((wa[k] - wb[k]).abs().max()), tol)


def erased_gap(velocity, model, clip, erased, erased_clip, target: str, anchor: str) -> float:
    """How far the erased model's velocity for ``target`` lies from the original model's for
    ``anchor``, relative to the original gap between the two (``velocity(model, clip, text)``),
    after checking the two prompts do differ there."""
    v_anchor, v_target = velocity(model, clip, anchor), velocity(model, clip, target)
    gap = float((v_target - v_anchor).norm())
    assert gap > 1e-4 * float(v_anchor.norm()), (target, anchor)
    return float((velocity(erased, erased_clip, target) - v_anchor).norm()) / gap


def solve_and_apply(model, clip, req):
    """``run_erasure`` on the ComfyUI host, then the edit applied at strength 1: (edit, MODEL, CLIP)."""
    from erasepro_comfy.apply import apply_edit
    from erasepro_comfy.host import ComfyHost
    from erasepro_ops.pipeline import run_erasure
    edit = run_erasure(ComfyHost(model, clip), req)
    return (edit, *apply_edit(model, clip, edit, 1.0))


def refused_on(pack, edit, model, clip, message: str) -> None:
    """Apply Erased UNet refuses ``edit`` on ``model`` with an error matching ``message``."""
    import pytest
    with pytest.raises(Exception, match=message):
        pack.NODE_CLASS_MAPPINGS["ErasePro_ApplyErasedUNet"]().apply(model, edit, 1.0, clip)
