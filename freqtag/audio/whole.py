"""A whole file at once, to the recipe's signal and features: what ``freqtag prepare`` stores.

Two steps, so that the expensive, per-file one runs in worker processes and
the transform runs batched on a device:

1. :func:`waveform` -- decode (:mod:`freqtag.audio.decode`), resample to the
   recipe's rate (:mod:`freqtag.audio.resample`), refuse a silent signal and
   trim leading/trailing silence when the recipe says so
   (:mod:`freqtag.audio.loudness`), and refuse what cannot give features:
   every refusal is an :class:`AudioError` whose ``reason`` is one line for a
   report.
2. :class:`freqtag.audio.logmel.LogMel` -- the recipe's log-mel spectrogram of
   many waveforms at once, on any torch device.

:func:`features_from_file` chains the two for one file.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from freqtag.audio.decode import AudioError, decode
from freqtag.audio.frames import frame_count
from freqtag.audio.loudness import SILENCE_RMS, TRIM_FRAME_LENGTH, TRIM_HOP_LENGTH, _frame_mean_squares, _interval
from freqtag.audio.resample import resample
from freqtag.features import FeatureSpec

__all__ = ["waveform", "features_from_file"]


def waveform(path: str | Path, spec: FeatureSpec, min_frames: int = 1) -> np.ndarray:
    """The mono float32 signal at the recipe's rate, trimmed as the recipe says, ready for :class:`LogMel`.

    Raises :class:`AudioError` when the file cannot be decoded, holds
    non-finite samples, is silent (nothing left after trimming), or gives
    fewer than ``min_frames`` frames.
    """
    x, sr = decode(path)
    if not np.isfinite(x).all():
        raise AudioError(path, "non-finite samples (NaN or inf) in the decoded audio")
    x = resample(x, sr, spec.sample_rate, spec.resample)
    ms = _frame_mean_squares(x, TRIM_FRAME_LENGTH, TRIM_HOP_LENGTH)
    loudest = float(ms.max()) ** 0.5
    if loudest < SILENCE_RMS:
        level = f"{20 * np.log10(loudest):.0f} dBFS" if loudest > 0 else "digital silence"
        left = "; nothing is left after trimming" if spec.trim_top_db is not None else ""
        raise AudioError(path, f"silent: the loudest frame is {level} (below -100 dBFS){left}")
    if spec.trim_top_db is not None:
        start, end = _interval(ms, x.shape[0], spec.trim_top_db, TRIM_HOP_LENGTH)
        x = x[start:end]
    frames = frame_count(x.shape[0], spec)
    needed = max(1, min_frames)
    trimmed = " after trimming" if spec.trim_top_db is not None else ""
    if frames < needed:
        window = " of one input window (--min-frames)" if needed > 1 else ""
        raise AudioError(
            path,
            f"too short: {x.shape[0] / spec.sample_rate:.2f} s{trimmed} gives {frames} frames of {spec.name}, "
            f"fewer than the {needed}{window}",
        )
    if spec.pad_mode == "reflect" and x.shape[0] <= spec.n_fft // 2:  # reflect padding needs more than half a frame
        raise AudioError(path, f"too short: {x.shape[0]} samples{trimmed}, {spec.name} needs more than {spec.n_fft // 2}")
    return x


@functools.lru_cache(maxsize=4)
def _transform(spec: FeatureSpec, device: str):  # type: ignore[no-untyped-def]
    from freqtag.audio.logmel import LogMel

    return LogMel(spec, device)


def features_from_file(
    path: str | Path, spec: FeatureSpec, *, min_frames: int = 1, device: str = "cpu"
) -> np.ndarray:
    """The recipe's features of one audio file: float32 (frames, n_mels).

    Raises :class:`AudioError` (a ``ValueError``; ``.reason`` says why) for a
    file that cannot give features: missing, empty, not audio, unsupported,
    corrupt, silent, or shorter than ``min_frames`` frames.
    """
    return _transform(spec, str(device))([waveform(path, spec, min_frames)])[0]
