"""The block-by-block sketch: one loop, whether a block's weights stream from a checkpoint or sit in memory.

For each decoder block in order: its weights come in (:meth:`BlockHost.load`), its target linears are
sketched (with calibration: Hessians from the block's inputs, then the inputs run through the
*sketched* block to become the next block's, :func:`.block.sketch_block`), and the sketched block goes
out (:meth:`BlockHost.keep`: written as its shard, or moved off the device). Only one block needs to be
on the compute device. With a :class:`~.progress.ProgressStore`, every block is committed to the
partial folder, so that ``resume`` continues a killed run and gives the same bytes.

The streamed host is :class:`spallm_plugins.streaming.StreamedCheckpoint` (``spallm sketch``); the
host of a model already in memory is :class:`ModelInMemory` (sketch-on-load, PEFT's calibrated
injection, ``spallm bench quality``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..config import SketchConfig
from ..convert import resolve_targets
from .block import sketch_block
from .blocks import capture_block_inputs, find_blocks, relative_name
from .model import sketch_layers
from .process_memory import peak_memory, release_freed_memory
from .progress import ProgressStore, SpilledActivations

__all__ = ["BlockHost", "ModelInMemory", "sketch_blocks", "sketch_model_calibrated"]

_TAGS = ("a", "b")  # spilled inputs of block i live in set _TAGS[i % 2], its outputs in the other


class BlockHost(Protocol):
    """Where a block's weights come from and where they go."""

    model: nn.Module

    def start(self, blocks_name: str, store: ProgressStore | None, state: dict[str, Any]) -> None:
        """Before the first block: what lies outside the blocks is written through or put on the device."""

    def embeddings(self) -> contextlib.AbstractContextManager:
        """The layers before the first block, ready for the calibration forward while the context lasts."""

    def load(self, block: nn.Module, prefix: str) -> None:
        """The weights of ``block`` (checkpoint names under ``prefix``) on the compute device."""

    def keep(self, index: int, block: nn.Module, prefix: str) -> None:
        """The sketched ``block`` leaves the compute device (written as its shard, or moved to the CPU)."""

    def finish(self) -> None:
        """After the last block."""


class ModelInMemory:
    """A model whose weights are already in memory, sketched in place; ``offload`` keeps every block on
    the CPU but the one being sketched."""

    def __init__(self, model: nn.Module, device: torch.device, offload: bool = False):
        self.model, self.device, self.offload = model, device, offload
        self.use_cache = getattr(model.config, "use_cache", None)

    def start(self, blocks_name: str, store: ProgressStore | None, state: dict[str, Any]) -> None:
        if self.use_cache is not None:
            self.model.config.use_cache = False
        if not self.offload:
            self.model.to(self.device)
            return
        for name, module in self.model.named_modules():
            inside = name == blocks_name or name.startswith(blocks_name + ".")
            if not inside and not any(True for _ in module.children()):
                module.to(self.device)

    def embeddings(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def load(self, block: nn.Module, prefix: str) -> None:
        block.to(self.device)

    def keep(self, index: int, block: nn.Module, prefix: str) -> None:
        if self.offload:
            block.to("cpu")

    def finish(self) -> None:
        if self.use_cache is not None:
            self.model.config.use_cache = self.use_cache


def _saved_inputs(store: ProgressStore, state: dict[str, Any], finished: int, sizes: list[int], device, spill: bool):
    """The inputs of block ``finished`` as the previous run left them, in this run's form (list or files)."""
    if state.get("spilled_inputs"):
        saved = SpilledActivations(store.dir, _TAGS[finished % 2], device, sizes)
        return saved if spill else [saved[i] for i in range(len(saved))]
    batches = list(store.hidden(finished).to(device).split(sizes))
    if not spill:
        return batches
    spilled = SpilledActivations(store.dir, _TAGS[finished % 2], device)
    for batch in batches:
        spilled.append(batch)
    return spilled


def _first_inputs(host: BlockHost, blocks, ids, batch_size, device, store, state, spill: bool):
    """The inputs of the first block still to sketch, per calibration batch, and the blocks' keyword arguments.

    The capture runs on resume too (the keyword arguments are needed); its spilled hidden states go to
    the set that block ``finished`` then overwrites, and the saved inputs replace them.
    """
    finished = state["finished_blocks"]
    sink = SpilledActivations(store.dir, _TAGS[(finished + 1) % 2 if finished else 0], device) if spill else None
    with host.embeddings():
        hidden, kwargs_list = capture_block_inputs(host.model, blocks, ids, batch_size, device, into=sink)
    if finished:
        sizes = [batch.shape[0] for batch in ids.split(batch_size)]
        hidden = _saved_inputs(store, state, finished, sizes, device, spill)
    return hidden, kwargs_list


@torch.no_grad()
def sketch_blocks(
    host: BlockHost,
    config: SketchConfig,
    *,
    calibration_ids: torch.Tensor | None = None,
    store: ProgressStore | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = False,
    max_memory: int | None = None,
    offload_activations: bool = False,
    on_block_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Sketch every target linear of ``host.model``, block by block; return the report.

    ``calibration_ids`` (``[nsamples, seqlen]``) select the calibrated method; without them each
    block is sketched data-free. With a ``store``, each block is committed there (``resume``
    continues from its last commit) and ``offload_activations`` keeps the calibration activations
    in its folder, one batch in memory at a time. ``on_block_done(i)`` is called after block ``i``
    is committed (progress reporting; tests use it to simulate a kill). ``max_memory`` bounds the
    workspace of sketching one linear (bytes, :mod:`.memory`).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    targets = resolve_targets(host.model, config)
    blocks_name, blocks = find_blocks(host.model, targets)
    saved = store.begin(resume) if store is not None else None
    state: dict[str, Any] = saved or {"finished_blocks": 0, "report": {"layers": {}, "blocks": []}}
    finished, report = state["finished_blocks"], state["report"]
    timings = {"read": 0.0, "capture": 0.0, "hessian": 0.0, "sketch": 0.0, "propagate": 0.0, "write": 0.0}
    start = time.perf_counter()
    host.start(blocks_name, store, state)
    timings["write"] += time.perf_counter() - start

    hidden: Sequence[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []
    if calibration_ids is not None:
        start = time.perf_counter()
        hidden, kwargs_list = _first_inputs(host, blocks, calibration_ids, batch_size, device, store, state,
                                            offload_activations)  # fmt: skip
        timings["capture"] += time.perf_counter() - start

    bar = tqdm(total=len(blocks), initial=finished, desc="sketching blocks", unit="block", disable=not progress)
    for index in range(finished, len(blocks)):
        block, prefix = blocks[index], f"{blocks_name}.{index}"
        start = time.perf_counter()
        host.load(block, prefix)
        timings["read"] += time.perf_counter() - start
        # popped: once replaced in the block, nothing may keep the dense linears (and their weights) alive
        local = {relative_name(name, prefix): targets.pop(name) for name in list(targets)
                 if name.startswith(prefix + ".")}  # fmt: skip
        if calibration_ids is not None:
            spill = SpilledActivations(store.dir, _TAGS[(index + 1) % 2], device) if offload_activations else None
            hidden = sketch_block(block, index, prefix, local, hidden, kwargs_list, config, report, timings, bar,
                                  max_memory, spill)  # fmt: skip
        else:
            _sketch_data_free(block, index, prefix, local, config, report, timings, bar, max_memory)
        del local
        start = time.perf_counter()
        host.keep(index, block, prefix)
        if store is not None:
            _commit(store, state, index, hidden if calibration_ids is not None else None, offload_activations)
        release_freed_memory()
        timings["write"] += time.perf_counter() - start
        bar.update(1)
        if on_block_done is not None:
            on_block_done(index)
    bar.close()
    del hidden
    host.finish()
    report["seconds"] = {k: round(v, 3) for k, v in timings.items()}  # this process only
    report["resumed_from_block"] = finished
    report.update(peak_memory())
    return report


def _sketch_data_free(block, index, prefix, local, config, report, timings, bar, max_memory) -> None:
    """Sketch the linears ``local`` of one block without calibration; ``report`` and ``timings`` in place."""
    start = time.perf_counter()
    losses = sketch_layers(block, local, config, prefix=prefix, max_memory=max_memory, on_layer=bar.set_postfix_str)
    report["layers"].update({name: {"loss": loss} for name, loss in losses.items()})
    report["blocks"].append({"index": index, "seconds": round(time.perf_counter() - start, 3), **peak_memory()})
    timings["sketch"] += time.perf_counter() - start


def _commit(store: ProgressStore, state: dict[str, Any], index: int, hidden, spilled: bool) -> None:
    """Block ``index`` done: the next block's inputs saved (unless spilled already), then ``progress.json``."""
    if hidden is not None and not spilled:
        store.write_inputs(index + 1, torch.cat(list(hidden)))
    state.update(finished_blocks=index + 1, spilled_inputs=spilled)
    store.commit(state)
    store.hidden_file(index).unlink(missing_ok=True)  # superseded once progress.json is committed


def sketch_model_calibrated(
    model: nn.Module,
    config: SketchConfig,
    calibration_ids: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    offload: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    max_memory: int | None = None,
) -> dict[str, Any]:
    """Sketch every target linear of ``model`` in place with calibration; return the report.

    ``offload`` keeps blocks on the CPU except the one being sketched.
    """
    device = torch.device(device)
    return sketch_blocks(ModelInMemory(model, device, offload), config, calibration_ids=calibration_ids,
                         device=device, batch_size=batch_size, progress=progress, max_memory=max_memory)  # fmt: skip
