"""vLLM ``QuantizationConfig`` + ``LinearMethod`` for format-v1 sketched checkpoints.

Per sketched linear the layer holds ``qweight`` (the packed uint8 ``codes``, renamed on load so vLLM's
LoRA plumbing finds the layer's device by its usual name) and ``tables`` ``[out, groups, 2**bits]``,
declared in ``create_weights`` for the sum of ``output_partition_sizes`` so fused ``qkv_proj`` /
``gate_up_proj`` load from the checkpoint's unfused names. Tensor parallel: column-parallel layers
shard rows (codes and tables together); row-parallel layers shard codes by columns and tables by
groups, or replicate the tables when one group spans several ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)
from vllm.model_executor.utils import set_weight_attrs

from spallm_plugins.config import QUANT_METHOD, SketchConfig, packed_width, packing_unit
from spallm_plugins.convert import is_target
from spallm_plugins.format import (
    CODES_SUFFIX,
    AdapterBaseMismatchError,
    check_codes_fingerprint,
    codes_fingerprint,
    read_tensors,
    validate_checkpoint_files,
)
from spallm_plugins.hooks import architecture_for, select_backend
from spallm_plugins.kernels import LUTProblem, prepare_weights, restore_weights

CODES_PARAM = "qweight"


class TensorParallelError(ValueError):
    """The sketch's groups cannot be split over the tensor-parallel ranks."""


def row_parallel_tables(
    groups_per_row: int, input_size: int, input_size_per_partition: int, rank: int
) -> tuple[str, int, int]:
    """How a row-parallel rank holds its tables: ``("shard", groups, first)`` or ``("replicate", groups, first)``.

    ``shard``: each rank owns ``groups`` whole groups (``groups_per_row`` divisible by the number of
    shards). ``replicate``: the checkpoint's whole tables are loaded on every rank and the rank keeps
    the one group its columns fall in (the number of shards divisible by ``groups_per_row``).
    """
    shards = input_size // input_size_per_partition
    if groups_per_row % shards == 0:
        return "shard", groups_per_row // shards, rank * (groups_per_row // shards)
    if shards % groups_per_row == 0:
        return "replicate", groups_per_row, (rank * input_size_per_partition) // (input_size // groups_per_row)
    raise TensorParallelError(
        f"spallm: groups_per_row={groups_per_row} cannot be split over {shards} tensor-parallel ranks "
        f"(a row-parallel layer gives each rank {input_size_per_partition} of {input_size} input columns): "
        f"use a tensor_parallel_size that divides or is a multiple of {groups_per_row}, or re-sketch with a "
        f"groups_per_row that divides or is a multiple of {shards}"
    )


@register_quantization_config(QUANT_METHOD)
class SpaLLMQuantizationConfig(QuantizationConfig):
    """``quant_method: "spallm"``: read from ``config.json``, validated by the core's SketchConfig."""

    def __init__(self, sketch: SketchConfig) -> None:
        super().__init__()
        self.sketch = sketch
        self.sketched_modules: set[str] | None = None  # from the checkpoint itself, when local
        self.default_targets: tuple[str, ...] | None = None
        self.checkpoint_dir: str | None = None
        self._fingerprints: dict[tuple[str, ...], str] = {}

    def __repr__(self) -> str:
        return f"SpaLLMQuantizationConfig({self.sketch})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SpaLLMQuantizationConfig:
        return cls(SketchConfig.from_dict(config, where="config.json quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Validate a local checkpoint before any weight is read and learn which linears it sketched."""
        spec = architecture_for(getattr(hf_config, "model_type", None))
        self.default_targets = spec.target_modules if spec else None
        if os.path.isdir(model_name):
            _, prefixes = validate_checkpoint_files(model_name)
            self.sketched_modules = set(prefixes)
            self.checkpoint_dir = model_name

    def check_codes_fingerprint(self, modules: list[str], adapter_config: dict[str, Any], where: str) -> None:
        """Refuse a table set trained on other codes than the served checkpoint's (the core's one policy)."""
        if not adapter_config.get("base_codes_fingerprint"):
            check_codes_fingerprint(adapter_config, "", adapter=where, base=str(self.checkpoint_dir))
        if self.checkpoint_dir is None:
            raise AdapterBaseMismatchError(
                f"{where}: the served model is not a local folder, so its codes cannot be checked"
            )
        key = tuple(sorted(modules))
        if key not in self._fingerprints:
            stored = read_tensors(self.checkpoint_dir, names={m + CODES_SUFFIX for m in key})
            codes = {n.removesuffix(CODES_SUFFIX): t for n, t in stored.items()}
            missing = sorted(set(key) - set(codes))
            if missing:
                raise AdapterBaseMismatchError(
                    f"{where}: adapted layer {missing[0]} is not sketched in {self.checkpoint_dir}"
                )
            self._fingerprints[key] = codes_fingerprint(codes)
        check_codes_fingerprint(adapter_config, self._fingerprints[key], adapter=where, base=self.checkpoint_dir)

    @staticmethod
    def get_checkpoint_weight_mapper():
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper(orig_to_new_suffix={CODES_SUFFIX: "." + CODES_PARAM})

    def _shard_sketched(self, name: str) -> bool:
        if self.sketched_modules is not None:
            return name in self.sketched_modules
        return is_target(name, self.sketch, self.default_targets)

    def is_sketched(self, prefix: str) -> bool:
        """Whether vLLM's layer ``prefix`` (possibly fused, e.g. ``qkv_proj``) is sketched."""
        parent, _, proj = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(proj)
        names = [f"{parent}.{s}" if parent else s for s in shards] if shards else [prefix]
        flags = {name: self._shard_sketched(name) for name in names}
        if len(set(flags.values())) > 1:
            raise ValueError(
                f"spallm: vLLM fuses {names} into {prefix}, but the checkpoint sketched only "
                f"{sorted(n for n, s in flags.items() if s)}; sketch all of them or none"
            )
        return next(iter(flags.values()))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return SpaLLMLinearMethod(self) if self.is_sketched(prefix) else UnquantizedLinearMethod()
        return None


@register_weight_loader_v2_supported_method
class SpaLLMLinearMethod(LinearMethodBase):
    """One LUT matmul per layer through the core's kernel backends (Triton on CUDA, PyTorch on CPU)."""

    def __init__(self, config: SpaLLMQuantizationConfig) -> None:
        self.config = config

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        sketch = self.config.sketch
        name = getattr(layer, "prefix", "") or "layer"
        sketch.check_in_features(input_size, name)
        weight_loader = extra_weight_attrs.pop("weight_loader")
        rows = sum(output_partition_sizes)
        per_byte, unit_bytes = packing_unit(sketch.bits)
        if input_size_per_partition % per_byte:
            raise TensorParallelError(
                f"spallm: {name}: {input_size_per_partition} input columns per tensor-parallel rank is not a "
                f"multiple of {per_byte} ({sketch.bits}-bit codes are packed {per_byte} per unit)"
            )
        mode, groups, first_group = "whole", sketch.groups_per_row, 0
        if input_size_per_partition != input_size:
            mode, groups, first_group = row_parallel_tables(
                sketch.groups_per_row, input_size, input_size_per_partition, get_tensor_model_parallel_rank()
            )
        codes_data = torch.empty(rows, packed_width(input_size_per_partition, sketch.bits), dtype=torch.uint8)
        if unit_bytes != 1:  # 3-bit: 8 codes per 3 bytes, no integer packing factor
            codes = ModelWeightParameter(data=codes_data, input_dim=1, output_dim=0, weight_loader=weight_loader)
        else:
            codes = PackedvLLMParameter(
                data=codes_data, input_dim=1, output_dim=0, packed_dim=1, packed_factor=per_byte,
                weight_loader=weight_loader,
            )  # fmt: skip
        tables_data = torch.empty(rows, groups, sketch.num_codes, dtype=sketch.torch_table_dtype())
        if mode == "replicate":
            tables = ChannelQuantScaleParameter(data=tables_data, output_dim=0, weight_loader=weight_loader)
        else:
            tables = GroupQuantScaleParameter(data=tables_data, output_dim=0, input_dim=1, weight_loader=weight_loader)
        layer.register_parameter(CODES_PARAM, codes)
        layer.register_parameter("tables", tables)
        set_weight_attrs(codes, extra_weight_attrs)
        set_weight_attrs(tables, extra_weight_attrs)
        layer.spallm_table_mode = mode
        layer.spallm_first_group = first_group
        layer.spallm_act_dtype = params_dtype
        layer.spallm_in_features = input_size_per_partition

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Pick the kernel backend once per layer and let it repack codes and tables into the layout
        its kernels read (its ``prepare_weights``, e.g. 3-bit bit planes); ``dequantize_weight``
        restores format v1. Per-request table sets reach ``forward_table_sets`` in format v1 (no
        backend repacks tables today)."""
        tables = layer.tables.data
        if layer.spallm_table_mode == "replicate":
            tables = tables[:, layer.spallm_first_group : layer.spallm_first_group + 1]
        layer.tables = torch.nn.Parameter(tables.contiguous(), requires_grad=False)
        layer.qweight = torch.nn.Parameter(layer.qweight.data, requires_grad=False)
        problem = LUTProblem(
            device_type=layer.qweight.device.type,
            dtype=layer.spallm_act_dtype,
            table_dtype=layer.tables.dtype,
            bits=self.config.sketch.bits,
            in_features=layer.spallm_in_features,
            out_features=layer.tables.shape[0],
            groups_per_row=layer.tables.shape[1],
            rows=1,
        )
        backend = select_backend(problem)
        codes, tables = prepare_weights(backend, layer.qweight.data, layer.tables.data, self.config.sketch.bits)
        layer.qweight = torch.nn.Parameter(codes, requires_grad=False)
        layer.tables = torch.nn.Parameter(tables, requires_grad=False)
        layer.spallm_backend = backend

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = layer.spallm_backend.forward(x2, layer.qweight, layer.tables, bias, self.config.sketch.bits)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def dequantize_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        from spallm_plugins.kernels.reference import dequantize

        bits = self.config.sketch.bits
        codes, tables = restore_weights(layer.spallm_backend, layer.qweight, layer.tables, bits)
        return dequantize(codes, tables, bits, layer.spallm_act_dtype)
