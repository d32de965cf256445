"""What the Trainer scripts of ``tests/test_trainer_sharding.py`` share (each runs in fresh processes):
the sketched tiny Llama, the saved adapter's check, and accelerate's FSDP2 on CPU ranks.

accelerate's FSDP2 on CPU ranks is the one switch accelerate makes on a GPU and not on a CPU.

accelerate 1.15 turns a Trainer's FSDP plugin into ``DistributedType.FSDP`` only for accelerator
devices; on CPU ranks (gloo) it keeps ``MULTI_CPU`` and silently falls back to DDP. :func:`use_fsdp`
makes that one switch after the Trainer built its ``Accelerator``, so the rest (``fully_shard`` per
decoder layer in ``prepare``, FSDP checkpoints, resumption, saving) runs accelerate's and the
Trainer's own code. Axolotl builds its own device mesh on ``"cuda"`` and cannot use it (README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer


def sketched_tiny_llama():
    """The tiny Llama (conftest) sketched at 4-bit, gpr 2, float32 tables; the same for every call."""
    from conftest import tiny_llama

    from spallm_plugins.config import SketchConfig
    from spallm_plugins.sketch import sketch_model

    model = tiny_llama(seed=0)
    config = SketchConfig(bits=4, groups_per_row=2, kmeans_iters=4, kmeans_restarts=1, table_dtype="float32")
    sketch_model(model, config)
    return model


def saved_adapter(folder: str | Path) -> dict[str, Any]:
    """The adapter a Trainer saved in ``folder``: its tensors' shapes, the shapes of the tables
    ``PeftModel.from_pretrained`` loads from it onto a fresh base, and whether they are equal."""
    from peft import PeftModel
    from safetensors.torch import load_file

    saved = load_file(Path(folder) / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(sketched_tiny_llama(), folder)
    loaded = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if ".spallm_tables." in n}
    return {
        "saved": {k: list(v.shape) for k, v in saved.items()},
        "expected": {k: list(p.shape) for k, p in loaded.items()},
        "loaded_equal": saved.keys() == loaded.keys() and all(torch.equal(v, loaded[k]) for k, v in saved.items()),
    }


def use_fsdp(trainer: Trainer) -> None:
    """Make ``trainer``'s accelerate state FSDP with the plugin its arguments describe."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None:
        raise ValueError("use_fsdp: the Trainer's arguments configure no FSDP (fsdp / fsdp_config)")
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"use_fsdp is for CPU ranks, but accelerate chose {state.distributed_type}")
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    # both: a later AcceleratorState() copies PartialState's shared state over its own
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class CPUFSDPTrainer(Trainer):
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        use_fsdp(self)
