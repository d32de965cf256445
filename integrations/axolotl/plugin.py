"""``SpaLLMPlugin``: ``adapter: spallm`` in Axolotl, driving the PEFT method ``spallm``.

``base_model`` is a sketched checkpoint, or a dense model (Hub id or folder) that the plugin sketches once,
when the config is read, into a cache folder keyed by model, revision and the ``spallm:`` settings (data-free,
or calibrated with ``spallm: {calibration: ...}``), and trains from there: one YAML, as QLoRA's. Either way the
base loads through the ``spallm`` transformers quantizer, so the adapter trains table sets over its codes.
``lora_model_dir`` continues from saved tables. Checkpoints, resume and saving are PEFT's. Sharded
runs (``fsdp_version: 2``, ``deepspeed:`` ZeRO-3) get ``SpaLLMShardingCallback``, and DeepSpeed options
that break the codes are refused when the config is read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger

ADAPTER = "spallm"
LOG = get_logger("axolotl.integrations.spallm")  # under "axolotl": shown by its logging setup


def peft_config_from_cfg(cfg: Any):
    """The ``SpaLLMConfig`` an Axolotl config describes (``spallm:`` block + ``lora_target_modules``)."""
    from spallm_plugins.integrations.peft import SpaLLMConfig

    from .args import PLUGIN_KEYS

    options = dict(cfg.get("spallm") or {})
    options = {k: v for k, v in options.items() if v is not None and k not in PLUGIN_KEYS}
    if "target_modules" not in options and cfg.get("lora_target_modules"):
        options["target_modules"] = cfg.get("lora_target_modules")
    if cfg.get("lora_modules_to_save") and "modules_to_save" not in options:
        options["modules_to_save"] = cfg.get("lora_modules_to_save")
    return SpaLLMConfig(task_type="CAUSAL_LM", **options)


def check_deepspeed(deepspeed: str | dict | None) -> None:
    """Refuse, before any model loads, the DeepSpeed options SpaLLM's codes cannot train under; the
    ``deepspeed:`` key is a JSON file or an inline mapping (a path that does not exist is Axolotl's to report)."""
    if not deepspeed:
        return
    from spallm_plugins.sharding import check_deepspeed_config

    if isinstance(deepspeed, dict):
        check_deepspeed_config(deepspeed, "deepspeed (Axolotl config)")
        return
    path = Path(str(deepspeed))
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable DeepSpeed JSON config ({err})") from err
    check_deepspeed_config(config, str(path))


def sketch_dense_base(cfg: Any) -> None:
    """Point ``base_model`` at the sketch of a dense base (made once, reused after; see ``cached_sketch``), so
    everything Axolotl reads next (config, tokenizer, weights) is the sketched checkpoint's."""
    from spallm_plugins.models import resolve_model
    from spallm_plugins.pipeline import cached_sketch, is_sketched_folder

    base, revision = cfg.get("base_model"), cfg.get("revision_of_model")
    if not base or is_sketched_folder(resolve_model(base, revision=revision)):
        return
    options = dict(cfg.get("spallm") or {})
    sketch = peft_config_from_cfg(cfg).sketch_config(target_modules=None)
    started = time.time()
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    result = cached_sketch(base, sketch, folder=options.get("sketch_dir"), revision=revision, device=device)
    made = (result.path / "config.json").stat().st_mtime >= started
    LOG.info("spallm: %s is dense: %s its %s-bit sketch (%s groups per row) %s", base, "made" if made else "reusing",
             sketch.bits, sketch.groups_per_row, result.path)  # fmt: skip
    for key in ("base_model", "base_model_config", "tokenizer_config"):
        if cfg.get(key) in (None, base):
            cfg[key] = str(result.path)
    cfg["revision_of_model"] = None
    if options.get("calibration"):
        cfg["spallm"] = {**options, "calibration": result.config.calibration}


class SpaLLMPlugin(BasePlugin):
    """Makes ``adapter: spallm`` valid and loads it; merges go through ``merge_and_unload``."""

    def get_input_args(self) -> str:
        return "spallm_plugins.integrations.axolotl.args.SpaLLMArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER, lora_like=False, relora=False)]

    def register(self, cfg: dict) -> None:
        if cfg.get("adapter") != ADAPTER:
            return
        # Axolotl's default memory-efficient merge reads LoRA tensors only; merge_and_unload works.
        if not cfg.get("merge_method"):
            cfg["merge_method"] = "legacy"
        check_deepspeed(cfg.get("deepspeed"))
        sketch_dense_base(cfg)

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        if cfg.adapter != ADAPTER:
            return []
        from spallm_plugins.integrations.transformers.trainer import SpaLLMShardingCallback

        LOG.info("spallm: SpaLLMShardingCallback checks codes and tables placement when training starts")
        return [SpaLLMShardingCallback()]

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
