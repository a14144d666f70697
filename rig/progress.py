"""The one progress bar of the CLI commands: rich, on stderr, quiet when stderr is not a terminal
(logs and CI get the commands' plain result lines instead)."""

from __future__ import annotations

from typing import Any


class Bar:
    """``with Bar("collecting (episodes)", total) as bar: bar(done)``.

    Calling the bar (``bar(completed, total=None, status=None)``) moves it to ``completed``;
    ``total`` (None: unknown) and a short ``status`` text after the bar can change on the way.
    Library functions take it as their ``progress`` callback."""

    def __init__(self, what: str, total: int | None = None, console: Any = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=console, disable=not console.is_terminal,
        )  # fmt: skip
        self._task = self._progress.add_task(what, total=total, status="")

    def __enter__(self) -> Bar:
        self._progress.start()
        return self

    def __call__(self, completed: int, total: int | None = None, status: str | None = None):
        changes: dict[str, Any] = {"completed": completed}
        if total is not None:
            changes["total"] = total
        if status is not None:
            changes["status"] = status
        self._progress.update(self._task, **changes)

    def __exit__(self, *exc) -> None:
        self._progress.stop()
