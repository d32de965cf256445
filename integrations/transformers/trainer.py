"""``SpaLLMShardingCallback``: the checks a sharded SpaLLM model needs once the Trainer has sharded it."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from spallm_plugins.sharding import check_deepspeed_config, check_sharded


class SpaLLMShardingCallback(TrainerCallback):
    """When the Trainer is built, refuse the DeepSpeed options SpaLLM's uint8 codes cannot train under
    (:func:`~spallm_plugins.sharding.check_deepspeed_config`); at ``on_train_begin`` (after accelerate
    has wrapped the model with FSDP2 or DeepSpeed), refuse codes and tables sharded differently
    (:func:`~spallm_plugins.sharding.check_sharded`), which also stops sharded layers from caching a
    full repacked copy of their codes on every rank.

    ``Trainer(..., callbacks=[SpaLLMShardingCallback()])``; the Axolotl plugin adds it itself.
    """

    def on_init_end(self, args, state, control, **kwargs: Any):
        deepspeed = getattr(args, "hf_deepspeed_config", None)
        if deepspeed is not None:  # before accelerate hands the model to DeepSpeed
            check_deepspeed_config(deepspeed.config, "TrainingArguments.deepspeed")
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        if model is not None:
            check_sharded(model)
        return control
