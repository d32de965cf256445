"""``SpaLLMQuantConfig``: the core's SketchConfig as a transformers quantization config."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from spallm_plugins.config import QUANT_METHOD, SketchConfig


class SpaLLMQuantConfig(QuantizationConfigMixin):
    """Wraps :class:`spallm_plugins.config.SketchConfig`; every field and check lives there.

    ``from_pretrained(dense_dir, quantization_config=SpaLLMQuantConfig(bits=4, groups_per_row=4))``
    sketches on load; a sketched checkpoint's ``config.json`` carries the same dict. As with transformers'
    ``GPTQConfig``, ``dataset`` (texts, a ``datasets.Dataset``, ``hf://datasets/ORG/NAME?...`` or a file; its text
    column ``dataset_column``) and ``tokenizer`` (an object, or a Hub id or folder; default: the model's) make the
    sketch calibrated, block by block as ``spallm sketch`` does. They are used on load and never serialised: the
    saved config records the calibration by name and digest.
    """

    def __init__(self, dataset: Any = None, tokenizer: Any = None, dataset_column: str | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        if dataset is not None:
            kwargs.setdefault("method", "gptq")
            if isinstance(dataset, str):
                kwargs.setdefault("calibration", dataset)
        self.sketch = SketchConfig.from_dict(kwargs, where="SpaLLMQuantConfig")
        self.dataset, self.tokenizer, self.dataset_column = dataset, tokenizer, dataset_column

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
