"""svgt_fast: a fast, correct runtime for value-guided generation (SVGT and friends)."""
from .api import GenerationOutput, generate
from .conva import ConVA, ConVAConfig, ConVAVectors, fit_conva
from .convert import convert_reference_checkpoint
from .engine import Engine
from .guard import EngineBusyError
from .neva import NeVA, NeVAConfig, NeVANeurons, fit_neva
from .re_control import REControl, REControlConfig, REControlValue, fit_re_control
from .steering import SVGT
from .streaming import GenerationStream, StreamEvent
from .value_module import SVGTConfig, SVGTModule

__all__ = ["Engine", "EngineBusyError", "GenerationOutput", "GenerationStream", "StreamEvent", "generate",
           "SVGT", "SVGTConfig", "SVGTModule", "convert_reference_checkpoint",
           "REControl", "REControlConfig", "REControlValue", "fit_re_control",
           "ConVA", "ConVAConfig", "ConVAVectors", "fit_conva", "NeVA", "NeVAConfig", "NeVANeurons", "fit_neva"]
__version__ = "0.1.0"
