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
        keys = [s.key for s in edit.part(part)]
        wa, wb = effective_weights(a, keys), effective_weights(b, keys)
        for k in keys:
            tol = 4 * torch.finfo(torch.float32).eps * float(wb[k].abs().max())
            assert float((wa[k] - wb[k]).abs().max()) <= tol, k
