"""The verified-state record: which files were checked against their sha256, as they were then.

A re-run must not re-hash 5 GB of tars to learn what it verified yesterday,
yet must notice a file changed or removed since. Each entry keeps the file's
sha256 with its size and mtime when verified; a file whose size or mtime
differs is hashed again. The record is a cache: lost or corrupt, it costs one
re-hash of what is on disk, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from freqtag.system.atomic import atomic_write_text
from freqtag.system.faults import DiskFullError, disk_full

__all__ = ["STATE_NAME", "VerifiedState", "sha256_file"]

STATE_NAME = ".freqtag-download.json"
_VERSION = 1


def sha256_file(path: Path) -> str:
    """sha256 of a file read in 1 MiB blocks: memory stays flat whatever its size."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class VerifiedState:
    """Verified files (paths relative to ``out``) and the tracks each unpacked shard held; thread-safe."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / STATE_NAME
        self._lock = threading.Lock()
        self.files: dict[str, list] = {}  # rel -> [sha256, size, mtime_ns]
        self.unpacked: dict[str, list[str]] = {}  # shard name -> its tracks
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == _VERSION:
                self.files, self.unpacked = dict(data["files"]), dict(data["unpacked"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no record, or an unreadable one: everything is checked again

    def recorded(self, rel: str, sha256: str) -> bool:
        """True when ``rel`` was verified as ``sha256`` and its size and mtime are unchanged since."""
        entry = self.files.get(rel)
        if entry is None or entry[0] != sha256:
            return False
        try:
            st = os.stat(self.out / rel)
        except OSError:
            return False
        return [st.st_size, st.st_mtime_ns] == entry[1:]

    def verify(self, rel: str, sha256: str) -> bool:
        """True when ``rel`` is on disk with that sha256: from the record when it still holds, else hashed."""
        if self.recorded(rel, sha256):
            return True
        path = self.out / rel
        if not path.is_file() or sha256_file(path) != sha256:
            return False
        self.record(rel, sha256)
        return True

    def record(self, rel: str, sha256: str) -> None:
        st = os.stat(self.out / rel)
        with self._lock:
            self.files[rel] = [sha256, st.st_size, st.st_mtime_ns]

    def forget(self, rel: str) -> None:
        with self._lock:
            self.files.pop(rel, None)

    def set_unpacked(self, shard: str, tracks: list[str]) -> None:
        with self._lock:
            self.unpacked[shard] = sorted(tracks)

    def save(self) -> None:
        """Write the record whole (atomically): a kill leaves the previous one."""
        with self._lock:
            text = json.dumps({"version": _VERSION, "files": self.files, "unpacked": self.unpacked})
            try:
                atomic_write_text(self.path, text)
            except OSError as e:
                if disk_full(e):
                    raise DiskFullError(self.path, "the files on disk are kept and checked again by the same "
                                        "command") from None  # fmt: skip
                raise
