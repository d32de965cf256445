"""Whole-model jobs: load, sketch, save atomically, and load sketched checkpoints safely."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .card import sketch_card, stored_sizes, write_card
from .config import DENSE_DTYPES, SketchConfig
from .convert import plan_sketch, resolve_targets, sketched_layers
from .format import (
    QUANT_METHOD,
    CheckpointError,
    atomic_path,
    read_json,
    refuse_sketch_without_config,
)
from .hooks import register_host
from .layer import SketchedLinear
from .models import load_model, load_tokenizer, meta_model_from_config, resolve_model
from .outputs import prepare_output_dir, writes_folder
from .sketch import sketch_model
from .sketch.calibration import CalibrationError, calibration_batch
from .sketch.driver import PARTIAL_DIR, find_blocks
from .sketch.memory import DEFAULT_MAX_MEMORY
from .streaming import sketch_streaming
from .validate import validate_checkpoint

REPORT_NAME = "sketch_report.json"


# data-free settings whose perplexity is known to be far from the original (SmolLM2-135M: 2-bit gpr 1
# 854,472 and 3-bit 282 against 27.9; 4-bit is usable data-free)
POOR_WITHOUT_CALIBRATION_BITS = (2, 3)


def source_dense_dtype(source: str | os.PathLike) -> str:
    """The dtype a dense checkpoint stores its weights in (``config.json``'s ``dtype``), else float32."""
    cfg = Path(source) / "config.json"
    data = read_json(cfg) if cfg.is_file() else {}
    stored = str(data.get("dtype") or data.get("torch_dtype") or "float32").removeprefix("torch.")
    return stored if stored in DENSE_DTYPES else "float32"


def stored_dense_rest(folder: str | os.PathLike) -> tuple[int, str] | None:
    """``(bytes, dtype)`` of the tensors a sketched checkpoint keeps dense, read from its safetensors
    headers (the most common dtype among them); ``None`` when the folder holds no weights."""
    try:
        sizes = stored_sizes(folder)
    except CheckpointError:
        return None
    return (sizes.dense_bytes, sizes.dense_dtype) if sizes.dense_dtype else None


def check_dense_dtype(dense_dtype: str) -> torch.dtype:
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"dense_dtype: expected one of {', '.join(DENSE_DTYPES)}, got {dense_dtype!r}")
    return getattr(torch, dense_dtype)


def estimate_output_bytes(source: str | os.PathLike, config: SketchConfig, dense_dtype: str) -> int:
    """The bytes a sketch of ``source`` writes (codes, tables, the dense rest in ``dense_dtype``), from
    ``config.json`` alone: what ``spallm info`` reports, used to check the free space before any work."""
    model, _ = meta_model_from_config(source)
    plan = plan_sketch(model, config, dense_dtype_bytes=check_dense_dtype(dense_dtype).itemsize)
    return plan.code_bytes + plan.table_bytes + plan.dense_rest_bytes


def warn_if_poor_without_calibration(config: SketchConfig) -> str | None:
    """A warning line for data-free settings known to lose most of the model's quality (or ``None``)."""
    if config.method == "gptq" or config.bits not in POOR_WITHOUT_CALIBRATION_BITS:
        return None
    message = (
        f"spallm: a data-free {config.bits}-bit sketch loses most of the model's quality (SmolLM2-135M: "
        f"perplexity {'854,472' if config.bits == 2 else '282'} against 27.9 dense); calibrate it with "
        "--calib FILE (calibration text, e.g. a .txt or instruction rows), or use --bits 4"
    )
    warnings.warn(message, UserWarning, stacklevel=3)
    return message


def cast_dense_rest(model: torch.nn.Module, dense_dtype: str) -> None:
    """Cast everything a sketch leaves dense (embeddings, norms, lm_head, biases) to ``dense_dtype``;
    the tables keep their own dtype and the codes stay uint8."""
    dtype = check_dense_dtype(dense_dtype)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and not (isinstance(module, SketchedLinear) and name == "tables"):
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point():
                setattr(module, name, buf.to(dtype))
    model.config.dtype = dtype


def _write_sketched(model, tokenizer, out_dir: Path, config: SketchConfig, report: dict | None) -> None:
    model.config.quantization_config = config.to_quantization_config()
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        # a model sketched in memory names its source by what it was loaded from (a Hub id or a folder)
        card_report = report or {"source": getattr(model.config, "name_or_path", "") or None}
        write_card(tmp, sketch_card(tmp, out_dir.name, card_report))
        validate_checkpoint(tmp)


@writes_folder("out_dir")
def save_sketched_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    config: SketchConfig,
    report: dict | None = None,
    *,
    overwrite: bool = False,
):
    """Write a sketched model as a format-v1 checkpoint folder, atomically and validated.

    ``out_dir`` must be new or empty unless ``overwrite`` (see :func:`spallm_plugins.outputs.prepare_output_dir`).
    The folder is assembled under a temporary name, validated, and only then renamed onto
    ``out_dir``: an interrupted or failed save leaves ``out_dir`` exactly as it was.
    """
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    _write_sketched(model, tokenizer, out_dir, config, report)
    return out_dir


@writes_folder("out_dir")
def sketch_to_folder(
    model_ref: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: SketchConfig,
    progress: bool = True,
    *,
    resume: bool = False,
    device: str = "cpu",
    offload: bool = False,
    on_block_done=None,
    overwrite: bool = False,
    dense_dtype: str | None = None,
    max_memory: int | None = None,
    offload_activations: bool = False,
) -> dict[str, Any]:
    """Load ``model_ref``, sketch it per ``config``, save to ``out_dir``; return the report.

    ``method="kmeans"`` is data-free. ``method="gptq"`` reads ``config.calibration`` (packed into
    ``nsamples`` x ``seqlen`` tokens) and sketches block by block, persisting progress under
    ``out_dir/.spallm-partial`` so that ``resume=True`` continues a killed run. The checkpoint
    appears in ``out_dir`` only when complete. Before any work, ``out_dir`` is checked: new or empty
    (or ``overwrite``), never the source, writable, with room for the output. ``dense_dtype`` is the
    dtype of what stays dense (default: the source's stored dtype). ``max_memory`` bounds the
    workspace of sketching one linear (bytes; the result does not depend on it).
    ``offload_activations`` keeps the calibration activations in files, one batch in memory at a time.
    """
    source = resolve_model(model_ref)
    dense_dtype = dense_dtype or source_dense_dtype(source)
    check_dense_dtype(dense_dtype)
    sources = [source, *([model_ref] if Path(model_ref).exists() else [])]
    out_dir = prepare_output_dir(
        out_dir, overwrite=overwrite, sources=sources, own_entries={PARTIAL_DIR},
        need_bytes=estimate_output_bytes(source, config, dense_dtype),
    )  # fmt: skip
    if config.method == "gptq" and not config.calibration:
        raise CalibrationError("method 'gptq' needs calibration data: pass --calib FILE (or set calibration)")
    poor = warn_if_poor_without_calibration(config)
    tokenizer = load_tokenizer(source)
    ids = None
    if config.method == "gptq":
        if tokenizer is None:
            raise CalibrationError(f"{source}: no tokenizer in the model folder; cannot tokenise calibration data")
        ids = calibration_batch(config.calibration, tokenizer, config.nsamples, config.seqlen, config.seed)
    torch.manual_seed(config.seed)
    start = time.perf_counter()

    def full_report(details: dict[str, Any]) -> dict[str, Any]:
        return {
            "source": str(source),
            "spallm_plugins_version": __version__,
            "torch_version": torch.__version__,
            "machine": platform.machine(),
            "config": config.to_dict(),
            "dense_dtype": dense_dtype,
            "streamed": streamed,
            "max_memory_bytes": max_memory or DEFAULT_MAX_MEMORY,
            "sketch_seconds": round(time.perf_counter() - start, 3),
            **({"warning": poor} if poor else {}),
            **details,
        }

    def finish(tmp: Path, details: dict[str, Any]) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report = full_report(details)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_card(tmp, sketch_card(tmp, out_dir.name, report))

    streamed = ids is not None or blocks_hold_targets(source, config)
    if streamed:
        details = sketch_streaming(
            source, out_dir, config, dense_dtype=dense_dtype, calibration_ids=ids, resume=resume, device=device,
            progress=progress, on_block_done=on_block_done, partial_name=PARTIAL_DIR, finish=finish,
            max_memory=max_memory, offload_activations=offload_activations,
        )  # fmt: skip
        return full_report(details)
    # data-free with targets outside the decoder blocks (e.g. lm_head): the whole model in memory
    model, _ = load_model(source, dtype=torch.float32)
    losses = sketch_model(model, config, progress=progress, max_memory=max_memory)
    details = {"layers": {name: {"loss": loss} for name, loss in losses.items()}}
    cast_dense_rest(model, dense_dtype)
    report = full_report(details)
    _write_sketched(model, tokenizer, out_dir, config, report)
    return report


def blocks_hold_targets(source: str | os.PathLike, config: SketchConfig) -> bool:
    """Whether every linear ``config`` selects lies inside the decoder blocks (so the sketch can stream)."""
    model, _ = meta_model_from_config(source)
    try:
        find_blocks(model, resolve_targets(model, config))
    except ValueError:
        return False
    return True


def load_sketched(path: str | os.PathLike, **kwargs):
    """Load a sketched checkpoint after validating it; refuses to return silently dense models."""
    validate_checkpoint(path, check_values=False)  # the quantizer checks the loaded tables: read them once
    if not register_host("transformers"):
        raise CheckpointError(
            f"{path}: cannot load a sketched checkpoint: no installed integration registers spallm with "
            "transformers (install spallm-plugins itself, not only its source tree)"
        )
    model, tokenizer = load_model(path, **kwargs)
    if not sketched_layers(model):
        raise CheckpointError(
            f"{path}: loaded without SketchedLinear layers; spallm is not registered with transformers"
        )
    return model, tokenizer


def is_sketched_folder(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    quant = read_json(cfg).get("quantization_config") or {}
    return quant.get("quant_method") == QUANT_METHOD


def load_any(ref: str | os.PathLike, **kwargs):
    """Load a dense or sketched model reference (folder, .gguf, or the default model name)."""
    path = resolve_model(ref)
    refuse_sketch_without_config(path)
    return load_sketched(path, **kwargs) if is_sketched_folder(path) else load_model(path, **kwargs)
