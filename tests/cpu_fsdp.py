"""accelerate's FSDP2 on CPU ranks, for tests: the one switch accelerate makes on a GPU and not on a CPU.

accelerate 1.15 turns a Trainer's FSDP plugin into ``DistributedType.FSDP`` only for accelerator
devices; on CPU ranks (gloo) it keeps ``MULTI_CPU`` and silently falls back to DDP. :func:`use_fsdp`
makes that one switch after the Trainer built its ``Accelerator``, so the rest (``fully_shard`` per
decoder layer in ``prepare``, FSDP checkpoints, resumption, saving) runs accelerate's and the
Trainer's own code. Axolotl builds its own device mesh on ``"cuda"`` and cannot use it (README).
"""

from __future__ import annotations

from transformers import Trainer


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
