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

    def __setattr__(self, name: str, value: Any) -> None:
        """A sketch field set on this object goes to (and is validated by) the one SketchConfig, so
        ``to_dict()`` always reports what is used; transformers' ``update()`` uses this too."""
        if name in SketchConfig.field_names() and "sketch" in self.__dict__:
            self.__dict__["sketch"] = self.sketch.replace(**{name: value})
            return
        super().__setattr__(name, value)

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the sketch fields among ``kwargs`` (validated together); return the keys that are not fields."""
        fields = {k: v for k, v in kwargs.items() if k in SketchConfig.field_names()}
        if fields:
            self.__dict__["sketch"] = self.sketch.replace(**fields)
        return {k: v for k, v in kwargs.items() if k not in fields}

    def to_dict(self) -> dict[str, Any]:
        return self.sketch.to_quantization_config()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()
