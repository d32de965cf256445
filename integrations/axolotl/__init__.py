"""Axolotl integration: ``adapter: spallm`` (``plugins: [spallm_plugins.integrations.axolotl.SpaLLMPlugin]``).

Axolotl logs and swallows a plugin's ImportError, after which ``adapter: spallm`` is merely "not
registered by a plugin"; so a failing import is reported here, loudly, before it is re-raised.
"""

import logging

try:
    from .args import SpaLLMArgs
    from .plugin import SpaLLMPlugin
except Exception:  # reported here, then re-raised
    logging.getLogger("spallm_plugins.axolotl").exception(
        "spallm: the Axolotl plugin could not be imported, so `adapter: spallm` will not be available. Cause:"
    )
    raise

__all__ = ["SpaLLMArgs", "SpaLLMPlugin"]
