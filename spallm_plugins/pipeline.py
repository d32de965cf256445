"""Whole-model jobs: load, sketch, save atomically, and load sketched checkpoints safely."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .card import sketch_card, stored_sizes, write_card
from .config import DENSE_DTYPES, SketchConfig, SketchConfigError
from .convert import plan_sketch, resolve_targets, sketched_layers
from .format import (
    QUANT_METHOD,
    CheckpointError,
    atomic_path,
    read_json,
    refuse_sketch_without_config,
)
from .hooks import register_host
from .hub import hub_record, resolve_hub_ref
from .layer import SketchedLinear
from .models import cache_dir, load_model, load_tokenizer, resolve_model
from .outputs import prepare_output_dir, turn, writes_folder
from .sketch import sketch_model
from .sketch.blocks import find_blocks
from .sketch.calibration import CalibrationError, calibration_batch, load_calibration
from .sketch.memory import DEFAULT_MAX_MEMORY
from .sketch.progress import PARTIAL_DIR, setting_difference
from .streaming import meta_skeleton, sketch_streaming
from .validate import validate_checkpoint

REPORT_NAME = "sketch_report.json"


# data-free settings that lose most of a model's quality (benchmarks/quality-smollm2/ has the figures;
# 4-bit is usable data-free)
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


def estimate_output_bytes(model: torch.nn.Module, config: SketchConfig, dense_dtype: str) -> int:
    """The bytes a sketch of ``model`` (built on the meta device from ``config.json``) writes: codes, tables,
    the dense rest in ``dense_dtype``; what ``spallm info`` reports, used to check the free space before any work."""
    plan = plan_sketch(model, config, dense_dtype_bytes=check_dense_dtype(dense_dtype).itemsize)
    return plan.code_bytes + plan.table_bytes + plan.dense_rest_bytes


def warn_if_poor_without_calibration(config: SketchConfig) -> str | None:
    """A warning line for data-free settings known to lose most of the model's quality (or ``None``)."""
    if config.method == "gptq" or config.bits not in POOR_WITHOUT_CALIBRATION_BITS:
        return None
    message = (
        f"spallm: a data-free {config.bits}-bit sketch loses most of the model's quality; calibrate it with "
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


def calibration_inputs(
    source: Path, config: SketchConfig, calibration: Any, calibration_column: str | None
) -> tuple[SketchConfig, Any, torch.Tensor | None]:
    """``(config, tokenizer, token ids)`` of a sketch: ``calibration`` (else ``config.calibration``) implies
    ``gptq`` and is tokenised into ``[nsamples, seqlen]`` ids; the config then records it by name and digest.
    Data-free: no ids (the tokenizer, if any, is still saved beside the sketch)."""
    if calibration is not None:
        config = config.replace(method="gptq")
    calibration = calibration if calibration is not None else config.calibration
    if config.method == "gptq" and calibration is None:
        raise CalibrationError("method 'gptq' needs calibration data: pass --calib FILE (or set calibration)")
    tokenizer = load_tokenizer(source)
    if config.method != "gptq":
        return config, tokenizer, None
    if tokenizer is None:
        raise CalibrationError(f"{source}: no tokenizer in the model folder; cannot tokenise calibration data")
    texts = load_calibration(calibration, column=calibration_column)
    config = config.replace(calibration=texts.record)
    return config, tokenizer, calibration_batch(texts, tokenizer, config.nsamples, config.seqlen, config.seed)


@writes_folder("out_dir")
def sketch_to_folder(
    model_ref: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: SketchConfig,
    progress: bool = True,
    *,
    resume: bool = False,
    device: str = "cpu",
    on_block_done=None,
    overwrite: bool = False,
    dense_dtype: str | None = None,
    max_memory: int | None = None,
    offload_activations: bool = False,
    calibration: Any = None,
    calibration_column: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Load ``model_ref``, sketch it per ``config``, save to ``out_dir``; return the report.

    ``model_ref`` is anything :func:`spallm_plugins.models.resolve_model` takes: a folder, a ``.gguf`` file,
    ``"smollm2"``, or a Hub id ``org/name`` (at ``revision``), whose repo and commit the report records.

    ``method="kmeans"`` is data-free. ``method="gptq"`` reads ``calibration`` (texts, a ``datasets`` dataset, a
    Hub dataset or a file: :func:`~spallm_plugins.sketch.calibration.load_calibration`; given, it implies
    ``gptq``), else ``config.calibration``, packed into ``nsamples`` x ``seqlen`` tokens; the checkpoint
    records the source by name and digest, never by local path. It sketches block by block, persisting progress under
    ``out_dir/.spallm-partial`` so that ``resume=True`` continues a killed run. The checkpoint
    appears in ``out_dir`` only when complete. Before any work, ``out_dir`` is checked: new or empty
    (or ``overwrite``), never the source, writable, with room for the output. ``dense_dtype`` is the
    dtype of what stays dense (default: the source's stored dtype). ``max_memory`` bounds the
    workspace of sketching one linear (bytes; the result does not depend on it).
    ``offload_activations`` keeps the calibration activations in files, one batch in memory at a time.
    """
    source = resolve_model(model_ref, revision=revision)
    origin = hub_record(source, revision)
    dense_dtype = dense_dtype or source_dense_dtype(source)
    check_dense_dtype(dense_dtype)
    sources = [source, *([model_ref] if Path(model_ref).exists() else [])]
    skeleton = meta_skeleton(source)  # the output's size, whether it can stream, the model it streams into
    out_dir = prepare_output_dir(
        out_dir, overwrite=overwrite, sources=sources, own_entries={PARTIAL_DIR},
        need_bytes=estimate_output_bytes(skeleton, config, dense_dtype),
    )  # fmt: skip
    config, tokenizer, ids = calibration_inputs(source, config, calibration, calibration_column)
    poor = warn_if_poor_without_calibration(config)
    torch.manual_seed(config.seed)
    start = time.perf_counter()

    def full_report(details: dict[str, Any]) -> dict[str, Any]:
        return {
            "source": str(source),
            **({"source_hub": origin} if origin else {}),
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

    streamed = ids is not None or blocks_hold_targets(skeleton, config)
    if streamed:
        details = sketch_streaming(
            source, out_dir, config, skeleton=skeleton, dense_dtype=dense_dtype, calibration_ids=ids, resume=resume,
            device=device,
            progress=progress, on_block_done=on_block_done, finish=finish,
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


def blocks_hold_targets(model: torch.nn.Module, config: SketchConfig) -> bool:
    """Whether every linear ``config`` selects lies inside the decoder blocks of ``model`` (so the sketch can
    stream)."""
    try:
        find_blocks(model, resolve_targets(model, config))
    except ValueError:
        return False
    return True


def load_sketched(path: str | os.PathLike, *, revision: str | None = None, **kwargs):
    """Load a sketched checkpoint (a folder, or a Hub id at ``revision``) after validating it; refuses to
    return silently dense models."""
    path = resolve_hub_ref(path, revision) or path
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


def load_any(ref: str | os.PathLike, *, revision: str | None = None, **kwargs):
    """Load a dense or sketched model reference (folder, .gguf, the default model name, or a Hub id at
    ``revision``)."""
    path = resolve_model(ref, revision=revision)
    refuse_sketch_without_config(path)
    return load_sketched(path, **kwargs) if is_sketched_folder(path) else load_model(path, **kwargs)


@dataclass(frozen=True)
class SketchResult:
    """What :func:`sketch_pretrained` made: the checkpoint folder (also usable as a path), the settings it was
    sketched with (calibration recorded by name and digest) and its report (per-layer losses, timings)."""

    path: Path
    config: SketchConfig
    report: dict[str, Any]

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def load(self, **kwargs: Any):
        """``(model, tokenizer)``: the sketched model through transformers (``kwargs`` go to ``from_pretrained``)."""
        return load_sketched(self.path, **kwargs)


def sketch_pretrained(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: SketchConfig | None = None,
    *,
    calibration: Any = None,
    calibration_column: str | None = None,
    revision: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
    dense_dtype: str | None = None,
    max_memory: int | None = None,
    offload_activations: bool = False,
    **settings: Any,
) -> SketchResult:
    """Sketch ``model`` (a Hub id, a model folder, a ``.gguf`` file or ``"smollm2"``) into ``out_dir``: the
    main job of ``spallm sketch``, with the same defaults, in one call.

    ``settings`` are :class:`~spallm_plugins.config.SketchConfig` fields (``bits=4, groups_per_row=4``, ...),
    applied over ``config``. ``calibration`` (texts, a ``datasets.Dataset``, ``hf://datasets/ORG/NAME?...`` or a
    file) makes the sketch calibrated, ``nsamples`` x ``seqlen`` tokens of it; without it the sketch is
    data-free. The model streams block by block; progress shows unless ``progress=False``; the checkpoint
    appears in ``out_dir`` only when complete, and ``resume=True`` continues a killed run. Next:
    ``AutoModelForCausalLM.from_pretrained(result.path)`` (no import needed), or ``result.load()``, then
    ``get_peft_model(model, SpaLLMConfig())`` to train its tables.
    """
    unknown = sorted(set(settings) - set(SketchConfig.field_names()))
    if unknown:
        raise SketchConfigError(
            f"sketch_pretrained: unknown setting(s) {unknown}; SketchConfig fields are {list(SketchConfig.field_names())}"
        )
    if config is None:
        config = SketchConfig(**settings)
    elif settings:
        config = config.replace(**settings)
    report = sketch_to_folder(
        model, out_dir, config, progress=progress, resume=resume, device=device, overwrite=overwrite,
        dense_dtype=dense_dtype, max_memory=max_memory, offload_activations=offload_activations,
        calibration=calibration, calibration_column=calibration_column, revision=revision,
    )  # fmt: skip
    return SketchResult(Path(out_dir), SketchConfig.from_dict(report["config"]), report)


def _source_identity(model: str | os.PathLike, source: Path) -> dict[str, Any]:
    """What names a source's content: the resolved folder (a Hub snapshot's names its commit) and its files'
    sizes and times, so a dense folder trained further is not mistaken for the one sketched before."""
    files = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    return {"model": os.fspath(model), "folder": str(source), "files": stats}


def cached_sketch(
    model: str | os.PathLike,
    config: SketchConfig,
    *,
    folder: str | os.PathLike | None = None,
    calibration: Any = None,
    calibration_column: str | None = None,
    revision: str | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> SketchResult:
    """The sketch of ``model`` with ``config``, made once and reused: what a one-file training recipe names.

    The default ``folder`` is ``$SPALLM_HOME/sketched/<model>-<key>``, the key hashing the source (Hub commit,
    or a folder's files) and the settings (calibration by digest). A folder that exists is validated and reused
    when it holds this source sketched with these settings, refused when it holds another; a killed sketch
    resumes. Processes needing the same folder (distributed ranks) take turns: one sketches, the rest reuse.
    """
    source = resolve_model(model, revision=revision)
    if calibration is not None or config.method == "gptq":
        texts = load_calibration(
            calibration if calibration is not None else config.calibration, column=calibration_column
        )
        config, calibration = config.replace(method="gptq", calibration=texts.record), texts
    wanted = config.to_quantization_config()
    identity = json.dumps({"source": _source_identity(model, source), "settings": wanted}, sort_keys=True)
    name = os.fspath(model).strip("/").replace("/", "--") if not Path(model).exists() else source.name
    folder = (
        Path(folder)
        if folder
        else cache_dir() / "sketched" / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    )
    with turn(folder):
        if (folder / "config.json").is_file():
            return _reuse_sketch(folder, source, wanted)
        return sketch_pretrained(
            source, folder, config, calibration=calibration, resume=True, progress=progress, device=device
        )


def _reuse_sketch(folder: Path, source: Path, wanted: dict[str, Any]) -> SketchResult:
    found = read_json(folder / "config.json").get("quantization_config")
    report = read_json(folder / REPORT_NAME) if (folder / REPORT_NAME).is_file() else {}
    if found != wanted or report.get("source") != str(source):
        why = setting_difference(found, wanted) if found != wanted else f"it was sketched from {report.get('source')!r}"
        raise CheckpointError(
            f"{folder}: holds another sketch ({why}); remove the folder to sketch {source.name} with these "
            "settings, or choose another folder"
        )
    validate_checkpoint(folder, check_values=False)
    return SketchResult(folder, SketchConfig.from_dict(found), report)
