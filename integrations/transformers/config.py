"""``SpaLLMQuantConfig``: the core's SketchConfig as a transformers quantization config."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from spallm_plugins.config import QUANT_METHOD, SketchConfig


class SpaLLMQuantConfig(QuantizationConfigMixin):
    """Wraps :class:`spallm_plugins.config.SketchConfig`; every field and check lives there.

    ``from_pretrained(dense_dir, quantization_config=SpaLLMQuantConfig(bits=4, groups_per_row=4))``
    sketches on load; a sketched checkpoint's ``config.json`` carries the same dict.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.sketch = SketchConfig.from_dict(kwargs, where="SpaLLMQuantConfig")

    @classmethod
    def from_sketch_config(cls, sketch: SketchConfig) -> SpaLLMQuantConfig:
        return cls(**sketch.to_dict())

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def __getattr__(self, name: str) -> Any:
        sketch = self.__dict__.get("sketch")
        if sketch is not None and name in SketchConfig.field_names():
            return getattr(sketch, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return self.sketch.to_quantization_config()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()
