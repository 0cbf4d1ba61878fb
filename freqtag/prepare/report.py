"""``STORE.report.tsv`` (every skipped track and why) and the outcome of a run, :class:`PrepareReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from freqtag.prepare.pool import one_line

__all__ = ["PrepareReport", "report_path", "read_report", "write_report"]

REPORT_HEADER = ("track_id", "path", "reason")


@dataclass
class PrepareReport:
    """The outcome of one run. ``total == written + len(skipped)``.

    ``written`` counts the tracks the final store holds (including those kept
    from an interrupted run, also counted in ``resumed``). With
    ``already_complete`` the store existed before the run and was left as it
    was; ``skipped`` then lists the requested tracks it lacks.
    """

    out: Path
    total: int
    written: int
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0
    already_complete: bool = False

    @property
    def report(self) -> Path:
        return report_path(self.out)


def report_path(out: str | Path) -> Path:
    """``STORE.report.tsv``, beside the store (and beside ``STORE.partial/``)."""
    out = Path(out)
    return out.with_name(out.name + ".report.tsv")


def write_report(path: Path, skipped: Sequence[tuple[str, str, str]]) -> None:
    lines = ["\t".join(REPORT_HEADER)] + ["\t".join(one_line(c) for c in row) for row in skipped]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def read_report(path: str | Path) -> list[tuple[str, str, str]]:
    """The rows of a ``STORE.report.tsv`` (empty if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return [(r[0], r[1], r[2]) for r in rows if len(r) == 3]
