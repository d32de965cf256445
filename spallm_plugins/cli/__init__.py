"""spallm: sketch, evaluate and inspect SpaLLM checkpoints; spallm quickstart runs it all end to end."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from ..config import SketchConfigError
from . import bench, evaluate, fingerprint, info, merge, quickstart, sketch
from .common import CLI_COMMANDS, integration_entry_points, quiet_hosts


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="spallm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spallm-plugins {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (sketch, evaluate, info, merge, fingerprint):
        command.add_parser(sub)
    bench_commands = bench.add_parser(sub)
    quickstart.add_parser(sub)
    for add_commands in integration_entry_points(CLI_COMMANDS).values():
        add_commands(sub, bench_commands)
    return parser


_show_warning = warnings.showwarning


def _show_spallm_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """spallm's own warnings as one plain line (``spallm: ...``); others as Python shows them."""
    if str(message).startswith("spallm:"):
        print(f"{message}", file=sys.stderr if file is None else file)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """The one line after Ctrl-C: what was kept and, for a sketch with saved progress, the exact command
    that continues it."""
    from ..sketch.progress import PARTIAL_DIR, PROGRESS_FILE

    partial = Path(args.out) / PARTIAL_DIR if args.command == "sketch" else None
    if partial is None or not (partial / PROGRESS_FILE).is_file():
        return f"spallm {args.command}: interrupted (an output folder appears only when complete)"
    resume = shlex.join(["spallm", *argv, *([] if "--resume" in argv else ["--resume"])])
    return f"spallm sketch: interrupted; the progress is kept in {partial}; continue with: {resume}"


def main(argv: list[str] | None = None) -> int:
    from ..bench import BenchUnavailableError
    from ..format import CheckpointError
    from ..models import ModelNotFoundError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_hosts()
    warnings.showwarning = _show_spallm_warning
    try:
        return args.func(args)
    except (
        SketchConfigError,
        CheckpointError,
        ModelNotFoundError,
        ValueError,
        FileNotFoundError,
        BenchUnavailableError,
    ) as err:
        print(f"spallm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permissions, read-only or full file systems: one line naming the path
        where = f"{err.filename}: " if err.filename else ""
        print(f"spallm {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted(args, argv), file=sys.stderr)
        return 130
