"""From an audio file to the log-mel features of a recipe (see REFERENCE.md, Features).

Two steps, so that the expensive, per-file one runs in worker processes and
the transform runs batched on a device:

1. :func:`waveform` -- decode (soundfile: MP3, Ogg Vorbis/Opus, FLAC, WAV, ...),
   average the channels to mono, resample to the recipe's rate (``spec.resample``:
   torchaudio's sinc filter, or Essentia's linear interpolation, see :func:`resample`),
   trim leading/trailing silence when the recipe says so (``librosa.effects.trim``
   with its defaults, reproduced in numpy), and refuse what cannot give
   features: every refusal is an :class:`AudioError` whose ``reason`` is one
   line for a report.
2. :class:`freqtag.audio.logmel.LogMel` -- the recipe's log-mel spectrogram of
   many waveforms at once, on any torch device: framing, window, FFT, power,
   mel filterbank, ``db_multiplier * log10(max(x, amin))``, optional first
   frame dropped. Frames of all the waveforms of a call are packed into blocks
   of a fixed number of frames, so a track's values never depend on which
   other tracks shared its batch (a resumed or differently parallelised run
   writes the same store).

:func:`features_from_file` chains the two for one file (the predict path).

The two recipes:

- ``mel128`` is torchaudio's ``MelSpectrogram`` + ``AmplitudeToDB`` with the
  reference's arguments (to float32 rounding, ~1e-5 dB), applied to the
  trimmed 44.1 kHz signal, first frame dropped.
- ``mel96`` is MTG's Essentia recipe as torchaudio formulates it
  (``Spectrogram(n_fft=512, hop_length=256, power=2, center=True,
  pad_mode="constant")`` with a symmetric Hann window, and Slaney filters with
  unit area), ``20*log10``, on the signal resampled as Essentia's
  ``MonoLoader(resampleQuality=4)`` does (linear interpolation, no
  anti-aliasing filter: MTG's files hold the folded energy in their top bands).
  Essentia yields one more trailing frame (a last, mostly zero-padded frame);
  we do not add it: the spec has no field for it, it holds at most the last
  21 ms of the track, and whole-track evaluation uses non-overlapping windows.

Silence: a signal whose loudest 2048-sample frame has an RMS below 1e-5
(-100 dBFS) is refused as silent for either recipe. That is exactly where
``librosa.effects.trim`` with ``ref=np.max`` stops trimming anything (it keeps
all of a digitally silent signal); above it our trim equals librosa's.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from freqtag.features import FeatureSpec

# torch is imported where it is needed (resampling, the transform): a worker
# that only decodes 44.1 kHz files for mel128 never pays its import.

__all__ = [
    "AudioError",
    "AUDIO_EXTENSIONS",
    "UNSUPPORTED_EXTENSIONS",
    "TRIM_FRAME_LENGTH",
    "TRIM_HOP_LENGTH",
    "SILENCE_RMS",
    "decode",
    "to_mono",
    "resample",
    "linear_step",
    "linear_count",
    "linear_outputs",
    "nonsilent_interval",
    "frame_count",
    "waveform",
    "features_from_file",
    "quiet_decoder_messages",
    "one_torch_thread",
]

# What soundfile (libsndfile 1.1+) decodes, by file name. A file is recognised
# by its content; the name only decides what we try.
AUDIO_EXTENSIONS = (
    ".mp3", ".mp2", ".ogg", ".oga", ".opus", ".flac", ".wav", ".wave",
    ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64",
)  # fmt: skip
# Audio that soundfile cannot decode: reported as unsupported, with the fix.
UNSUPPORTED_EXTENSIONS = (
    ".m4a", ".mp4", ".m4b", ".aac", ".wma", ".ape", ".alac", ".mka", ".webm", ".ac3", ".dts", ".wv", ".amr", ".ra",
)
# librosa.effects.trim defaults (frame_length, hop_length); its ref is the
# loudest frame, its amin 1e-5 (so 1e-10 on mean squares).
TRIM_FRAME_LENGTH = 2048
TRIM_HOP_LENGTH = 512
SILENCE_RMS = 1e-5

_capture_decoder_messages = False
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # libmpg123's "[src/libmpg123/parse.c:...] "


class AudioError(ValueError):
    """A file that gives no features. ``reason`` is one line; ``str()`` also names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")


# ---------------------------------------------------------------------- decoding


def quiet_decoder_messages() -> None:
    """Keep the C decoders' own stderr lines (libmpg123's warnings) out of the terminal.

    Called in each worker process (not in the main one, where the progress bar
    writes to stderr): the messages of a file that fails are put into its reason
    instead. Also limits torch (when a worker resamples) to one thread: the
    workers are the parallelism.
    """
    global _capture_decoder_messages
    _capture_decoder_messages = True
    os.environ["OMP_NUM_THREADS"] = "1"  # read when torch is first imported
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what C code writes to file descriptor 2 during the block (when enabled)."""
    lines: list[str] = []
    if not _capture_decoder_messages:
        yield lines
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(line.strip() for line in tmp.read().decode(errors="replace").splitlines() if line.strip())


def _decoder_error(e: sf.LibsndfileError) -> str:
    text = (e.error_string or "").strip()
    # libsndfile says this when its MPEG probe finds no audio frame in an existing file
    if text.startswith("File does not exist or is not a regular file"):
        text = "no audio stream found"
    return text or f"libsndfile error {e.code}"


def check_audio_path(path: Path) -> None:
    """Refuse, before reading, a path that cannot be audio we decode (whole-file and streamed decoding alike)."""
    suffix = path.suffix.lower()
    if suffix in UNSUPPORTED_EXTENSIONS:
        raise AudioError(
            path,
            f"unsupported audio format {suffix} (soundfile cannot decode it); "
            f"convert it, e.g. `ffmpeg -i IN{suffix} OUT.flac`",
        )
    if suffix not in AUDIO_EXTENSIONS:
        raise AudioError(
            path, f"not an audio file name ({suffix or 'no extension'}, not one of .mp3 .ogg .opus .flac .wav .aiff ...)"
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AudioError(path, "missing file") from None
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    if size == 0:
        raise AudioError(path, "empty file (0 bytes)")


def decode(path: str | Path) -> tuple[np.ndarray, int]:
    """The file's samples averaged over channels (float32, mono) and its sample rate.

    Raises :class:`AudioError` for a missing, empty, non-audio, unsupported or
    undecodable file. A file that ends early (a truncated MP3 or Ogg) gives the
    part that decodes, as every soundfile-based loader does.
    """
    path = Path(path)
    check_audio_path(path)
    try:
        with _captured_stderr() as messages:
            x, sr = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        said = f" (decoder: {'; '.join(_SOURCE_PREFIX.sub('', m) for m in messages[:2])})" if messages else ""
        raise AudioError(path, f"corrupt or not audio: {_decoder_error(e)}{said}") from None
    except (RuntimeError, ValueError, TypeError) as e:  # soundfile's own checks on odd headers
        raise AudioError(path, f"corrupt or not audio: {type(e).__name__}: {e}") from None
    if x.shape[0] == 0:
        raise AudioError(path, "no audio samples (0 frames decoded)")
    return to_mono(x), int(sr)


def to_mono(x: np.ndarray) -> np.ndarray:
    """(samples, channels) float32 -> (samples,): the channel mean, as np.mean / librosa.to_mono compute it."""
    channels = x.shape[1]
    if channels == 1:
        return np.ascontiguousarray(x[:, 0])
    mono = x[:, 0].copy()  # column sums: far faster than np.mean over a strided axis, same float32 result
    for c in range(1, channels):
        mono += x[:, c]
    mono /= np.float32(channels)
    return mono


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's CPU ops of the block on one thread, then restore the count.

    The per-file signal processing here is made of many small ops: on a busy
    machine, torch's intra-op threads waiting for each other made the log-mel
    transform 35x slower than one thread (measured: 540 ms instead of 16 ms
    for a minute of audio with 2 threads on 2 loaded cores). Parallelism comes
    from the decoding worker processes instead.
    """
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resample(x: np.ndarray, orig_rate: int, new_rate: int, method: str = "sinc") -> np.ndarray:
    """``x`` at ``new_rate``; a no-op at equal rates.

    ``sinc``: torchaudio's default band-limited resampling (Hann-windowed sinc).
    ``linear``: libsamplerate's SRC_LINEAR as Essentia's MonoLoader runs it
    (see :func:`linear_outputs`), for recipes that must match Essentia's output.
    """
    if orig_rate == new_rate:
        return x
    if method == "linear":
        return _linear_whole(x, orig_rate, new_rate)
    if method != "sinc":
        raise ValueError(f"resample method {method!r}; valid values: sinc, linear")
    import torch
    import torchaudio

    with one_torch_thread():
        return torchaudio.functional.resample(torch.from_numpy(x), int(orig_rate), int(new_rate)).numpy()


# Outputs computed per numpy call by the whole-signal linear resampler: bounds its temporary arrays.
LINEAR_CHUNK = 1 << 20


def linear_step(orig_rate: int, new_rate: int) -> float:
    """Input samples per output sample, as Essentia gives libsamplerate its ratio: new/orig in float32.

    Essentia's Resample computes the ratio in its ``Real`` type (float32); the
    step 1/ratio then differs from orig/new by up to 6e-8 relative, which moves
    the outputs near the end of a 10-minute 44.1 kHz track by over a sample.
    """
    return 1.0 / float(np.float32(new_rate) / np.float32(orig_rate))


def linear_count(n: int, step: float) -> int:
    """How many outputs the linear resampler gives for ``n`` input samples: those at positions ``k*step < n``."""
    if n <= 0:
        return 0
    k = math.ceil(n / step)
    while k > 0 and (k - 1) * step >= n:  # the float product, not the quotient, decides (as in linear_outputs)
        k -= 1
    while k * step < n:
        k += 1
    return k


def linear_outputs(x: np.ndarray, start: int, k0: int, k1: int, step: float) -> np.ndarray:
    """Outputs ``k0 <= k < k1`` of libsamplerate's linear converter; ``x`` holds input samples ``start, start+1, ...``.

    Output k lies at input position ``k*step - 1``: SRC_LINEAR begins with its
    "last sample" set to the first input sample, one position before it, and
    steps from there. Between samples i and i+1 it gives ``x[i] + frac*(x[i+1] - x[i])``
    (the difference in float32, the rest in float64, as its C code computes);
    sample -1 is the first sample. The position is computed from k directly, so
    any split of k into calls gives the same values; libsamplerate accumulates
    it step by step, which differs in the last bits (measured against Essentia:
    |difference| < 2e-8, 99.98% of samples equal at 44.1 kHz; at 8/16/32 kHz
    its sum can fall just short of the last sample and give one output more).
    ``x`` must hold the samples ``max(0, floor(k0*step - 1))`` to ``floor((k1-1)*step - 1) + 1``.
    """
    pos = np.arange(k0, k1, dtype=np.float64) * step - 1.0
    left = np.floor(pos)
    frac = pos - left
    i = left.astype(np.int64) - start
    lo = x[np.maximum(i, 0)]  # position -1 (only when x starts the signal): the first sample
    hi = x[i + 1]
    return (lo + frac * (hi - lo)).astype(np.float32)


def _linear_whole(x: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """:func:`linear_outputs` for a whole signal, LINEAR_CHUNK outputs per call (the same values as one call)."""
    step = linear_step(orig_rate, new_rate)
    total = linear_count(x.shape[0], step)
    out = np.empty(total, dtype=np.float32)
    for k0 in range(0, total, LINEAR_CHUNK):
        k1 = min(total, k0 + LINEAR_CHUNK)
        out[k0:k1] = linear_outputs(x, 0, k0, k1, step)
    return out


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


def frame_count(n_samples: int, spec: FeatureSpec) -> int:
    """Frames the recipe gives for ``n_samples`` samples at its rate (centred frames)."""
    if n_samples <= 0:
        return 0
    return max(0, 1 + n_samples // spec.hop_length - int(spec.drop_first_frame))


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
