"""``SpaLLMConfig``: the PEFT config of the ``spallm`` method, serialised as ``adapter_config.json``.

The sketch settings mean exactly what the core's :class:`~spallm_plugins.config.SketchConfig` fields
mean, and are validated by it (``sketch_config()``); they are declared here, as PEFT configs declare
theirs, so IDEs, type checkers and docs see them. A test keeps names and defaults in step with the core.
``target_modules`` takes PEFT's richer form (names, a regex, or ``"all-linear"``). ``bits``,
``groups_per_row`` and ``table_dtype`` default to ``None``: on a sketched base they are read from the base
(and must match it when given); on a dense base ``bits`` and ``groups_per_row`` take the core's defaults
and ``table_dtype`` the target weights' dtype (PEFT's rule: adapter weights follow the base weights).
The resolved values are written back, so a saved ``adapter_config.json`` is explicit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from spallm_plugins.config import FORMAT_VERSION, SketchConfig
from spallm_plugins.format import ADAPTER_WEIGHTS_NAME

from .constants import spallm_peft_type

# set from the base model when None (a sketched base fixes them)
FROM_BASE = ("bits", "groups_per_row", "table_dtype")
# SketchConfig fields PEFT already owns, with its own semantics
PEFT_OWNED = ("target_modules",)

_SKETCH = SketchConfig()


@dataclass
class SpaLLMConfig(PeftConfig):
    """Configuration of a SpaLLM adapter (PEFT method ``spallm``).

    SpaLLM adapts a linear layer by training its lookup tables over frozen k-bit codes; nothing is
    added beside the layer. On a sketched base (loaded through the ``spallm`` quantizer) an adapter
    is a table set over the base's shared codes; on a dense base the target weights are sketched at
    injection (data-free, or calibrated when ``calibration`` names data) and the adapter stores codes
    too.

    Args:
        target_modules: Module names or a regex of the linears whose tables are trained; ``"all-linear"``
            for every linear but the output layer; None for the architecture's default.
        exclude_modules: Module names or a regex to leave out.
        layers_to_transform: Only these layer indices are adapted.
        layers_pattern: Name of the layer list, used with ``layers_to_transform``.
        modules_to_save: Modules besides the tables to train and save (e.g. a classifier head).
        init_weights: True: the adapter starts as the base. False: tables are perturbed (for tests).
        base_codes_fingerprint: Fingerprint of the sketched base's codes the adapter was trained on.
        bits, groups_per_row, table_dtype, modules_to_not_convert, method, calibration, nsamples,
            seqlen, damping, grid_exponent, act_order, true_sequential, refit, refit_rounds, kmeans_iters,
            kmeans_restarts, tune_steps, tune_lr, seed, format_version: the sketch settings, as in ``SketchConfig``.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex of the linears whose tables are trained; 'all-linear' for every "
            "linear but the output layer; None for the architecture's default (spallm_architectures hook)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave out."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only these layer indices are adapted."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the tables to train and save (e.g. a classifier head)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter starts as the base (tables copied or sketched). False: tables are perturbed "
            "(for tests that need a non-identity adapter)."
        },
    )
    base_codes_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Fingerprint of the sketched base's codes this adapter was trained on (set at injection); "
            "loading onto a base with other codes, or an adapter without one, is refused."
        },
    )
    bits: int | None = field(
        default=None, metadata={"help": "Bits per code, 2, 3 or 4. None: the sketched base's, else 4."}
    )
    groups_per_row: int | None = field(
        default=None,
        metadata={
            "help": "Table groups per weight row, 1..8 (2**bits values each). None: the sketched base's, else 1."
        },
    )
    table_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Storage dtype of the tables: float16, bfloat16 or float32. None: the sketched base's tables' "
            "dtype, or a dense base's weight dtype."
        },
    )
    modules_to_not_convert: list[str] = field(
        default_factory=lambda: list(_SKETCH.modules_to_not_convert),
        metadata={"help": "Linears never adapted (default: lm_head)."},
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "How a dense base is sketched at injection: 'kmeans' (data-free) or 'gptq' (calibrated; the "
            "default when calibration is set)."
        },
    )
    calibration: str | None = field(
        default=_SKETCH.calibration,
        metadata={"help": "Calibration data for method 'gptq': a file or folder, or hf://datasets/ORG/NAME[?...]."},
    )
    nsamples: int = field(default=_SKETCH.nsamples, metadata={"help": "Calibration sequences (method 'gptq')."})
    seqlen: int = field(default=_SKETCH.seqlen, metadata={"help": "Tokens per calibration sequence."})
    damping: float = field(default=_SKETCH.damping, metadata={"help": "Fraction of the mean Hessian diagonal added."})
    grid_exponent: float = field(
        default=_SKETCH.grid_exponent, metadata={"help": "p in the loss-error-aware k-means weights U_cc ** -p."}
    )
    act_order: bool = field(default=_SKETCH.act_order, metadata={"help": "Assign codes by descending H_cc."})
    true_sequential: bool = field(
        default=_SKETCH.true_sequential,
        metadata={"help": "Sketch a block's linears in forward-order stages, each through the sketched ones."},
    )
    refit: bool = field(default=_SKETCH.refit, metadata={"help": "Refit tables with the codes fixed."})
    refit_rounds: int = field(default=_SKETCH.refit_rounds, metadata={"help": "Assignment/refit rounds, 1..8."})
    kmeans_iters: int = field(default=_SKETCH.kmeans_iters, metadata={"help": "Lloyd iterations of the k-means."})
    kmeans_restarts: int = field(
        default=_SKETCH.kmeans_restarts, metadata={"help": "Seeded k-means++ starts besides the fixed ones."}
    )
    tune_steps: int = field(
        default=_SKETCH.tune_steps, metadata={"help": "Adam steps on each block's tables after sketching (0: none)."}
    )
    tune_lr: float = field(default=_SKETCH.tune_lr, metadata={"help": "Learning rate of the block table tuning."})
    seed: int = field(default=_SKETCH.seed, metadata={"help": "Seed of the k-means starts and calibration sampling."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Format of codes and tables (1)."})

    loading_from = None  # class attribute, not a field: a local adapter folder being loaded, never serialised

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = spallm_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("SpaLLMConfig: layers_pattern is only used with layers_to_transform; set both or neither")
        self.sketch_config()  # validates every sketch field with the core's rules

    @staticmethod
    def sketch_field_names() -> tuple[str, ...]:
        """The core SketchConfig fields this config carries (all but the PEFT-owned ``target_modules``)."""
        return tuple(n for n in SketchConfig.field_names() if n not in PEFT_OWNED)

    def sketch_config(self, **resolved: Any) -> SketchConfig:
        """The core SketchConfig these settings describe (``None`` fields: ``resolved`` or core defaults)."""
        values = {name: getattr(self, name) for name in self.sketch_field_names()}
        values.update(resolved)
        values = {k: v for k, v in values.items() if v is not None or k not in FROM_BASE}
        try:
            return SketchConfig(**values)
        except ValueError as err:
            raise ValueError(f"SpaLLMConfig: {err}") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's loader, remembering a local adapter folder so its tensors are checked before injection."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS_NAME)):
            config.loading_from = os.fspath(path)
        return config
