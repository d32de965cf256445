"""``spallm eval``: perplexity of models on a text, or lm-evaluation-harness tasks on local data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    add_revision_option,
    check_json_output,
    harness_batch_size,
    positive_int,
    revision_for,
    task_names,
    window_tokens,
)


def _eval_tasks(args: argparse.Namespace) -> int:
    """``spallm eval --tasks``: lm-evaluation-harness tasks on local data, one table per model."""
    from ..evaluate import HarnessUnavailableError, check_local_tasks, harness_evaluate, harness_json, harness_table
    from ..models import resolve_adapter, resolve_model

    misplaced = [f for f, v in (("--text", args.text), ("--seqlen", args.seqlen),
                                ("--max-windows", args.max_windows)) if v is not None]  # fmt: skip
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: perplexity options; they do not apply to --tasks")
    if args.data is None:
        raise ValueError("--tasks needs --data DIR, the llm-adapters dataset folder the tasks read")
    if args.adapter is not None and len(args.models) != 1:
        raise ValueError(f"--adapter goes with one model, got {len(args.models)}")
    check_json_output(args)
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
    from ..evaluate import perplexity, read_text
    from ..pipeline import load_any

    if args.tasks is not None:
        return _eval_tasks(args)
    misplaced = [f for f, v in (("--data", args.data), ("--limit", args.limit), ("--batch-size", args.batch_size),
                                ("--adapter", args.adapter), ("--adapter-revision", args.adapter_revision))
                 if v is not None]  # fmt: skip
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: options of lm-eval tasks; add --tasks")
    check_json_output(args)
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


def add_parser(sub) -> None:
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
