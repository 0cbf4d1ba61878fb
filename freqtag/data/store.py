"""The HDF5 feature store: every frame of every track in one file.

Layout (format version 1)::

    /features        float16 (total_frames, n_mels), contiguous, uncompressed
    /tracks/id       utf-8 strings (N,)
    /tracks/offset   int64 (N,)   first frame of each track in /features
    /tracks/length   int64 (N,)   frames of each track
    attrs: format, version, spec (JSON FeatureSpec), mean, std, stats_split, stats_tracks

Frames are stored time-major so that a crop of L frames is ONE contiguous
byte range (bands x frames would make it one strided read per band; time-major
makes it a single ``memcpy``). Because the dataset is
contiguous and uncompressed, readers memory-map it at its HDF5 offset, opened
lazily in each process, so a store is safe to share across fork and spawn.

Stores are written by :class:`freqtag.data.store_writer.StoreWriter`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
import torch

from freqtag.features import FeatureSpec

__all__ = ["FeatureStore", "StoreError", "FORMAT", "VERSION", "DTYPE", "store_summary"]

FORMAT = "freqtag-store"
VERSION = 1
DTYPE = np.float16
_LOAD_FRAMES = 1 << 16  # frames per block when loading the store band-major (16 MB of mel128)
_SCAN_FRAMES = 1 << 18  # frames per block when scanning for non-finite values (64 MB of mel128)
_EXP16 = np.uint16(0x7C00)  # float16 exponent bits: all set means inf or NaN


class StoreError(RuntimeError):
    """A store that cannot be used as asked (names the file and the fix)."""


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
                self.n_frames, self.n_mels = (int(n) for n in ds.shape)
                self._byte_offset = ds.id.get_offset()
                if ds.dtype != DTYPE or self._byte_offset is None or ds.chunks is not None:
                    raise StoreError(f"{self.path}: /features is not a contiguous float16 dataset; rebuild it")
        except (OSError, KeyError) as e:
            raise StoreError(f"{self.path} is not a readable freqtag store ({e}); rebuild it") from e
        if self.n_mels != self.spec.n_mels:
            raise StoreError(f"{self.path}: {self.n_mels} bands stored but the spec says {self.spec.n_mels}")
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
        need = int(self._byte_offset) + self.n_frames * self.n_mels * np.dtype(DTYPE).itemsize
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
        """(total_frames, n_mels) float16 memory map, opened once per process."""
        if self._map is None or self._pid != os.getpid():
            self._map = np.memmap(
                self.path, dtype=DTYPE, mode="r", offset=self._byte_offset, shape=(self.n_frames, self.n_mels)
            )
            self._pid = os.getpid()
        return self._map

    @property
    def hours(self) -> float:
        return float(self.lengths.sum()) / self.spec.frames_per_second / 3600.0

    def length(self, track_id: str) -> int:
        return int(self.lengths[self.row[track_id]])

    def track(self, track_id: str) -> np.ndarray:
        """All frames of a track, (frames, n_mels) float16 (a copy)."""
        i = self.row[track_id]
        o = int(self.offsets[i])
        return np.array(self.frames[o : o + int(self.lengths[i])])

    def crop(self, row: int, start: int, length: int) -> np.ndarray:
        """Frames start..start+length of track number ``row``: one contiguous read."""
        o = int(self.offsets[row]) + start
        return np.array(self.frames[o : o + length])

    def band_major_bytes(self, pad: int = 0) -> int:
        """Bytes :meth:`load_band_major` allocates on its device."""
        return self.n_mels * (self.n_frames + pad) * np.dtype(DTYPE).itemsize

    def load_band_major(self, pad: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every frame on ``device``, band-major: (n_mels, total_frames + pad) float16, the ``pad`` extra frames 0.

        The device tensor is allocated once and filled block by block from the
        map through one reusable host buffer (pinned for a GPU), so host memory
        never holds more than one block of the store (35 GB of mel96 for
        MTG-Jamendo would otherwise pass through RAM once per rank).
        """
        device = torch.device(device)
        out = torch.empty((self.n_mels, self.n_frames + pad), dtype=torch.float16, device=device)
        out[:, self.n_frames :] = 0
        block = torch.empty((self.n_mels, min(_LOAD_FRAMES, max(self.n_frames, 1))), dtype=torch.float16,
                            pin_memory=device.type == "cuda")
        staging = block.numpy()
        for a in range(0, self.n_frames, _LOAD_FRAMES):
            b = min(a + _LOAD_FRAMES, self.n_frames)
            np.copyto(staging[:, : b - a], self.frames[a:b].T)
            out[:, a:b].copy_(block[:, : b - a])  # synchronous: the buffer is refilled next
        return out

    def missing(self, track_ids: Iterable[str]) -> list[str]:
        return [t for t in track_ids if t not in self.row]


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
