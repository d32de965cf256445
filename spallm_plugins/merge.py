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
from pathlib import Path
from typing import Any

import torch

from .config import SketchConfig, SketchConfigError
from .format import (
    ADAPTER_CODES_SUFFIX,
    ADAPTER_CONFIG_NAME,
    ADAPTER_KEY_PREFIX,
    ADAPTER_TABLES_SUFFIX,
    ADAPTER_WEIGHTS_NAME,
    CODES_SUFFIX,
    SAFETENSORS_INDEX,
    TABLES_SUFFIX,
    CheckpointError,
    atomic_path,
    codes_fingerprint,
    load_quantization_config,
    read_file_headers,
    read_json,
    read_tensors,
    validate_checkpoint,
    write_tensors,
)

MERGE_REPORT_NAME = "merge_report.json"


def read_adapter(
    adapter_dir: str | os.PathLike,
) -> tuple[dict[str, Any], SketchConfig, dict[str, dict[str, torch.Tensor]]]:
    """``(adapter_config, sketch settings, {module: {"tables": t, "codes": c?}})`` of a saved adapter."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG_NAME, adapter_dir / ADAPTER_WEIGHTS_NAME
    for path in (cfg_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{adapter_dir}: no {path.name} (expected a saved SpaLLM adapter folder)")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "SPALLM":
        raise CheckpointError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}, expected 'SPALLM'")
    fields = {k: cfg[k] for k in SketchConfig.field_names() if k in cfg and k != "target_modules"}
    try:
        sketch = SketchConfig.from_dict(fields, where=str(cfg_path))
    except SketchConfigError as err:
        raise CheckpointError(str(err)) from None
    read_file_headers([weights])  # names a truncated or malformed file before loading it
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(weights)).items():
        key = name.removeprefix(ADAPTER_KEY_PREFIX)
        for suffix, kind in ((ADAPTER_TABLES_SUFFIX, "tables"), (ADAPTER_CODES_SUFFIX, "codes")):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[kind] = tensor
    for module, parts in modules.items():
        if "tables" not in parts:
            raise CheckpointError(f"{weights}: codes for {module} but no {ADAPTER_TABLES_SUFFIX} tensor")
        want = (parts["tables"].shape[0], sketch.groups_per_row, sketch.num_codes)
        if tuple(parts["tables"].shape) != want or not parts["tables"].is_floating_point():
            raise CheckpointError(
                f"{weights}: tensor {ADAPTER_KEY_PREFIX}{module}{ADAPTER_TABLES_SUFFIX} is {parts['tables'].dtype} "
                f"{list(parts['tables'].shape)}, expected a float tensor of shape {list(want)}"
            )
    if not modules:
        raise CheckpointError(f"{weights}: no {ADAPTER_TABLES_SUFFIX} tensors")
    return cfg, sketch, modules


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write ``base_dir`` with the adapter's tables merged in as a sketched checkpoint at ``out_dir``.

    Everything is checked before anything is written; ``out_dir`` appears only complete and validated.
    Returns a small report (also saved as ``merge_report.json``).
    """
    base_dir = Path(base_dir)
    adapter_cfg, sketch, modules = read_adapter(adapter_dir)
    base_cfg_path = base_dir / "config.json"
    if not base_cfg_path.is_file():
        raise CheckpointError(f"{base_dir}: no config.json (expected a Hugging Face model folder)")
    base_cfg = read_json(base_cfg_path)
    sketched_base = (base_cfg.get("quantization_config") or {}).get("quant_method") == "spallm"
    tensors = read_tensors(base_dir)
    if sketched_base:
        validate_checkpoint(base_dir)
        out_sketch = load_quantization_config(base_dir)
        for name in ("bits", "groups_per_row"):
            if getattr(out_sketch, name) != getattr(sketch, name):
                raise CheckpointError(
                    f"{adapter_dir}: adapter has {name}={getattr(sketch, name)} but base {base_dir} has "
                    f"{getattr(out_sketch, name)}"
                )
        shared = {m: tensors.get(m + CODES_SUFFIX) for m, parts in modules.items() if "codes" not in parts}
        missing = sorted(m for m, codes in shared.items() if codes is None)
        if missing:
            raise CheckpointError(f"{adapter_dir}: adapted layer {missing[0]} is not sketched in base {base_dir}")
        expected = adapter_cfg.get("base_codes_fingerprint")
        if shared and expected and codes_fingerprint(shared) != expected:
            raise CheckpointError(
                f"{adapter_dir}: trained on codes with fingerprint {expected[:19]}..., but base {base_dir} has "
                f"other codes: merge it into the base it was trained on ({adapter_cfg.get('base_model_name_or_path')})"
            )
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
    report = {
        "base": str(base_dir),
        "adapter": str(adapter_dir),
        "sketched_base": sketched_base,
        "merged_layers": len(modules),
        "table_dtype": out_sketch.table_dtype,
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        for item in base_dir.iterdir():
            is_weights = item.suffix == ".safetensors" or item.name == SAFETENSORS_INDEX
            if item.is_file() and not is_weights and item.name not in ("config.json", MERGE_REPORT_NAME):
                shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(base_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_tensors(tmp, tensors)
        (tmp / MERGE_REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        validate_checkpoint(tmp)
    return report
