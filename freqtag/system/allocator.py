"""Keep freed memory in the process: with glibc's defaults a CPU training step spends a fifth of its time in page faults.

glibc serves every block above its (moving) mmap threshold with a fresh
``mmap`` and gives freed memory at the top of the heap back to the kernel. A
training step allocates and frees hundreds of MB of activations and gradients,
so each step page-faults them in again, zero-filled: measured on freq_dep at
mel96 x 128, batch 32 (``bench/train_step.py``), 100-135k minor faults and
460-500 ms per step; with freed memory kept, 0-26k faults and 360-370 ms.
How many faults a step takes also depends on the order of earlier frees,
which is why a Lightning loop and a plain loop over the same network differed
by 7% with the defaults and by nothing with memory kept. ``freqtag predict``
keeps it too (2.1x the tracks/s, ``bench/predict.py``), unless ``--low-memory``.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # bytes free at the heap's top before glibc trims it (an int)


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and never trim it (glibc; elsewhere nothing). True if applied.

    Peak memory is unchanged (a step reaches it anyway); the process just keeps
    it between steps. Worker processes forked later inherit the setting.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
