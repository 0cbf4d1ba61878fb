"""What ``freqtag prepare`` shows on stderr while it runs: a progress bar, then a spinner."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["progress_bar", "status"]


@contextmanager
def progress_bar(
    enabled: bool, total: int, done: int, frames_per_second: float = 1.0
) -> Iterator[Callable[[int], None]]:
    """A rich bar on stderr: files, hours of audio, rates, ETA.

    Yields ``advance(frames)``: one more file, whose features cover ``frames``
    frames (0 for a skipped file); hours of audio are counted from the frames.
    """
    if not enabled:
        yield lambda frames=0: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:  # type: ignore[no-untyped-def]
            files = f"{task.speed:.1f} files/s" if task.speed else "- files/s"
            seconds = task.fields["seconds"]
            realtime = f" {seconds / task.elapsed:.0f}x realtime" if task.elapsed and seconds else ""
            return Text(files + realtime)

    columns = (
        TextColumn("prepare"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("files"),
        TextColumn("{task.fields[hours]:.2f} h audio"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("files", total=total, completed=done, seconds=0.0, hours=0.0)
        seconds = 0.0

        def advance(frames: int = 0) -> None:
            nonlocal seconds
            seconds += frames / frames_per_second
            bar.update(task, advance=1, seconds=seconds, hours=seconds / 3600.0)

        yield advance


@contextmanager
def status(enabled: bool, message: str) -> Iterator[None]:
    """A spinner while the store is assembled (minutes for the full dataset, with no bar to move)."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
