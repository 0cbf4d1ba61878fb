"""Loudness of a signal at the recipe's rate: the silence refusal and ``librosa.effects.trim``'s interval.

A signal whose loudest 2048-sample frame has an RMS below 1e-5 (-100 dBFS) is
refused as silent for either recipe. That is exactly where
``librosa.effects.trim`` with ``ref=np.max`` stops trimming anything (it keeps
all of a digitally silent signal); above it our trim equals librosa's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freqtag.audio.decode import AudioError
from freqtag.features import FeatureSpec

__all__ = [
    "TRIM_FRAME_LENGTH",
    "TRIM_HOP_LENGTH",
    "SILENCE_RMS",
    "SilenceScan",
    "frame_mean_squares",
    "kept_interval",
    "nonsilent_interval",
]

# librosa.effects.trim defaults (frame_length, hop_length); its ref is the
# loudest frame, its amin 1e-5 (so 1e-10 on mean squares).
TRIM_FRAME_LENGTH = 2048
TRIM_HOP_LENGTH = 512
SILENCE_RMS = 1e-5


class SilenceScan:
    """``librosa.feature.rms(y, frame_length, hop_length)**2`` of a signal pushed in pieces of any sizes.

    Keeps the float32 sum of squares of every hop-sized block (as librosa
    computes within a block; 8 bytes per 512 samples, about 2.5 MB an hour at
    44.1 kHz) and builds the centred, zero-padded frames' mean squares at the
    end, in float64 across blocks: O(n), no padded copy of the signal, the same
    values whatever the pieces.
    """

    def __init__(self, frame_length: int = TRIM_FRAME_LENGTH, hop_length: int = TRIM_HOP_LENGTH) -> None:
        if frame_length % hop_length or (frame_length // 2) % hop_length:
            raise ValueError(f"frame length {frame_length} must be an even multiple of the hop {hop_length}")
        self.frame_length, self.hop_length = frame_length, hop_length
        self.sums: list[np.ndarray] = []
        self.rest = np.zeros(0, dtype=np.float32)
        self.n = 0

    def push(self, x: np.ndarray) -> None:
        hop = self.hop_length
        self.n += x.shape[0]
        if self.rest.size:
            x = np.concatenate([self.rest, x])
        full = x.shape[0] // hop
        body = x[: full * hop].reshape(full, hop)
        if full:
            self.sums.append(np.einsum("ij,ij->i", body, body).astype(np.float64))
        self.rest = x[full * hop :].copy()

    def mean_squares(self) -> np.ndarray:
        """(1 + n // hop,) float64: each centred frame's mean square."""
        hop, per = self.hop_length, self.frame_length // self.hop_length
        n_frames = 1 + self.n // hop  # 1 + (n + 2*half - frame_length) // hop
        full = self.n // hop
        blocks = np.zeros(n_frames - 1 + per, dtype=np.float64)
        lead = self.frame_length // 2 // hop  # the zero padding is whole blocks
        if self.sums:
            blocks[lead : lead + full] = np.concatenate(self.sums)
        if self.rest.size:
            blocks[lead + full] = float(np.dot(self.rest, self.rest))
        sums = np.lib.stride_tricks.sliding_window_view(blocks, per).sum(axis=1)
        return sums[:n_frames] / self.frame_length

    def interval(self, path: str | Path, spec: FeatureSpec) -> tuple[int, int]:
        """The [start, end) samples the recipe keeps; refuses a silent signal (loudest frame below -100 dBFS)."""
        ms = self.mean_squares()
        loudest = float(ms.max()) ** 0.5
        if loudest < SILENCE_RMS:
            level = f"{20 * np.log10(loudest):.0f} dBFS" if loudest > 0 else "digital silence"
            left = "; nothing is left after trimming" if spec.trim_top_db is not None else ""
            raise AudioError(path, f"silent: the loudest frame is {level} (below -100 dBFS){left}")
        if spec.trim_top_db is None:
            return 0, self.n
        return kept_interval(ms, self.n, spec.trim_top_db, self.hop_length)


def frame_mean_squares(
    x: np.ndarray, frame_length: int = TRIM_FRAME_LENGTH, hop_length: int = TRIM_HOP_LENGTH
) -> np.ndarray:
    """``librosa.feature.rms(y=x, frame_length, hop_length)**2`` (centred, zero padded), as float64."""
    scan = SilenceScan(frame_length, hop_length)
    scan.push(x)
    return scan.mean_squares()


def kept_interval(ms: np.ndarray, n: int, top_db: float, hop_length: int = TRIM_HOP_LENGTH) -> tuple[int, int]:
    """librosa's trim of ``n`` samples from their frames' mean squares ``ms``: the kept [start, end) samples.

    A frame is kept when its RMS is within ``top_db`` of the loudest frame's
    (both floored at 1e-5); the interval runs from the first kept frame's start
    to one hop past the last kept frame, clipped to the signal.
    """
    floor = SILENCE_RMS**2
    keep = np.maximum(ms, floor) > max(float(ms.max()), floor) * 10.0 ** (-top_db / 10.0)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        return 0, 0
    return int(kept[0]) * hop_length, min(n, (int(kept[-1]) + 1) * hop_length)


def nonsilent_interval(
    x: np.ndarray, top_db: float = 60.0, frame_length: int = TRIM_FRAME_LENGTH, hop_length: int = TRIM_HOP_LENGTH
) -> tuple[int, int]:
    """``librosa.effects.trim(x, top_db=top_db)[1]`` for a mono signal: the kept [start, end) samples."""
    return kept_interval(frame_mean_squares(x, frame_length, hop_length), x.shape[0], top_db, hop_length)
