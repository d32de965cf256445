"""``spallm bench quality``: perplexity of SpaLLM sketches against plain-quantization baselines.

One model, one held-out text, side by side in one run: the original; round-to-nearest uniform
quantization with groups of 64 (4 and 3 bits; a 16-bit scale and zero per group, so ``b + 0.5``
bits/weight); NF4 with blocks of 64 (16 fixed normal-quantile values times a 16-bit absmax,
4.25 bits/weight); and SpaLLM at bits x groups_per_row, data-free and calibrated, with and without
the table refit. Every row reports bits per sketched weight (codes + tables) and the sketch time.

The RTN and NF4 rows above are this module's own re-implementations (``"implementation"`` says so in
the JSON). Beside them run the real quantizers ("peers", ``--peers``), each on the same target linears,
dequantized to the model dtype for the evaluation (the values their kernels multiply with), with bits
per weight counted from what they store (codes + scales/zeros/absmax, double-quant statistics
included; the fixed code books NF4 and bitsandbytes' 8-bit map are format constants, not counted):

- ``nf4-bnb``: bitsandbytes ``quantize_4bit`` NF4, blocks of 64, double quant (QLoRA's settings):
  4 + 8/64 + 32/(64*256) bits/weight (+ one fp32 offset per tensor).
- ``hqq-g64``: HQQ 4-bit, groups of 64 along the input, its defaults (optimized zero, rounded; scale and
  zero stored in float16): 4 + 32/64 = 4.5 bits/weight.
- ``gptq-g128``: GPTQModel's GPTQ (its defaults: symmetric, no act-order, group-aware reordering,
  damping 0.05) with groups of 128 along the input, block by block and stage by stage through the
  already quantized layers, on the same calibration rows as the calibrated SpaLLM rows: 4 + (16 + 4)/128
  bits/weight (fp16 scale + 4-bit zero per group; the checkpoint's ``g_idx`` is implied without
  act-order and not counted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


BASELINE_IMPLEMENTATION = "re-implementation in spallm_plugins.bench.quality (not the reference package)"


# ---- peers: the real quantizers -------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    package: str  # import name
    distribution: str  # pip name
    settings: str  # what the row runs, for the JSON
    calibrated: bool = False


PEERS = {
    "nf4-bnb": Peer("bitsandbytes", "bitsandbytes", "quantize_4bit(quant_type='nf4', blocksize=64, "
                    "compress_statistics=True) / dequantize_4bit"),
    "hqq-g64": Peer("hqq", "hqq", "Quantizer.quantize(**hqq_base_quant_config(nbits=4, group_size=64, axis=1)"
                    "['weight_quant_params'], compute_dtype=float16) / Quantizer.dequantize"),
    "gptq-g128": Peer("gptqmodel", "gptqmodel", "GPTQ(QuantizeConfig(bits=4, group_size=128)) per linear, "
                      "other settings GPTQModel's defaults; sequential by block and by input stage",
                      calibrated=True),
}  # fmt: skip


def peer_unavailable(name: str) -> str | None:
    """Why peer ``name`` cannot run here, or None when its package is importable."""
    import importlib.util

    peer = PEERS[name]
    if importlib.util.find_spec(peer.package) is None:
        return f"{peer.distribution} is not installed"
    return None


def peer_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PEERS[name].distribution)
    except PackageNotFoundError:
        return None


def select_peers(peers: list[str] | None, only: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The peers to run and ``{name: reason}`` for those left out for want of their package.

    ``None`` means every importable peer (with ``only``: those ``only`` names); names asked for
    explicitly must be known and importable.
    """
    if peers is not None:
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)} (or 'none')")
        missing = {p: why for p in peers if (why := peer_unavailable(p))}
        if missing:
            raise BenchUnavailableError(
                "; ".join(f"peer {p}: {why} (see `pip install spallm-plugins[peers]`)" for p, why in missing.items())
            )
        return list(peers), {}
    wanted = [p for p in PEERS if only is None or p in only]
    missing = {p: why for p in wanted if (why := peer_unavailable(p))}
    return [p for p in wanted if p not in missing], missing


@torch.no_grad()
def nf4_bnb(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """bitsandbytes NF4 (blocks of 64, double quant): the dequantized weight and the bits it stores."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    dequantized = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
    bits = packed.numel() * packed.element_size() * 8 + state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8 + 32  # + the fp32 offset
    return dequantized, bits


@torch.no_grad()
def hqq_g64(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """HQQ 4-bit, groups of 64 along the input (its default settings): dequantized weight, stored bits."""
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    params = hqq_base_quant_config(nbits=4, group_size=64, axis=1)["weight_quant_params"]
    packed, meta = Quantizer.quantize(weight, **params, compute_dtype=torch.float16, device=weight.device)
    dequantized = Quantizer.dequantize(packed, meta).to(weight.dtype)
    bits = packed.numel() * packed.element_size() * 8 + (meta["scale"].numel() + meta["zero"].numel()) * 16
    return dequantized, bits


@torch.no_grad()
def gptq_g128_model(model, targets: dict[str, nn.Module], ids: torch.Tensor, batch_size: int = 8) -> int:
    """GPTQModel's GPTQ on every linear of ``targets``, block by block and input stage by input stage
    (each stage's inputs through the already quantized ones); returns the bits stored. In place."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    from ..sketch.block import input_stages, run_block
    from ..sketch.blocks import capture_block_inputs, find_blocks, relative_name

    device = next(model.parameters()).device
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    blocks_name, blocks = find_blocks(model, targets)
    hidden, kwargs_list = capture_block_inputs(model, blocks, ids, batch_size, device)
    bits = 0
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}"
        local = {relative_name(n, prefix): m for n, m in targets.items() if n.startswith(prefix + ".")}
        for stage in input_stages(block, local, hidden[0], kwargs_list[0]):
            tasks = {}
            for rel in stage:
                task = GPTQ(local[rel], QuantizeConfig(bits=4, group_size=128, offload_to_disk=False))
                task.quantizer.configure(perchannel=True)
                tasks[rel] = task
            handles = [local[rel].register_forward_hook(lambda m, a, o, t=task: t.add_batch(a[0], o))
                       for rel, task in tasks.items()]  # fmt: skip
            try:
                for h, kw in zip(hidden, kwargs_list):
                    block(h, **kw)
            finally:
                for handle in handles:
                    handle.remove()
            for rel, task in tasks.items():
                linear = local[rel]
                quantized, scale, zero, g_idx = task.quantize()[:4]
                g_idx = g_idx.long().to(linear.weight.device)
                scale, zero = scale.float()[:, g_idx], zero.float()[:, g_idx]
                codes = torch.round(quantized.float() / scale + zero).clamp(0, 15)
                # the stored (packed) form keeps the scales in float16: dequantize with those
                linear.weight.copy_(((codes - zero) * scale.half().float()).to(linear.weight.dtype))
                groups = int(g_idx.max()) + 1
                bits += linear.weight.numel() * 4 + linear.out_features * groups * (16 + 4)
                task.free()
        hidden = run_block(block, hidden, kwargs_list, [])
    if use_cache is not None:
        model.config.use_cache = use_cache
    return bits


@torch.no_grad()
def apply_peer(model, name: str, config: SketchConfig, ids: torch.Tensor | None = None) -> float:
    """Quantize and dequantize every target linear of ``model`` in place with peer ``name``; return
    the bits per weight it stores."""
    targets = resolve_targets(model, config)
    weights = sum(linear.weight.numel() for linear in targets.values())
    if name == "gptq-g128":
        if ids is None:
            raise ValueError("peer gptq-g128 needs calibration data (--calib FILE)")
        return gptq_g128_model(model, targets, ids) / weights
    quantize = {"nf4-bnb": nf4_bnb, "hqq-g64": hqq_g64}[name]
    bits = 0
    for linear in targets.values():
        dequantized, stored = quantize(linear.weight.detach())
        linear.weight.copy_(dequantized)
        bits += stored
    return bits / weights


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


TUNE_STEPS = 8  # Adam steps of the table-tuned variants (SketchConfig.tune_steps)


def default_variants() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"name": "original"}] + [{"name": b, "baseline": b} for b in BASELINES]
    for bits in (4, 3):
        for gpr in (1, 4):
            rows.append({"name": f"spallm-b{bits}-g{gpr}-datafree", "bits": bits, "gpr": gpr, "method": "kmeans"})
            for refit, staged in ((False, False), (True, False), (True, True)):
                suffix = ("refit" if refit else "norefit") + ("-seq" if staged else "")
                rows.append({"name": f"spallm-b{bits}-g{gpr}-calib-{suffix}", "bits": bits, "gpr": gpr,
                             "method": "gptq", "refit": refit, "true_sequential": staged})  # fmt: skip
            if bits == 4:  # GPTQ's act-order: error feedback in descending H_cc order
                rows.append({"name": f"spallm-b4-g{gpr}-calib-refit-seq-actorder", "bits": 4, "gpr": gpr,
                             "method": "gptq", "refit": True, "true_sequential": True, "act_order": True})  # fmt: skip
                # each block's tables tuned against the dense block's outputs after sketching
                rows.append({"name": f"spallm-b4-g{gpr}-calib-refit-seq-tune{TUNE_STEPS}", "bits": 4, "gpr": gpr,
                             "method": "gptq", "refit": True, "true_sequential": True, "tune_steps": TUNE_STEPS})  # fmt: skip
    return rows


def apply_variant(
    model, variant: dict[str, Any], ids: torch.Tensor | None, nsamples: int, seqlen: int, seed: int,
    grid_exponent: float | None,
) -> dict[str, Any]:  # fmt: skip
    """Turn ``model`` into ``variant`` in place (a baseline, a peer quantizer, our sketch, or the original);
    return its row's ``bits_per_weight`` and what ran."""
    from ..sketch import sketch_model
    from ..sketch.driver import sketch_model_calibrated

    if "baseline" in variant:
        apply_baseline(model, variant["baseline"], SketchConfig())
        return {"bits_per_weight": BASELINES[variant["baseline"]][1], "implementation": BASELINE_IMPLEMENTATION}
    if "peer" in variant:
        bits_per_weight = round(apply_peer(model, variant["peer"], SketchConfig(), ids), 4)
        peer = PEERS[variant["peer"]]
        return {"bits_per_weight": bits_per_weight,
                "implementation": f"{peer.distribution} {peer_version(variant['peer'])}: {peer.settings}"}  # fmt: skip
    if "bits" not in variant:
        return {"bits_per_weight": 16.0}
    fields = {"bits": variant["bits"], "groups_per_row": variant["gpr"], "method": variant["method"]}
    fields.update(
        {key: variant[key] for key in ("refit", "true_sequential", "act_order", "tune_steps") if key in variant}
    )
    if grid_exponent is not None:
        fields["grid_exponent"] = grid_exponent
    calibrated = ids is not None
    config = SketchConfig(
        **fields, nsamples=nsamples if calibrated else 0, seqlen=seqlen if calibrated else 0, seed=seed
    )
    row: dict[str, Any] = {}
    if config.method == "gptq":
        row["sketch_seconds_breakdown"] = sketch_model_calibrated(model, config, ids)["seconds"]
    else:
        sketch_model(model, config)
    row["bits_per_weight"] = round(sketch_bits_per_weight(model, config), 4)
    return row


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
    peers: list[str] | None = None,
    seed: int = 0,
    max_windows: int | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Run every variant (or those named in ``only``) and write ``quality.json`` (+ ``quality.png``)
    into ``out_dir``, which must be new or empty unless ``overwrite``.

    ``peers`` names the real quantizers to run beside them (``[]``: none); ``None`` runs every one
    whose package is importable (with ``only``: those ``only`` names) and lists the others, with the
    reason, under ``"peers_unavailable"``. ``max_windows`` evaluates only the first windows of ``eval_seqlen``
    tokens of the text (``None``: all of it). ``model_ref`` may be a Hub id, at ``revision``.
    """
    from ..outputs import prepare_output_dir
    from ..sketch.calibration import calibration_batch

    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)

    source = resolve_model(model_ref, revision=revision)
    text = read_text(text_path)
    variants = [v for v in default_variants() if only is None or v["name"] in only]
    run_peers, peers_unavailable = select_peers(peers, only)
    variants += [{"name": p, "peer": p} for p in run_peers]
    needs_calib = any(v.get("method") == "gptq" or ("peer" in v and PEERS[v["peer"]].calibrated) for v in variants)
    if needs_calib and not calib:
        raise ValueError(
            "calibrated variants (and peer gptq-g128) need --calib FILE (or pass --only with data-free variants)"
        )
    base_model, tokenizer = load_model(source, dtype=torch.float32)
    ids = calibration_batch(calib, tokenizer, nsamples, seqlen, 0) if needs_calib else None
    results: dict[str, Any] = {
        "model": str(source),
        "text": text_path or "bundled sample text",
        "calibration": calib,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "eval_seqlen": eval_seqlen,
        "max_windows": max_windows,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "peers": {
            p: {"package": PEERS[p].distribution, "version": peer_version(p), "settings": PEERS[p].settings}
            for p in run_peers
        },
        "peers_unavailable": peers_unavailable,
        "rows": [],
    }
    if ids is not None:
        results["forward_seconds_calibration_set"] = round(forward_seconds(base_model, ids), 3)
        log(f"plain forward of the calibration set: {results['forward_seconds_calibration_set']:.1f} s")
    for variant in variants:
        model, _ = load_model(source, dtype=torch.float32)
        start = time.perf_counter()
        row = {"name": variant["name"], **apply_variant(model, variant, ids, nsamples, seqlen, seed, grid_exponent)}
        row["sketch_seconds"] = round(time.perf_counter() - start, 3)
        row["perplexity"] = perplexity(model, tokenizer, text, seqlen=eval_seqlen, max_windows=max_windows)
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
