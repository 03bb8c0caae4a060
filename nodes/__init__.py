"""ComfyUI node classes of the pack (thin adapters over erasepro_ops)."""

from .apply import ApplyErasedUNet
from .concept_pair import ConceptPairNode
from .edit_io import LoadEraseProEdit, SaveEraseProEdit
from .evaluate import EraseProEvaluate
from .solver import ProgressiveSolver
from .toy_model import LoadToyModel

NODE_CLASS_MAPPINGS = {
    "ErasePro_ConceptPair": ConceptPairNode,
    "ErasePro_ProgressiveSolver": ProgressiveSolver,
    "ErasePro_ApplyErasedUNet": ApplyErasedUNet,
    "ErasePro_SaveEdit": SaveEraseProEdit,
    "ErasePro_LoadEdit": LoadEraseProEdit,
    "ErasePro_Evaluate": EraseProEvaluate,
    "ErasePro_ToyModel": LoadToyModel,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ErasePro_ConceptPair": "ErasePro Concept Pair",
    "ErasePro_ProgressiveSolver": "ErasePro Progressive Solver",
    "ErasePro_ApplyErasedUNet": "Apply Erased UNet",
    "ErasePro_SaveEdit": "Save ErasePro Edit",
    "ErasePro_LoadEdit": "Load ErasePro Edit",
    "ErasePro_Evaluate": "ErasePro Evaluate",
    "ErasePro_ToyModel": "ErasePro Toy Model (no download)",
}
