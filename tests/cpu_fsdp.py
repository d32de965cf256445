"""accelerate's FSDP2 on CPU ranks, for tests: the one switch accelerate makes on a GPU and not on a CPU.

accelerate 1.15 turns a Trainer's FSDP plugin into ``DistributedType.FSDP`` only for accelerator
devices; on CPU ranks (gloo) it keeps ``MULTI_CPU`` and silently falls back to DDP. :func:`use_fsdp`
makes that one switch after the Trainer built its ``Accelerator``, so the rest (``fully_shard`` per
decoder layer in ``prepare``, FSDP checkpoints, resumption, saving) runs accelerate's and the
Trainer's own code. Used by the Trainer test (``CPUFSDPTrainer``) and, through :class:`CPUFSDPPlugin`,
by the Axolotl test.
"""

from __future__ import annotations

from transformers import Trainer


def use_fsdp(trainer: Trainer) -> None:
    """Make ``trainer``'s accelerate state FSDP with the plugin its arguments describe."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import os

    state = trainer.accelerator.state
    plugin_args = trainer.args.fsdp_plugin_args
    if plugin_args is None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        raise ValueError("use_fsdp: neither the Trainer's arguments nor ACCELERATE_USE_FSDP configure FSDP")
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"use_fsdp is for CPU ranks, but accelerate chose {state.distributed_type}")
    # without Trainer arguments (Axolotl), the plugin reads accelerate's FSDP_* environment
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
    # both: a later AcceleratorState() copies PartialState's shared state over its own
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class CPUFSDPTrainer(Trainer):
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        use_fsdp(self)
