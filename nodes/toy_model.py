"""ErasePro Toy Model: a small trained text-to-image model shipped with the pack, to try erasure
without downloading a model."""

from erasepro_comfy import toy_model
from erasepro_ops.errors import EraseProError


class LoadToyModel:
    DESCRIPTION = ("A small SD1.x-shaped model trained on a world of drawn shapes (balls, boxes, tents, crosses, "
                   "rings, stars in six colours, on white, at night or on the beach, striped, dotted, checkered, "
                   "wavy, or painted by Van Gogh, Mondrian, Seurat or Hokusai). Ships with the pack: try erasing "
                   "a painter or an object without downloading anything. It makes 32 × 32 pictures from a "
                   "128 × 128 Empty Latent Image.")
    CATEGORY = "ErasePro"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The toy diffusion model (an SD1.x UNet, narrow).",
                       "Its text encoder (CLIP's architecture, 128 wide, 6 layers).",
                       "Its VAE (one downsampling level: a 128 × 128 Empty Latent Image decodes to 32 × 32).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        try:
            return toy_model.load()
        except toy_model.ToyModelError as e:
            raise EraseProError(f"ErasePro Toy Model: {e}") from e
