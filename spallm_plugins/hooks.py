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
from typing import Any

import pluggy

from .kernels import KernelBackend, LUTProblem

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

    @hookspec
    def spallm_register_host(self, host: str) -> bool | None:
        """Register spallm with the host library ``host`` (``"transformers"``, ``"peft"``) now.

        An integration that serves ``host`` registers (idempotently) and returns True; others
        return None. This is how the core asks for registration without importing an integration.
        """

    @hookspec
    def spallm_adapter_config_fields(self) -> list[str] | None:
        """Return every field the ``adapter_config.json`` of a spallm adapter may hold (the PEFT config's),
        or None when this plugin does not define that config (or its host library is missing)."""


BUILTIN_PLUGIN = "builtin"  # this package's own entry point: the reference and Triton kernels, known architectures


class PluginsMissingError(RuntimeError):
    """The package's own ``spallm`` entry points are not installed (e.g. run from a source tree)."""


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: every ``spallm`` entry point, this package's own included.

    The built-in plugins come through the same entry-point group as third-party ones (no import
    from here), so a source tree without installed metadata has none: install it (``pip install
    --no-deps -e .``) and :func:`kernel_backends` says so otherwise.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(SpallmHookSpecs)
    for name, plugin in load_entry_points(ENTRY_POINT_GROUP).items():
        pm.register(plugin, name=name)
    return pm


def load_entry_points(group: str, *, missing_host_ok: bool = False) -> dict[str, Any]:
    """The loaded entry points of ``group`` by name (the first of a name wins): how the core reaches plugins
    and integrations without importing them. One that fails to load is left out, so a broken third-party
    plugin cannot break the core: with a warning, or silently for an ImportError when ``missing_host_ok``
    (an integration's command whose host library is not installed)."""
    loaded: dict[str, Any] = {}
    for ep in entry_points(group=group):
        if ep.name in loaded:
            continue
        try:
            loaded[ep.name] = ep.load()
        except ImportError as err:
            if not missing_host_ok:
                logger.warning("spallm: could not load plugin entry point %r (%s): %s", ep.name, ep.value, err)
        except Exception as err:
            logger.warning("spallm: could not load plugin entry point %r (%s): %s", ep.name, ep.value, err)
    return loaded


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object at run time (entry points are found automatically)."""
    get_plugin_manager().register(plugin, name=name)
    _plugins_changed()


def unregister_plugin(plugin: object) -> None:
    get_plugin_manager().unregister(plugin)
    _plugins_changed()


def _plugins_changed() -> None:
    select_backend.cache_clear()


def kernel_backends() -> list[KernelBackend]:
    """All registered kernel backends, highest priority first."""
    backends = [b for group in get_plugin_manager().hook.spallm_kernel_backends() for b in group]
    if not backends:
        raise PluginsMissingError(
            "spallm: no kernel backends are registered: the package's 'spallm' entry points are missing "
            "(running from a source tree?); install it: pip install --no-deps --no-build-isolation -e ."
        )
    return sorted(backends, key=lambda b: -b.priority)


def explain_backends(problem: LUTProblem) -> list[tuple[str, bool, str]]:
    """``(name, accepted, reason)`` for every backend in priority order (for ``spallm info --kernels``)."""
    return [(b.name, *b.can_implement(problem)) for b in kernel_backends()]


@functools.lru_cache(maxsize=1024)
def select_backend(problem: LUTProblem) -> KernelBackend:
    """The highest-priority backend that accepts ``problem`` (cached per problem; cleared when plugins change)."""
    for backend in kernel_backends():
        ok, _ = backend.can_implement(problem)
        if ok:
            return backend
    raise RuntimeError(f"no spallm kernel backend can run {problem}")


def register_host(host: str) -> bool:
    """Ask the integrations to register spallm with ``host`` now; True when one did."""
    return any(get_plugin_manager().hook.spallm_register_host(host=host))


def adapter_config_fields() -> set[str] | None:
    """The fields a spallm ``adapter_config.json`` may hold, from the integration that defines it; ``None``
    when none can say (PEFT not installed)."""
    answers = [a for a in get_plugin_manager().hook.spallm_adapter_config_fields() if a is not None]
    return set().union(*answers) if answers else None


def architectures() -> list[ArchitectureSpec]:
    return [a for group in get_plugin_manager().hook.spallm_architectures() for a in group]


def architecture_for(model_type: str | None) -> ArchitectureSpec | None:
    for spec in architectures():
        if model_type in spec.model_types:
            return spec
    return None
