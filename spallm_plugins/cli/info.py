"""``spallm info``: what a sketch of a model holds (sizes, kernels, memory to sketch it, per-rank bytes),
from config.json alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import SketchConfig
from .common import (
    add_dense_dtype_option,
    add_revision_option,
    add_sketch_options,
    config_from_args,
    human,
    human_bytes,
    memory_size,
    positive_int,
)


def cmd_info(args: argparse.Namespace) -> int:
    summary = info_summary(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_info(args, summary)
    return 0


def info_summary(args: argparse.Namespace) -> dict[str, Any]:
    """What ``spallm info --json`` prints: the plan of sketching ``args.path`` with the options' settings."""
    import torch

    from ..convert import plan_sketch
    from ..format import refuse_sketch_without_config
    from ..hub import CONFIG_FILES, resolve_hub_ref
    from ..models import meta_model_from_config
    from ..pipeline import source_dense_dtype, stored_dense_rest

    # a Hub id: config.json alone is fetched (a cached snapshot's files are read as they are)
    path = resolve_hub_ref(args.path, args.revision, files=CONFIG_FILES, need_weights=False) or Path(args.path)
    folder = path if path.is_dir() else path.parent
    refuse_sketch_without_config(folder)
    model, quant = meta_model_from_config(path)
    base = SketchConfig.from_dict(quant, where=f"{path} quantization_config") if quant else None
    config = config_from_args(args, base)
    dense_dtype = args.dense_dtype or source_dense_dtype(folder)
    plan = plan_sketch(model, config, dense_dtype_bytes=getattr(torch, dense_dtype).itemsize)
    stored = stored_dense_rest(folder) if base is not None and args.dense_dtype is None else None
    if stored is not None:  # a sketched checkpoint: count what its files hold
        plan.dense_rest_bytes, dense_dtype = stored
    shapes: dict[str, list] = {}
    for name, out_f, in_f in plan.layers:
        shapes.setdefault(name.rsplit(".", 1)[-1], [out_f, in_f, 0])[2] += 1
    dense_bytes = getattr(torch, dense_dtype).itemsize
    summary: dict[str, Any] = {
        "model_type": model.config.model_type,
        "sketched_from_checkpoint": base is not None,
        "bits": config.bits,
        "groups_per_row": config.groups_per_row,
        "table_dtype": config.table_dtype,
        "sketched_layers": len(plan.layers),
        "table_values": plan.table_values,
        "trainable_parameters": plan.table_values,
        "code_bytes": plan.code_bytes,
        "table_bytes": plan.table_bytes,
        "dense_dtype": dense_dtype,
        "dense_rest_bytes": plan.dense_rest_bytes,
        "sketched_model_bytes": plan.code_bytes + plan.table_bytes + plan.dense_rest_bytes,
        "dense_model_bytes": plan.dense_bytes,
        "bits_per_sketched_weight": round(plan.bits_per_weight, 4),
        "layers_by_name": {k: {"out_features": o, "in_features": i, "count": c} for k, (o, i, c) in shapes.items()},
    }
    if args.kernels:
        summary["kernels"] = _kernel_report(plan.layers, config)
    summary["sketch_memory"] = _sketch_memory(model, config, args, dense_bytes)
    if args.world_size is not None:
        summary["sharded"] = _sharded_memory(model, config, args.world_size, dense_bytes)
    return summary


def print_info(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """``spallm info`` for people: the summary's figures in units."""
    bits_per_weight = summary["bits_per_sketched_weight"]
    print(f"{args.path}: {summary['model_type']}, bits={summary['bits']}, groups_per_row={summary['groups_per_row']}, "
          f"table_dtype={summary['table_dtype']}")  # fmt: skip
    print(f"  sketched linears: {summary['sketched_layers']}")
    for k, v in summary["layers_by_name"].items():
        print(f"    {k:<16} {v['count']:>4} x [{v['out_features']} x {v['in_features']}]")
    print(f"  table values (trainable): {human(summary['table_values'])} ({summary['table_values']:,})")
    print(f"  codes: {human_bytes(summary['code_bytes'])}, tables: {human_bytes(summary['table_bytes'])}, "
          f"dense rest ({summary['dense_dtype']}): {human_bytes(summary['dense_rest_bytes'])}")  # fmt: skip
    print(f"  sketched model: {human_bytes(summary['sketched_model_bytes'])}; bits per sketched weight "
          f"(codes + tables): {bits_per_weight:.3f}; dense model ({summary['dense_dtype']}): "
          f"{human_bytes(summary['dense_model_bytes'])}")  # fmt: skip
    memory = summary["sketch_memory"]
    if memory:
        terms = ", ".join(f"{k.removesuffix('_bytes').replace('_', ' ')} {human_bytes(v)}" for k, v in memory.items()
                          if k != "peak_bytes")  # fmt: skip
        print(f"  sketching it (streaming; calibrated with {args.nsamples} x {args.seqlen} tokens): about "
              f"{human_bytes(memory['peak_bytes'])} ({terms})")  # fmt: skip
    sharded = summary.get("sharded")
    if sharded:
        print(f"  FSDP2 over {sharded['world_size']} ranks, per rank (rank 0, the largest): codes "
              f"{human_bytes(sharded['codes_bytes'])}, tables {human_bytes(sharded['tables_bytes'])}, dense rest "
              f"{human_bytes(sharded['dense_bytes'])}, buffers {human_bytes(sharded['buffer_bytes'])}: "
              f"{human_bytes(sharded['persistent_bytes'])} held")  # fmt: skip
        print(f"    training the tables (Adam): + optimizer state {human_bytes(sharded['optimizer_bytes'])} + gathered "
              f"blocks {human_bytes(sharded['training_gathered_bytes'])} = {human_bytes(sharded['training_peak_bytes'])} "
              "before activations")  # fmt: skip
    if summary.get("kernels"):
        print("  kernel backends (first accepted is used):")
    for row in summary.get("kernels", []):
        verdict = "ok" if row["accepted"] else f"no: {row['reason']}"
        print(f"    {row['case']:<40} {row['backend']:<12} {verdict}")


def _sketch_memory(model, config: SketchConfig, args: argparse.Namespace, dense_bytes: int) -> dict[str, int]:
    """Peak memory of a streaming calibrated sketch of ``model`` ({} when its targets are not in blocks)."""
    from ..convert import resolve_targets
    from ..streaming import sketch_memory

    try:
        memory = sketch_memory(model, resolve_targets(model, config), args.nsamples, args.seqlen, args.max_memory,
                               dense_bytes, args.device)  # fmt: skip
    except ValueError:
        return {}
    return {**memory, "peak_bytes": sum(memory.values())}


def _sharded_memory(model, config: SketchConfig, world_size: int, dense_bytes: int) -> dict[str, int]:
    """Per-rank bytes of ``model`` sketched with ``config`` under FSDP2 (``sharding.sharded_memory``)."""
    from ..convert import resolve_targets
    from ..sharding import sharded_memory
    from ..sketch.blocks import find_blocks

    targets = resolve_targets(model, config)
    try:
        blocks_name, _ = find_blocks(model, targets)
    except ValueError:
        blocks_name = None
    return sharded_memory(model, targets, config, world_size, dense_bytes, blocks_name)


def _kernel_report(layers: list[tuple[str, int, int]], config: SketchConfig) -> list[dict[str, Any]]:
    import torch

    from ..hooks import explain_backends
    from ..kernels import LUTProblem

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    _, out_f, in_f = layers[0]
    rows = []
    for device in devices:
        for m, dtype in ((1, torch.float16), (256, torch.bfloat16), (256, torch.float32)):
            problem = LUTProblem(device, dtype, config.torch_table_dtype(), config.bits, in_f, out_f,
                                 config.groups_per_row, m)  # fmt: skip
            case = f"{device} {str(dtype).removeprefix('torch.')} M={m} {out_f}x{in_f}"
            for name, ok, reason in explain_backends(problem):
                rows.append({"case": case, "backend": name, "accepted": ok, "reason": reason})
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="what a sketch of a model holds; works from config.json alone")
    p.add_argument("path", help="model folder, config.json file, or Hub id (org/name: only its config.json is fetched)")
    add_revision_option(p)
    add_sketch_options(p, defaults_from_checkpoint=True)
    add_dense_dtype_option(p, default_help="what the checkpoint stores, from its files or config.json")
    p.add_argument("--kernels", action="store_true", help="also show which kernel backend runs each case, and why")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences of the memory estimate (default 64)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per sequence of the memory estimate (default 256)")
    p.add_argument("--max-memory", dest="max_memory", type=memory_size, default=None,
                   help="sketching workspace budget of the memory estimate (default 1GiB)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the memory estimate's sketch runs (cuda: cuSOLVER's inverse copies the factor)")  # fmt: skip
    p.add_argument("--world-size", dest="world_size", type=positive_int, default=None,
                   help="also show what each of N ranks holds when training sharded with FSDP2")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
