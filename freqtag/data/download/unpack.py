"""A shard unpacked as a stream: every track checked against MTG's per-track list as it is written.

The tar is read once, front to back (``r|``), so a 5 GB shard never sits in
memory and is never read twice. A track appears under its name only once
written whole and matching its sha256; one that does not match is left out
and reported. Tracks already verified are not rewritten.
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable

from freqtag.data.download.fetch import Stopped
from freqtag.data.download.state import VerifiedState
from freqtag.system.atomic import atomic_path
from freqtag.system.faults import DiskFullError, disk_full, fault_point

__all__ = ["UnpackResult", "unpack_shard", "clean_stale_temporaries"]

_KEPT = "the shards and tracks verified so far are kept: the same command resumes"


@dataclass
class UnpackResult:
    tracks: list[str] = field(default_factory=list)  # in the list, on disk and verified
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (track, why)


class _Mismatch(Exception):
    pass


def unpack_shard(tar_path: Path, out: Path, track_sums: dict[str, str], state: VerifiedState,
                 stop: threading.Event, on_track: Callable[[], None]) -> UnpackResult:  # fmt: skip
    """Write the tracks of ``tar_path`` under ``out``, each verified; ``on_track`` after each one."""
    result = UnpackResult()
    with tarfile.open(tar_path, mode="r|") as tar:
        for member in tar:
            if stop.is_set():
                raise Stopped
            if member.isdir():
                continue
            name = _track_name(member.name)
            why = _refuse(member, name, track_sums)
            if why:
                result.failed.append((name or member.name, why))
                continue
            assert name is not None
            if state.verify(name, track_sums[name]):
                result.tracks.append(name)
            elif _write_track(tar.extractfile(member), out, name, track_sums[name], result):  # type: ignore[arg-type]
                state.record(name, track_sums[name])
                result.tracks.append(name)
                result.written += 1
            on_track()
    return result


def _track_name(member: str) -> str | None:
    """The member's path as MTG's list writes it (``NN/ID.npy``), or None if it would leave ``--out``."""
    parts = [p for p in PurePosixPath(member).parts if p not in ("", ".")]
    if not parts or member.startswith("/") or ".." in parts:
        return None
    return "/".join(parts)


def _refuse(member: tarfile.TarInfo, name: str | None, track_sums: dict[str, str]) -> str | None:
    if name is None:
        return "a path outside the output folder: not written"
    if not member.isfile():
        return "not a regular file in the tar: not written"
    if name not in track_sums:
        return "not in MTG's per-track checksum list: not written"
    return None


def _write_track(src: IO[bytes], out: Path, name: str, expected: str, result: UnpackResult) -> bool:
    """Copy one track to a temporary file, hashing it; rename only when the sha256 matches."""
    target = out / name
    try:
        with atomic_path(target) as tmp:
            digest = hashlib.sha256()
            with open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
                    digest.update(block)
            if digest.hexdigest() != expected:
                raise _Mismatch(digest.hexdigest())
            fault_point("download.track")  # written and checked, not yet under its name
        return True
    except _Mismatch as e:
        got = str(e)
        result.failed.append((name, f"sha256 {got[:12]}... in the tar, {expected[:12]}... in MTG's list: not written"))
        return False
    except OSError as e:
        if disk_full(e):
            raise DiskFullError(target, _KEPT) from None
        raise


def clean_stale_temporaries(out: Path) -> None:
    """Remove the temporaries of writers that were killed: tracks (``NN/.ID.npy.PID.tmp``), the state record."""
    for stale in [*out.glob("*/.*.tmp"), *out.glob(".*.tmp")]:
        if stale.is_file():
            stale.unlink(missing_ok=True)
