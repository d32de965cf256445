"""vLLM integration: the ``spallm`` quantization method (``vllm serve DIR --quantization spallm``).

vLLM runs every ``vllm.general_plugins`` entry point in every process it starts (API server, engine
core, workers), possibly more than once, and only logs a plugin's exception; a broken plugin then
surfaces later as "Unknown quantization method". So :func:`register` is idempotent, imports vLLM
only when called, and says loudly in its own log line what failed.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("spallm_plugins.vllm")

_registered = False


def register() -> None:
    """Register ``spallm`` with vLLM (entry point ``vllm.general_plugins``): the quantization method and
    the table-set wrappers/loader that serve SpaLLM adapters with ``--enable-lora``."""
    global _registered
    if _registered:
        return
    try:
        from . import quantization  # noqa: F401  (its decorator registers the config)
        from .lora import install

        install()  # per-request table sets through vLLM's multi-LoRA plumbing
    except Exception:
        logger.exception(
            "spallm: registering the 'spallm' quantization method with vLLM FAILED; sketched checkpoints "
            "will not load ('Unknown quantization method'). Cause:"
        )
        raise
    _registered = True
