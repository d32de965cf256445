"""transformers integration: ``quant_method: "spallm"`` for ``from_pretrained`` / ``save_pretrained``."""

from .config import SpaLLMQuantConfig
from .quantizer import SpaLLMHfQuantizer, register

__all__ = ["SpaLLMHfQuantizer", "SpaLLMQuantConfig", "register"]
