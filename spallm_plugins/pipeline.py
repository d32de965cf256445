"""Whole-model jobs: load, sketch, save atomically, and load sketched checkpoints safely."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import SketchConfig
from .convert import sketched_layers
from .format import QUANT_METHOD, CheckpointError, atomic_path, read_json, refuse_sketch_without_config
from .hooks import register_host
from .models import load_model, resolve_model
from .sketch import sketch_model
from .sketch.calibration import CalibrationError, calibration_batch
from .sketch.driver import PARTIAL_DIR, sketch_model_calibrated
from .validate import validate_checkpoint

REPORT_NAME = "sketch_report.json"


def save_sketched_model(model, tokenizer, out_dir: str | os.PathLike, config: SketchConfig, report: dict | None = None):
    """Write a sketched model as a format-v1 checkpoint folder, atomically and validated.

    The folder is assembled under a temporary name, validated, and only then renamed onto
    ``out_dir``: an interrupted or failed save leaves ``out_dir`` exactly as it was.
    """
    out_dir = Path(out_dir)
    model.config.quantization_config = config.to_quantization_config()
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        validate_checkpoint(tmp)
    return out_dir


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
) -> dict[str, Any]:
    """Load ``model_ref``, sketch it per ``config``, save to ``out_dir``; return the report.

    ``method="kmeans"`` is data-free. ``method="gptq"`` reads ``config.calibration`` (packed into
    ``nsamples`` x ``seqlen`` tokens) and sketches block by block, persisting progress under
    ``out_dir/.spallm-partial`` so that ``resume=True`` continues a killed run. The checkpoint
    appears in ``out_dir`` only when complete.
    """
    source = resolve_model(model_ref)
    model, tokenizer = load_model(source, dtype=torch.float32)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    if config.method == "gptq":
        if not config.calibration:
            raise CalibrationError("method 'gptq' needs calibration data: pass --calib FILE (or set calibration)")
        if tokenizer is None:
            raise CalibrationError(f"{source}: no tokenizer in the model folder; cannot tokenise calibration data")
        ids = calibration_batch(config.calibration, tokenizer, config.nsamples, config.seqlen, config.seed)
        details = sketch_model_calibrated(
            model, config, ids, partial_dir=Path(out_dir) / PARTIAL_DIR, resume=resume, device=device,
            offload=offload, progress=progress, on_block_done=on_block_done,
        )  # fmt: skip
        model.to("cpu")
    else:
        losses = sketch_model(model, config, progress=progress)
        details = {"layers": {name: {"loss": loss} for name, loss in losses.items()}}
    seconds = time.perf_counter() - start
    report = {
        "source": str(source),
        "spallm_plugins_version": __version__,
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "config": config.to_dict(),
        "sketch_seconds": round(seconds, 3),
        **details,
    }
    save_sketched_model(model, tokenizer, out_dir, config, report)
    return report


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
