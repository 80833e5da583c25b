"""Progress reporting for long steps. Library code reports; the CLI decides how (rich on a terminal, else quiet)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Step(Protocol):
    def advance(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def step(self, description: str, total: int | None = None) -> AbstractContextManager[Step]: ...


class _NullStep:
    def advance(self, n: int = 1) -> None:
        pass


class NullProgress:
    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Step]:
        yield _NullStep()


class RichProgress:
    """A spinner/bar per step on stderr, for interactive terminals."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as _Progress

        self._progress = _Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                   MofNCompleteColumn(), TimeElapsedColumn(),
                                   console=Console(stderr=True), transient=False)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Step]:
        task = self._progress.add_task(description, total=total)
        p = self._progress

        class _Step:
            def advance(self, n: int = 1) -> None:
                p.advance(task, n)

        try:
            yield _Step()
            if total is None:
                p.update(task, total=1, completed=1)
            else:
                p.update(task, completed=total)
        finally:
            p.stop_task(task)
