"""Merge a saved SpaLLM adapter into a checkpoint, at the file level (no PEFT, no model forward).

The result is a plain sketched checkpoint (format v1) that ``from_pretrained`` and vLLM load:

* sketched base: the base's codes are copied unchanged and each adapted layer's ``tables`` are
  replaced by the adapter's (rounded to the base's table dtype, which is what the adapter computed
  with); the adapter must have been trained on these codes (fingerprint checked).
* dense base: each adapted ``weight`` is replaced by the adapter's ``codes`` and ``tables``, and
  ``quantization_config`` is written from the adapter's sketch settings.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from .card import CARD_NAME, merge_card, write_card
from .config import SketchConfig
from .format import (
    ADAPTER_CONFIG_NAME,
    CODES_SUFFIX,
    SAFETENSORS_INDEX,
    TABLES_SUFFIX,
    CheckpointError,
    atomic_path,
    check_codes_fingerprint,
    codes_fingerprint,
    load_quantization_config,
    read_adapter,
    read_json,
    read_tensors,
    refuse_pickle_weights,
    refuse_sketch_without_config,
    safetensors_files,
    write_json,
    write_tensors,
)
from .hooks import adapter_config_fields
from .hub import hub_record, resolve_hub_ref
from .outputs import prepare_output_dir, writes_folder
from .validate import validate_checkpoint

MERGE_REPORT_NAME = "merge_report.json"
# reports about the base's own making: stale for the merged model, so not copied
# (the base's model card too: the merged folder gets its own)
NOT_COPIED = (
    "config.json", MERGE_REPORT_NAME, "sketch_report.json", "sketch_report.png", "quickstart.json", CARD_NAME,
)  # fmt: skip


def sketched_base_for(
    adapter_dir: str | os.PathLike, sketch: SketchConfig, base_dir: str | os.PathLike
) -> SketchConfig:
    """Validate the sketched ``base_dir`` and check it stores codes as the adapter's tables expect."""
    validate_checkpoint(base_dir)
    base_sketch = load_quantization_config(base_dir)
    for name in ("bits", "groups_per_row"):
        if getattr(base_sketch, name) != getattr(sketch, name):
            raise CheckpointError(
                f"{adapter_dir}: adapter has {name}={getattr(sketch, name)} but base {base_dir} has "
                f"{getattr(base_sketch, name)}"
            )
    return base_sketch


def warn_unknown_adapter_fields(adapter_dir: str | os.PathLike, adapter_cfg: dict[str, Any]) -> list[str]:
    """Warn, as PEFT does when it loads the adapter, about ``adapter_config.json`` fields its config does
    not define (a typo, or a newer version's setting that is ignored); return them."""
    known = adapter_config_fields()
    unknown = sorted(set(adapter_cfg) - known) if known is not None else []
    if unknown:
        warnings.warn(
            f"spallm: {Path(adapter_dir) / ADAPTER_CONFIG_NAME}: unexpected field(s) {unknown} for SpaLLMConfig, "
            "ignored (a typo, or saved by a newer version: upgrade spallm-plugins and peft)",
            UserWarning,
            stacklevel=3,
        )
    return unknown


@writes_folder("out_dir")
def merge_adapter(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    revision: str | None = None,
    adapter_revision: str | None = None,
) -> dict:
    """Write ``base_dir`` with the adapter's tables merged in as a sketched checkpoint at ``out_dir``.

    Everything is checked before anything is written; ``out_dir`` appears only complete and validated.
    ``out_dir`` must be new or empty (or ``overwrite``), and never the base or the adapter. Either may be
    a Hub id (``org/name``, at ``revision`` / ``adapter_revision``), fetched into the Hugging Face cache.
    Returns a small report (also saved as ``merge_report.json``).
    """
    base_dir = resolve_hub_ref(base_dir, revision) or Path(base_dir)
    adapter_dir = resolve_hub_ref(adapter_dir, adapter_revision) or Path(adapter_dir)
    base_cfg_path = base_dir / "config.json"
    if not base_cfg_path.is_file():
        raise CheckpointError(f"{base_dir}: no config.json (expected a Hugging Face model folder)")
    refuse_pickle_weights(base_dir)
    out_dir = prepare_output_dir(
        out_dir, overwrite=overwrite, sources=[base_dir, adapter_dir],
        need_bytes=sum(f.stat().st_size for f in safetensors_files(base_dir)),
    )  # fmt: skip
    refuse_sketch_without_config(base_dir)
    adapter_cfg, sketch, modules = read_adapter(adapter_dir)
    warn_unknown_adapter_fields(adapter_dir, adapter_cfg)
    base_cfg = read_json(base_cfg_path)
    sketched_base = (base_cfg.get("quantization_config") or {}).get("quant_method") == "spallm"
    tensors = read_tensors(base_dir)
    if sketched_base:
        out_sketch = sketched_base_for(adapter_dir, sketch, base_dir)
        shared = {m: tensors.get(m + CODES_SUFFIX) for m, parts in modules.items() if "codes" not in parts}
        missing = sorted(m for m, codes in shared.items() if codes is None)
        if missing:
            raise CheckpointError(f"{adapter_dir}: adapted layer {missing[0]} is not sketched in base {base_dir}")
        if shared:
            check_codes_fingerprint(adapter_cfg, shared, adapter=str(adapter_dir), base=str(base_dir))
        table_dtype = out_sketch.torch_table_dtype()
        for module, parts in modules.items():
            if "codes" in parts:
                raise CheckpointError(
                    f"{adapter_dir}: carries its own codes for {module}; merge it into its dense base instead"
                )
            tensors[module + TABLES_SUFFIX] = parts["tables"].to(table_dtype)
    else:
        out_sketch = sketch.replace(target_modules=sorted(modules))
        table_dtype = out_sketch.torch_table_dtype()
        for module, parts in modules.items():
            if "codes" not in parts:
                raise CheckpointError(
                    f"{adapter_dir}: has no codes for {module}, so it was trained on a sketched base; "
                    f"{base_dir} is dense: merge it into that sketched base"
                )
            if module + ".weight" not in tensors:
                raise CheckpointError(f"{base_dir}: no tensor {module}.weight for adapted layer {module}")
            del tensors[module + ".weight"]
            tensors[module + CODES_SUFFIX] = parts["codes"]
            tensors[module + TABLES_SUFFIX] = parts["tables"].to(table_dtype)
        base_cfg["quantization_config"] = out_sketch.to_quantization_config()
    base_hub, adapter_hub = hub_record(base_dir, revision), hub_record(adapter_dir, adapter_revision)
    report = {
        "base": str(base_dir),
        "adapter": str(adapter_dir),
        "sketched_base": sketched_base,
        "merged_layers": len(modules),
        "table_dtype": out_sketch.table_dtype,
        **{f"{name}_hub": record for name, record in (("base", base_hub), ("adapter", adapter_hub)) if record},
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        for item in base_dir.iterdir():
            is_weights = item.suffix == ".safetensors" or item.name == SAFETENSORS_INDEX
            if item.is_file() and not is_weights and item.name not in NOT_COPIED:
                shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(base_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_tensors(tmp, tensors)
        (tmp / MERGE_REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_card(tmp, merge_card(tmp, out_dir.name, base_dir, adapter_dir, sketched_base))
        validate_checkpoint(tmp)
    return report


def record_codes_fingerprint(
    adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, *, revision: str | None = None
) -> str:
    """Write the fingerprint of ``base_dir``'s codes (a folder, or a Hub id at ``revision``) into an adapter
    folder saved without one.

    For adapters made before fingerprints were recorded: the user vouches that the adapter was
    trained on ``base_dir``; its layers and table shapes are checked, then ``adapter_config.json``
    is rewritten atomically. An adapter that already records a fingerprint is left unchanged.
    """
    base_dir = resolve_hub_ref(base_dir, revision) or Path(base_dir)
    adapter_cfg, sketch, modules = read_adapter(adapter_dir)
    config_path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    if adapter_cfg.get("base_codes_fingerprint"):
        raise CheckpointError(f"{config_path}: already records base_codes_fingerprint; nothing to do")
    sketched_base_for(adapter_dir, sketch, base_dir)
    shared = sorted(m for m, parts in modules.items() if "codes" not in parts)
    if not shared:
        raise CheckpointError(f"{adapter_dir}: carries its own codes (a dense-base adapter); it needs no fingerprint")
    codes = read_tensors(base_dir, names={m + CODES_SUFFIX for m in shared})
    missing = [m for m in shared if m + CODES_SUFFIX not in codes]
    if missing:
        raise CheckpointError(f"{adapter_dir}: adapted layer {missing[0]} is not sketched in base {base_dir}")
    for m in shared:
        if codes[m + CODES_SUFFIX].shape[0] != modules[m]["tables"].shape[0]:
            raise CheckpointError(
                f"{adapter_dir}: tables of {m} have {modules[m]['tables'].shape[0]} rows, base {base_dir} has "
                f"{codes[m + CODES_SUFFIX].shape[0]}"
            )
    fingerprint = codes_fingerprint({m: codes[m + CODES_SUFFIX] for m in shared})
    write_json(config_path, {**adapter_cfg, "base_codes_fingerprint": fingerprint})
    return fingerprint
