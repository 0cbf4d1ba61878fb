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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from freqtag.audio.decode import DECODE_BLOCK, AudioError, decoded_blocks
from freqtag.audio.logmel import LogMel
from freqtag.audio.loudness import SilenceScan
from freqtag.audio.resample import BlockResampler, LinearBlockResampler, Signal, block_resampler
from freqtag.features import FeatureSpec

__all__ = ["BlockLogMel", "FileFeatures", "stream_features", "REPLAY_SAMPLES", "FEATURE_SEGMENT"]

REPLAY_SAMPLES = 1 << 24  # resampled samples kept for a trimming recipe's second pass
FEATURE_SEGMENT = 1 << 19  # samples per LogMel call (plus its context)

FrameSink = Callable[[np.ndarray], None]


def _signal(spec: FeatureSpec) -> Signal:
    return spec.sample_rate, spec.resample


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
