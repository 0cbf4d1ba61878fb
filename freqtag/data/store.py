"""The HDF5 feature store: every frame of every track in one file.

Layout (format version 1)::

    /features        float16 (total_frames, n_bands), contiguous, uncompressed
    /tracks/id       utf-8 strings (N,)
    /tracks/offset   int64 (N,)   first frame of each track in /features
    /tracks/length   int64 (N,)   frames of each track
    attrs: format, version, spec (JSON FeatureSpec), mean, std, stats_split, stats_tracks

Frames are stored time-major so that a crop of L frames is ONE contiguous
byte range (DESIGN.md said bands x frames; time-major makes the read a single
``memcpy`` instead of one strided read per band). Because the dataset is
contiguous and uncompressed, readers memory-map it at its HDF5 offset, opened
lazily in each process, so a store is safe to share across fork and spawn.

Writing is resumable and atomic: finished tracks are kept in
``STORE.partial/`` (one ``.npz`` per batch, each renamed into place when
complete); ``finish`` assembles ``STORE.tmp`` in the canonical track order and
renames it to ``STORE``. An interrupted run re-opens the partial folder and
does only the tracks that are missing; the assembled store does not depend on
how often, or where, the writing was interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch

from freqtag.features import FeatureSpec
from freqtag.system.faults import DiskFullError, disk_full, fault_point

__all__ = ["FeatureStore", "StoreWriter", "StoreError", "FORMAT", "VERSION", "remove_partial"]

FORMAT = "freqtag-store"
VERSION = 1
DTYPE = np.float16
_OPEN_PARTS = 16  # npz parts kept open at once while assembling
_LOAD_FRAMES = 1 << 16  # frames per block when loading the store band-major (16 MB of mel128)
_SCAN_FRAMES = 1 << 18  # frames per block when scanning for non-finite values (64 MB of mel128)
_SPACE_MARGIN = 1 << 20  # bytes beyond the frames and index that assembling a store may take (HDF5 metadata)
_EXP16 = np.uint16(0x7C00)  # float16 exponent bits: all set means inf or NaN


class StoreError(RuntimeError):
    """A store that cannot be used as asked (names the file and the fix)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureStore:
    """Read-only view of a store: index in memory, frames memory-mapped on first use.

    Pickling carries only the path and the small index, never an open file,
    so DataLoader workers (fork or spawn) each open their own map.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = (
                f"; an unfinished run left {partial}: re-run the same `freqtag prepare` to finish it"
                if partial.exists()
                else "; make one with `freqtag prepare` or `freqtag synth`"
            )
            raise StoreError(f"feature store {self.path} does not exist{hint}")
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise StoreError(f"{self.path} is not a freqtag feature store (no format attribute)")
                if int(f.attrs["version"]) != VERSION:
                    raise StoreError(
                        f"{self.path} has store format version {f.attrs['version']}, this freqtag reads "
                        f"{VERSION}: rebuild it with `freqtag prepare`"
                    )
                self.spec = FeatureSpec.from_json(f.attrs["spec"])
                self.mean = float(f.attrs["mean"])
                self.std = float(f.attrs["std"])
                self.stats_split = str(f.attrs["stats_split"])
                self.stats_tracks = int(f.attrs["stats_tracks"])
                self.track_ids: list[str] = [s.decode() for s in f["tracks/id"][()]]
                self.offsets: np.ndarray = f["tracks/offset"][()].astype(np.int64)
                self.lengths: np.ndarray = f["tracks/length"][()].astype(np.int64)
                ds = f["features"]
                self.n_frames, self.n_bands = (int(n) for n in ds.shape)
                self._byte_offset = ds.id.get_offset()
                if ds.dtype != DTYPE or self._byte_offset is None or ds.chunks is not None:
                    raise StoreError(f"{self.path}: /features is not a contiguous float16 dataset; rebuild it")
        except (OSError, KeyError) as e:
            raise StoreError(f"{self.path} is not a readable freqtag store ({e}); rebuild it") from e
        if self.n_bands != self.spec.n_mels:
            raise StoreError(f"{self.path}: {self.n_bands} bands stored but the spec says {self.spec.n_mels}")
        self._check_index()
        self.row = {t: i for i, t in enumerate(self.track_ids)}
        self._map: np.ndarray | None = None
        self._pid: int | None = None

    def _check_index(self) -> None:
        """The track index must describe the stored frames exactly; a store that disagrees is refused on open.

        Writers lay tracks out back to back in index order, so anything else
        (a gap, an overlap, frames no track owns, a file cut short by a copy)
        means the file was damaged or made by something else. Cheap: the
        index and the file size only, never the frames.
        """
        fix = "rebuild it with `freqtag prepare` (or copy it again if it was copied)"
        n = len(self.track_ids)
        if not (n == len(self.offsets) == len(self.lengths)):
            raise StoreError(
                f"{self.path}: the track index disagrees with itself ({n} ids, {len(self.offsets)} offsets, "
                f"{len(self.lengths)} lengths); {fix}"
            )
        if len(set(self.track_ids)) != n:
            dup = next(t for t in self.track_ids if self.track_ids.count(t) > 1)
            raise StoreError(f"{self.path}: track {dup} is listed twice in the track index; {fix}")
        if n and self.lengths.min() < 1:
            bad = self.track_ids[int(np.argmin(self.lengths))]
            raise StoreError(f"{self.path}: track {bad} has {int(self.lengths.min())} frames in the index; {fix}")
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]) if n else self.offsets
        if not np.array_equal(self.offsets, starts):
            bad = self.track_ids[int(np.flatnonzero(self.offsets != starts)[0])]
            raise StoreError(
                f"{self.path}: the track index and the data disagree (track {bad} does not start where the "
                f"previous one ends); {fix}"
            )
        total = int(self.lengths.sum())
        if total != self.n_frames:
            raise StoreError(
                f"{self.path}: the track index and the data disagree (the index covers {total:,} frames, "
                f"/features holds {self.n_frames:,}); {fix}"
            )
        need = int(self._byte_offset) + self.n_frames * self.n_bands * np.dtype(DTYPE).itemsize
        size = self.path.stat().st_size
        if size < need:
            raise StoreError(f"{self.path} is cut short ({size:,} bytes, its frames need {need:,}); {fix}")

    def nonfinite_tracks(self, rows: Iterable[int] | None = None) -> list[tuple[str, int]]:
        """(track id, count of NaN/inf values) of every listed track (all by default) that has any.

        One sequential read of the frames, in blocks: the float16 bit pattern
        is tested (exponent all ones) rather than converted, so the scan runs
        at the speed of the disk or the page cache.
        """
        wanted = np.zeros(len(self), dtype=bool)
        wanted[np.arange(len(self)) if rows is None else np.fromiter(rows, dtype=np.int64)] = True
        bits = self.frames.view(np.uint16)
        ends = self.offsets + self.lengths
        found: dict[int, int] = {}
        for start in range(0, self.n_frames, _SCAN_FRAMES):
            stop = min(start + _SCAN_FRAMES, self.n_frames)
            bad = (bits[start:stop] & _EXP16) == _EXP16
            if not np.count_nonzero(bad):
                continue
            per_frame = bad.sum(axis=1)
            hit = np.flatnonzero(per_frame)
            if not len(hit):
                continue
            owners = np.searchsorted(ends, start + hit, side="right")
            for row, count in zip(owners.tolist(), per_frame[hit].tolist()):
                if wanted[row]:
                    found[row] = found.get(row, 0) + int(count)
        return [(self.track_ids[r], found[r]) for r in sorted(found)]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_map"] = None
        state["_pid"] = None
        return state

    def __len__(self) -> int:
        return len(self.track_ids)

    def __contains__(self, track_id: str) -> bool:
        return track_id in self.row

    @property
    def frames(self) -> np.ndarray:
        """(total_frames, n_bands) float16 memory map, opened once per process."""
        if self._map is None or self._pid != os.getpid():
            self._map = np.memmap(
                self.path, dtype=DTYPE, mode="r", offset=self._byte_offset, shape=(self.n_frames, self.n_bands)
            )
            self._pid = os.getpid()
        return self._map

    @property
    def hours(self) -> float:
        return float(self.lengths.sum()) / self.spec.frames_per_second / 3600.0

    def length(self, track_id: str) -> int:
        return int(self.lengths[self.row[track_id]])

    def track(self, track_id: str) -> np.ndarray:
        """All frames of a track, (frames, n_bands) float16 (a copy)."""
        i = self.row[track_id]
        o = int(self.offsets[i])
        return np.array(self.frames[o : o + int(self.lengths[i])])

    def crop(self, row: int, start: int, length: int) -> np.ndarray:
        """Frames start..start+length of track number ``row``: one contiguous read."""
        o = int(self.offsets[row]) + start
        return np.array(self.frames[o : o + length])

    def band_major_bytes(self, pad: int = 0) -> int:
        """Bytes :meth:`load_band_major` allocates on its device."""
        return self.n_bands * (self.n_frames + pad) * np.dtype(DTYPE).itemsize

    def load_band_major(self, pad: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every frame on ``device``, band-major: (n_bands, total_frames + pad) float16, the ``pad`` extra frames 0.

        The device tensor is allocated once and filled block by block from the
        map through one reusable host buffer (pinned for a GPU), so host memory
        never holds more than one block of the store (35 GB of mel96 for
        MTG-Jamendo would otherwise pass through RAM once per rank).
        """
        device = torch.device(device)
        out = torch.empty((self.n_bands, self.n_frames + pad), dtype=torch.float16, device=device)
        out[:, self.n_frames :] = 0
        block = torch.empty((self.n_bands, min(_LOAD_FRAMES, max(self.n_frames, 1))), dtype=torch.float16,
                            pin_memory=device.type == "cuda")
        staging = block.numpy()
        for a in range(0, self.n_frames, _LOAD_FRAMES):
            b = min(a + _LOAD_FRAMES, self.n_frames)
            np.copyto(staging[:, : b - a], self.frames[a:b].T)
            out[:, a:b].copy_(block[:, : b - a])  # synchronous: the buffer is refilled next
        return out

    def missing(self, track_ids: Iterable[str]) -> list[str]:
        return [t for t in track_ids if t not in self.row]


@dataclass
class _Stats:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, x: np.ndarray) -> None:
        x64 = x.astype(np.float64)
        self.count += x64.size
        self.total += float(x64.sum())
        self.total_sq += float(np.square(x64).sum())

    def mean_std(self) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 1.0
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return mean, float(np.sqrt(var)) or 1.0


class StoreWriter:
    """Build a store resumably: ``add`` finished tracks, then ``finish``.

    ``track_ids`` is the canonical order of the final store; tracks already in
    ``STORE.partial/`` from an interrupted run are listed in ``done``.
    """

    def __init__(self, out: str | Path, spec: FeatureSpec, track_ids: Sequence[str]) -> None:
        self.out = Path(out)
        self.spec = spec
        self.order = list(track_ids)
        if len(set(self.order)) != len(self.order):
            raise StoreError(f"{self.out}: duplicate track ids given to the store writer")
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.partial.mkdir(parents=True, exist_ok=True)
        spec_file = self.partial / "spec.json"
        if spec_file.exists():
            old = FeatureSpec.from_json(spec_file.read_text())
            if old != spec:
                raise StoreError(
                    f"{self.partial} holds an unfinished store with features '{old.name}', not '{spec.name}': "
                    f"re-run with --features {old.name}, or delete {self.partial} to start over"
                )
        else:
            tmp = spec_file.with_suffix(".tmp")
            tmp.write_text(spec.to_json())
            tmp.replace(spec_file)
        self._where: dict[str, Path] = {}
        self._next = 0
        for part in sorted(self.partial.glob("part-*.npz")):
            self._next = max(self._next, int(part.stem.split("-")[1]) + 1)
            try:
                with np.load(part) as z:
                    names = list(z.files)
            except Exception:  # a damaged part is redone, never trusted
                part.unlink()
                continue
            for name in names:
                self._where[name] = part
        for stale in self.partial.glob("*.tmp"):
            stale.unlink()

    @property
    def done(self) -> set[str]:
        return set(self._where)

    def todo(self) -> list[str]:
        return [t for t in self.order if t not in self._where]

    def add(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Keep a batch of finished tracks: (track_id, (frames, n_bands) array) each."""
        if not items:
            return
        arrays: dict[str, np.ndarray] = {}
        for track_id, x in items:
            x = np.asarray(x)
            if x.ndim != 2 or x.shape[1] != self.spec.n_mels:
                raise StoreError(f"track {track_id}: features of shape {x.shape}, expected (frames, {self.spec.n_mels})")
            x16 = x.astype(DTYPE)
            if not np.isfinite(x16).all():
                raise StoreError(
                    f"track {track_id}: {int((~np.isfinite(x16)).sum())} NaN/inf values (or beyond the float16 "
                    f"range) in its features; a store holds finite values only: fix or leave out its source file"
                )
            arrays[track_id] = x16
        part = self.partial / f"part-{self._next:06d}.npz"
        self._next += 1
        tmp = part.with_name(part.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            fault_point("store.part.written")
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if disk_full(e):
                raise DiskFullError(
                    tmp, f"the {len(self._where)} tracks finished so far are kept in {self.partial}"
                ) from None
            raise
        tmp.replace(part)
        fault_point("store.part.renamed")
        for track_id in arrays:
            self._where[track_id] = part

    def finish(self, stats_ids: Iterable[str], stats_split: str) -> Path:
        """Assemble the store from the kept tracks (those of ``track_ids`` that were added).

        ``stats_ids``: the tracks whose frames give the normalisation mean/std
        (the train split). Returns the final path.
        """
        present = [t for t in self.order if t in self._where]
        if not present:
            # h5py never allocates an unwritten dataset, so the reader could not map it
            raise StoreError(f"{self.out}: no track was added, so there is no store to assemble")
        stats_set = set(stats_ids)
        stats = _Stats()
        lengths = np.zeros(len(present), dtype=np.int64)
        # A few parts open at a time: a store of many small parts must not run
        # out of file descriptors (an NpzFile keeps its file open).
        opened: OrderedDict[Path, np.lib.npyio.NpzFile] = OrderedDict()

        def get(track_id: str) -> np.ndarray:
            part = self._where[track_id]
            if part in opened:
                opened.move_to_end(part)
            else:
                if len(opened) >= _OPEN_PARTS:
                    opened.popitem(last=False)[1].close()
                opened[part] = np.load(part)
            return opened[part][track_id]

        tmp = self.out.with_name(self.out.name + ".tmp")
        total = 0
        try:
            for i, t in enumerate(present):
                lengths[i] = get(t).shape[0]
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(present) else lengths
            total = int(lengths.sum())
            # HDF5 cannot fail cleanly when the disk fills (a write that fails at close leaves objects that
            # crash the interpreter when freed), so the space is checked before HDF5 writes anything
            need = total * self.spec.n_mels * np.dtype(DTYPE).itemsize + 64 * len(present) + _SPACE_MARGIN
            if shutil.disk_usage(tmp.parent).free < need:
                raise OSError(errno.ENOSPC, f"{need:,} bytes needed, {shutil.disk_usage(tmp.parent).free:,} free")
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("features", shape=(total, self.spec.n_mels), dtype=DTYPE)
                for i, t in enumerate(present):
                    x = get(t)
                    ds[offsets[i] : offsets[i] + lengths[i]] = x
                    if t in stats_set:
                        stats.add(x)
                    if i == len(present) // 2:
                        fault_point("store.assemble")
                f.create_dataset("tracks/id", data=np.array(present, dtype=object), dtype=h5py.string_dtype())
                f.create_dataset("tracks/offset", data=offsets)
                f.create_dataset("tracks/length", data=lengths)
                mean, std = stats.mean_std()
                f.attrs["format"] = FORMAT
                f.attrs["version"] = VERSION
                f.attrs["spec"] = self.spec.to_json()
                f.attrs["mean"] = mean
                f.attrs["std"] = std
                f.attrs["stats_split"] = stats_split
                f.attrs["stats_tracks"] = sum(1 for t in present if t in stats_set)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except BaseException as e:
            if disk_full(e):
                tmp.unlink(missing_ok=True)  # give the space back: the parts are all a re-run needs
                raise DiskFullError(
                    tmp, f"the {len(present)} finished tracks are kept in {self.partial}; the store needs "
                    f"{total * self.spec.n_mels * np.dtype(DTYPE).itemsize / 1e6:,.1f} MB"
                ) from None
            raise
        finally:
            for z in opened.values():
                z.close()
        fault_point("store.rename.before")
        tmp.replace(self.out)
        fault_point("store.rename.after")
        _fsync_dir(self.out.parent)
        remove_partial(self.partial)
        return self.out


def remove_partial(partial: Path) -> None:
    """Delete ``STORE.partial/`` once the store is complete (also what a re-run does after a kill here)."""
    if not partial.is_dir():
        return
    for i, entry in enumerate(sorted(partial.iterdir())):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        if i == 0:
            fault_point("store.cleanup")
    partial.rmdir()


def store_summary(store: FeatureStore) -> dict:
    """What `freqtag info` prints."""
    return {
        "path": str(store.path),
        "tracks": len(store),
        "frames": store.n_frames,
        "hours": round(store.hours, 3),
        "mean": store.mean,
        "std": store.std,
        "stats": f"{store.stats_split} split, {store.stats_tracks} tracks",
        "spec": json.loads(store.spec.to_json()),
    }
