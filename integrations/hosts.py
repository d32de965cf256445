"""The ``spallm`` plugin of the integrations: registers spallm with a host library when the core asks.

Loaded through the ``spallm`` entry point (the core never imports an integration); it imports a host
library's integration only when asked for that host, so building the plugin manager stays cheap.
"""

from __future__ import annotations

import importlib

from spallm_plugins.hooks import hookimpl

REGISTRATIONS = {
    "transformers": "spallm_plugins.integrations.transformers.quantizer",
    "peft": "spallm_plugins.integrations.peft.registration",
}


@hookimpl
def spallm_register_host(host: str) -> bool | None:
    module = REGISTRATIONS.get(host)
    if module is None:
        return None
    importlib.import_module(module).register()
    return True
