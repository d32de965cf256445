"""PEFT integration: the ``spallm`` adapter type (``SpaLLMConfig``, ``SpaLLMModel``, ``SpaLLMLayer``).

Names load on first use, so importing this package (as the auto-registration does while PEFT itself
is being imported) pulls in nothing from PEFT.
"""

_LAZY = {
    "SpaLLMConfig": ".config",
    "SpaLLMModel": ".model",
    "SpaLLMLayer": ".layer",
    "AdapterBaseMismatchError": ".model",
    "register": ".registration",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name != "register":
        importlib.import_module(".registration", __name__).register()
    return getattr(importlib.import_module(module, __name__), name)
