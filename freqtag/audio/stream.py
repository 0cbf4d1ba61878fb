"""An audio file's features for several recipes at once, computed in blocks: memory bounded for any length.

:func:`freqtag.audio.decode.features_from_file` holds the whole decoded signal (an
hour of 44.1 kHz stereo is 1.3 GB of float32). Tagging must not, so here the
same recipe is computed from fixed-size blocks, and gives the same frames:

- **decode**: ``soundfile`` reads ``DECODE_BLOCK`` sample frames at a time;
  channels are averaged per block (the same float32 arithmetic as
  :func:`freqtag.audio.decode.to_mono`).
- **resample** (:class:`BlockResampler`): torchaudio's sinc resampler is a
  strided convolution, so an output sample depends on a bounded stretch of
  input. Each call runs on a segment that starts on a multiple of the
  resampler's input period and carries enough context on both sides; only the
  outputs that the context makes exact are kept. The linear resampler
  (:class:`LinearBlockResampler`, ``resample: linear`` recipes) needs two input
  samples per output and keeps one sample between blocks.
- **silence** (:class:`SilenceScan`): ``librosa.effects.trim`` compares every
  2048-sample frame with the loudest one, which is known only at the end. The
  scan keeps one float64 per 512 samples (8 bytes per 11.6 ms at 44.1 kHz,
  about 2.5 MB an hour) and decides the kept interval at the end.
- **log-mel** (:class:`BlockLogMel`): frames are centred windows of n_fft
  samples every hop; each call of :class:`freqtag.audio.logmel.LogMel` gets a
  segment starting on a hop boundary, and only frames lying wholly inside the
  segment (or touching the signal's true ends, where the recipe's own padding
  applies) are kept.

A trimming recipe (``mel128``) can only start producing frames once the
silence interval is known, i.e. after the whole file has been read. The
resampled signal is therefore kept in memory while it is short (up to
``replay_samples``, 2**24 samples = 64 MB, 6.3 minutes at 44.1 kHz: any
ordinary song is decoded once); a longer file is decoded a second time
(``passes`` says how many times a file was read). Recipes that do not trim
(``mel96``) are computed during the first pass.

Refusals are :class:`freqtag.audio.decode.AudioError`, with the same reasons as the
whole-file path (missing, empty, not audio, unsupported, corrupt, non-finite,
silent, too short).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch

from freqtag.audio.decode import (
    SILENCE_RMS,
    TRIM_FRAME_LENGTH,
    TRIM_HOP_LENGTH,
    AudioError,
    _decoder_error,
    _interval,
    check_audio_path,
    linear_count,
    linear_outputs,
    linear_step,
    one_torch_thread,
    to_mono,
)
from freqtag.audio.logmel import LogMel
from freqtag.features import FeatureSpec

__all__ = [
    "BlockResampler",
    "LinearBlockResampler",
    "block_resampler",
    "BlockLogMel",
    "SilenceScan",
    "FileFeatures",
    "stream_features",
    "DECODE_BLOCK",
    "REPLAY_SAMPLES",
]

DECODE_BLOCK = 1 << 18  # sample frames per read: 6 s at 44.1 kHz
REPLAY_SAMPLES = 1 << 24  # resampled samples kept for a trimming recipe's second pass
FEATURE_SEGMENT = 1 << 19  # samples per LogMel call (plus its context)

FrameSink = Callable[[np.ndarray], None]
Signal = tuple[int, str]  # (sample rate, resample method): recipes sharing one share the resampled signal


def decoded_blocks(path: Path, block: int = DECODE_BLOCK) -> Iterator[tuple[np.ndarray, int]]:
    """(mono float32 block, sample rate) pairs, in order, for the whole file."""
    check_audio_path(path)
    try:
        f = sf.SoundFile(path)
    except sf.LibsndfileError as e:
        raise AudioError(path, f"corrupt or not audio: {_decoder_error(e)}") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise AudioError(path, f"corrupt or not audio: {type(e).__name__}: {e}") from None
    with f:
        rate = int(f.samplerate)
        total = 0
        while True:
            try:
                x = f.read(block, dtype="float32", always_2d=True)
            except sf.LibsndfileError as e:
                raise AudioError(path, f"corrupt or not audio: {_decoder_error(e)}") from None
            except (RuntimeError, ValueError, TypeError) as e:
                raise AudioError(path, f"corrupt or not audio: {type(e).__name__}: {e}") from None
            if x.shape[0] == 0:
                break
            total += x.shape[0]
            mono = to_mono(x)
            if not np.isfinite(mono).all():
                raise AudioError(path, "non-finite samples (NaN or inf) in the decoded audio")
            yield mono, rate
        if total == 0:
            raise AudioError(path, "no audio samples (0 frames decoded)")


class BlockResampler:
    """torchaudio's default resampling of a signal that arrives in blocks; outputs equal the whole-signal call.

    ``torchaudio.functional.resample`` (after dividing both rates by their gcd
    to ``a`` -> ``b``) pads the signal with ``width`` zeros on the left, and
    output block t (b samples) reads input ``[t*a - width, t*a + width + a)``.
    A segment that starts at input ``k*a`` gives output blocks ``k + t'``; those
    whose input lies inside the segment are exact, the rest are recomputed by
    the next call, whose segment starts ``context`` samples earlier.
    """

    def __init__(self, orig_rate: int, new_rate: int, segment: int = FEATURE_SEGMENT) -> None:
        import torchaudio

        self.identity = orig_rate == new_rate
        if self.identity:
            return
        self.rates = (int(orig_rate), int(new_rate))
        g = math.gcd(orig_rate, new_rate)
        self.a, self.b = orig_rate // g, new_rate // g
        # the kernel's reach, as torchaudio computes it (Resample's kernel is built in another dtype than
        # functional.resample's, which the whole-file path uses: its outputs differ in the last bits)
        self.width = int(torchaudio.transforms.Resample(orig_rate, new_rate).width)
        self.context = -(-self.width // self.a) * self.a  # whole input periods covering the kernel's reach
        self.segment = max(segment, 4 * (self.context + self.a))
        self.buffer = np.zeros(0, dtype=np.float32)
        self.start_block = 0  # output block of buffer[0] when buffer[0] is at a period boundary
        self.left_exact = True  # buffer starts at the signal's start: its zero padding is the real one
        self.n_in = 0

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torchaudio

        # one thread, as freqtag.audio.decode.resample: then a segment's outputs equal the whole-signal call's bit for bit
        with one_torch_thread(), torch.inference_mode():
            return torchaudio.functional.resample(torch.from_numpy(x), *self.rates).numpy()

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.identity:
            return x
        self.n_in += x.shape[0]
        self.buffer = np.concatenate([self.buffer, x]) if self.buffer.size else x
        if self.buffer.shape[0] < self.segment:
            return np.zeros(0, dtype=np.float32)
        return self._emit(final=False)

    def _emit(self, final: bool) -> np.ndarray:
        buf = self.buffer
        y = self._run(buf)
        first = 0 if self.left_exact else self.context // self.a  # blocks before this lack left context
        if final:
            last = -(-y.shape[0] // self.b)
        else:
            last = (buf.shape[0] - self.width - self.a) // self.a + 1  # blocks whose input is inside the buffer
            last = min(last, -(-y.shape[0] // self.b))
        out = y[first * self.b : last * self.b]
        # keep enough input for the next call: from `context` samples before the first missing block
        keep_from = last * self.a - self.context
        self.buffer = buf[keep_from:].copy()
        self.left_exact = False
        return out

    def finish(self) -> np.ndarray:
        if self.identity or self.buffer.size == 0:
            return np.zeros(0, dtype=np.float32)
        return self._emit(final=True)


class LinearBlockResampler:
    """:func:`freqtag.audio.decode.resample` ``linear`` of a signal that arrives in blocks; outputs equal the whole-signal call.

    Output k lies at input position ``k*step - 1`` and is final as soon as the
    input reaches past it (whether it exists, ``k*step < n``, never depends on
    later input), so each push gives every output up to the last sample
    received, computed by the same function of k as the whole-signal call. The
    buffer keeps the input from the next output's left sample on: one sample.
    """

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        self.identity = orig_rate == new_rate
        self.step = linear_step(orig_rate, new_rate)
        self.buffer = np.zeros(0, dtype=np.float32)
        self.start = 0  # input index of buffer[0]
        self.n_in = 0
        self.k = 0  # next output

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.identity:
            return x
        self.n_in += x.shape[0]
        self.buffer = np.concatenate([self.buffer, x]) if self.buffer.size else np.asarray(x, dtype=np.float32)
        k1 = linear_count(self.n_in, self.step)
        y = linear_outputs(self.buffer, self.start, self.k, k1, self.step)
        self.k = k1
        left = max(0, int(np.floor(np.float64(k1) * self.step - 1.0)))  # the next output's left sample
        keep = min(left, self.n_in)
        self.buffer = self.buffer[keep - self.start :].copy()
        self.start = keep
        return y

    def finish(self) -> np.ndarray:
        return np.zeros(0, dtype=np.float32)  # every output was final when its input arrived


def block_resampler(
    orig_rate: int, signal: Signal, segment: int = FEATURE_SEGMENT
) -> BlockResampler | LinearBlockResampler:
    """The streamed resampler of ``signal`` (rate, method) for a file at ``orig_rate``."""
    rate, method = signal
    if method == "linear":
        return LinearBlockResampler(orig_rate, rate)
    return BlockResampler(orig_rate, rate, segment)


def _signal(spec: FeatureSpec) -> Signal:
    return spec.sample_rate, spec.resample


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


@functools.lru_cache(maxsize=8)
def _logmel(spec: FeatureSpec) -> LogMel:
    return LogMel(spec)


class BlockLogMel:
    """The recipe's frames of a signal that arrives in blocks, handed to ``sink`` as (frames, n_mels) float32.

    Frame f is the window of n_fft samples centred on sample f*hop (the recipe
    pads n_fft/2 at both ends of the signal). A :class:`LogMel` call on a
    segment starting at sample ``s = k*hop`` gives frame ``k + j`` as its frame
    j; frames whose window reaches outside the segment are wrong unless that
    side is the signal's true end, and are recomputed by the next call.
    """

    def __init__(self, spec: FeatureSpec, sink: FrameSink, logmel: LogMel | None = None,
                 segment: int = FEATURE_SEGMENT) -> None:
        self.spec = spec
        self.sink = sink
        self.logmel = logmel or _logmel(spec)
        self.half = spec.n_fft // 2
        self.lead = -(-self.half // spec.hop_length)  # frames of a segment whose window starts before it
        self.first = int(spec.drop_first_frame)
        if self.lead < self.first:
            raise ValueError(f"{spec.name}: n_fft/2 < hop with drop_first_frame is not supported in blocks")
        self.segment = max(int(segment), 4 * spec.n_fft)
        self.buffer = np.zeros(0, dtype=np.float32)
        self.offset = 0  # sample index of buffer[0], a multiple of hop
        self.next_frame = 0  # first recipe frame (before dropping) not yet given to the sink
        self.n = 0
        self.frames = 0

    def push(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        self.n += x.shape[0]
        self.buffer = np.concatenate([self.buffer, x]) if self.buffer.size else np.asarray(x, dtype=np.float32)
        if self.buffer.shape[0] >= self.segment:
            self._emit(final=False)

    def _emit(self, final: bool) -> None:
        hop = self.spec.hop_length
        buf = self.buffer
        if buf.shape[0] <= self.half and self.spec.pad_mode == "reflect":
            raise ValueError("internal: a reflect-padded segment must be longer than n_fft/2")
        out = self.logmel([buf])[0]  # its frame j is call frame j + first
        k0 = self.offset // hop
        n_call = out.shape[0] + self.first
        if final:
            j_end = n_call
        else:  # frames whose window ends inside the buffer
            j_end = min(n_call, (buf.shape[0] - self.half) // hop + 1)
        j_start = self.next_frame - k0
        if j_start < j_end:
            lo = max(j_start, self.first)
            frames = out[lo - self.first : j_end - self.first]
            if frames.shape[0]:
                self.sink(frames)
                self.frames += frames.shape[0]
            self.next_frame = k0 + j_end
        if not final:
            # one hop more than the next frame's window needs: a last segment that ends exactly where
            # that window does still holds more than n_fft/2 samples, as reflect padding requires
            new_offset = max(0, (self.next_frame - self.lead - 1) * hop)
            self.buffer = buf[new_offset - self.offset :].copy()
            self.offset = new_offset

    def finish(self) -> None:
        if self.n == 0:
            return
        self._emit(final=True)


@dataclass
class FileFeatures:
    """What reading one file gave: its length and, per recipe, the frames handed to the sinks."""

    path: Path
    sample_rate: int = 0
    samples: int = 0
    passes: int = 1
    frames: dict[str, int] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0


def _feed(x: np.ndarray, piece: int, *consumers: Callable[[np.ndarray], None]) -> None:
    for i in range(0, x.shape[0], piece):
        for c in consumers:
            c(x[i : i + piece])


def stream_features(
    path: str | Path,
    specs: Sequence[FeatureSpec],
    sinks: Sequence[FrameSink],
    *,
    decode_block: int = DECODE_BLOCK,
    replay_samples: int = REPLAY_SAMPLES,
    segment: int = FEATURE_SEGMENT,
) -> FileFeatures:
    """Decode ``path`` in blocks and hand each recipe's frames, in order, to its sink.

    The frames equal :func:`freqtag.audio.decode.features_from_file` (float32
    rounding aside). Raises :class:`AudioError` for a file that gives no
    features; the sinks may already have received frames then.
    """
    path = Path(path)
    if len(specs) != len(sinks):
        raise ValueError("one sink per spec")
    info = FileFeatures(path)
    rates = sorted({_signal(s) for s in specs})
    resamplers: dict[Signal, BlockResampler | LinearBlockResampler] = {}
    scans = {r: SilenceScan() for r in rates}
    replay: dict[Signal, list[np.ndarray] | None] = {
        r: [] for r in rates if any(s.trim_top_db is not None and _signal(s) == r for s in specs)
    }
    kept = {r: 0 for r in replay}
    direct = [(s, BlockLogMel(s, sink, segment=segment)) for s, sink in zip(specs, sinks) if s.trim_top_db is None]

    def at_rate(rate: Signal, y: np.ndarray) -> None:
        if y.size == 0:
            return
        scans[rate].push(y)
        for s, bl in direct:
            if _signal(s) == rate:
                bl.push(y)
        if rate in replay and replay[rate] is not None:
            if kept[rate] + y.shape[0] > replay_samples:
                replay[rate] = None  # too long to keep: decode again for the trimming recipes
            else:
                replay[rate].append(y)  # type: ignore[union-attr]
                kept[rate] += y.shape[0]

    for mono, sr in decoded_blocks(path, decode_block):
        if not resamplers:
            info.sample_rate = sr
            resamplers = {r: block_resampler(sr, r, segment) for r in rates}
        info.samples += mono.shape[0]
        for r, rs in resamplers.items():
            at_rate(r, rs.push(mono))
    for r, rs in resamplers.items():
        at_rate(r, rs.finish())

    for s, bl in direct:
        scans[_signal(s)].interval(path, s)  # the silence check
        _check_length(path, s, bl)
        bl.finish()
        _check_frames(path, s, bl)
        info.frames[s.name] = bl.frames

    trimming = [(s, sink) for s, sink in zip(specs, sinks) if s.trim_top_db is not None]
    if not trimming:
        return info
    intervals = {s.name: scans[_signal(s)].interval(path, s) for s, _ in trimming}
    blocks = {s.name: BlockLogMel(s, sink, segment=segment) for s, sink in trimming}

    def trimmed(rate: Signal, pieces: Iterator[np.ndarray]) -> None:
        pos = 0
        for y in pieces:
            for s, _ in trimming:
                if _signal(s) != rate:
                    continue
                start, end = intervals[s.name]
                lo, hi = max(start, pos), min(end, pos + y.shape[0])
                if lo < hi:
                    blocks[s.name].push(y[lo - pos : hi - pos])
            pos += y.shape[0]

    again = [r for r in replay if replay[r] is None]
    for r in replay:
        if replay[r] is not None:
            trimmed(r, iter(replay[r]))  # type: ignore[arg-type]
            replay[r] = None
    if again:
        info.passes = 2
        rs2 = {r: block_resampler(info.sample_rate, r, segment) for r in again}

        def second_pass(rate: Signal) -> Iterator[np.ndarray]:
            for mono, _ in decoded_blocks(path, decode_block):
                yield rs2[rate].push(mono)
            yield rs2[rate].finish()

        for r in again:  # one rate per extra pass (in practice there is only 44.1 kHz)
            trimmed(r, second_pass(r))
    for s, _ in trimming:
        _check_length(path, s, blocks[s.name])
        blocks[s.name].finish()
        _check_frames(path, s, blocks[s.name])
        info.frames[s.name] = blocks[s.name].frames
    return info


def _check_length(path: Path, spec: FeatureSpec, bl: BlockLogMel) -> None:
    """Before finish(): reflect padding needs more than n_fft/2 samples (the whole-file path's refusal)."""
    trimmed = " after trimming" if spec.trim_top_db is not None else ""
    if bl.n == 0 or (spec.pad_mode == "reflect" and bl.n <= spec.n_fft // 2):
        raise AudioError(path, f"too short: {bl.n} samples{trimmed}, {spec.name} needs more than {spec.n_fft // 2}")


def _check_frames(path: Path, spec: FeatureSpec, bl: BlockLogMel) -> None:
    """After finish(): a recipe that gave no frame refuses the file, as freqtag.audio.decode.waveform does."""
    if bl.frames < 1:
        trimmed = " after trimming" if spec.trim_top_db is not None else ""
        raise AudioError(path, f"too short: {bl.n / spec.sample_rate:.3f} s{trimmed} gives no frame of {spec.name}")
