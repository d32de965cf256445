"""``spallm bench sharding``: what FSDP2 saves each rank and what it costs per step, side by side.

A Llama-shaped model (default: SmolLM2-135M's widths) with random codes and tables (the numbers
measured do not depend on the values) trains its tables with Adam, once in one plain process and
once per world size as ``fully_shard`` ranks on gloo (CPU), each configuration in its own processes so
their peak resident memory is their own. Per rank: bytes of codes, tables and the dense rest actually
held, peak RSS, median step time; and, beside them, what ``spallm info --world-size N`` projects
(:func:`spallm_plugins.sharding.sharded_memory`).

The machine's cores are shared by the ranks (``threads per rank = threads // N``), so the step-time
ratio on a CPU says what gloo collectives cost against the same compute, not what N GPUs would gain.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}  # fmt: skip


def build_model(shape: dict[str, int], bits: int, groups_per_row: int, seed: int = 0):
    """The Llama of ``shape`` with every default target a ``SketchedLinear`` of random codes and tables
    (float32 tables: the trainable dtype); only the tables train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..config import SketchConfig
    from ..convert import replace_with_empty, sketched_layers

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    config = SketchConfig(bits=bits, groups_per_row=groups_per_row, table_dtype="float32")
    replace_with_empty(model, config, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sketched_layers(model).values():
            layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, generator=g, dtype=torch.uint8))
            layer.tables.copy_(torch.randn(layer.tables.shape, generator=g) * 0.02)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".tables"))
    return model, config


def held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of codes, tables and the dense rest this process holds (a sharded parameter's local part)."""
    from ..sharding import is_sharded

    held = {"codes_bytes": 0, "tables_bytes": 0, "dense_bytes": 0}
    for name, param in model.named_parameters():
        local = param.to_local() if is_sharded(param) else param
        kind = name.rsplit(".", 1)[-1]
        held[f"{kind}_bytes" if kind in ("codes", "tables") else "dense_bytes"] += local.nbytes
    return held


def _rank(rank: int, world_size: int, port: int, settings: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(settings["threads_per_rank"])
    sharded = world_size > 1
    if sharded:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, _ = build_model(settings["shape"], settings["bits"], settings["groups_per_row"])
        if sharded:
            from torch.distributed.fsdp import fully_shard

            from ..sharding import check_sharded

            for block in model.model.layers:
                fully_shard(block)
            fully_shard(model)
            check_sharded(model)
        held = held_bytes(model)
        batch, seqlen = settings["batch"], settings["seqlen"]
        ids = torch.randint(
            0, settings["shape"]["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(1)
        )
        per_rank = batch // world_size
        ids = ids[rank * per_rank : (rank + 1) * per_rank]
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        seconds, losses = [], []
        for step in range(settings["steps"] + 1):  # step 0 warms up (allocations, first all-gathers)
            if sharded:
                dist.barrier()
            start = time.perf_counter()
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sharded:
                dist.barrier()
            if step:
                seconds.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
        result = {
            **held,
            "optimizer_state_bytes": sum(
                (v.to_local() if hasattr(v, "to_local") else v).nbytes
                for state in opt.state.values()
                for k, v in state.items()
                if k != "step"
            ),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds": [round(s, 4) for s in seconds],
            "losses": losses,
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if sharded:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sharding_bench(
    out_dir: str | Path,
    *,
    world_sizes: tuple[int, ...] = (2,),
    shape: dict[str, int] | None = None,
    bits: int = 4,
    groups_per_row: int = 4,
    steps: int = 5,
    batch: int = 8,
    seqlen: int = 128,
    overwrite: bool = False,
    log=print,
) -> dict[str, Any]:
    """One plain process, then ``fully_shard`` over each world size; write ``sharding.json``."""
    import torch.multiprocessing as mp

    from ..format import write_json
    from ..outputs import prepare_output_dir

    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    shape = dict(shape or SMOLLM2)
    threads = torch.get_num_threads()
    rows = []
    for world_size in (1, *[n for n in world_sizes if n > 1]):
        if batch % world_size:
            raise ValueError(f"--batch {batch} does not split over {world_size} ranks")
        settings = {"shape": shape, "bits": bits, "groups_per_row": groups_per_row, "steps": steps, "batch": batch,
                    "seqlen": seqlen, "threads_per_rank": max(1, threads // world_size)}  # fmt: skip
        work = out_dir / f"world-{world_size}"
        work.mkdir(parents=True, exist_ok=True)
        mp.spawn(_rank, args=(world_size, _free_port(), settings, str(work)), nprocs=world_size, join=True)
        ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(world_size)]
        step = statistics.median(max(r["step_seconds"][i] for r in ranks) for i in range(steps))
        row = {"world_size": world_size, "sharded": world_size > 1, "threads_per_rank": settings["threads_per_rank"],
               "step_seconds_median": round(step, 4), "ranks": ranks,
               "projected_rank0": _projection(shape, bits, groups_per_row, world_size)}  # fmt: skip
        rows.append(row)
        log(f"world size {world_size}: rank 0 codes {ranks[0]['codes_bytes'] / 2**20:.1f} MiB, tables "
            f"{ranks[0]['tables_bytes'] / 2**20:.1f} MiB, peak RSS {ranks[0]['peak_rss_bytes'] / 2**30:.2f} GiB, "
            f"step {step:.3f} s (median of {steps})")  # fmt: skip
    single = rows[0]
    for row in rows[1:]:
        row["step_time_ratio_to_one_process"] = round(row["step_seconds_median"] / single["step_seconds_median"], 3)
        row["rank0_codes_fraction"] = round(row["ranks"][0]["codes_bytes"] / single["ranks"][0]["codes_bytes"], 4)
    results = {"shape": shape, "bits": bits, "groups_per_row": groups_per_row, "batch": batch, "seqlen": seqlen,
               "steps": steps, "torch_threads": threads, "rows": rows}  # fmt: skip
    write_json(out_dir / "sharding.json", results)
    return results


def _projection(shape: dict[str, int], bits: int, groups_per_row: int, world_size: int) -> dict[str, int]:
    """``spallm info --world-size N`` for this shape (float32 dense rest, as built here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..config import SketchConfig
    from ..convert import resolve_targets
    from ..sharding import sharded_memory

    config = SketchConfig(bits=bits, groups_per_row=groups_per_row, table_dtype="float32")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    return sharded_memory(model, resolve_targets(model, config), config, world_size, 4, "model.layers")
