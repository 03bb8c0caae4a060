"""Shared pytest fixtures: the ComfyUI host on sys.path, a tiny SD1.5 checkpoint, a live
ComfyUI server (loopback) with this pack linked into custom_nodes, and an artifacts folder.

ComfyUI's folder ($COMFYUI or <repo>/.comfyui, made by scripts/bootstrap.sh) goes to the front
of sys.path *before* any test module is imported, so `import nodes` is ComfyUI's nodes.py and
never this repo's nodes/ package (the pack is imported as "ComfyUI_ErasePro" by
comfy_host.load_pack()).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "scripts", REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import comfy_host  # noqa: E402

comfy_host.ensure_comfy_path()
# Import ComfyUI now (choosing --cpu when there is no GPU) so that whatever imports
# comfy.model_management later, including the pack, finds it initialised.
comfy_host.import_comfy()

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def weighting_files(tmp_path_factory) -> Path:
    """The retain weightings' folder for this test session (ComfyUI's is the user folder's)."""
    import erasepro_comfy.host  # noqa: F401  (sets ComfyUI's folder first)
    from erasepro_ops.weighting_cache import RETAIN_WEIGHTINGS
    RETAIN_WEIGHTINGS.directory = tmp_path_factory.mktemp("weightings")
    return RETAIN_WEIGHTINGS.directory


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    """The ComfyUI folder, first on sys.path."""
    return comfy_host.ensure_comfy_path()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """<repo>/test-artifacts (git-ignored): logs, images, reports written by tests."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def host():
    """The comfy_host module (ComfyUI imported)."""
    comfy_host.import_comfy()
    return comfy_host


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_path) -> Path:
    """<comfyui>/models/checkpoints/erasepro_tiny_sd15.safetensors, written once (seed 0)."""
    import make_checkpoint
    return make_checkpoint.ensure_checkpoint()


@pytest.fixture(scope="session")
def sd3_checkpoint(comfy_path) -> Path:
    """<comfyui>/models/checkpoints/erasepro_tiny_sd3.safetensors, written once (seed 0): tiny MMDiT,
    full-size CLIP-L and CLIP-G, no T5, fp16 (scripts/comfy_dit.py ``ensure_sd3_checkpoint``)."""
    from scripts import comfy_dit
    return comfy_dit.ensure_sd3_checkpoint(comfy_path / "models" / "checkpoints")


@pytest.fixture(scope="session")
def flux_workflow_files(comfy_path) -> dict:
    """The Flux example workflow's files in <comfyui>/models/{diffusion_models,text_encoders,vae},
    written once (seed 0): Flux 3072 wide with one block of each kind, CLIP-L, a tiny T5 whose
    config the live server's test extension passes to the loader (tests/server_nodes), a
    16-channel VAE; fp16 (scripts/comfy_dit.py ``ensure_flux_workflow_files``)."""
    from scripts import comfy_dit
    return comfy_dit.ensure_flux_workflow_files(comfy_path / "models")


@pytest.fixture(scope="session")
def chroma_workflow_files(comfy_path) -> dict:
    """The Chroma example workflow's files in <comfyui>/models/{diffusion_models,text_encoders,vae},
    written once (seed 0): a Chroma that ComfyUI's detection loads (3072 wide, one block of each
    kind), a T5 at T5-XXL's width and depth but narrow inside, whose config the live server's test
    extension passes to the loader, the Flux workflow's VAE; fp16
    (scripts/comfy_dit.py ``ensure_chroma_workflow_files``)."""
    from scripts import comfy_dit
    return comfy_dit.ensure_chroma_workflow_files(comfy_path / "models")


SERVER_NODES = REPO / "tests" / "server_nodes"


@pytest.fixture(scope="session")
def comfy_server_handle(tiny_checkpoint, artifacts_dir):
    """A running comfy_server.ComfyServer (has .base_url, .output_dir, .log_text(), .object_info()),
    with the test-only extension in tests/server_nodes (reduced text encoders through the stock
    CLIP loaders) added through an extra model paths file."""
    import comfy_server
    d = artifacts_dir / "comfy-server"
    d.mkdir(parents=True, exist_ok=True)
    paths = d / "extra_model_paths.yaml"
    paths.write_text(f"erasepro_tests:\n  custom_nodes: {json.dumps(str(SERVER_NODES))}\n", encoding="utf-8")
    srv = comfy_server.ComfyServer(output_dir=d / "output", input_dir=d / "input", temp_dir=d / "temp",
                                   user_dir=d / "user", log_path=d / "comfyui.log",
                                   extra_args=["--extra-model-paths-config", str(paths)])
    srv.start(timeout=240)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def comfy_server(comfy_server_handle) -> str:
    """Base URL (http://127.0.0.1:<port>) of a live ComfyUI server with the pack linked."""
    return comfy_server_handle.base_url


@pytest.fixture(scope="session")
def object_info(comfy_server_handle) -> dict:
    return comfy_server_handle.object_info()
