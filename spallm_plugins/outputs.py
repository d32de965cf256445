"""Where jobs write: the one rule for output folders, checked before any work is done.

Every command and Python job that writes a folder (sketch, merge, the quickstart, benchmarks) calls
:func:`prepare_output_dir` first. It refuses, naming the path:

* a file where a folder is asked for, the current directory (or a folder holding it), and a folder
  that is or holds a model being read: never, even with ``overwrite``;
* an existing non-empty folder, unless ``overwrite`` (``--overwrite``) is given; the job's own
  leftovers (e.g. ``.spallm-partial`` of a killed calibrated sketch) do not count;
* a location that cannot be written, or (roughly) lacks room for the output;
* a folder that another live process is writing (it holds the folder's lock, :func:`output_lock`).

Jobs decorated with :func:`writes_folder` hold that lock while they run, so a second writer of the same
folder is refused at once, naming the other's pid; the kernel releases a killed process's lock.

Before the non-empty rule it removes the temporaries a killed run left beside the output
(``.NAME.tmp-PID-*`` from :func:`spallm_plugins.format.atomic_path`, whose writer is gone) and says
so, and puts back a previous output that a kill caught half-replaced (``.NAME.old-*`` with no
``NAME``): the rule then applies to what was put back, so a run without ``--overwrite`` never
replaces it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, the other checks still hold
    fcntl = None  # type: ignore[assignment]

from .format import REPLACED_MARK, TEMPORARY_MARK, OutputError, current_umask, output_path

logger = logging.getLogger(__name__)
LOCK_MARK = ".spallm-lock"  # .{name}.spallm-lock beside the output: flock-ed by the process writing it
_held: dict[Path, int] = {}  # output folder -> descriptor of the lock this process holds
Job = TypeVar("Job", bound=Callable[..., Any])


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


def _cannot_write(path: Path, err: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write there ({err.strerror or err}); choose another location")


def _acquire(path: Path) -> int | None:
    """Lock ``path``'s lock file without waiting; refuse, naming the holder's pid, when another process has it.
    ``None`` where no lock file can be made: nothing can be written there, which :func:`prepare_output_dir` says."""
    lock = path.parent / f".{path.name}{LOCK_MARK}"
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{path}: another spallm run (pid {holder}) is writing this folder; wait for it to end or stop it "
                f"(its progress is kept), or give --out another folder"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we opened it: lock the new one
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the advisory lock of the output folder ``out`` (re-entrant within a process); yield its path.

    An ``flock`` on ``.NAME.spallm-lock`` beside the folder: the kernel drops it when the holder dies, so
    a killed run never leaves a stuck lock; the file is removed on release.
    """
    path = output_path(out)
    if fcntl is None or path in _held:
        yield path
        return
    fd = _acquire(path)
    if fd is None:
        yield path
        return
    _held[path] = fd
    try:
        yield path
    finally:
        del _held[path]
        (path.parent / f".{path.name}{LOCK_MARK}").unlink(missing_ok=True)  # while locked: no one holds it
        os.close(fd)


@contextlib.contextmanager
def turn(folder: str | os.PathLike) -> Iterator[None]:
    """Wait for, then hold, the turn to make or reuse ``folder``: processes that all need one folder (the ranks of
    a distributed run) take turns, so the first makes it and the others find it made."""
    path = output_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(path.parent / f".{path.name}.spallm-turn", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def writes_folder(parameter: str) -> Callable[[Job], Job]:
    """Run the decorated job holding the lock of the folder its argument ``parameter`` names, so two
    processes never write one folder (one would delete or replace the other's files)."""

    def decorate(job: Job) -> Job:
        signature = inspect.signature(job)

        @functools.wraps(job)
        def run(*args: Any, **kwargs: Any) -> Any:
            with output_lock(signature.bind(*args, **kwargs).arguments[parameter]):
                return job(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


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
    with output_lock(path):  # refused while another process writes it (a job holding the lock passes)
        pass
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


def check_output_file(path: str | os.PathLike, *, option: str = "--json") -> Path:
    """Check, before any work, that the file ``path`` can be written (not a folder; a writable location),
    so a long job does not fail only at its last step; return it as an absolute path."""
    path = output_path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; {option} must name a file")
    check_writable(path)
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
        raise _cannot_write(path, err) from None
    if need_bytes:
        free = shutil.disk_usage(path.parent).free
        if free < need_bytes:
            raise OutputError(
                f"{path}: not enough free space: the output needs about {need_bytes / (1 << 20):.1f} MiB, "
                f"{free / (1 << 20):.1f} MiB are free on that device"
            )
