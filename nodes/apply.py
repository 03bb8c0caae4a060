"""Apply Erased UNet: the edit as non-destructive "diff" patches on clones of MODEL and CLIP."""

from erasepro_comfy.apply import apply_edit, check_fingerprint


class ApplyErasedUNet:
    DESCRIPTION = ("Applies an ErasePro edit as a patch (like a LoRA) on copies of the MODEL and CLIP. "
                   "The inputs stay untouched; strength 0 gives the original model back. An edit made for "
                   "another base model (its fingerprint differs from the connected MODEL/CLIP's edited "
                   "layers) is refused; Load ErasePro Edit's ignore_fingerprint lets it through.")
    CATEGORY = "ErasePro"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The erased diffusion model.", "The text encoder with the shallow edits (use it for prompts), or the input CLIP when none was needed.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the edit was solved for."}),
                "edit": ("ERASEPRO_EDIT", {"tooltip": "The edit from ErasePro Progressive Solver."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05, "tooltip": "1 = full erasure, 0 = original model, values in between blend."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The CLIP the edit was solved with; required when progressive_layers > 0."}),
            },
        }

    def apply(self, model, edit, strength, clip=None):
        new_model, new_clip = apply_edit(model, clip, edit, strength)  # checks shapes and the CLIP first
        # Strength 0 applies nothing (the outputs are the inputs' clones), so any edit is harmless
        # there and an A/B "before" branch costs no hashing.
        if strength != 0 and not edit.fingerprint_ignored:
            check_fingerprint(edit, model, clip)
        return new_model, new_clip
