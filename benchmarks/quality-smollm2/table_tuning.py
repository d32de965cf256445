"""SmolLM2-135M at 4-bit gpr 4, calibrated, with and without block table tuning (issue #13).

One sketch per seed, evaluated on both held-out texts of this folder (the bundled sample and the first
240 windows of GSM8K's test rows), so that one run costs one sketch per seed rather than one per text.
Run from the repository root: ``python benchmarks/quality-smollm2/table_tuning.py DATA_DIR OUT.json
--seeds 0 1 2 --tune-steps 8``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from spallm_plugins.bench.quality import load_model, perplexity, read_text, resolve_model
from spallm_plugins.config import SketchConfig
from spallm_plugins.format import write_json
from spallm_plugins.sketch.calibration import calibration_batch
from spallm_plugins.sketch.driver import sketch_model_calibrated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the llm-adapters dataset folder (ARC-Easy/train.json, gsm8k/test.json)")
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-steps", type=int, default=8)
    parser.add_argument("--tune-lr", type=float, default=SketchConfig.tune_lr)
    args = parser.parse_args()
    source = resolve_model("smollm2")
    texts = {"bundled": (read_text(None), None), "gsm8k-240": (read_text(f"{args.data}/gsm8k/test.json"), 240)}
    model, tokenizer = load_model(source, dtype=torch.float32)
    ids = calibration_batch(f"{args.data}/ARC-Easy/train.json", tokenizer, 64, 256, 0)
    original = {k: perplexity(model, tokenizer, t, seqlen=256, max_windows=w) for k, (t, w) in texts.items()}
    results = {"model": str(source), "calibration": "ARC-Easy/train.json, 64 x 256", "original": original, "rows": []}
    for seed in args.seeds:
        model, _ = load_model(source, dtype=torch.float32)
        config = SketchConfig(bits=4, groups_per_row=4, method="gptq", nsamples=64, seqlen=256, seed=seed,
                              tune_steps=args.tune_steps, tune_lr=args.tune_lr)  # fmt: skip
        start = time.perf_counter()
        report = sketch_model_calibrated(model, config, ids)
        row = {"seed": seed, "tune_steps": args.tune_steps, "tune_lr": args.tune_lr,
               "sketch_seconds": round(time.perf_counter() - start, 1), "seconds": report["seconds"]}  # fmt: skip
        for key, (text, windows) in texts.items():
            row[key] = perplexity(model, tokenizer, text, seqlen=256, max_windows=windows)
            row[f"{key}_ratio"] = round(row[key] / original[key], 4)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(args.out, results)


if __name__ == "__main__":
    main()
