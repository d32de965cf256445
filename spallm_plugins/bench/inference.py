"""``spallm bench inference``: ``generate`` throughput and bytes of a dense model and its sketch, side by side,
each in its own child process (so that its peak resident memory is its own).

- ``dense``: the original model, float32;
- ``spallm``: the sketched model with its (merged) tables: one LUT matmul per target linear
  (``adapter`` merges a fine-tuned table set in first).

For each batch size, greedy ``generate`` of exactly ``new_tokens`` tokens after a fixed prompt of
``prompt_tokens`` tokens (the same rows for every variant); one warm-up call, then the median of ``repeats``
timed calls; tokens/s counts the new tokens of the whole batch. ``model_bytes`` is every tensor of the model's
state dict. A comparison with more variants (benchmarks/inference_bench.py adds QLoRA's) reuses
:func:`run_inference_bench` with its own child command.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

VARIANTS = ("dense", "spallm")


def load_for_inference(variant: str, dense: str, sketched: str | None, adapter: str | None = None):
    """``(model, tokenizer)`` of a variant of :data:`VARIANTS`."""
    import torch

    from ..models import load_model
    from ..pipeline import load_sketched

    if variant == "dense":
        return load_model(dense, dtype=torch.float32)
    if variant == "spallm":
        model, tokenizer = load_sketched(sketched)
        if adapter:
            from ..hooks import register_host

            register_host("peft")  # the integration that loads a spallm adapter (the core never imports it)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        return model, tokenizer
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """``length`` tokens of the package's English sample text (the same for every variant)."""
    import torch

    from ..evaluate import sample_text

    ids = tokenizer(sample_text(), add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor(ids[:length])


def time_generate(model, tokenizer, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        return _time_generate(model, tokenizer, batch, prompt_tokens, new_tokens, repeats)


def _time_generate(model, tokenizer, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

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


def state_bytes(model) -> int:
    """Bytes of everything ``model.state_dict()`` holds (quantisation constants included), tied tensors once."""
    import torch

    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def peak_rss_bytes() -> int:
    """The process's resident high-water mark (VmHWM on Linux, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_variant(args: argparse.Namespace, load=None) -> dict[str, Any]:
    """One child's measurement: ``load(args)`` builds the model (a comparison passes its own loader)."""
    import torch

    torch.manual_seed(0)
    start = time.perf_counter()
    if load is None:
        model, tokenizer = load_for_inference(args.variant, args.dense, args.sketched, args.adapter)
    else:
        model, tokenizer = load(args)
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
    overwrite: bool = False,
    rounds: int = 1,
    revision: str | None = None,
    known_variants: Sequence[str] = VARIANTS,
    child: Sequence[str] | None = None,
    child_options: Sequence[str] = (),
    summary_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All ``variants`` side by side (one child each); writes ``inference.json`` into ``out_dir``.

    ``rounds``: run the whole set of variants this many times, the order rotated each round, and report
    each round's speed ratios (SpaLLM against each other variant) and their median: the variants of one
    round run minutes apart, and on a shared machine the speed drifts over minutes, so one round's ratio
    can be off by more than the effect measured. ``variants`` holds the first round's full results.
    ``model_ref`` may be a Hub id (at ``revision``), and so may ``sketched`` and ``adapter`` (main branch).
    A comparison with more ``known_variants`` runs its own ``child`` command (given ``child_options`` too)."""
    import torch

    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1")

    from ..config import SketchConfig
    from ..models import cache_dir, resolve_adapter, resolve_model
    from ..outputs import prepare_output_dir
    from ..pipeline import sketch_to_folder

    unknown = [v for v in variants if v not in known_variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known_variants)}")
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
    child = [sys.executable, "-m", __name__] if child is None else list(child)
    options = [*child_options, *measure_options(batches, prompt_tokens, new_tokens, repeats)]
    per_round = run_rounds(out_dir, child, options, variants, rounds, dense, sketched, adapter)
    summary = {
        "model": str(dense),
        "sketched": None if sketched is None else str(sketched),
        "adapter": adapter,
        **(summary_extra or {}),
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


def run_rounds(out_dir: Path, child: list[str], options: list[str], variants: tuple[str, ...], rounds: int,
               dense: Path, sketched: str | Path | None, adapter: str | None) -> list[dict[str, Any]]:  # fmt: skip
    """Every variant once per round, each in its own child process, the order rotated each round: each
    round's results by variant."""
    per_round: list[dict[str, Any]] = []
    for round_index in range(rounds):
        order = variants[round_index % len(variants) :] + variants[: round_index % len(variants)]
        suffix = "" if rounds == 1 else f"-round{round_index}"
        results = {}
        for v in order:
            path = out_dir / f"inference-{v}{suffix}.json"
            command = [*child, "--variant", v, "--dense", str(dense), *options, "--json", str(path)]
            if v == "spallm":
                command += ["--sketched", str(sketched)] + (["--adapter", str(adapter)] if adapter else [])
            print(f"[{v}] {' '.join(command[len(child) :])}", flush=True)
            subprocess.run(command, check=True)
            results[v] = json.loads(path.read_text())
        per_round.append(results)
    return per_round


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


def measure_options(batches: tuple[int, ...], prompt_tokens: int, new_tokens: int, repeats: int) -> list[str]:
    return ["--batches", ",".join(map(str, batches)), "--prompt-tokens", str(prompt_tokens),
            "--new-tokens", str(new_tokens), "--repeats", str(repeats)]  # fmt: skip


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers."""
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


def child_parser(variants: Sequence[str] = VARIANTS) -> argparse.ArgumentParser:
    """The options of one variant's child process (the parent passes them)."""
    p = argparse.ArgumentParser(description="one variant of an inference benchmark (run by the parent)")
    p.add_argument("--variant", choices=variants, required=True)
    p.add_argument("--dense", required=True)
    p.add_argument("--sketched")
    p.add_argument("--adapter")
    add_measure_options(p)
    p.add_argument("--json", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = child_parser().parse_args(argv)
    Path(args.json).write_text(json.dumps(measure_variant(args), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
