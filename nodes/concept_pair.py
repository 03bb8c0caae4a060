"""ErasePro Concept Pair: one target → anchor pair; chain several to erase many in one solve."""

from erasepro_ops.templates import CONCEPT_TYPES, ConceptPair
from erasepro_ops.text import quote

from erasepro_ops.errors import EraseProError


class ConceptPairNode:
    DESCRIPTION = ("A concept to erase (target) and what it should become (anchor). Chain several "
                   "Concept Pair nodes through 'concepts' to erase them all in one solve.")
    CATEGORY = "ErasePro"
    RETURN_TYPES = ("ERASEPRO_CONCEPTS",)
    RETURN_NAMES = ("concepts",)
    OUTPUT_TOOLTIPS = ("The concept pairs so far; connect to the solver or to another Concept Pair.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "target": ("STRING", {"default": "Van Gogh", "tooltip": "The concept to erase, e.g. an artist's name, an object or 'nudity'."}),
                "anchor": ("STRING", {"default": "a painting", "tooltip": "What prompts naming the target should produce instead. Leave empty for 'nothing'."}),
                "concept_type": (list(CONCEPT_TYPES), {"default": "style", "tooltip": "Which prompt templates to expand the pair into: object, style, nudity, or only your custom prompts."}),
            },
            "optional": {
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "Extra templates, one per line, each with {} where the concept goes (required for 'custom')."}),
                "concepts": ("ERASEPRO_CONCEPTS", {"tooltip": "Pairs from an earlier Concept Pair node, to erase together with this one."}),
            },
        }

    def build(self, target, anchor, concept_type, prompts="", concepts=None):
        try:
            pair = ConceptPair(target=target, anchor=anchor, concept_type=concept_type, prompts=prompts)
        except ValueError as e:
            raise EraseProError(f"ErasePro Concept Pair: {e}") from e
        before = tuple(concepts or ())
        if any(p.target.lower() == pair.target.lower() for p in before):
            raise EraseProError(f"ErasePro Concept Pair: {quote(pair.target)} is already in the chain")
        return (before + (pair,),)
