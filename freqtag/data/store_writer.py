"""Writing a feature store (its format: :mod:`freqtag.data.store`), resumably and atomically.

Finished tracks are kept in
``STORE.partial/`` (one ``.npz`` per batch, each renamed into place when
complete); ``finish`` assembles ``STORE.tmp`` in the canonical track order and
renames it to ``STORE``. An interrupted run re-opens the partial folder and
does only the tracks that are missing; the assembled store does not depend on
how often, or where, the writing was interrupted.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from freqtag.data.store import DTYPE, FORMAT, VERSION, StoreError
from freqtag.features import FeatureSpec
from freqtag.system.faults import DiskFullError, disk_full, fault_point

__all__ = ["StoreWriter", "remove_partial"]

_OPEN_PARTS = 16  # npz parts kept open at once while assembling
_SPACE_MARGIN = 1 << 20  # bytes beyond the frames and index that assembling a store may take (HDF5 metadata)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        """Keep a batch of finished tracks: (track_id, (frames, n_mels) array) each."""
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

    # over 60 lines: one transaction (space check, write, fsync, rename) whose clean-up sees every step
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
