"""ComfyUI-ErasePro: zero-residual concept erasure (ErasePro, Chen et al. 2025) as ComfyUI nodes."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # makes `erasepro_ops` and `erasepro_comfy` importable; appended so ComfyUI's own `nodes` wins

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

try:  # /erasepro/tokens for the Concept Pair readout; registers only inside a running ComfyUI server
    from .nodes.routes import register_routes as _register_routes; _register_routes()  # noqa: E702
except Exception as _e:  # the nodes work without it
    import logging; logging.warning("[ErasePro] token route unavailable: %s", _e)  # noqa: E702

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
