"""``spallm bench quality``: perplexity of SpaLLM sketches against plain-quantization baselines.

One model, one held-out text, side by side in one run: the original; round-to-nearest uniform
quantization with groups of 64 (4 and 3 bits; a 16-bit scale and zero per group, so ``b + 0.5``
bits/weight); NF4 with blocks of 64 (16 fixed normal-quantile values times a 16-bit absmax,
4.25 bits/weight); and SpaLLM at bits x groups_per_row, data-free and calibrated, with and without
the table refit. Every row reports bits per sketched weight (codes + tables) and the sketch time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import SketchConfig
from ..convert import resolve_targets
from ..evaluate import perplexity, read_text
from ..models import load_model, resolve_model
from . import BenchUnavailableError

# The 16 NF4 values (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    """Asymmetric round-to-nearest with a min/max grid per group of ``group_size`` input columns."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    q = ((w - lo) / scale).round().clamp(0, levels)
    return (q * scale + lo).reshape(out_features, in_features).to(weight.dtype)


def nf4_quantize(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """NF4: each block of ``block_size`` consecutive weights scaled by its absmax onto 16 fixed values."""
    values = torch.tensor(NF4_VALUES, dtype=torch.float32, device=weight.device)
    w = weight.float().reshape(-1, block_size)
    absmax = w.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    normalised = w / absmax
    idx = (normalised[..., None] - values).abs().argmin(-1)
    return (values[idx] * absmax).reshape(weight.shape).to(weight.dtype)


BASELINES = {
    "rtn4-g64": (lambda w: rtn_quantize(w, 4, 64), 4 + 32 / 64),
    "rtn3-g64": (lambda w: rtn_quantize(w, 3, 64), 3 + 32 / 64),
    "nf4-b64": (lambda w: nf4_quantize(w, 64), 4 + 16 / 64),
}


@torch.no_grad()
def apply_baseline(model, name: str, config: SketchConfig) -> None:
    quantize, _ = BASELINES[name]
    for linear in resolve_targets(model, config).values():
        linear.weight.copy_(quantize(linear.weight))


def sketch_bits_per_weight(model, config: SketchConfig) -> float:
    from ..convert import sketched_layers

    layers = sketched_layers(model).values()
    stored = sum(m.codes.numel() * 8 + m.tables.numel() * m.tables.element_size() * 8 for m in layers)
    return stored / sum(m.in_features * m.out_features for m in layers)


@torch.no_grad()
def forward_seconds(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    start = time.perf_counter()
    for batch in ids.split(batch_size):
        model(batch, use_cache=False)
    return time.perf_counter() - start


def default_variants() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"name": "original"}] + [{"name": b, "baseline": b} for b in BASELINES]
    for bits in (4, 3):
        for gpr in (1, 4):
            rows.append({"name": f"spallm-b{bits}-g{gpr}-datafree", "bits": bits, "gpr": gpr, "method": "kmeans"})
            for refit, staged in ((False, False), (True, False), (True, True)):
                suffix = ("refit" if refit else "norefit") + ("-seq" if staged else "")
                rows.append({"name": f"spallm-b{bits}-g{gpr}-calib-{suffix}", "bits": bits, "gpr": gpr,
                             "method": "gptq", "refit": refit, "true_sequential": staged})  # fmt: skip
    return rows


def run_quality(
    model_ref: str = "smollm2",
    text_path: str | None = None,
    calib: str | None = None,
    nsamples: int = 64,
    seqlen: int = 256,
    eval_seqlen: int = 256,
    only: list[str] | None = None,
    grid_exponent: float | None = None,
    out_dir: str | Path = "bench-quality",
    log=print,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every variant (or those named in ``only``) and write ``quality.json`` (+ ``quality.png``)
    into ``out_dir``, which must be new or empty unless ``overwrite``."""
    from ..outputs import prepare_output_dir

    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    from ..sketch import sketch_model
    from ..sketch.calibration import calibration_batch
    from ..sketch.driver import sketch_model_calibrated

    source = resolve_model(model_ref)
    text = read_text(text_path)
    variants = [v for v in default_variants() if only is None or v["name"] in only]
    needs_calib = any(v.get("method") == "gptq" for v in variants)
    if needs_calib and not calib:
        raise ValueError("calibrated variants need --calib FILE (or pass --only with data-free variants)")
    base_model, tokenizer = load_model(source, dtype=torch.float32)
    ids = calibration_batch(calib, tokenizer, nsamples, seqlen, 0) if needs_calib else None
    results: dict[str, Any] = {
        "model": str(source),
        "text": text_path or "bundled sample text",
        "calibration": calib,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "eval_seqlen": eval_seqlen,
        "torch_threads": torch.get_num_threads(),
        "rows": [],
    }
    if ids is not None:
        results["forward_seconds_calibration_set"] = round(forward_seconds(base_model, ids), 3)
        log(f"plain forward of the calibration set: {results['forward_seconds_calibration_set']:.1f} s")
    for variant in variants:
        model, _ = load_model(source, dtype=torch.float32)
        row: dict[str, Any] = {"name": variant["name"]}
        start = time.perf_counter()
        if "baseline" in variant:
            apply_baseline(model, variant["baseline"], SketchConfig())
            row["bits_per_weight"] = BASELINES[variant["baseline"]][1]
        elif "bits" in variant:
            fields = {"bits": variant["bits"], "groups_per_row": variant["gpr"], "method": variant["method"]}
            for key in ("refit", "true_sequential"):
                if key in variant:
                    fields[key] = variant[key]
            if grid_exponent is not None:
                fields["grid_exponent"] = grid_exponent
            config = SketchConfig(
                **fields, nsamples=nsamples if ids is not None else 0, seqlen=seqlen if ids is not None else 0
            )
            if config.method == "gptq":
                detail = sketch_model_calibrated(model, config, ids)
                row["sketch_seconds_breakdown"] = detail["seconds"]
            else:
                sketch_model(model, config)
            row["bits_per_weight"] = round(sketch_bits_per_weight(model, config), 4)
        else:
            row["bits_per_weight"] = 16.0
        row["sketch_seconds"] = round(time.perf_counter() - start, 3)
        row["perplexity"] = perplexity(model, tokenizer, text, seqlen=eval_seqlen)
        results["rows"].append(row)
        log(f"{row['name']:<32} ppl {row['perplexity']:8.3f}  bits/weight {row['bits_per_weight']:.3f}  "
            f"time {row['sketch_seconds']:.1f} s")  # fmt: skip
    original = next((r["perplexity"] for r in results["rows"] if r["name"] == "original"), None)
    if original:
        for row in results["rows"]:
            row["ratio_to_original"] = round(row["perplexity"] / original, 4)
    from ..format import write_json

    write_json(out_dir / "quality.json", results)
    try:
        from .plots import plot_quality

        plot_quality(results, out_dir / "quality.png")
    except BenchUnavailableError as err:
        log(f"(no plot: {err})")
    return results
