"""One decoder block sketched with calibration data, stage by stage (GPTQ's sequential order).

Its linears' Hessians are captured from the block's inputs, the linears replaced by ``SketchedLinear``
layers (one factorisation per distinct input), the tables optionally tuned against the dense block's
outputs, and the inputs run through the *sketched* block to become the next block's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import SketchConfig
from ..convert import set_submodule
from .blocks import StopForward, block_output
from .gptq import PreparedHessian, prepare_hessian
from .hessians import HessianCollector
from .model import sketch_layer
from .process_memory import peak_memory
from .progress import SpilledActivations
from .tuning import tune_block_tables


@torch.no_grad()
def input_stages(
    block: nn.Module, local: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict[str, Any]
) -> list[list[str]]:
    """The linears of ``local`` grouped by shared input, in the order the block's forward reaches them.

    Found with one forward of one calibration batch; a linear that forward never reaches goes into
    a last stage of its own (its capture then runs the full forward and reports it if never reached).
    """
    order: list[tuple[str, tuple]] = []
    inputs: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0]
            inputs.append(x)  # held, so that an equal data_ptr really is the same tensor
            order.append((name, (x.data_ptr(), tuple(x.shape), tuple(x.stride()))))

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in local.items()]
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    stages: dict[tuple, list[str]] = {}
    for name, key in order:
        if not any(name in stage for stage in stages.values()):
            stages.setdefault(key, []).append(name)
    grouped = list(stages.values())
    unseen = [name for name in local if not any(name in stage for stage in grouped)]
    return grouped + ([unseen] if unseen else [])


def run_block(block: nn.Module, hidden: Sequence[torch.Tensor], kwargs_list: list[dict[str, Any]], into: Any) -> Any:
    """The block's output for each batch of ``hidden``, appended to ``into`` (a list, or spilled activations)."""
    for h, kw in zip(hidden, kwargs_list):
        into.append(block_output(block(h, **kw)))
    return into


def capture_hessians(
    block: nn.Module, linears: dict[str, nn.Linear], index: int, hidden: Sequence[torch.Tensor],
    kwargs_list: list[dict[str, Any]],
) -> HessianCollector:  # fmt: skip
    """The input Hessians of ``linears`` over every calibration batch; each forward stops once they all saw
    their input."""
    with HessianCollector(linears, index, stop_when_reached=True) as collector:
        for h, kw in zip(hidden, kwargs_list):
            collector.new_batch()
            try:
                block(h, **kw)
            except StopForward:
                pass
    return collector


def sketch_stage(
    block: nn.Module, prefix: str, local: dict[str, nn.Linear], stage: list[str], collector: HessianCollector,
    config: SketchConfig, report: dict[str, Any], bar, max_memory: int | None,
) -> None:  # fmt: skip
    """Replace the linears of one stage by their sketches, one factorisation per distinct input: an input's
    Hessian is prepared for its first reader and released after its last."""
    prepared: dict[str, PreparedHessian] = {}  # per distinct input, while a layer reading it is left
    readers = {owner: [n for n in stage if collector.owner.get(n) == owner] for owner in collector.sums}
    for rel_name in stage:
        linear = local[rel_name]
        name = f"{prefix}.{rel_name}"
        if bar is not None:
            bar.set_postfix_str(rel_name)
        layer_start = time.perf_counter()
        owner = collector.owner.get(rel_name)
        hessian: torch.Tensor | PreparedHessian | None = prepared.get(owner)
        if hessian is None:
            hessian = collector.hessian(rel_name)  # raises for a layer the forward never reached
            if config.method == "gptq":  # factored once for all the layers that read this input
                together = ", ".join(f"{prefix}.{n}" for n in readers[owner])
                hessian = prepare_hessian(
                    hessian.to(linear.weight.device), config.damping, together, config.act_order, overwrite=True
                )
                prepared[owner] = hessian
        if readers[owner][-1] == rel_name:
            prepared.pop(owner, None)
            collector.release(rel_name)
        layer, result = sketch_layer(linear, config, hessian=hessian, name=name, max_memory=max_memory)
        del hessian
        set_submodule(block, rel_name, layer)
        report["layers"][name] = {
            "loss": result.loss,
            "loss_before_refit": result.loss_before_refit,
            "refit_rows": result.refit_rows,
            "rows": linear.out_features,
            "damping": result.damping,
            "seconds": round(time.perf_counter() - layer_start, 4),
        }


@torch.no_grad()
def sketch_block(
    block: nn.Module,
    index: int,
    prefix: str,
    local: dict[str, nn.Linear],
    hidden: list[torch.Tensor],
    kwargs_list: list[dict[str, Any]],
    config: SketchConfig,
    report: dict[str, Any],
    timings: dict[str, float],
    bar=None,
    max_memory: int | None = None,
    outputs: SpilledActivations | None = None,
) -> Sequence[torch.Tensor]:
    """Sketch the linears ``local`` (names relative to ``block``) of one decoder block with calibration.

    Captures their Hessians from ``hidden`` (the block's inputs, per batch), replaces them in ``block``
    by ``SketchedLinear`` layers, and returns the block's outputs through the *sketched* block: the
    next block's inputs (appended to ``outputs`` when given, else a list). ``report`` and ``timings`` are updated in place.

    With ``config.true_sequential`` the linears are sketched in stages of one shared input each, in
    forward order (q/k/v, then o_proj, then gate/up, then down_proj for a Llama block), and each
    stage's Hessian is captured through the already sketched stages before it, so that a layer
    compensates the errors of the layers that feed it (GPTQ's ``true-sequential``). A stage's
    capture stops the forward as soon as the stage's last linear has seen its input.

    With ``config.tune_steps`` the dense block's outputs are kept (or spilled beside ``outputs``) before
    its linears are replaced, and the sketched block's tables are then tuned against them
    (:func:`tune_block_tables`) before its outputs go on to the next block.
    """
    t0 = time.perf_counter()
    stages = input_stages(block, local, hidden[0], kwargs_list[0]) if config.true_sequential else [list(local)]
    dense_outputs: Any = None
    tune_seconds = 0.0
    if config.tune_steps:  # the targets of the table tuning: the dense block's outputs (spilled with the rest)
        dense_start = time.perf_counter()
        dense_outputs = run_block(block, hidden, kwargs_list, [] if outputs is None else outputs.emptied("targets"))
        tune_seconds = time.perf_counter() - dense_start
    hessian_seconds = 0.0
    for stage in stages:
        stage_start = time.perf_counter()
        collector = capture_hessians(block, {n: local[n] for n in stage}, index, hidden, kwargs_list)
        hessian_seconds += time.perf_counter() - stage_start
        sketch_stage(block, prefix, local, stage, collector, config, report, bar, max_memory)
        del collector
    t1 = t0 + hessian_seconds
    tuning: dict[str, Any] = {}
    if dense_outputs is not None:
        tune_start = time.perf_counter()
        sketched = {rel: block.get_submodule(rel) for rel in local}
        tuning = tune_block_tables(
            block, sketched, hidden, kwargs_list, dense_outputs, config.tune_steps, config.tune_lr
        )
        del dense_outputs
        tune_seconds += time.perf_counter() - tune_start
        tuning["seconds"] = round(tune_seconds, 3)  # the dense block's forward included
        timings["tune"] = timings.get("tune", 0.0) + tune_seconds
    t2 = time.perf_counter()
    hidden = run_block(block, hidden, kwargs_list, [] if outputs is None else outputs)
    t3 = time.perf_counter()
    timings["hessian"] += t1 - t0
    timings["sketch"] += t2 - t1 - tune_seconds
    timings["propagate"] += t3 - t2
    block_report = {"index": index, "seconds": round(t3 - t0, 3), **peak_memory()}
    report["blocks"].append({**block_report, "tuning": tuning} if tuning else block_report)
    return hidden
