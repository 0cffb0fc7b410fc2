"""Progress reporting that library code can call without printing: the CLI decides where it goes.

Library functions take ``progress: Progress | None``; the CLI passes :class:`RichProgress` on stderr,
which shows nothing when stderr is not a terminal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Task]: ...


class NullProgress:
    """Reports nothing (the default inside the library and in tests): its tasks are itself."""

    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Task]:
        return contextlib.nullcontext(self)

    def advance(self, n: int = 1, **fields: Any) -> None:
        return None


class RichProgress:
    """A Rich progress bar on ``console`` (the CLI's stderr) with samples/s and the latest loss; silent off a
    terminal."""

    def __init__(self, console: Any) -> None:
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if not self.console.is_terminal:
            yield NullProgress()
            return
        from rich import progress as rp
        from rich.text import Text

        class SpeedColumn(rp.ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed:,.1f}/s" if task.speed else "", style="cyan")

        columns = (
            rp.TextColumn("[bold]{task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            SpeedColumn(),
            rp.TextColumn("{task.fields[info]}"),
            rp.TimeElapsedColumn(),
            rp.TimeRemainingColumn(),
        )
        with rp.Progress(*columns, console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total, info="")

            class _T:
                def advance(self, n: int = 1, **fields: Any) -> None:
                    info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                    bar.update(tid, advance=n, **({"info": info} if fields else {}))

            yield _T()


def get(progress: Progress | None) -> Progress:
    return progress if progress is not None else NullProgress()
