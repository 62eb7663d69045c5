"""Progress for long work: a live bar on a terminal, sparse parseable lines in CI and logs."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """Yield a callback `(done, total)`; draws a rich bar on a TTY, else one line per ~10%."""
    interactive = sys.stderr.isatty() and not os.environ.get("CI")
    if interactive:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
        ) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return
    last = [-1]

    def log(done: int, total: int) -> None:
        step = max(1, -(-total // 10))  # ceil: at most ~10 lines per task
        if done == total or done // step != last[0]:
            last[0] = done // step
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)

    yield log
