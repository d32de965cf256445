"""``spallm bench inference``: ``generate`` throughput of the two towers side by side, one child process each.

- ``dense``: the original model, float32;
- ``spallm``: the sketched model with its (merged) tables: one LUT matmul per target linear
  (``--adapter`` merges a fine-tuned table set in first);
- ``qlora``: the bitsandbytes NF4 base (double quantisation) with an unmerged LoRA at the matched rank;
- ``qlora-merged``: the same QLoRA model merged into a dense float32 model (each NF4 weight dequantised plus
  its LoRA update, :func:`.peers.qlora_merged_dense`).

For each batch size, greedy ``generate`` of exactly ``--new-tokens`` tokens after a fixed prompt of
``--prompt-tokens`` tokens (the same rows for every variant); one warm-up call, then the median of
``--repeats`` timed calls; tokens/s counts the new tokens of the whole batch. ``model_bytes`` is every tensor
of the model's state dict (NF4 codes and quantisation constants included; the LoRA factors for ``qlora``).
The LoRA factors are random (``init_lora_weights=False``) so the unmerged arm does its real work and the
merged arm differs from the plain NF4 model; the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("dense", "spallm", "qlora", "qlora-merged")


def build_for_inference(variant: str, dense: str, sketched: str | None, rank: int, adapter: str | None = None):
    from peft import PeftModel, get_peft_model

    from spallm_plugins.models import load_model
    from spallm_plugins.pipeline import load_sketched

    from .peers import load_nf4, lora_config, qlora_merged_dense, targets_of

    if variant == "dense":
        return load_model(dense, dtype=torch.float32)
    if variant == "spallm":
        model, tokenizer = load_sketched(sketched)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        return model, tokenizer
    if variant in ("qlora", "qlora-merged"):
        model, tokenizer = load_nf4(dense)
        torch.manual_seed(0)
        model = get_peft_model(model, lora_config(rank, targets_of(model), init_lora_weights=False))
        if variant == "qlora-merged":
            model = qlora_merged_dense(model, dense)
        return model, tokenizer
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """``length`` tokens of the package's English sample text (the same for every variant)."""
    from spallm_plugins.evaluate import sample_text

    ids = tokenizer(sample_text(), add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor(ids[:length])


@torch.no_grad()
def time_generate(model, tokenizer, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    rows = prompt_ids(tokenizer, prompt_tokens).repeat(batch, 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(
        input_ids=rows, attention_mask=torch.ones_like(rows), do_sample=False, pad_token_id=pad,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
    )  # fmt: skip
    model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(**kwargs)
        seconds.append(time.perf_counter() - start)
    generated = out.shape[1] - prompt_tokens
    median = statistics.median(seconds)
    return {
        "batch": batch,
        "new_tokens": generated,
        "seconds": seconds,
        "median_seconds": median,
        "tokens_per_second": batch * generated / median,
        "first_row": out[0, prompt_tokens:].tolist(),
    }


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    from .peers import peak_rss_bytes, state_bytes

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = build_for_inference(args.variant, args.dense, args.sketched, args.rank, args.adapter)
    model.eval()
    load_seconds = time.perf_counter() - start
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    result = {
        "variant": args.variant,
        "model_bytes": state_bytes(model),
        "linear_kinds": kinds,
        "load_seconds": round(load_seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "generate": [
            time_generate(model, tokenizer, b, args.prompt_tokens, args.new_tokens, args.repeats) for b in args.batches
        ],
    }
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def run_inference_bench(
    model_ref: str,
    out_dir: str | Path,
    *,
    sketched: str | None = None,
    adapter: str | None = None,
    variants: tuple[str, ...] = VARIANTS,
    groups_per_row: int = 4,
    batches: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    repeats: int = 3,
    rank: int | None = None,
    overwrite: bool = False,
    rounds: int = 1,
    revision: str | None = None,
) -> dict[str, Any]:
    """All ``variants`` side by side (one child each); writes ``inference.json`` into ``out_dir``.

    ``rounds``: run the whole set of variants this many times, the order rotated each round, and report
    each round's speed ratios (SpaLLM against each other variant) and their median: the variants of one
    round run minutes apart, and on a shared machine the speed drifts over minutes, so one round's ratio
    can be off by more than the effect measured. ``variants`` holds the first round's full results.
    ``model_ref`` may be a Hub id (at ``revision``), and so may ``sketched`` and ``adapter`` (main branch)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1")
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.convert import plan_sketch
    from spallm_plugins.models import cache_dir, load_model, resolve_adapter, resolve_model
    from spallm_plugins.outputs import prepare_output_dir
    from spallm_plugins.pipeline import sketch_to_folder

    from .peers import lora_rank_matching, targets_of

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    dense = resolve_model(model_ref, revision=revision)
    sketched = None if sketched is None else str(resolve_model(sketched))  # the children get local folders
    adapter = None if adapter is None else str(resolve_adapter(adapter))
    if "spallm" in variants and sketched is None:
        sketched = cache_dir() / "bench" / f"{dense.name}-spallm-b4-g{groups_per_row}"
        if not (sketched / "config.json").is_file():
            sketch_to_folder(dense, sketched, SketchConfig(bits=4, groups_per_row=groups_per_row), progress=False,
                             overwrite=True)  # fmt: skip
    if rank is None:
        model, _ = load_model(dense, dtype=torch.float32)
        table_values = plan_sketch(model, SketchConfig(bits=4, groups_per_row=groups_per_row)).table_values
        rank = lora_rank_matching(model, targets_of(model), table_values)
        del model
    per_round: list[dict[str, Any]] = []
    for round_index in range(rounds):
        order = variants[round_index % len(variants) :] + variants[: round_index % len(variants)]
        suffix = "" if rounds == 1 else f"-round{round_index}"
        measured = {}
        for v in order:
            path = out_dir / f"inference-{v}{suffix}.json"
            measured[v] = _run_variant(v, path, dense, sketched, adapter, rank, batches, prompt_tokens, new_tokens,
                                       repeats)  # fmt: skip
        per_round.append(measured)
    summary = {
        "model": str(dense),
        "sketched": None if sketched is None else str(sketched),
        "adapter": adapter,
        "lora_rank": rank,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "rounds": rounds,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "variants": {v: per_round[0][v] for v in variants},
        "tokens_per_second_by_round": [
            {v: {str(g["batch"]): g["tokens_per_second"] for g in r[v]["generate"]} for v in variants}
            for r in per_round
        ],
        "spallm_speed_ratios": speed_ratios(per_round, variants, batches),
    }
    (out_dir / "inference.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def speed_ratios(per_round: list[dict[str, Any]], variants: tuple[str, ...], batches: tuple[int, ...]) -> dict:
    """``{"spallm/OTHER": {batch: {"by_round": [...], "median", "min", "max"}}}``: SpaLLM's tokens/s over
    each other variant's, within each round (never across rounds)."""
    if "spallm" not in variants:
        return {}
    ratios = {}
    for other in (v for v in variants if v != "spallm"):
        by_batch = {}
        for i, batch in enumerate(batches):
            values = [r["spallm"]["generate"][i]["tokens_per_second"] / r[other]["generate"][i]["tokens_per_second"]
                      for r in per_round]  # fmt: skip
            by_batch[str(batch)] = {"by_round": values, "median": statistics.median(values), "min": min(values),
                                    "max": max(values)}  # fmt: skip
        ratios[f"spallm/{other}"] = by_batch
    return ratios


def _run_variant(variant, path, dense, sketched, adapter, rank, batches, prompt_tokens, new_tokens, repeats) -> dict:
    """One variant in its own child process; its JSON."""
    cmd = [
        sys.executable, "-m", __name__, "--variant", variant, "--dense", str(dense), "--rank", str(rank),
        "--batches", ",".join(map(str, batches)), "--prompt-tokens", str(prompt_tokens),
        "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--json", str(path),
    ]  # fmt: skip
    if variant == "spallm":
        cmd += ["--sketched", str(sketched)] + (["--adapter", str(adapter)] if adapter else [])
    print(f"[{variant}] {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(path.read_text())


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def add_measure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int_list, default=(1, 8), help="batch sizes (default 1,8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy new tokens per call (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch size, median reported (default 3)")


def cmd_bench_inference(args: argparse.Namespace) -> int:
    from spallm_plugins.cli import human_bytes

    summary = run_inference_bench(
        args.model, args.out, sketched=args.sketched, adapter=args.adapter, variants=tuple(args.variants.split(",")),
        groups_per_row=args.groups_per_row, batches=args.batches, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, repeats=args.repeats, overwrite=args.overwrite, rounds=args.rounds,
        revision=args.revision,
    )  # fmt: skip
    for name, v in summary["variants"].items():
        speeds = "  ".join(f"batch {g['batch']}: {g['tokens_per_second']:7.1f} tok/s" for g in v["generate"])
        print(f"{name:13s} {human_bytes(v['model_bytes']):>10s}  {speeds}")
    for pair, by_batch in summary["spallm_speed_ratios"].items():
        text = "  ".join(f"batch {b}: x{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" for b, r in by_batch.items())
        print(f"{pair:20s} {text}  (median over {summary['rounds']} round(s), min-max)")
    print(f"wrote {Path(args.out) / 'inference.json'}")
    return 0


def add_commands(commands, bench) -> None:
    """``spallm bench inference`` (entry point ``spallm.cli``: needs PEFT and bitsandbytes)."""
    from spallm_plugins.cli import add_output_options, add_revision_option

    p = bench.add_parser("inference", help="generate tokens/s and bytes: dense, SpaLLM, QLoRA unmerged and merged")
    p.add_argument("--model", default="smollm2", help="dense model: folder, Hub id, .gguf (default smollm2)")
    add_revision_option(p)
    p.add_argument("--sketched", help="sketched model (folder or Hub id) for the spallm arm (default: data-free "
                                      "sketch, cached)")  # fmt: skip
    p.add_argument("--adapter", help="a spallm adapter (folder or Hub id) merged into the sketched model first")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="gpr of the default sketch; QLoRA's LoRA rank matches its table count (default 4)")  # fmt: skip
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run all variants this many times (order rotated); SpaLLM's speed ratios per round and "
                        "their median (default 1)")  # fmt: skip
    add_measure_options(p)
    add_output_options(p, default="bench-inference", what="inference.json")
    p.set_defaults(func=cmd_bench_inference)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one variant of spallm bench inference (run by the parent)")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--dense", required=True)
    p.add_argument("--sketched")
    p.add_argument("--adapter")
    p.add_argument("--rank", type=int, default=8)
    add_measure_options(p)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    Path(args.json).write_text(json.dumps(run_variant(args), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
