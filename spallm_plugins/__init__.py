"""spallm-plugins: SpaLLM sketched parameter adaptation for PEFT, transformers, Axolotl and vLLM.

Importing this package is cheap (no torch); names below load on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "SketchConfig": "spallm_plugins.config",
    "sketch_pretrained": "spallm_plugins.pipeline",
    "SketchResult": "spallm_plugins.pipeline",
    "load_calibration": "spallm_plugins.sketch.calibration",
    "SketchedLinear": "spallm_plugins.layer",
    "sketch_linear": "spallm_plugins.sketch",
    "lut_linear": "spallm_plugins.ops",
    "validate_checkpoint": "spallm_plugins.validate",
}
# Integration classes live with their integration (the core below never imports one); the root is the public
# facade and names them, loaded on first use, as `from peft import LoraConfig` works.
_LAZY.update(
    {
        "SpaLLMQuantConfig": "spallm_plugins.integrations.transformers",
        "SpaLLMConfig": "spallm_plugins.integrations.peft",
    }
)

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):  # -> Any; no typing import, to keep interpreter start cheap
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spallm_plugins' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
