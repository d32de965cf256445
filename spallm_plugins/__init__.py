"""spallm-plugins: SpaLLM sketched parameter adaptation for PEFT, transformers, Axolotl and vLLM.

Importing this package is cheap (no torch); names below load on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "SketchConfig": "spallm_plugins.config",
    "SketchedLinear": "spallm_plugins.layer",
    "sketch_linear": "spallm_plugins.sketch",
    "lut_linear": "spallm_plugins.ops",
    "validate_checkpoint": "spallm_plugins.validate",
}
# Integration classes live with their integration (the core never imports one); the root says where.
_MOVED = {
    "SpaLLMQuantConfig": "from spallm_plugins.integrations.transformers import SpaLLMQuantConfig",
    "SpaLLMConfig": "from spallm_plugins.integrations.peft import SpaLLMConfig",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):  # -> Any; no typing import, to keep interpreter start cheap
    import importlib

    module = _LAZY.get(name)
    if module is None:
        hint = f"; {name} is an integration class: {_MOVED[name]}" if name in _MOVED else ""
        raise AttributeError(f"module 'spallm_plugins' has no attribute {name!r}{hint}")
    return getattr(importlib.import_module(module), name)
