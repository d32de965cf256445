"""SpaLLM's ``generate`` throughput against QLoRA's, unmerged and merged: ``spallm bench inference`` (dense vs
SpaLLM, :mod:`spallm_plugins.bench.inference`) with two more arms, each in its own child process:

- ``qlora``: the bitsandbytes NF4 base (double quantisation) with an unmerged LoRA at the rank whose trainable
  count matches SpaLLM's tables (``--gpr``);
- ``qlora-merged``: the same QLoRA model merged into a dense float32 model (each NF4 weight dequantised plus
  its LoRA update, :func:`lora_peers.qlora_merged_dense`).

The LoRA factors are random (``init_lora_weights=False``) so the unmerged arm does its real work and the
merged arm differs from the plain NF4 model; the cost does not depend on their values. ``model_bytes`` counts
the NF4 codes and quantisation constants (and the LoRA factors for ``qlora``).

    pip install -e ".[bench,peers]"
    python benchmarks/inference_bench.py --model smollm2 --rounds 3 --out benchmarks/inference-smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from spallm_plugins.bench import inference

VARIANTS = ("dense", "spallm", "qlora", "qlora-merged")


def load_variant(args: argparse.Namespace):
    """``(model, tokenizer)`` of one variant: the QLoRA arms here, the others as ``spallm bench inference``'s."""
    if args.variant not in ("qlora", "qlora-merged"):
        return inference.load_for_inference(args.variant, args.dense, args.sketched, args.adapter)
    from lora_peers import load_nf4, lora_config, qlora_merged_dense, targets_of
    from peft import get_peft_model

    model, tokenizer = load_nf4(args.dense)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(args.rank, targets_of(model), init_lora_weights=False))
    if args.variant == "qlora-merged":
        model = qlora_merged_dense(model, args.dense)
    return model, tokenizer


def matched_rank(dense: str, groups_per_row: int, revision: str | None = None) -> int:
    """The LoRA rank whose trainable count matches a 4-bit sketch's tables at ``groups_per_row``."""
    from lora_peers import lora_rank_matching, targets_of

    from spallm_plugins.config import SketchConfig
    from spallm_plugins.convert import plan_sketch
    from spallm_plugins.models import load_model, resolve_model

    model, _ = load_model(resolve_model(dense, revision=revision), dtype=torch.float32)
    table_values = plan_sketch(model, SketchConfig(bits=4, groups_per_row=groups_per_row)).table_values
    return lora_rank_matching(model, targets_of(model), table_values)


def run_inference_bench(model_ref: str, out_dir: str | Path, *, variants: tuple[str, ...] = VARIANTS,
                        groups_per_row: int = 4, rank: int | None = None, revision: str | None = None,
                        **options: Any) -> dict[str, Any]:  # fmt: skip
    """:func:`spallm_plugins.bench.inference.run_inference_bench` with the QLoRA arms; writes ``inference.json``."""
    if options.get("rounds", 1) < 1:
        raise ValueError(f"rounds={options['rounds']}: expected at least 1")
    if rank is None:
        rank = matched_rank(model_ref, groups_per_row, revision)
    return inference.run_inference_bench(
        model_ref, out_dir, variants=variants, groups_per_row=groups_per_row, revision=revision,
        known_variants=VARIANTS, child=[sys.executable, str(Path(__file__).resolve()), "child"],
        child_options=["--rank", str(rank)], summary_extra={"lora_rank": rank}, **options,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from spallm_plugins.cli.bench import add_inference_options, cmd_bench_inference

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["child"]:  # one variant, run by the parent
        p = inference.child_parser(VARIANTS)
        p.add_argument("--rank", type=int, default=8)
        args = p.parse_args(argv[1:])
        Path(args.json).write_text(json.dumps(inference.measure_variant(args, load_variant), indent=2) + "\n")
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_inference_options(p, VARIANTS)
    return cmd_bench_inference(p.parse_args(argv), run_inference_bench)


if __name__ == "__main__":
    sys.exit(main())
