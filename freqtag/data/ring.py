"""The shared-memory ring that DataLoader workers write crop batches into."""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable

import torch
from torch.utils.data import get_worker_info

__all__ = ["CropRing", "RingOverwrite", "PREFETCH", "RING_HOLD"]

_RINGS: "weakref.WeakValueDictionary[int, CropRing]" = weakref.WeakValueDictionary()
_RING_IDS = itertools.count(1)
PREFETCH = 2  # batches each worker process makes ahead (the DataLoader's prefetch_factor)
RING_HOLD = 3  # batches a consumer may hold, beyond the DataLoader's prefetch, before a slot is reused


class RingOverwrite(RuntimeError):
    """A crop batch's slot was written again before the batch was used (the consumer held too many)."""


class CropRing:
    """Shared-memory slots that DataLoader workers write crop batches into; a batch carries only its slot.

    A tensor sent back from a worker costs a new shared-memory segment and a
    file descriptor handed over a socket, per tensor and per batch: measured,
    that caps the DataLoader at about 750 batches/s with nothing in them, and
    at 9k crops/s with the crops. Slots made once, before the workers start,
    cost nothing per batch. Each worker cycles through its own
    ``PREFETCH + RING_HOLD`` slots, and a slot's sequence number (0 while it
    is being written) shows whether it still holds the batch a reader asks for.
    """

    per_worker = PREFETCH + RING_HOLD

    def __init__(self, workers: int, batch: int, bands: int, length: int) -> None:
        self.id = next(_RING_IDS)
        self.x = torch.zeros((workers * self.per_worker, batch, bands, length), dtype=torch.float16).share_memory_()
        self.seq = torch.zeros(workers * self.per_worker, dtype=torch.int64).share_memory_()
        self._written = 0  # batches this worker process wrote
        _RINGS[self.id] = self

    def claim(self) -> tuple[int, int]:
        """(slot, token) for the next batch of this worker; marks the slot as being written."""
        info = get_worker_info()
        assert info is not None, "CropRing slots are written by DataLoader workers"
        self._written += 1
        slot = info.id * self.per_worker + self._written % self.per_worker
        self.seq[slot] = 0
        return slot, self._written * info.num_workers + info.id + 1

    def publish(self, slot: int, token: int) -> None:
        self.seq[slot] = token

    def check(self, slot: int, token: int) -> None:
        if int(self.seq.numpy()[slot]) != token:  # host shared memory, read through numpy: no tensor call
            raise RingOverwrite(
                f"a crop batch was overwritten in its shared-memory slot before it was used: whatever iterates "
                f"the loader held more than {RING_HOLD} batches without passing them through the DataModule's "
                f"hooks (Lightning's on_before_batch_transfer .. on_after_batch_transfer, or dm.on_device); use "
                f"each batch before taking the next, or set data.num_workers=0"
            )

    @staticmethod
    def read(batch: dict[str, Any], use: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``use`` applied to the batch's crops in their slot, checked to be still the batch's own after."""
        ring = _RINGS.get(int(batch.pop("ring")))
        if ring is None:
            raise RingOverwrite("this crop batch's DataLoader is gone, and with it the shared memory that held its "
                                "crops: keep the loader while its batches are in use")
        slot, token = int(batch.pop("slot")), int(batch.pop("token"))
        ring.check(slot, token)
        out = use(ring.x[slot, : len(batch["valid"])])
        ring.check(slot, token)
        return out
