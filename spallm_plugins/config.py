"""The one definition of a SpaLLM sketch: bits, groups per row, table dtype, targets, sketch settings.

Every integration (transformers ``quantization_config``, PEFT ``adapter_config.json``, Axolotl YAML,
vLLM) translates to and from :class:`SketchConfig`; none redefines these fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

QUANT_METHOD = "spallm"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4)
MAX_GROUPS_PER_ROW = 8
TABLE_DTYPES = ("float16", "bfloat16", "float32")
# what a sketch may store the layers it leaves dense in (embeddings, norms, lm_head, biases)
DENSE_DTYPES = ("float32", "bfloat16", "float16")
SKETCH_METHODS = ("kmeans", "gptq")


def packing_unit(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of one packing unit of format v1: the one bits-to-packing rule.

    4-bit: two codes per byte; 2-bit: four per byte; 3-bit: eight codes per three bytes (a 24-bit
    word). Every packer, validator and loader derives its widths from this.
    """
    if bits == 3:
        return 8, 3
    if bits in (2, 4):
        return 8 // bits, 1
    raise ValueError(f"no format-v1 packing for {bits}-bit codes (expected one of {SUPPORTED_BITS})")


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per row of packed codes for a row of ``in_features`` codes."""
    codes, nbytes = packing_unit(bits)
    return in_features // codes * nbytes


def unpacked_width(packed_columns: int, bits: int) -> int:
    """``in_features`` of a row of ``packed_columns`` bytes."""
    codes, nbytes = packing_unit(bits)
    return packed_columns // nbytes * codes


class SketchConfigError(ValueError):
    """A sketch configuration value or key is invalid; the message names the key and what was expected."""


@dataclass
class SketchConfig:
    """How a model is (or was) sketched.

    ``bits`` and ``groups_per_row`` fix the storage: each row of a target weight is split into
    ``groups_per_row`` contiguous column groups, and each group owns ``2**bits`` table values.
    ``target_modules=None`` means "the architecture's default" (from the ``spallm`` architecture
    hook), falling back to every ``nn.Linear`` not listed in ``modules_to_not_convert``.
    The remaining fields record how the codes were found, so a checkpoint documents itself:
    ``method`` ``"kmeans"`` (data-free) or ``"gptq"`` (calibrated error feedback, see
    :mod:`spallm_plugins.sketch.gptq`; by default ``"gptq"`` when ``calibration`` is set), the ``calibration``
    source (a file or ``hf://datasets/...`` id; a sketch records it by name and digest, see
    :func:`spallm_plugins.sketch.calibration.load_calibration`) with ``nsamples`` x ``seqlen`` tokens, ``damping`` (fraction of the mean Hessian diagonal added to it), ``grid_exponent`` (p in
    the loss-error-aware k-means weights ``U_cc ** -p``), ``act_order``, ``true_sequential`` (sketch
    a decoder block's linears in forward-order stages, each calibrated through the sketched stages
    before it), ``refit`` and ``refit_rounds``; ``kmeans_iters`` and ``kmeans_restarts`` (seeded
    k-means++ starts besides the quantile and min-max-grid starts) with ``seed``; ``tune_steps`` and
    ``tune_lr`` (after a block's linears are sketched, Adam steps on its tables against the dense
    block's outputs, one calibration batch each; 0: none).
    """

    bits: int = 4
    groups_per_row: int = 1
    table_dtype: str = "float16"
    target_modules: list[str] | None = None
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"])
    method: str | None = None
    calibration: str | None = None
    nsamples: int = 64
    seqlen: int = 256
    damping: float = 0.01
    grid_exponent: float = 2.0
    act_order: bool = False
    true_sequential: bool = True
    refit: bool = True
    refit_rounds: int = 1
    kmeans_iters: int = 50
    kmeans_restarts: int = 2
    tune_steps: int = 0
    tune_lr: float = 5e-5
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.method is None:  # as the CLI: calibrated when there is calibration data, else data-free
            self.method = "gptq" if self.calibration else "kmeans"
        if isinstance(self.modules_to_not_convert, str):  # one name, as transformers users often write it
            self.modules_to_not_convert = [self.modules_to_not_convert]
        elif self.modules_to_not_convert is None:  # transformers' configs write null for "none"
            self.modules_to_not_convert = []
        elif isinstance(self.modules_to_not_convert, tuple):
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    @property
    def num_codes(self) -> int:
        """Table entries per row-group: ``2**bits``."""
        return 1 << self.bits

    def torch_table_dtype(self):  # -> torch.dtype; torch imported lazily to keep this module light
        import torch

        return getattr(torch, self.table_dtype)

    def validate(self) -> None:
        def fail(key: str, value: Any, expected: str) -> None:
            raise SketchConfigError(f"SketchConfig.{key}={value!r} is invalid: expected {expected}")

        if self.format_version != FORMAT_VERSION:
            fail("format_version", self.format_version, f"{FORMAT_VERSION} (the format this version reads)")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            fail("bits", self.bits, f"one of {SUPPORTED_BITS}")
        if (
            isinstance(self.groups_per_row, bool)
            or not isinstance(self.groups_per_row, int)
            or not 1 <= self.groups_per_row <= MAX_GROUPS_PER_ROW
        ):
            fail("groups_per_row", self.groups_per_row, f"an integer in 1..{MAX_GROUPS_PER_ROW}")
        if self.table_dtype not in TABLE_DTYPES:
            fail("table_dtype", self.table_dtype, f"one of {TABLE_DTYPES}")
        if self.method not in SKETCH_METHODS:
            fail("method", self.method, f"one of {SKETCH_METHODS}")
        if self.calibration is not None and not isinstance(self.calibration, str):
            fail(
                "calibration",
                self.calibration,
                "null or a file / hf://datasets/... source (texts go to the sketch call)",
            )
        if self.target_modules is not None and (
            isinstance(self.target_modules, str) or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            fail("target_modules", self.target_modules, "null or a list of module names")
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(t, str) and t for t in self.modules_to_not_convert
        ):
            fail("modules_to_not_convert", self.modules_to_not_convert, "a module name or a list of module names")
        if (
            isinstance(self.refit_rounds, bool)
            or not isinstance(self.refit_rounds, int)
            or not 1 <= self.refit_rounds <= 8
        ):
            fail("refit_rounds", self.refit_rounds, "an integer in 1..8")
        for key in ("nsamples", "seqlen", "kmeans_iters", "kmeans_restarts", "tune_steps", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(key, value, "a non-negative integer")
        if self.method == "gptq" and (self.nsamples < 1 or self.seqlen < 1):
            raise SketchConfigError(
                f"SketchConfig: method 'gptq' is calibrated and needs nsamples >= 1 and seqlen >= 1 "
                f"(got nsamples={self.nsamples}, seqlen={self.seqlen}); use method 'kmeans' for a data-free sketch"
            )
        if self.tune_steps and self.method != "gptq":
            raise SketchConfigError(
                f"SketchConfig: tune_steps={self.tune_steps} tunes tables on calibration data and needs method 'gptq' "
                f"(got method={self.method!r})"
            )
        if isinstance(self.tune_lr, bool) or not isinstance(self.tune_lr, (int, float)) or not 0 < self.tune_lr < 1:
            fail("tune_lr", self.tune_lr, "a number in (0, 1) (Adam's learning rate for block table tuning)")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 <= self.damping < 1:
            fail("damping", self.damping, "a number in [0, 1) (fraction of the mean Hessian diagonal)")
        if (
            isinstance(self.grid_exponent, bool)
            or not isinstance(self.grid_exponent, (int, float))
            or not 0 <= self.grid_exponent <= 16
        ):
            fail("grid_exponent", self.grid_exponent, "a number in [0, 16]")
        for key in ("act_order", "true_sequential", "refit"):
            if not isinstance(getattr(self, key), bool):
                fail(key, getattr(self, key), "true or false")

    def check_in_features(self, in_features: int, where: str = "layer") -> None:
        """Raise a clear ``ValueError`` when a layer of width ``in_features`` cannot be sketched."""
        if in_features % self.groups_per_row:
            raise ValueError(
                f"{where}: groups_per_row={self.groups_per_row} does not divide in_features={in_features}; "
                f"choose a groups_per_row that divides {in_features} or exclude this module"
            )
        per_unit, _ = packing_unit(self.bits)
        if in_features % per_unit:
            raise ValueError(
                f"{where}: in_features={in_features} must be a multiple of {per_unit} "
                f"to pack {self.bits}-bit codes (format v1)"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["target_modules"] is not None:
            data["target_modules"] = list(data["target_modules"])
        return data

    def to_quantization_config(self) -> dict[str, Any]:
        """The ``config.json["quantization_config"]`` dict of a sketched checkpoint."""
        return {"quant_method": QUANT_METHOD, **self.to_dict()}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "quantization_config") -> SketchConfig:
        """Build from a dict, rejecting unknown keys; ``quant_method`` must be ``"spallm"`` if present."""
        if not isinstance(data, dict):
            raise SketchConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise SketchConfigError(f"{where}: quant_method={method!r}, expected {QUANT_METHOD!r}")
        known = set(cls.field_names())
        if "true_sequential" not in data and known - {"true_sequential"} <= set(data):
            data["true_sequential"] = False  # written in full by a version before the field: sketched all at once
        unknown = sorted(set(data) - known)
        if unknown:
            raise SketchConfigError(f"{where}: unknown key(s) {unknown}; SpaLLM sketch settings are {sorted(known)}")
        if "format_version" in data and data["format_version"] != FORMAT_VERSION:
            raise SketchConfigError(
                f"{where}: format_version={data['format_version']!r} is not supported; "
                f"this spallm-plugins reads format_version {FORMAT_VERSION}"
            )
        try:
            return cls(**data)
        except SketchConfigError as err:
            raise SketchConfigError(f"{where}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str) -> SketchConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), where=str(path))

    def replace(self, **changes: Any) -> SketchConfig:
        return dataclasses.replace(self, **changes)
