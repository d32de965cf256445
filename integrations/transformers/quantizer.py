"""``SpaLLMHfQuantizer``: loads sketched checkpoints and sketches dense ones on load."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from spallm_plugins.config import QUANT_METHOD
from spallm_plugins.convert import replace_with_empty, set_submodule, sketched_layers
from spallm_plugins.format import TABLES_SUFFIX, CheckpointError, read_file_headers, validate_sketched_tensors
from spallm_plugins.sketch import sketch_model
from spallm_plugins.sketch.calibration import CalibrationError, calibration_batch, load_calibration
from spallm_plugins.sketch.driver import sketch_model_calibrated
from spallm_plugins.validate import expected_shapes, validate_against_model

from .config import SpaLLMQuantConfig


class SpaLLMHfQuantizer(HfQuantizer):
    """Pre-sketched checkpoints: target linears become empty SketchedLinear before loading, and
    ``codes`` / ``tables`` load by name. Dense checkpoints with a ``SpaLLMQuantConfig``: the model
    loads densely and is sketched right after, data-free or, with calibration data, block by block.
    """

    requires_calibration = False
    quantization_config: SpaLLMQuantConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a ``device_map`` that offloads to the CPU or disk beside an accelerator.

        accelerate's offload keeps offloaded weights on the meta device until a forward pass, so
        sketch-on-load would read meta tensors and pre-sketched codes would never reach the LUT op.
        """
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            values = {str(v) for v in device_map.values()}
            offloaded = sorted(k for k, v in device_map.items() if str(v) in ("cpu", "disk"))
            if "disk" in values or (offloaded and values != {"cpu"}):
                raise ValueError(
                    f"spallm: device_map offloads {offloaded[:3]} to {'disk' if 'disk' in values else 'cpu'}; "
                    "SpaLLM layers cannot be offloaded (sketching and the LUT op need their weights resident). "
                    "Put the whole model on one device, or shard it with FSDP / vLLM instead"
                )

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        if not self.pre_quantized:
            refuse_dense_larger_than_memory(model, checkpoint_files)
            return model
        sketch = self.quantization_config.sketch
        if checkpoint_files:
            # Check the stored shapes against this model before any weight is read, so a bad
            # checkpoint fails with our message instead of a size-mismatch trace or random weights.
            shapes = {n: (h.shape, h.dtype) for n, h in read_file_headers(checkpoint_files).items()}
            folder = os.path.dirname(checkpoint_files[0])
            where = (
                str(checkpoint_files[0]) if len(checkpoint_files) == 1 else f"{folder} ({len(checkpoint_files)} shards)"
            )
            validate_sketched_tensors(shapes, sketch, where)
            validate_against_model(shapes, expected_shapes(model, sketch), where)
        replace_with_empty(model, sketch)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized:
            if self.quantization_config.sketch.method == "gptq":
                self._sketch_calibrated(model)
            else:
                sketch_model(model, self.quantization_config.sketch)
        sketch = self.quantization_config.sketch
        for name, layer in sketched_layers(model).items():
            if layer.tables.device.type != "meta" and not torch.isfinite(layer.tables).all():
                raise CheckpointError(
                    f"tensor {name}{TABLES_SUFFIX} holds non-finite values (NaN or inf): the checkpoint is damaged "
                    "or its fine-tune diverged"
                )
        table_dtype = sketch.torch_table_dtype()
        for layer in sketched_layers(model).values():
            if layer.tables.dtype != table_dtype:
                layer.tables.data = layer.tables.data.to(table_dtype)
        return model

    def _sketch_calibrated(self, model) -> None:
        """The block-by-block calibrated sketch of ``spallm sketch``; the config then records the calibration
        by name and digest (what ``save_pretrained`` writes)."""
        from transformers import AutoTokenizer

        config = self.quantization_config
        source = config.dataset if config.dataset is not None else config.sketch.calibration
        if source is None:
            raise CalibrationError(
                "SpaLLMQuantConfig(method='gptq') needs calibration data: dataset=texts, a datasets.Dataset, "
                "hf://datasets/ORG/NAME?... or a file"
            )
        tokenizer = config.tokenizer
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            name = os.fspath(tokenizer) if tokenizer is not None else model.name_or_path
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError) as err:
                raise CalibrationError(
                    f"SpaLLMQuantConfig: no tokenizer for the calibration texts at {name!r} ({err}); pass tokenizer=..."
                ) from None
        texts = load_calibration(source, column=config.dataset_column)
        sketch = config.sketch.replace(calibration=texts.record)
        ids = calibration_batch(texts, tokenizer, sketch.nsamples, sketch.seqlen, sketch.seed)
        sketch_model_calibrated(model, sketch, ids, device=next(model.parameters()).device)
        config.__dict__["sketch"] = sketch

    @property
    def is_trainable(self) -> bool:
        return True

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    def _dequantize(self, model, dtype: torch.dtype | None = None):
        for name, layer in sketched_layers(model).items():
            set_submodule(model, name, layer.to_linear(dtype))
        return model


def available_memory_bytes() -> int | None:
    """Memory the kernel says a new allocation can use now (``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def refuse_dense_larger_than_memory(model, checkpoint_files) -> None:
    """Sketch-on-load holds the whole dense model first: refuse up front when it cannot fit, and name the
    streaming command, instead of being killed for memory halfway through loading."""
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    available = available_memory_bytes()
    if available is None or needed <= available:
        return
    source = str(checkpoint_files[0].rsplit("/", 1)[0]) if checkpoint_files else "MODEL_DIR"
    raise ValueError(
        f"spallm: sketching while loading needs the whole dense model in memory ({needed / 2**30:.1f} GiB as "
        f"{next(model.parameters()).dtype}), and {available / 2**30:.1f} GiB are available. Sketch it by "
        f"streaming, one decoder block at a time, then load the result: spallm sketch {source} --out "
        f"SKETCHED_DIR (add --calib FILE to calibrate)"
    )


_registered = False


def register() -> None:
    """Register ``quant_method: "spallm"`` with transformers; safe to call any number of times."""
    global _registered
    if _registered:
        return
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SpaLLMQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SpaLLMHfQuantizer)
    _registered = True


# set by the registration hook (integrations.hosts) when transformers' import, triggered by importing this
# module, asked for the registration before ``register`` existed
if globals().get("_spallm_register_when_imported"):
    register()
