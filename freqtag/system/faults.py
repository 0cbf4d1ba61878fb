"""What happens when the machine fails: a full disk, and named points where tests make the process die.

Two small pieces shared by the writers (:mod:`freqtag.data.store`, the checkpoint
writer in :mod:`freqtag.train.checkpoints`):

- :func:`disk_full` recognises "no space left" however deep a library wraps
  it (h5py raises ``OSError(28)``, ``torch.save`` a ``RuntimeError`` whose
  context is one), and :class:`DiskFullError` says which file could not be
  written and what to do, in one line.
- :func:`fault_point` marks a step of a multi-step write (a part renamed, the
  store assembled, the final rename). With ``FREQTAG_FAULT=NAME`` (or
  ``NAME@K``: the K-th time the point is reached) in the environment the
  process SIGKILLs itself there, exactly as a power cut or the OOM killer
  would stop it; ``NAME@K=enospc`` raises a full-disk error instead. Without
  the variable a point costs one dictionary look-up. The reliability tests
  (tests/system/test_faults.py) kill a run at every point and check that re-running
  the same command gives the same result as a run never interrupted.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

__all__ = ["DiskFullError", "disk_full", "fault_point", "FAULT_ENV", "free_space"]

FAULT_ENV = "FREQTAG_FAULT"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_hits: dict[str, int] = {}


class DiskFullError(OSError):
    """A write that failed for want of space; names the file, the free space and the fix."""

    def __init__(self, path: str | Path, what: str) -> None:
        path = Path(path)
        super().__init__(
            errno.ENOSPC,
            f"disk full while writing {path} (free space on its file system: {free_space(path.parent)}): "
            f"free some space and re-run; {what}",
        )
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


def free_space(folder: str | Path) -> str:
    """Free bytes where ``folder`` lives, readable ("1.2 GB"), or "unknown"."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000
    return "unknown"  # pragma: no cover


def disk_full(e: BaseException) -> bool:
    """True when ``e``, or an exception it was raised from or while handling, is ENOSPC / EDQUOT."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(cur) or "errno = 28" in str(cur):
            return True  # h5py / torch sometimes keep only the text of the C library's error
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def fault_point(name: str) -> None:
    """Die here (SIGKILL) or fail as a full disk when ``FREQTAG_FAULT`` names this point; else nothing."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, action = wanted.partition("=")
    target, _, nth = point.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)
