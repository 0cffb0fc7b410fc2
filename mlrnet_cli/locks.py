"""Advisory locks, so two runs never write the same outputs or delete each other's temp files.

A writing stage (``collect-losses``, ``train``) holds a lock on each output it writes (``losses.safetensors``,
``stage1/``, ``model/``) for the whole run: a second run writing the same output fails at once with one line,
instead of crashing later or mixing the two runs' files. Runs writing different outputs never wait, even in
one workspace (e.g. ``train --out model-plain`` beside ``train --out model-mlrnet``). The lock of an
output is a ``flock`` on ``.mlrnet-lock.<name>`` beside it, removed when the run ends (done or failed), so a
run leaves no lock file behind; the kernel drops the lock of a killed run, and its file is reused.

A cache folder can be shared by many runs (the benchmarks link one cache into several workspaces): writers
hold its ``.mlrnet-lock`` shared while they write, and temp files a killed run left there are removed only when
nobody else holds it. The kernel drops ``flock`` locks when a process dies, so a killed run never leaves
anything locked; the cache's one lock file stays. Where ``fcntl`` does not exist (Windows) the locks do nothing.
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


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as any file
    except OSError as e:
        raise ArtifactError(
            f"cannot create {path}: {e.strerror or e}", "choose another output path or check permissions"
        ) from e


def lock_file(output: Path) -> Path:
    """Where the lock of ``output`` (a file or folder a stage writes) lives: beside it."""
    return output.parent / f"{LOCK_NAME}.{output.name}"


def _remove_if_only_locks(folder: Path) -> None:
    with contextlib.suppress(OSError):
        entries = list(folder.iterdir())
        if all(p.name.startswith(LOCK_NAME) for p in entries):
            for p in entries:
                p.unlink()
            folder.rmdir()


@contextlib.contextmanager
def exclusive(outputs: Path | list[Path], what: str) -> Iterator[None]:
    """Hold the lock of every output in ``outputs`` for ``what`` (e.g. ``train``), or raise WorkspaceBusyError."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    unique = sorted({Path(o).absolute() for o in ([outputs] if isinstance(outputs, Path) else outputs)})
    with contextlib.ExitStack() as stack:
        for output in unique:
            if not output.parent.exists():  # a run that fails early leaves no empty folder behind
                stack.callback(_remove_if_only_locks, output.parent)
            path = lock_file(output)
            fd = _lock(path, output)
            stack.callback(os.close, fd)  # closing the file releases its lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"mlrnet {what} (pid {os.getpid()})\n".encode(), 0)
            # runs before the close, on every way out: the lock file goes while still held (see _lock)
            stack.callback(_unlink, path)
        yield


def _lock(path: Path, output: Path) -> int:
    """Open and flock ``path``; retry if the file was removed (by its releasing holder) while we waited on it."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = b""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0)
            os.close(fd)
            raise WorkspaceBusyError(
                f"{output} is being written by {holder.decode(errors='replace').strip() or 'another mlrnet run'}",
                "wait for it to finish, or write to another --workdir or output path",
            ) from None
        # a lock on a file that is no longer at ``path`` would lock nothing anyone else sees
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def shared(folder: Path) -> Iterator[None]:
    """Hold ``folder`` shared while writing into it (waits while a cleaner holds it exclusively)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with os.fdopen(_open(Path(folder) / LOCK_NAME), "rb") as fh:  # closing the file releases its lock
        fcntl.flock(fh, fcntl.LOCK_SH)
        yield


@contextlib.contextmanager
def if_unused(folder: Path) -> Iterator[bool]:
    """Yield True while holding ``folder`` exclusively, or False at once if another run holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        yield True
        return
    if not Path(folder).is_dir():
        yield False
        return
    with os.fdopen(_open(Path(folder) / LOCK_NAME), "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
