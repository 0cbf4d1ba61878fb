"""An audio file's features for several recipes at once, computed in blocks: memory bounded for any length.

:func:`freqtag.audio.whole.features_from_file` holds the whole decoded signal (an
hour of 44.1 kHz stereo is 1.3 GB of float32). Tagging must not, so here the
same recipe is computed from fixed-size blocks by the same pieces:

- **decode** (:func:`freqtag.audio.decode.decoded_blocks`): ``soundfile``
  reads ``DECODE_BLOCK`` sample frames at a time; channels are averaged per
  block.
- **resample** (:class:`freqtag.audio.resample.BlockResampler`): torchaudio's
  sinc resampler is a strided convolution, so an output sample depends on a
  bounded stretch of input. Each call runs on a segment that starts on a
  multiple of the resampler's input period and carries enough context on both
  sides; only the outputs that the context makes exact are kept. The linear
  resampler (``resample: linear`` recipes) needs two input samples per output
  and keeps one sample between blocks.
- **silence** (:class:`freqtag.audio.loudness.SilenceScan`):
  ``librosa.effects.trim`` compares every 2048-sample frame with the loudest
  one, which is known only at the end. The scan keeps one float64 per 512
  samples and decides the kept interval at the end.
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

Refusals are :class:`freqtag.audio.decode.AudioError`, made by the same
functions as the whole-file path's (missing, empty, not audio, unsupported,
corrupt, non-finite, silent, too short). The frames equal the whole-file
path's (bit for bit on every file measured), except for MP3s of 24 kHz and
below longer than one decode block (see :mod:`freqtag.audio.whole`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from freqtag.audio.decode import DECODE_BLOCK, check_finite, decoded_blocks
from freqtag.audio.frames import check_length
from freqtag.audio.logmel import LogMel, cached_logmel
from freqtag.audio.loudness import SilenceScan
from freqtag.audio.resample import BlockResampler, LinearBlockResampler, Signal, block_resampler
from freqtag.features import FeatureSpec

__all__ = ["BlockLogMel", "FileFeatures", "stream_features", "REPLAY_SAMPLES", "FEATURE_SEGMENT"]

REPLAY_SAMPLES = 1 << 24  # resampled samples kept for a trimming recipe's second pass
FEATURE_SEGMENT = 1 << 19  # samples per LogMel call (plus its context)

FrameSink = Callable[[np.ndarray], None]


def _signal(spec: FeatureSpec) -> Signal:
    return spec.sample_rate, spec.resample


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
        self.logmel = logmel or cached_logmel(spec)
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

    The frames equal :func:`freqtag.audio.whole.features_from_file` (float32
    rounding aside). Raises :class:`freqtag.audio.decode.AudioError` for a file that gives no
    features; the sinks may already have received frames then.
    """
    path = Path(path)
    if len(specs) != len(sinks):
        raise ValueError("one sink per spec")
    info = FileFeatures(path)
    blocks = [(s, BlockLogMel(s, sink, segment=segment)) for s, sink in zip(specs, sinks)]
    direct = [(s, bl) for s, bl in blocks if s.trim_top_db is None]
    trimming = [(s, bl) for s, bl in blocks if s.trim_top_db is not None]
    scans, replay = _first_pass(path, specs, direct, info, decode_block, replay_samples, segment)
    for s, bl in direct:
        scans[_signal(s)].interval(path, s)  # the silence check
        info.frames[s.name] = _last_frames(path, s, bl)
    if trimming:
        _trimmed_pass(path, trimming, scans, replay, info, decode_block, segment)
    return info


def _first_pass(
    path: Path,
    specs: Sequence[FeatureSpec],
    direct: Sequence[tuple[FeatureSpec, BlockLogMel]],
    info: FileFeatures,
    decode_block: int,
    replay_samples: int,
    segment: int,
) -> tuple[dict[Signal, SilenceScan], dict[Signal, list[np.ndarray] | None]]:
    """Decode once: feed the recipes that do not trim, scan every rate's loudness, keep short signals to replay.

    Returns the scans and, per rate a trimming recipe needs, its resampled
    blocks (None: longer than ``replay_samples``, to be decoded again).
    """
    rates = sorted({_signal(s) for s in specs})
    scans = {r: SilenceScan() for r in rates}
    replay: dict[Signal, list[np.ndarray] | None] = {
        r: [] for r in rates if any(s.trim_top_db is not None and _signal(s) == r for s in specs)
    }
    kept = {r: 0 for r in replay}

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

    resamplers: dict[Signal, BlockResampler | LinearBlockResampler] = {}
    for mono, sr in decoded_blocks(path, decode_block):
        check_finite(path, mono)
        if not resamplers:
            info.sample_rate = sr
            resamplers = {r: block_resampler(sr, r, segment) for r in rates}
        info.samples += mono.shape[0]
        for r, rs in resamplers.items():
            at_rate(r, rs.push(mono))
    for r, rs in resamplers.items():
        at_rate(r, rs.finish())
    return scans, replay


def _trimmed_pass(
    path: Path,
    trimming: Sequence[tuple[FeatureSpec, BlockLogMel]],
    scans: dict[Signal, SilenceScan],
    replay: dict[Signal, list[np.ndarray] | None],
    info: FileFeatures,
    decode_block: int,
    segment: int,
) -> None:
    """Feed the trimming recipes their kept interval: from the replayed blocks, or from a second decode."""
    intervals = {s.name: scans[_signal(s)].interval(path, s) for s, _ in trimming}  # refuses a silent file first

    def trimmed(rate: Signal, pieces: Iterable[np.ndarray]) -> None:
        pos = 0
        for y in pieces:
            for s, bl in trimming:
                if _signal(s) != rate:
                    continue
                start, end = intervals[s.name]
                lo, hi = max(start, pos), min(end, pos + y.shape[0])
                if lo < hi:
                    bl.push(y[lo - pos : hi - pos])
            pos += y.shape[0]

    def second_pass(rate: Signal) -> Iterator[np.ndarray]:
        rs = block_resampler(info.sample_rate, rate, segment)
        for mono, _ in decoded_blocks(path, decode_block):
            yield rs.push(mono)
        yield rs.finish()

    for r, blocks in replay.items():
        if blocks is not None:
            trimmed(r, blocks)
    for r in [r for r, blocks in replay.items() if blocks is None]:  # one rate per extra pass (in practice 44.1 kHz)
        info.passes = 2
        trimmed(r, second_pass(r))
    for s, bl in trimming:
        info.frames[s.name] = _last_frames(path, s, bl)


def _last_frames(path: Path, spec: FeatureSpec, bl: BlockLogMel) -> int:
    """Refuse a signal too short for the recipe (as the whole-file path does), else give its last frames."""
    check_length(path, spec, bl.n)
    bl.finish()
    return bl.frames
