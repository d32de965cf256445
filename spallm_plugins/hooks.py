"""Extension points: pluggy hook specifications and the plugin manager (entry-point group ``spallm``).

A third-party package adds kernel backends or architectures without touching this repository::

    # its pyproject.toml
    [project.entry-points.spallm]
    mykernels = "mypkg.spallm_plugin"

    # mypkg/spallm_plugin.py
    from spallm_plugins.hooks import hookimpl

    @hookimpl
    def spallm_kernel_backends():
        return [MyBackend()]
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

PROJECT = "spallm"
ENTRY_POINT_GROUP = "spallm"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchitectureSpec:
    """Defaults for one family of models (matched on ``config.model_type``).

    ``target_modules`` are the linear-layer names sketched by default; ``fused_modules`` maps a fused
    serving-side name (vLLM's ``qkv_proj``) to the checkpoint names it concatenates.
    """

    model_types: tuple[str, ...]
    target_modules: tuple[str, ...]
    fused_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)


class SpallmHookSpecs:
    @hookspec
    def spallm_kernel_backends(self) -> list:
        """Return kernel backends (objects following ``spallm_plugins.kernels.KernelBackend``)."""

    @hookspec
    def spallm_architectures(self) -> list[ArchitectureSpec]:
        """Return architecture specs: default targets and fused-module names per model type."""


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: built-ins first, then every ``spallm`` entry point."""
    from . import builtin_plugins

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(SpallmHookSpecs)
    pm.register(builtin_plugins, name="spallm-builtin")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as err:  # a broken third-party plugin must not break the core
            logger.warning("spallm: could not load plugin entry point %r (%s): %s", ep.name, ep.value, err)
    return pm


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object at run time (entry points are found automatically)."""
    get_plugin_manager().register(plugin, name=name)
    _plugins_changed()


def unregister_plugin(plugin: object) -> None:
    get_plugin_manager().unregister(plugin)
    _plugins_changed()


def _plugins_changed() -> None:
    from .ops import select_backend

    select_backend.cache_clear()


def kernel_backends() -> list:
    """All registered kernel backends, highest priority first."""
    backends = [b for group in get_plugin_manager().hook.spallm_kernel_backends() for b in group]
    return sorted(backends, key=lambda b: -b.priority)


def architectures() -> list[ArchitectureSpec]:
    return [a for group in get_plugin_manager().hook.spallm_architectures() for a in group]


def architecture_for(model_type: str | None) -> ArchitectureSpec | None:
    for spec in architectures():
        if model_type in spec.model_types:
            return spec
    return None
