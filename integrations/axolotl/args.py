"""The ``spallm:`` block of an Axolotl YAML, built from the core's SketchConfig fields (never redefined).

```yaml
base_model: meta-llama/Llama-3.2-1B   # a Hub id or a dense folder: sketched once into a cache, then trained
adapter: spallm
plugins: [spallm_plugins.integrations.axolotl.SpaLLMPlugin]
spallm:
  groups_per_row: 4        # any SketchConfig field: bits, table_dtype, calibration, nsamples, ...
  target_modules: [q_proj, v_proj]   # optional; default: the architecture's
  sketch_dir: outputs/base-sketch    # optional: where the sketched base is kept (default: $SPALLM_HOME/sketched/...)
```

Axolotl silently drops keys no plugin declares, so every key is declared here; unknown ones are an
error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from spallm_plugins.config import SketchConfig

EXTRA_KEYS = ("exclude_modules", "layers_to_transform", "modules_to_save", "init_weights")
PLUGIN_KEYS = ("sketch_dir",)  # the plugin's own: not adapter settings


def _options_model() -> type[BaseModel]:
    fields: dict[str, Any] = {f.name: (Any, None) for f in dataclasses.fields(SketchConfig)}
    fields.update({name: (Any, None) for name in (*EXTRA_KEYS, *PLUGIN_KEYS)})

    def check(cls, data):
        if isinstance(data, dict):
            sketch_keys = {k: v for k, v in data.items() if k in SketchConfig.field_names() and v is not None}
            sketch_keys.pop("target_modules", None)
            from spallm_plugins.integrations.peft import SpaLLMConfig

            SpaLLMConfig(**sketch_keys)  # the core's rules, with their messages
        return data

    return create_model(
        "SpaLLMOptions",
        __config__=ConfigDict(extra="forbid"),
        __validators__={"check_with_core": model_validator(mode="before")(check)},
        **fields,
    )


SpaLLMOptions = _options_model()


class SpaLLMArgs(BaseModel):
    """Declares the ``spallm:`` block to Axolotl's config schema."""

    spallm: SpaLLMOptions | None = Field(  # type: ignore[valid-type]
        default=None,
        description="SpaLLM sketch and adapter settings (adapter: spallm); fields of spallm_plugins' SketchConfig.",
    )
