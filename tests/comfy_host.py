"""The tests' ComfyUI host is scripts/comfy_host.py (the benchmark and scripts use it too):
``import comfy_host`` in a test gives that module itself."""

import sys

from scripts import comfy_host as _host

sys.modules[__name__] = _host
