"""Files that appear whole or not at all: written under a temporary name beside the target, then renamed.

A reader (or a resumed run) never sees half a file under its final name; a
failed write leaves the previous file as it was and no temporary behind.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from freqtag.system.faults import DiskFullError, disk_full, fault_point

__all__ = ["atomic_path", "atomic_write_text", "atomic_write", "atomic_save", "atomic_save_bytes"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (``.NAME.PID.tmp``: one per writing process), renamed onto
    ``path`` when the block ends normally, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write`` into a temporary name, fsync, rename onto ``path``; full disk -> :class:`DiskFullError`."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write(f)
            fault_point(f"checkpoint.written:{path.name}")
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if disk_full(e):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written before"
            raise DiskFullError(path, kept) from None
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2 : -4]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary name, fsync, then rename: never a truncated file under ``path``.

    A full disk raises :class:`DiskFullError` naming the file, with the
    previous ``path`` untouched and the partial temporary file removed.
    Temporary files of writers that were killed (their pid is gone) are
    removed after a successful save, so kills never pile up dead copies.
    """
    import torch  # here, so that the text and byte writers stay free of torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_bytes(data: bytes | memoryview, path: str | Path) -> None:
    """:func:`atomic_save` of an object already serialised by ``torch.save`` (same file, same guarantees)."""
    atomic_write(path, lambda f: f.write(data))
