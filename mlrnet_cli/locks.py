"""Advisory folder locks, so two runs never write the same outputs or delete each other's temp files.

A writing stage (``collect-losses``, ``train``) holds its output folder's lock for the whole run: a second
run on the same workspace fails at once with one line, instead of crashing later or mixing the two runs'
files. A cache folder can be shared by many runs (the benchmarks link one cache into several workspaces):
writers hold it shared while they write, and temp files a killed run left there are removed only when
nobody else holds it. The locks are ``flock`` locks on a ``.mlrnet-lock`` file in the folder: the kernel
drops them when a process dies, so a killed run never leaves a folder locked. Where ``fcntl`` does not
exist (Windows) the locks do nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mlrnet_cli.errors import ArtifactError, WorkspaceBusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".mlrnet-lock"


def _open(folder: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ArtifactError(
            f"cannot create {folder / LOCK_NAME}: {e.strerror or e}", "choose another output path or check permissions"
        ) from e


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another mlrnet run"


@contextlib.contextmanager
def exclusive(folders: Path | list[Path], what: str) -> Iterator[None]:
    """Hold the lock of every folder in ``folders`` for ``what`` (e.g. ``train``), or raise WorkspaceBusyError."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    unique = sorted({Path(f).absolute() for f in ([folders] if isinstance(folders, Path) else folders)})
    with contextlib.ExitStack() as stack:
        for folder in unique:
            if not folder.exists():  # a run that fails early leaves no empty folder behind
                stack.callback(_remove_if_only_lock, folder)
            fd = _open(folder)
            stack.callback(os.close, fd)  # closing the file releases its lock
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceBusyError(
                    f"{folder} is in use by {_holder(fd)}",
                    "wait for it to finish, or give this run another --workdir",
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"mlrnet {what} (pid {os.getpid()})\n".encode(), 0)
            stack.callback(os.ftruncate, fd, 0)  # runs before the close: a released lock names nobody
        yield


def _remove_if_only_lock(folder: Path) -> None:
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()


@contextlib.contextmanager
def shared(folder: Path) -> Iterator[None]:
    """Hold ``folder`` shared while writing into it (waits while a cleaner holds it exclusively)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = _open(Path(folder))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def if_unused(folder: Path) -> Iterator[bool]:
    """Yield True while holding ``folder`` exclusively, or False at once if another run holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        yield True
        return
    if not Path(folder).is_dir():
        yield False
        return
    fd = _open(Path(folder))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
