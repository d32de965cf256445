"""``SpaLLMPlugin``: ``adapter: spallm`` in Axolotl, driving the PEFT method ``spallm``.

The base model is either a sketched checkpoint (``spallm sketch``; loaded through the ``spallm``
transformers quantizer, so the adapter trains table sets over its codes) or a dense model, sketched
when the adapter is injected (data-free, or calibrated with ``spallm: {calibration: ...}``).
``lora_model_dir`` continues from saved tables. Checkpoints, resume and saving are PEFT's.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger

ADAPTER = "spallm"
LOG = get_logger("axolotl.integrations.spallm")  # under "axolotl": shown by its logging setup


def peft_config_from_cfg(cfg: Any):
    """The ``SpaLLMConfig`` an Axolotl config describes (``spallm:`` block + ``lora_target_modules``)."""
    from spallm_plugins.integrations.peft import SpaLLMConfig

    options = dict(cfg.get("spallm") or {})
    options = {k: v for k, v in options.items() if v is not None}
    if "target_modules" not in options and cfg.get("lora_target_modules"):
        options["target_modules"] = cfg.get("lora_target_modules")
    if cfg.get("lora_modules_to_save") and "modules_to_save" not in options:
        options["modules_to_save"] = cfg.get("lora_modules_to_save")
    return SpaLLMConfig(task_type="CAUSAL_LM", **options)


class SpaLLMPlugin(BasePlugin):
    """Makes ``adapter: spallm`` valid and loads it; merges go through ``merge_and_unload``."""

    def get_input_args(self) -> str:
        return "spallm_plugins.integrations.axolotl.args.SpaLLMArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER, lora_like=False, relora=False)]

    def register(self, cfg: dict) -> None:
        # Axolotl's default memory-efficient merge reads LoRA tensors only; merge_and_unload works.
        if cfg.get("adapter") == ADAPTER and not cfg.get("merge_method"):
            cfg["merge_method"] = "legacy"

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if cfg.adapter != ADAPTER:
            return None
        from peft import PeftModel, get_peft_model

        config = peft_config_from_cfg(cfg)
        if config_only:
            return None, config
        if cfg.lora_model_dir:
            LOG.info("spallm: loading tables from %s", cfg.lora_model_dir)
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference)
        else:
            model = get_peft_model(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        LOG.info("spallm: %s trainable table values (only spallm_tables train)", f"{trainable:,}")
        return model, model.peft_config[model.active_adapter]
