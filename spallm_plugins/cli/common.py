"""What every command shares, the integrations' commands included: number formatting, the options
several commands take (``--out``/``--overwrite``, ``--revision``, the sketch settings), argparse types, and the
entry points through which integrations add commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import DENSE_DTYPES, SketchConfig


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def add_sketch_options(p: argparse.ArgumentParser, *, defaults_from_checkpoint: bool = False) -> None:
    default = None if defaults_from_checkpoint else argparse.SUPPRESS
    p.add_argument("--bits", type=int, default=default, help="bits per code: 2, 3 or 4 (default 4)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=default,
                   help="table groups per row, 1..8 (default 1)")  # fmt: skip
    p.add_argument("--table-dtype", dest="table_dtype", default=default, help="float16 (default), bfloat16, float32")
    p.add_argument("--targets", dest="target_modules", nargs="+", default=default,
                   help="linear names to sketch (default: the architecture's, else every linear)")  # fmt: skip
    p.add_argument("--skip", dest="modules_to_not_convert", nargs="+", default=default,
                   help="linear names to keep dense (default: lm_head)")  # fmt: skip


def add_output_options(p: argparse.ArgumentParser, *, what: str, default: str | None = None) -> None:
    """``--out`` and ``--overwrite``: the one rule for every command that writes a folder
    (:func:`spallm_plugins.outputs.prepare_output_dir`)."""
    p.add_argument("--out", default=default, required=default is None,
                   help=f"output folder for {what}; must be new or empty" + (f" (default {default})" if default else ""))  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output folder (never the input being read, nor a file)")  # fmt: skip


def add_revision_option(p: argparse.ArgumentParser, *, what: str = "the model", flag: str = "--revision") -> None:
    """``--revision``: the branch, tag or commit of a Hub id (``org/name``); one rule for every command."""
    p.add_argument(flag, dest=flag.removeprefix("--").replace("-", "_"), default=None, metavar="REV",
                   help=f"with a Hugging Face Hub id (org/name) as {what}: its branch, tag or commit "
                        "(default: the repo's main branch)")  # fmt: skip


def revision_for(ref: str, refs: list[str], revision: str | None) -> str | None:
    """``--revision`` of a command naming several models: it applies to the Hub ids among ``refs`` (a local
    path gets none); when no ref is a Hub id it stays, so that resolving says it does not apply."""
    from ..hub import looks_like_repo_id

    def is_hub(r: str) -> bool:
        return looks_like_repo_id(r) and not Path(r).exists()

    return revision if is_hub(ref) or not any(is_hub(r) for r in refs) else None


def add_dense_dtype_option(p: argparse.ArgumentParser, *, default_help: str) -> None:
    p.add_argument("--dense-dtype", dest="dense_dtype", choices=DENSE_DTYPES, default=None,
                   help=f"dtype of what stays dense: embeddings, norms, lm_head, biases (default: {default_help})")  # fmt: skip


def config_from_args(args: argparse.Namespace, base: SketchConfig | None = None) -> SketchConfig:
    fields = {k: getattr(args, k) for k in SketchConfig.field_names() if getattr(args, k, None) is not None}
    return (base or SketchConfig()).replace(**fields)


def _int_at_least(value: str, minimum: int, why: str = "") -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        because = f" ({why})" if why else ""
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}{because}, got {value!r}")
    return number


def window_tokens(value: str) -> int:
    """argparse type for a perplexity window length: an int >= 2 (one token predicts the next)."""
    return _int_at_least(value, 2, "a window needs 2 tokens")


def positive_int(value: str) -> int:
    """argparse type for a count that must be at least 1."""
    return _int_at_least(value, 1)


def memory_size(value: str) -> int:
    """argparse type for a memory budget such as ``2GiB``, ``1.5GB`` or a number of bytes."""
    from ..sketch.memory import parse_memory

    try:
        return parse_memory(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def quiet_hosts() -> None:
    """Silence the progress bars and info logs of transformers and huggingface_hub (for ``--quiet``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def task_names(value: str) -> list[str]:
    """argparse type for ``--tasks``: comma-separated task names (checked against the packaged tasks later)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {value!r}")
    return names


def harness_batch_size(value: str) -> int | str:
    """argparse type for lm-eval's batch size: a whole number of at least 1, or ``auto``."""
    return value if value == "auto" else _int_at_least(value, 1)


def check_json_output(args: argparse.Namespace) -> None:
    """``--json PATH`` must be writable before the work whose results it receives."""
    from ..outputs import check_output_file

    if args.json:
        check_output_file(args.json)


CLI_COMMANDS = "spallm.cli"  # entry points: add_commands(subparsers, bench_subparsers)
QUICKSTART_STEPS = "spallm.quickstart"  # entry point "finetune": (sketched_dir, adapter_dir, steps) -> dict


def integration_entry_points(group: str) -> dict[str, Any]:
    """The loaded entry points of ``group``: integrations add commands and steps this way, so the core never
    imports them. One whose host library is missing is left out."""
    from ..hooks import load_entry_points

    return load_entry_points(group, missing_host_ok=True)
