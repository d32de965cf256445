"""Make ``spallm`` a PEFT method: ``PeftType.SPALLM``, its config, its tuner and the ``spallm_`` prefix.

Runs automatically right after ``peft`` is imported (the ``spallm_register_host`` hook, see
:mod:`spallm_plugins._autoregister`), so ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained``
read ``"peft_type": "SPALLM"`` without the user importing spallm.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import SpaLLMConfig
from .constants import PEFT_METHOD, PREFIX, add_enum_member, spallm_peft_type
from .model import SpaLLMModel

__all__ = ["add_enum_member", "register"]

_registered = False


def register() -> None:
    """Register the ``spallm`` PEFT method once per process (later calls return immediately)."""
    global _registered
    if _registered:
        return
    if spallm_peft_type() not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_METHOD, config_cls=SpaLLMConfig, model_cls=SpaLLMModel, prefix=PREFIX)
    _registered = True
