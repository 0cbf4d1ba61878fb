"""The datasets: random crops for training, whole tracks for evaluation; workers only read bytes.

An item is a whole batch (the samplers choose its crops): a crop is one
contiguous read from the store.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from freqtag.data.normalise import normalise
from freqtag.data.ring import CropRing
from freqtag.data.store import FeatureStore

__all__ = ["CropDataset", "TrackDataset"]


class CropDataset(Dataset):
    """Crops of ``input_length`` frames; an item is a whole batch of (track number, start) pairs.

    Each crop is one contiguous read from the store, transposed to
    (bands, L) float16 (half the bytes of float32, to the GPU too);
    ``on_after_batch_transfer`` normalises it on the batch's device. In
    worker processes the crops go into the loader's shared ``ring`` and the
    batch carries only small numpy arrays (cheap to send) and the slot. In
    the in-memory mode the DataModule gathers the crops itself.
    """

    def __init__(
        self,
        reader: FeatureStore,
        rows: np.ndarray,
        labels: np.ndarray,
        input_length: int,
        in_memory: bool = False,
    ) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.ascontiguousarray(labels)
        self.input_length = input_length
        self.in_memory = in_memory
        self.ring: CropRing | None = None  # set by the DataModule for worker processes
        self._buffer: np.ndarray | None = None  # this process's (B, L, bands) read buffer

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return self.reader.lengths[self.rows]

    def __getitem__(self, batch: Sequence[tuple[int, int]]) -> dict[str, Any]:
        pairs = np.array(batch, dtype=np.int64).reshape(-1, 2)
        items, starts = pairs[:, 0], pairs[:, 1]
        rows = self.rows[items]
        L = self.input_length
        valid = np.minimum(self.reader.lengths[rows] - starts, L)
        out: dict[str, Any] = {"item": items, "row": rows, "start": starts, "valid": valid, "y": self.labels[items]}
        if self.in_memory:
            return out
        # time-major frames: one contiguous read per crop into this process's buffer, then one transposing
        # copy; frames past ``valid`` are left as they are (the normalisation sets them to 0)
        if self._buffer is None or len(self._buffer) < len(items):
            self._buffer = np.empty((len(items), L, self.reader.n_mels), dtype=np.float16)
        x = self._buffer[: len(items)]
        frames, offsets = self.reader.frames, self.reader.offsets
        for k in range(len(items)):
            o, v = int(offsets[rows[k]] + starts[k]), int(valid[k])
            x[k, :v] = frames[o : o + v]
        crops = torch.from_numpy(x).transpose(1, 2)
        ring = self.ring if get_worker_info() is not None else None
        if ring is None:
            out["x16"] = crops.contiguous()
            return out
        slot, token = ring.claim()
        ring.x[slot, : len(items)].copy_(crops)
        ring.publish(slot, token)
        out.update(ring=ring.id, slot=slot, token=token)
        return out


class TrackDataset(Dataset):
    """Whole tracks, one per batch: any length scores the same as on its own."""

    def __init__(self, reader: FeatureStore, rows: np.ndarray, labels: np.ndarray) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        (i,) = batch
        row = int(self.rows[i])
        x = torch.from_numpy(self.reader.crop(row, 0, int(self.reader.lengths[row]))).t()[None]
        return {"item": torch.tensor([i]), "x": normalise(x, self.reader.mean, self.reader.std), "y": self.labels[[i]]}
