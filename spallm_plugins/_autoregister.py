"""Register spallm with host libraries when they are imported, without the user importing spallm.

The installed ``spallm_plugins_autoregister.pth`` imports this module at interpreter start. It imports
nothing heavy: it adds a meta-path finder that, once ``transformers.quantizers.auto`` (or ``peft``)
has finished executing, asks the integrations to register with that host through the
``spallm_register_host`` hook (:func:`spallm_plugins.hooks.register_host`), so the core names no
integration. Set ``SPALLM_NO_AUTOREGISTER=1`` to opt out.
"""

import os
import sys

# module being imported -> host whose registration runs right after it
TRIGGERS = {
    "transformers.quantizers.auto": "transformers",
    "peft": "peft",  # the package: PEFT is complete then
}
OPT_OUT_VARIABLE = "SPALLM_NO_AUTOREGISTER"


def _warn(target: str, err: BaseException) -> None:
    import logging  # only on failure: keep interpreter start cheap

    logging.getLogger("spallm_plugins").warning("spallm: automatic registration via %s failed: %r", target, err)


def _run_registration(host: str) -> None:
    try:
        from .hooks import register_host

        register_host(host)
    except Exception as err:  # never break the host library's import
        _warn(host, err)


class _RegisteringLoader:
    """Delegates to the real loader and runs the registration after the module executed."""

    def __init__(self, loader, target: str) -> None:
        self._loader, self._target = loader, target

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run_registration(self._target)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class RegisteringFinder:
    """Wraps the loader of the trigger modules so registration runs after they execute."""

    def find_spec(self, fullname, path, target=None):
        target_module = TRIGGERS.get(fullname)
        if target_module is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, target_module)
                return spec
        return None


def install() -> None:
    if os.environ.get(OPT_OUT_VARIABLE, "").strip() not in ("", "0"):
        return
    if any(isinstance(f, RegisteringFinder) for f in sys.meta_path):
        return
    for name, target in TRIGGERS.items():
        if name in sys.modules:  # already imported (e.g. install() called late): register now
            _run_registration(target)
    sys.meta_path.insert(0, RegisteringFinder())


def ensure_registered() -> None:
    """Register with every host library now (for editable installs, where no ``.pth`` file runs)."""
    for target in TRIGGERS.values():
        _run_registration(target)


install()
