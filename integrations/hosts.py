"""The ``spallm`` plugin of the integrations: registers spallm with a host library when the core asks.

Loaded through the ``spallm`` entry point (the core never imports an integration); it imports a host
library's integration only when asked for that host, so building the plugin manager stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys

from spallm_plugins.hooks import hookimpl

REGISTRATIONS = {
    "transformers": "spallm_plugins.integrations.transformers.quantizer",
    "peft": "spallm_plugins.integrations.peft.registration",
}
DEFERRED_ATTRIBUTE = "_spallm_register_when_imported"  # set on a half-imported registration module


@hookimpl
def spallm_register_host(host: str) -> bool | None:
    name = REGISTRATIONS.get(host)
    if name is None:
        return None
    module = sys.modules.get(name)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
        # importing this very module imported the host (``import spallm_plugins.integrations.transformers``
        # before transformers): it has no ``register`` yet; its last line calls it when this flag is set
        setattr(module, DEFERRED_ATTRIBUTE, True)
        return True
    importlib.import_module(name).register()
    return True


@hookimpl
def spallm_adapter_config_fields() -> list[str] | None:
    try:
        config = importlib.import_module("spallm_plugins.integrations.peft.config")
    except ImportError:
        return None
    return [f.name for f in dataclasses.fields(config.SpaLLMConfig)]
