"""Device memory: will it fit, and one line when it did not.

A GPU's out-of-memory error is a page of allocator statistics that does not
say which setting to change. Here every place that can run out (the network's
steps, the in-memory store, whole-track evaluation, predict) names what did
not fit and the fix, and the in-memory store is measured against free memory
before any training time is spent.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["OutOfMemory", "free_bytes", "check_fits", "out_of_memory", "release_device_memory", "gib"]


class OutOfMemory(RuntimeError):
    """Something did not fit in a device's memory: names what, where, and the setting to change."""


def gib(n: int | float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _host_available() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_bytes(device: torch.device) -> int:
    """Bytes this process could still allocate on ``device``.

    On a GPU: the driver's free memory plus what torch's caching allocator
    holds but does not use (it hands that out first).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
    return _host_available()


def check_fits(needed: int, device: torch.device, what: str, fix: str) -> None:
    """Stop in one line, before the work, when ``needed`` bytes exceed what is free on ``device``."""
    free = free_bytes(device)
    if needed > free:
        where = f"GPU memory on {device}" if device.type == "cuda" else "host RAM"
        raise OutOfMemory(f"{what} needs {gib(needed)} of {where} but {gib(free)} is free: {fix}")


def release_device_memory() -> None:
    """Break reference cycles now and give cached GPU blocks back, so the next job in this process starts clean."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@contextmanager
def out_of_memory(what: str, fix: str) -> Iterator[None]:
    """Turn torch's out-of-memory error inside the block into one :class:`OutOfMemory` line."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". GPU")[0].rstrip(".")  # torch appends the device's totals; the first sentence says it
        raise OutOfMemory(f"out of memory: {what} did not fit ({first}): {fix}") from None
