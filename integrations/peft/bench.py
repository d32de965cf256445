"""``spallm bench finetune``: SpaLLM tables vs LoRA at the same trainable size vs full fine-tuning.

Each variant runs in its own child process (so peak memory is its own), one after the other, in one
benchmark run; the parent writes ``finetune.json`` with the ratios and a plot. Optionally a short
real fine-tune on an instruction set gives held-out loss curves of SpaLLM and LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("spallm", "lora", "full")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def lora_rank_matching(model, target_modules: set[str], table_values: int) -> int:
    """The LoRA rank whose ``r * (in + out)`` parameters over the same targets equal ``table_values``."""
    widths = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in target_modules and hasattr(module, "in_features"):
            widths += module.in_features + module.out_features
    return max(1, round(table_values / widths))


def _build(variant: str, dense_dir: str, sketched_dir: str, rank: int | None):
    import torch
    from peft import LoraConfig, get_peft_model

    from spallm_plugins.hooks import architecture_for
    from spallm_plugins.models import load_model
    from spallm_plugins.pipeline import load_sketched

    from .config import SpaLLMConfig

    if variant == "spallm":
        model, tokenizer = load_sketched(sketched_dir)
        model = get_peft_model(model, SpaLLMConfig(task_type="CAUSAL_LM"))
        return model, tokenizer
    model, tokenizer = load_model(dense_dir, dtype=torch.float32)
    if variant == "lora":
        targets = set(architecture_for(model.config.model_type).target_modules)
        config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=targets)
        model = get_peft_model(model, config)
    return model, tokenizer


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: step times on random tokens, memory, optional loss curve."""
    import torch

    from .finetune import batches, eval_loss, read_instructions, train

    torch.manual_seed(0)
    model, tokenizer = _build(args.variant, args.dense, args.sketched, args.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def random_batches():
        while True:
            ids = torch.randint(0, vocab, (args.batch, args.seqlen), generator=gen)
            yield {"input_ids": ids, "labels": ids}

    rss_loaded = _rss_bytes()
    history = train(model, random_batches(), args.warmup + args.steps, lr=1e-4)
    times = [h["seconds"] for h in history[args.warmup :]]
    result = {
        "variant": args.variant,
        "rank": args.rank if args.variant == "lora" else None,
        "trainable_params": trainable,
        "median_step_seconds": statistics.median(times),
        "step_seconds": times,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": _peak_rss_bytes(),
        "training_peak_extra_bytes": _peak_rss_bytes() - rss_loaded,
    }
    if args.curve_steps and args.variant in ("spallm", "lora"):
        model, tokenizer = _build(args.variant, args.dense, args.sketched, args.rank)
        rows = read_instructions(args.curve_data)
        held_out, train_rows = rows[: args.held_out], rows[args.held_out :]
        data = batches(train_rows, tokenizer, args.batch, args.curve_seqlen, seed=0)
        curve = [{"step": 0, "held_out_loss": eval_loss(model, held_out, tokenizer, args.curve_seqlen)}]
        lr = args.spallm_lr if args.variant == "spallm" else args.lora_lr
        done = 0
        while done < args.curve_steps:
            chunk = min(args.eval_every, args.curve_steps - done)
            train(model, data, chunk, lr)
            done += chunk
            curve.append({"step": done, "held_out_loss": eval_loss(model, held_out, tokenizer, args.curve_seqlen)})
            print(f"{args.variant} step {done}: held-out loss {curve[-1]['held_out_loss']:.4f}", flush=True)
        result["curve"] = curve
    return result


def run_finetune_bench(
    model_ref: str,
    out_dir: str | Path,
    *,
    sketched: str | None = None,
    groups_per_row: int = 4,
    batch: int = 4,
    seqlen: int = 256,
    steps: int = 8,
    warmup: int = 2,
    gradient_checkpointing: bool = False,
    curve_data: str | None = None,
    curve_steps: int = 0,
    overwrite: bool = False,
    **curve_options: Any,
) -> dict[str, Any]:
    """Run the three variants side by side (one child process each) and write ``finetune.json`` into
    ``out_dir`` (new or empty unless ``overwrite``)."""
    import torch

    from spallm_plugins.config import SketchConfig
    from spallm_plugins.models import cache_dir, load_model, resolve_model
    from spallm_plugins.outputs import prepare_output_dir
    from spallm_plugins.pipeline import sketch_to_folder

    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    dense = resolve_model(model_ref)
    if sketched is None:
        sketched = cache_dir() / "bench" / f"{dense.name}-spallm-b4-g{groups_per_row}"
        if not (sketched / "config.json").is_file():
            sketch_to_folder(dense, sketched, SketchConfig(bits=4, groups_per_row=groups_per_row), progress=False)
    model, _ = load_model(dense, dtype=torch.float32)
    from spallm_plugins.convert import plan_sketch
    from spallm_plugins.hooks import architecture_for

    targets = set(architecture_for(model.config.model_type).target_modules)
    table_values = plan_sketch(model, SketchConfig(bits=4, groups_per_row=groups_per_row)).table_values
    rank = lora_rank_matching(model, targets, table_values)
    del model
    results = {}
    for variant in VARIANTS:
        cmd = [
            sys.executable, "-m", __name__, "--variant", variant, "--dense", str(dense), "--sketched", str(sketched),
            "--rank", str(rank), "--batch", str(batch), "--seqlen", str(seqlen), "--steps", str(steps),
            "--warmup", str(warmup), "--json", str(out_dir / f"finetune-{variant}.json"),
        ]  # fmt: skip
        if gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        if curve_steps and curve_data:
            cmd += ["--curve-data", str(curve_data), "--curve-steps", str(curve_steps)]
            for key, value in curve_options.items():
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        print(f"[{variant}] {' '.join(cmd[3:])}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        results[variant] = json.loads((out_dir / f"finetune-{variant}.json").read_text())
        print(f"[{variant}] done in {time.perf_counter() - start:.1f} s", flush=True)
    spallm, lora, full = results["spallm"], results["lora"], results["full"]
    summary = {
        "model": str(dense),
        "sketched": str(sketched),
        "batch": batch,
        "seqlen": seqlen,
        "steps_measured": steps,
        "gradient_checkpointing": gradient_checkpointing,
        "torch_threads": torch.get_num_threads(),
        "lora_rank": rank,
        "variants": results,
        "step_time_ratio_spallm_vs_lora": spallm["median_step_seconds"] / lora["median_step_seconds"],
        "step_time_ratio_spallm_vs_full": spallm["median_step_seconds"] / full["median_step_seconds"],
        "peak_rss_ratio_spallm_vs_lora": spallm["peak_rss_bytes"] / lora["peak_rss_bytes"],
        "trainable_ratio_spallm_vs_lora": spallm["trainable_params"] / lora["trainable_params"],
    }
    (out_dir / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out_dir / "finetune.png")
    return summary


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    variants = summary["variants"]
    curves = {k: v["curve"] for k, v in variants.items() if v.get("curve")}
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(14 if curves else 9, 4))
    names = list(variants)
    axes[0].bar(names, [variants[n]["median_step_seconds"] for n in names], color=["C0", "C1", "C2"])
    axes[0].set_ylabel("median step time (s)")
    axes[0].set_title(f"batch {summary['batch']} x {summary['seqlen']}, CPU")
    axes[1].bar(names, [variants[n]["peak_rss_bytes"] / 2**30 for n in names], color=["C0", "C1", "C2"])
    axes[1].set_ylabel("peak RSS (GiB)")
    axes[1].set_title(f"LoRA rank {summary['lora_rank']} (same trainable size)")
    if curves:
        for name, curve in curves.items():
            axes[2].plot([c["step"] for c in curve], [c["held_out_loss"] for c in curve], marker="o", label=name)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("held-out loss")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVE_OPTIONS = ("curve_seqlen", "held_out", "eval_every", "spallm_lr", "lora_lr")


def add_curve_options(p: argparse.ArgumentParser) -> None:
    """Options of the held-out loss curves (shared by ``spallm bench finetune`` and the child runs)."""
    p.add_argument("--curve-data", help="instruction rows (e.g. ARC-Easy train.json) for held-out loss curves")
    p.add_argument("--curve-steps", type=int, default=0, help="training steps of each curve (0: no curves)")
    p.add_argument("--curve-seqlen", type=int, default=256, help="tokens per curve training row (default 256)")
    p.add_argument("--held-out", type=int, default=64, help="rows kept out of training for the curves (default 64)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations (default 25)")
    p.add_argument("--spallm-lr", type=float, default=1e-3, help="SpaLLM's learning rate for the curves")
    p.add_argument("--lora-lr", type=float, default=3e-4, help="LoRA's learning rate for the curves")


def cmd_bench_finetune(args: argparse.Namespace) -> int:
    from spallm_plugins.cli import human, human_bytes

    curve = {k: getattr(args, k) for k in CURVE_OPTIONS} if args.curve_steps else {}
    summary = run_finetune_bench(
        args.model, args.out, sketched=args.sketched, groups_per_row=args.groups_per_row, batch=args.batch,
        seqlen=args.seqlen, steps=args.steps, warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing,
        curve_data=args.curve_data, curve_steps=args.curve_steps, overwrite=args.overwrite, **curve,
    )  # fmt: skip
    for name, v in summary["variants"].items():
        print(
            f"{name:7s} trainable {human(v['trainable_params']):>7s}  median step {v['median_step_seconds']:.3f} s  "
            f"peak RSS {human_bytes(v['peak_rss_bytes'])}"
        )
    print(
        f"SpaLLM / LoRA(r={summary['lora_rank']}) step time {summary['step_time_ratio_spallm_vs_lora']:.2f}x, "
        f"peak RSS {summary['peak_rss_ratio_spallm_vs_lora']:.2f}x; wrote {Path(args.out) / 'finetune.json'}"
    )
    return 0


def add_commands(commands, bench) -> None:
    """``spallm bench finetune`` (entry point ``spallm.cli``: the core CLI does not import PEFT)."""
    from spallm_plugins.cli import add_output_options

    p = bench.add_parser("finetune", help="SpaLLM tables vs LoRA (same trainable size) vs full fine-tuning")
    p.add_argument("--model", default="smollm2", help="dense model (default smollm2)")
    p.add_argument("--sketched", help="sketched base to adapt (default: sketch the model data-free once, cached)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="SpaLLM table groups per row; LoRA's rank is matched to it (default 4)")  # fmt: skip
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=8, help="measured steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    add_curve_options(p)
    add_output_options(p, default="bench-finetune", what="finetune.json / finetune.png")
    p.set_defaults(func=cmd_bench_finetune)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one variant of spallm bench finetune (run by the parent)")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--dense", required=True)
    p.add_argument("--sketched", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    add_curve_options(p)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    result = run_variant(args)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
