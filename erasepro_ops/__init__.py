"""ErasePro's math: closed-form zero-residual concept erasure, pure PyTorch (no ComfyUI import)."""

__version__ = "0.1.0"
