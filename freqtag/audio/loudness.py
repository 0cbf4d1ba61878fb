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

__all__ = ["TRIM_FRAME_LENGTH", "TRIM_HOP_LENGTH", "SILENCE_RMS", "nonsilent_interval", "SilenceScan"]

# librosa.effects.trim defaults (frame_length, hop_length); its ref is the
# loudest frame, its amin 1e-5 (so 1e-10 on mean squares).
TRIM_FRAME_LENGTH = 2048
TRIM_HOP_LENGTH = 512
SILENCE_RMS = 1e-5


def _frame_mean_squares(x: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """librosa.feature.rms(y, frame_length, hop_length)**2 (centred, zero padded), as float64.

    Sums of squares per hop-sized block (float32 within a block, as librosa
    computes, float64 across blocks), then frame_length/hop_length adjacent
    blocks per frame: O(n), no padded copy of the signal.
    """
    half = frame_length // 2
    if frame_length % hop_length or half % hop_length:
        raise ValueError(f"frame length {frame_length} must be an even multiple of the hop {hop_length}")
    n = x.shape[0]
    per = frame_length // hop_length
    n_frames = 1 + n // hop_length  # 1 + (n + 2*half - frame_length) // hop
    full = n // hop_length
    body = x[: full * hop_length].reshape(full, hop_length)
    blocks = np.zeros(n_frames - 1 + per, dtype=np.float64)
    lead = half // hop_length  # the zero padding is whole blocks
    blocks[lead : lead + full] = np.einsum("ij,ij->i", body, body)
    if n > full * hop_length:
        rest = x[full * hop_length :]
        blocks[lead + full] = float(np.dot(rest, rest))
    sums = np.lib.stride_tricks.sliding_window_view(blocks, per).sum(axis=1)
    return sums[:n_frames] / frame_length


def nonsilent_interval(
    x: np.ndarray, top_db: float = 60.0, frame_length: int = TRIM_FRAME_LENGTH, hop_length: int = TRIM_HOP_LENGTH
) -> tuple[int, int]:
    """``librosa.effects.trim(x, top_db=top_db)[1]`` for a mono signal: the kept [start, end) samples.

    A frame is kept when its RMS is within ``top_db`` of the loudest frame's
    (both floored at 1e-5); the interval runs from the first kept frame's start
    to one hop past the last kept frame, clipped to the signal.
    """
    return _interval(_frame_mean_squares(x, frame_length, hop_length), x.shape[0], top_db, hop_length)


def _interval(ms: np.ndarray, n: int, top_db: float, hop_length: int) -> tuple[int, int]:
    floor = SILENCE_RMS**2
    keep = np.maximum(ms, floor) > max(float(ms.max()), floor) * 10.0 ** (-top_db / 10.0)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        return 0, 0
    return int(kept[0]) * hop_length, min(n, (int(kept[-1]) + 1) * hop_length)


class SilenceScan:
    """``librosa.effects.trim`` (and the silence check) for a signal that arrives in blocks.

    Keeps the float32 sum of squares of every 512-sample hop block (as
    :func:`freqtag.audio.decode._frame_mean_squares` computes them) and builds the
    frame mean squares at the end: identical to the whole-signal computation.
    """

    def __init__(self) -> None:
        self.sums: list[np.ndarray] = []
        self.rest = np.zeros(0, dtype=np.float32)
        self.n = 0

    def push(self, x: np.ndarray) -> None:
        self.n += x.shape[0]
        if self.rest.size:
            x = np.concatenate([self.rest, x])
        full = x.shape[0] // TRIM_HOP_LENGTH
        body = x[: full * TRIM_HOP_LENGTH].reshape(full, TRIM_HOP_LENGTH)
        if full:
            self.sums.append(np.einsum("ij,ij->i", body, body).astype(np.float64))
        self.rest = x[full * TRIM_HOP_LENGTH :].copy()

    def mean_squares(self) -> np.ndarray:
        hop, per, half = TRIM_HOP_LENGTH, TRIM_FRAME_LENGTH // TRIM_HOP_LENGTH, TRIM_FRAME_LENGTH // 2
        n_frames = 1 + self.n // hop
        full = self.n // hop
        blocks = np.zeros(n_frames - 1 + per, dtype=np.float64)
        lead = half // hop
        if self.sums:
            blocks[lead : lead + full] = np.concatenate(self.sums)
        if self.rest.size:
            blocks[lead + full] = float(np.dot(self.rest, self.rest))
        sums = np.lib.stride_tricks.sliding_window_view(blocks, per).sum(axis=1)
        return sums[:n_frames] / TRIM_FRAME_LENGTH

    def interval(self, path: Path, spec: FeatureSpec) -> tuple[int, int]:
        """The kept [start, end) samples; refuses a silent signal as :func:`freqtag.audio.decode.waveform` does."""
        ms = self.mean_squares()
        loudest = float(ms.max()) ** 0.5
        if loudest < SILENCE_RMS:
            level = f"{20 * np.log10(loudest):.0f} dBFS" if loudest > 0 else "digital silence"
            left = "; nothing is left after trimming" if spec.trim_top_db is not None else ""
            raise AudioError(path, f"silent: the loudest frame is {level} (below -100 dBFS){left}")
        if spec.trim_top_db is None:
            return 0, self.n
        return _interval(ms, self.n, spec.trim_top_db, TRIM_HOP_LENGTH)
