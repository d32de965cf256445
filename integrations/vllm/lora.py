"""Many fine-tuned SpaLLM table sets over one served set of codes, through vLLM's multi-LoRA plumbing.

A SpaLLM adapter is another table set for the *same* codes, so a server keeps the codes once and
switches tables per request. vLLM already does everything around that for LoRA: ``--enable-lora``,
``--lora-modules``, ``/v1/load_lora_adapter``, ``model: <name>`` in requests, ``--max-loras`` GPU
slots with LRU eviction, per-adapter prefix caching. This module plugs table sets into it:

* wrapper classes, prepended to ``vllm.lora.utils._all_lora_classes``, that take over only linears
  whose quant method is :class:`~.quantization.SpaLLMLinearMethod`. A wrapper holds
  ``table_sets [max_loras + 1, out, groups, 2**bits]`` (slot 0 is the base's tables, shared with the
  base layer; slot ``i + 1`` is vLLM's LoRA slot ``i``) and applies one multi-table-set LUT matmul
  in which token ``m`` reads ``table_sets[token_lora_indices[m] + 1]``;
* a loader for our PEFT adapter folders (``peft_type: SPALLM``), used by vLLM's worker in place of
  its LoRA reader for exactly those folders: validated by the core's adapter reader, checked
  against the served sketch and the served codes' fingerprint, delivered to the wrappers as
  ``lora_b = tables.view(out, groups * 2**bits)`` so vLLM's own tensor-parallel row slicing and
  packed-module (``qkv_proj``, ``gate_up_proj``) merging apply unchanged.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.lora.layers.base import BaseLayerWithLoRA

from spallm_plugins.format import ADAPTER_CONFIG_NAME, AdapterBaseMismatchError, CheckpointError, read_json
from spallm_plugins.ops import lut_linear_table_sets

from .quantization import SpaLLMLinearMethod, SpaLLMQuantizationConfig

logger = logging.getLogger("spallm_plugins.vllm")

TABLE_SET_MARKER_RANK = 0  # lora_a of a table set has 0 rows; vLLM's warm-up dummies have >= 1


def _is_spallm_layer(layer: torch.nn.Module) -> bool:
    return isinstance(getattr(layer, "quant_method", None), SpaLLMLinearMethod)


class SpaLLMTableSets:
    """Mixin over a stock vLLM LoRA wrapper: per-token table sets instead of a low-rank update."""

    table_sets: torch.Tensor

    def create_lora_weights(self, max_loras: int, lora_config: Any, model_config: Any = None) -> None:
        base = self.base_layer
        self.lora_config = lora_config
        tables = base.tables.data
        self.table_sets = tables.unsqueeze(0).repeat(max_loras + 1, 1, 1, 1)
        base.tables = torch.nn.Parameter(self.table_sets[0], requires_grad=False)  # one copy of the base
        self.bits = base.quant_method.config.sketch.bits
        # vLLM sizes its warm-up dummy adapters from these; meta tensors take no memory.
        if self.n_slices == 1:
            self.output_slices = (tables.shape[0],)
        slices = self.output_slices
        self.lora_a_stacked = tuple(
            torch.empty(1, 1, 1, self.input_size, dtype=tables.dtype, device="meta") for _ in slices
        )
        self.lora_b_stacked = tuple(torch.empty(1, 1, rows, 1, dtype=tables.dtype, device="meta") for rows in slices)

    def reset_lora(self, index: int) -> None:
        self.table_sets[index + 1].copy_(self.table_sets[0])

    def _local_tables(self, tables: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's ``[rows, groups, 2**bits]`` of one slice, from the slice's (row-sliced) ``lora_b``."""
        base = self.base_layer
        groups, num_codes = self.table_sets.shape[2:]
        if tables.dim() != 2 or tables.shape[1] % num_codes or tables.shape[0] != rows:
            raise AdapterBaseMismatchError(
                f"spallm: {base.prefix}: adapter tables have shape {list(tables.shape)}, expected "
                f"[{rows}, groups_per_row * {num_codes}]"
            )
        tables = tables.reshape(rows, -1, num_codes)
        first = getattr(base, "spallm_first_group", 0)
        return tables[:, first : first + groups]

    def set_lora(self, index: int, lora_a: Any, lora_b: Any) -> None:
        self.reset_lora(index)
        slice_a = lora_a if isinstance(lora_a, list) else [lora_a]
        if not any(a is not None and a.shape[0] == TABLE_SET_MARKER_RANK for a in slice_a):
            return  # a warm-up dummy: the slot keeps the base tables
        if self.tp_size > 1:
            lora_b = self.slice_lora_b(lora_b)
        parts = lora_b if isinstance(lora_b, list) else [lora_b]
        sizes = self.output_slices
        row = 0
        for tables, rows in zip(parts, sizes, strict=True):
            if tables is not None:
                self.table_sets[index + 1, row : row + rows].copy_(self._local_tables(tables, rows))
            row += rows

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base_layer
        x2 = x.reshape(-1, x.shape[-1])
        # Slot per token, from the buffer vLLM fills in place before each step (graph safe: padded
        # rows hold stale indices, clamped into range).
        lora_slots = self.punica_wrapper._token_lora_indices[: x2.shape[0]]
        slots = (lora_slots + 1).clamp_(0, self.table_sets.shape[0] - 1)
        y = lut_linear_table_sets(x2, base.qweight, self.table_sets, slots, bias, self.bits, base.spallm_backend)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @classmethod
    def can_replace_layer(cls, source_layer: torch.nn.Module, lora_config: Any, packed_modules_list: list,
                          model_config: Any = None) -> bool:  # fmt: skip
        if not _is_spallm_layer(source_layer):
            return False
        if lora_config.fully_sharded_loras:
            raise ValueError(
                f"spallm: {source_layer.prefix}: --fully-sharded-loras does not apply to SpaLLM table sets "
                "(they are sharded with their rows or groups like the base tables); drop the flag"
            )
        stock = next(c for c in cls.__mro__[1:] if c.__module__.startswith("vllm."))
        return stock.can_replace_layer(source_layer=source_layer, lora_config=lora_config,
                                       packed_modules_list=packed_modules_list, model_config=model_config)  # fmt: skip


class ColumnParallelLinearWithTableSets(SpaLLMTableSets, ColumnParallelLinearWithLoRA):
    pass


class MergedColumnParallelLinearWithTableSets(SpaLLMTableSets, MergedColumnParallelLinearWithLoRA):
    pass


class QKVParallelLinearWithTableSets(SpaLLMTableSets, QKVParallelLinearWithLoRA):
    pass


class MergedQKVParallelLinearWithTableSets(SpaLLMTableSets, MergedQKVParallelLinearWithLoRA):
    pass


class RowParallelLinearWithTableSets(SpaLLMTableSets, RowParallelLinearWithLoRA):
    pass


class ReplicatedLinearWithTableSets(SpaLLMTableSets, ReplicatedLinearWithLoRA):
    pass


class UnsupportedSketchedLayer(BaseLayerWithLoRA):
    """Last of ours: a sketched layer no table-set wrapper took must not fall to a stock LoRA wrapper."""

    @classmethod
    def can_replace_layer(cls, source_layer: torch.nn.Module, lora_config: Any, packed_modules_list: list,
                          model_config: Any = None) -> bool:  # fmt: skip
        if _is_spallm_layer(source_layer):
            raise ValueError(
                f"spallm: no table-set wrapper for {type(source_layer).__name__} {source_layer.prefix} "
                f"(packed modules {packed_modules_list}); leave it out of --lora-target-modules"
            )
        return False


TABLE_SET_CLASSES = (
    ColumnParallelLinearWithTableSets,
    MergedColumnParallelLinearWithTableSets,
    QKVParallelLinearWithTableSets,
    MergedQKVParallelLinearWithTableSets,
    RowParallelLinearWithTableSets,
    ReplicatedLinearWithTableSets,
    UnsupportedSketchedLayer,
)


# -------------------------------------------------------------------------------------------------
# loading our PEFT adapter folders


def is_spallm_adapter(path: str | Path) -> bool:
    config = Path(path) / ADAPTER_CONFIG_NAME
    if not config.is_file():
        return False
    return str(read_json(config).get("peft_type", "")).upper() == "SPALLM"


def served_quant_config(model: torch.nn.Module) -> SpaLLMQuantizationConfig | None:
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, SpaLLMLinearMethod):
            return method.config
    return None


def load_table_set(worker_manager: Any, lora_request: Any, path: str) -> Any:
    """Read a SpaLLM PEFT adapter folder into the ``LoRAModel`` vLLM's adapter manager expects. Under
    pipeline parallelism each stage's worker keeps the tables of its own layers."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.model_executor.models.utils import is_pp_missing_parameter

    from spallm_plugins.format import read_adapter

    model = worker_manager._adapter_manager.model
    served = served_quant_config(model)
    if served is None:
        raise AdapterBaseMismatchError(
            f"{path}: a SpaLLM adapter (table set) needs a sketched model served with --quantization spallm"
        )
    try:
        config, sketch, modules = read_adapter(path)
    except CheckpointError as err:
        raise AdapterBaseMismatchError(str(err)) from None
    own_codes = sorted(m for m, parts in modules.items() if "codes" in parts)
    if own_codes:
        raise AdapterBaseMismatchError(
            f"{path}: carries its own codes (for {own_codes[0]}, ...): it was trained on a dense base, so it is "
            "not a table set over the served codes; serve `spallm merge BASE ADAPTER --out DIR` instead"
        )
    for name in ("bits", "groups_per_row", "table_dtype"):
        if getattr(sketch, name) != getattr(served.sketch, name):
            raise AdapterBaseMismatchError(
                f"{path}: adapter has {name}={getattr(sketch, name)!r} but the served model has "
                f"{getattr(served.sketch, name)!r}"
            )
    served.check_codes_fingerprint(sorted(modules), config, where=path)
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    manager = worker_manager._adapter_manager
    wrapped = set(manager.modules).union(*manager.packed_modules.values())
    loras = {}
    for module, parts in sorted(modules.items()):
        name = mapper._map_name(module) if mapper is not None else module
        if name is None or name not in wrapped:
            if name is not None and is_pp_missing_parameter(name, model):
                continue  # a layer of another pipeline stage: that stage's worker loads its tables
            raise AdapterBaseMismatchError(
                f"{path}: adapted layer {module} is not served with table sets here (it would silently keep "
                "the base tables): add its name to --lora-target-modules"
            )
        tables = parts["tables"]
        loras[name] = LoRALayerWeights(
            name, rank=1, lora_alpha=1, scaling=1.0,
            lora_a=torch.empty(TABLE_SET_MARKER_RANK, 0, dtype=tables.dtype),
            lora_b=tables.reshape(tables.shape[0], -1).contiguous(),
        )  # fmt: skip
    return LoRAModel(lora_request.lora_int_id, 1, loras)


def install() -> None:
    """Put the table-set wrappers first in vLLM's LoRA class list and route SpaLLM adapter folders to
    :func:`load_table_set` (every other adapter still goes to vLLM's own reader). Idempotent."""
    import vllm.lora.utils as lora_utils
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import WorkerLoRAManager

    if TABLE_SET_CLASSES[0] not in lora_utils._all_lora_classes:
        lora_utils._all_lora_classes = (*TABLE_SET_CLASSES, *lora_utils._all_lora_classes)
    original = WorkerLoRAManager._load_adapter
    if getattr(original, "spallm_wrapped", False):
        return

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        if is_spallm_adapter(path):
            return load_table_set(self, lora_request, path)
        if served_quant_config(self._adapter_manager.model) is not None:
            raise AdapterBaseMismatchError(
                f"{path}: not a SpaLLM adapter (adapter_config.json peft_type is not SPALLM); a sketched model "
                "served with --quantization spallm takes SpaLLM table sets, not LoRA weights"
            )
        return original(self, lora_request)

    _load_adapter.spallm_wrapped = True
    WorkerLoRAManager._load_adapter = _load_adapter
