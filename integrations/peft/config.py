"""``SpaLLMConfig``: the PEFT config of the ``spallm`` method, serialised as ``adapter_config.json``.

The sketch settings are not redefined here: every field of the core's
:class:`~spallm_plugins.config.SketchConfig` (except ``target_modules``, which takes PEFT's richer
form: names, a regex, or ``"all-linear"``) is added to this dataclass from the core's definition,
with the core's defaults. ``bits``, ``groups_per_row`` and ``table_dtype`` default to ``None``: on a
sketched base they are read from the base (and must match it when given), on a dense base the core's
defaults apply. The resolved values are written back, so a saved ``adapter_config.json`` is explicit.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from spallm_plugins.config import SketchConfig
from spallm_plugins.format import ADAPTER_WEIGHTS_NAME

from .registration import PEFT_METHOD, add_enum_member

# set from the base model when None (a sketched base fixes them)
FROM_BASE = ("bits", "groups_per_row", "table_dtype")
# SketchConfig fields PEFT already owns, with its own semantics
PEFT_OWNED = ("target_modules",)


@dataclass
class _SpaLLMPeftFields(PeftConfig):
    """PEFT's own fields for a tuner that replaces target linears (names as in ``LoraConfig``)."""

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
            "loading onto a base with other codes is refused."
        },
    )


def _sketch_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` for every SketchConfig field, taken from the core's dataclass."""
    fields = []
    for f in dataclasses.fields(SketchConfig):
        if f.name in PEFT_OWNED:
            continue
        if f.name in FROM_BASE:
            spec = field(default=None, metadata={"help": f"SketchConfig.{f.name}; None: from a sketched base"})
            fields.append((f.name, f"{f.type} | None", spec))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, f.type, field(default_factory=f.default_factory, metadata={"help": "SketchConfig"})))
        else:
            fields.append((f.name, f.type, field(default=f.default, metadata={"help": "SketchConfig"})))
    return fields


def _post_init(self) -> None:
    _SpaLLMPeftFields.__post_init__(self)
    self.peft_type = add_enum_member(PeftType, PEFT_METHOD.upper(), PEFT_METHOD.upper())
    if isinstance(self.target_modules, list):
        self.target_modules = set(self.target_modules)
    if isinstance(self.exclude_modules, list):
        self.exclude_modules = set(self.exclude_modules)
    if self.layers_pattern and self.layers_to_transform is None:
        raise ValueError("SpaLLMConfig: layers_pattern is only used with layers_to_transform; set both or neither")
    self.sketch_config()  # validates every sketch field with the core's rules


def sketch_config(self, **resolved: Any) -> SketchConfig:
    """The core SketchConfig these settings describe (``None`` fields: ``resolved`` or core defaults)."""
    values = {name: getattr(self, name) for name, _, _ in _sketch_fields()}
    values.update(resolved)
    values = {k: v for k, v in values.items() if v is not None or k not in FROM_BASE}
    try:
        return SketchConfig(**values)
    except ValueError as err:
        raise ValueError(f"SpaLLMConfig: {err}") from None


@classmethod
def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
    """PEFT's loader, remembering a local adapter folder so its tensors are checked before injection."""
    config = PeftConfig.from_pretrained.__func__(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
    if os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS_NAME)):
        config.loading_from = os.fspath(path)
    return config


SpaLLMConfig = dataclasses.make_dataclass(
    "SpaLLMConfig",
    _sketch_fields(),
    bases=(_SpaLLMPeftFields,),
    namespace={
        "__post_init__": _post_init,
        "sketch_config": sketch_config,
        "from_pretrained": from_pretrained,
        "loading_from": None,  # class attribute, not a field: never serialised
        "__module__": __name__,
        "__doc__": """Configuration of a SpaLLM adapter (PEFT method ``spallm``).

    SpaLLM adapts a linear layer by training its lookup tables over frozen k-bit codes; nothing is
    added beside the layer. On a sketched base (loaded through the ``spallm`` quantizer) an adapter
    is a table set over the base's shared codes; on a dense base the target weights are sketched at
    injection (data-free, or calibrated when ``calibration`` names data) and the adapter stores codes
    too. Sketch fields are the core's :class:`~spallm_plugins.config.SketchConfig` fields.
    """,
    },
)
