"""Where jobs write: the one rule for output folders, checked before any work is done.

Every command and Python job that writes a folder (sketch, merge, the quickstart, benchmarks) calls
:func:`prepare_output_dir` first. It refuses, naming the path:

* a file where a folder is asked for, the current directory (or a folder holding it), and a folder
  that is or holds a model being read: never, even with ``overwrite``;
* an existing non-empty folder, unless ``overwrite`` (``--overwrite``) is given; the job's own
  leftovers (e.g. ``.spallm-partial`` of a killed calibrated sketch) do not count;
* a location that cannot be written, or (roughly) lacks room for the output.

Before the non-empty rule it removes the temporaries a killed run left beside the output
(``.NAME.tmp-PID-*`` from :func:`spallm_plugins.format.atomic_path`, whose writer is gone) and says
so, and puts back a previous output that a kill caught half-replaced (``.NAME.old-*`` with no
``NAME``): the rule then applies to what was put back, so a run without ``--overwrite`` never
replaces it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

from .format import REPLACED_MARK, TEMPORARY_MARK, OutputError, output_path

logger = logging.getLogger(__name__)


def _writer_alive(entry: str, mark: str) -> bool:
    """Whether the process named in a temporary's name (``...tmp-PID-xxxx``) still runs."""
    pid_text = entry.split(mark, 1)[1].split("-", 1)[0]
    if not pid_text.isdigit():
        return False  # a name from before temporaries carried their writer's pid
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dest: str | os.PathLike) -> list[str]:
    """Remove the temporaries that killed writers left beside ``dest``; return what was done, one line each.

    A ``.NAME.old-*`` folder while ``NAME`` is missing is the previous output, caught between the two
    renames of an atomic replace: it is put back, not removed.
    """
    dest = output_path(dest)
    parent = dest.parent
    if not parent.is_dir():
        return []
    done: list[str] = []
    for mark in (REPLACED_MARK, TEMPORARY_MARK):
        for entry in sorted(parent.glob(f".{dest.name}{mark}*")):
            if _writer_alive(entry.name, mark):
                continue
            if mark == REPLACED_MARK and not dest.exists():
                os.replace(entry, dest)
                done.append(
                    f"{dest}: put back the previous content from {entry.name} (a run was killed while replacing it)"
                )
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            done.append(f"removed {entry} (a temporary left by a killed run)")
    for line in done:
        logger.warning("spallm: %s", line)
    return done


def _describe(entries: list[Path]) -> str:
    shown = ", ".join(repr(e.name) for e in sorted(entries)[:3])
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}{', ...' if len(entries) > 3 else ''}"


def prepare_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike] = (),
    own_entries: Collection[str] = (),
    need_bytes: int | None = None,
    option: str = "--out",
) -> Path:
    """Check that writing the folder ``out`` loses nothing and can succeed; return it as an absolute path.

    ``sources`` are the paths the job reads (model folders, files): ``out`` may not be one of them nor
    hold one. ``own_entries`` are names inside ``out`` that belong to this job (its resumable state).
    ``need_bytes`` is the output's estimated size, checked against the free space. ``option`` names the
    setting in messages (``--out``; Python callers see the same words).
    """
    path = output_path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: is a file, not a folder; {option} must name a folder (new or empty)")
    cwd = output_path(Path.cwd())
    if path == cwd or path in cwd.parents:
        raise OutputError(
            f"{path}: is the current directory{'' if path == cwd else ' or holds it'}; "
            f"the output would replace it: give {option} a new folder"
        )
    real = Path(os.path.realpath(path))
    for source in sources:
        source_path = Path(os.path.realpath(output_path(source)))
        if source_path == real or real in source_path.parents:
            raise OutputError(
                f"{path}: is {'the model being read' if source_path == real else f'a folder holding {source_path}'}, "
                f"which the output would replace; give {option} another folder (--overwrite never allows this)"
            )
    remove_stale_temporaries(path)  # first: a restored previous output is judged by the rule below
    if path.is_dir() and not overwrite:
        entries = [e for e in path.iterdir() if e.name not in own_entries]
        if entries:
            raise OutputError(
                f"{path}: already exists and is not empty ({_describe(entries)}); pass --overwrite "
                f"(overwrite=True) to replace it, or give {option} a new folder"
            )
    check_writable(path, need_bytes=need_bytes)
    return path


def check_writable(path: str | os.PathLike, *, need_bytes: int | None = None) -> None:
    """Create ``path``'s parent if needed and prove a file can be written there, before any work."""
    path = output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{path}: cannot write there ({err.strerror or err}); choose another location") from None
    if need_bytes:
        free = shutil.disk_usage(path.parent).free
        if free < need_bytes:
            raise OutputError(
                f"{path}: not enough free space: the output needs about {need_bytes / (1 << 20):.1f} MiB, "
                f"{free / (1 << 20):.1f} MiB are free on that device"
            )
