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

These are the streamed path's pieces (:mod:`freqtag.audio.stream`), run on
the file as one block: one ``soundfile.read``, one :func:`resample` call, one
:class:`SilenceScan` push, one :class:`LogMel` call. Reading in blocks would
change stores written before: for MPEG-2/2.5 MP3s (24 kHz and below)
libmpg123 gives other float bits when a read ends inside one of their frames
(house_lo.mp3, 11.025 kHz, in reads of 30011 samples: 15557 of 80064 samples
differ, by up to 1.8e-7, and its mel128 features by up to 0.74 dB; generated
22.05 and 16 kHz MP3s of 150 s in reads of 2**18: 23% and 25% of the samples
differ). 32-48 kHz MP3s, Ogg, FLAC and WAV give the same bits in any blocks,
and so do the block resamplers and the block log-mel (measured on 17 files,
both recipes, with the default and with odd block sizes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freqtag.audio.decode import AudioError, check_finite, decode
from freqtag.audio.frames import check_length
from freqtag.audio.loudness import SilenceScan
from freqtag.audio.resample import resample
from freqtag.features import FeatureSpec

__all__ = ["waveform", "features_from_file", "AudioError"]


def waveform(path: str | Path, spec: FeatureSpec, min_frames: int = 1) -> np.ndarray:
    """The mono float32 signal at the recipe's rate, trimmed as the recipe says, ready for :class:`LogMel`.

    Raises :class:`AudioError` when the file cannot be decoded, holds
    non-finite samples, is silent (nothing left after trimming), or gives
    fewer than ``min_frames`` frames.
    """
    x, rate = decode(path)
    check_finite(path, x)
    x = resample(x, rate, spec.sample_rate, spec.resample)
    scan = SilenceScan()
    scan.push(x)
    start, end = scan.interval(path, spec)
    x = x[start:end]
    check_length(path, spec, x.shape[0], min_frames)
    return x


def features_from_file(
    path: str | Path, spec: FeatureSpec, *, min_frames: int = 1, device: str = "cpu"
) -> np.ndarray:
    """The recipe's features of one audio file: float32 (frames, n_mels).

    Raises :class:`AudioError` (a ``ValueError``; ``.reason`` says why) for a
    file that cannot give features: missing, empty, not audio, unsupported,
    corrupt, silent, or shorter than ``min_frames`` frames.
    """
    from freqtag.audio.logmel import cached_logmel  # torch: a worker that only makes waveforms never imports it

    return cached_logmel(spec, str(device))([waveform(path, spec, min_frames)])[0]
