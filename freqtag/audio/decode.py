"""Opening and decoding audio files: which names we try, the mono signal, and the refusals.

Decoding is soundfile's (libsndfile 1.1+: MP3, Ogg Vorbis/Opus, FLAC, WAV,
AIFF, ...); channels are averaged to mono in float32. Every refusal is an
:class:`AudioError` whose ``reason`` is one line for a report.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

__all__ = [
    "AudioError",
    "AUDIO_EXTENSIONS",
    "UNSUPPORTED_EXTENSIONS",
    "DECODE_BLOCK",
    "check_audio_path",
    "decode",
    "decoded_blocks",
    "to_mono",
    "check_finite",
    "quiet_decoder_messages",
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
DECODE_BLOCK = 1 << 18  # sample frames per read of the streamed path: 6 s at 44.1 kHz

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
def _captured_stderr(enabled: bool) -> Iterator[list[str]]:
    """Collect what C code writes to file descriptor 2 during the block (when enabled)."""
    lines: list[str] = []
    if not enabled:
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


@contextmanager
def _decoding(path: Path, capture: bool = False) -> Iterator[None]:
    """soundfile's exceptions in the block (opening or reading ``path``) as the one-line :class:`AudioError`.

    With ``capture`` (and :func:`quiet_decoder_messages` called), the decoder's
    own stderr lines of the block go into the reason instead of the terminal.
    """
    messages: list[str] = []
    try:
        with _captured_stderr(capture and _capture_decoder_messages) as messages:
            yield
    except sf.LibsndfileError as e:
        said = f" (decoder: {'; '.join(_SOURCE_PREFIX.sub('', m) for m in messages[:2])})" if messages else ""
        raise AudioError(path, f"corrupt or not audio: {_decoder_error(e)}{said}") from None
    except (RuntimeError, ValueError, TypeError) as e:  # soundfile's own checks on odd headers
        raise AudioError(path, f"corrupt or not audio: {type(e).__name__}: {e}") from None


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
    """The whole file's samples averaged over channels (float32, mono) and its sample rate.

    Raises :class:`AudioError` for a missing, empty, non-audio, unsupported or
    undecodable file. A file that ends early (a truncated MP3 or Ogg) gives the
    part that decodes, as every soundfile-based loader does.
    """
    ((x, rate),) = decoded_blocks(path, None)
    return x, rate


def decoded_blocks(path: str | Path, block: int | None = DECODE_BLOCK) -> Iterator[tuple[np.ndarray, int]]:
    """(mono float32 block, sample rate) pairs, in order, for the whole file; ``block`` None: one block.

    ``None`` reads the file in one ``soundfile.read``, with the decoder's
    messages captured (:func:`_decoding`): the whole-file path, whose stores
    must keep their bits (MP3s of 24 kHz and below decode to other float bits
    in blocks; see :mod:`freqtag.audio.whole`). The streamed reads leave the
    decoder's messages on stderr.
    """
    path = Path(path)
    check_audio_path(path)
    total = 0
    for x, rate in _whole_read(path) if block is None else _block_reads(path, block):
        total += x.shape[0]
        yield to_mono(x), rate
    if total == 0:
        raise AudioError(path, "no audio samples (0 frames decoded)")


def _whole_read(path: Path) -> Iterator[tuple[np.ndarray, int]]:
    with _decoding(path, capture=True):
        x, rate = sf.read(path, dtype="float32", always_2d=True)
    if x.shape[0]:
        yield x, int(rate)


def _block_reads(path: Path, block: int) -> Iterator[tuple[np.ndarray, int]]:
    with _decoding(path):
        f = sf.SoundFile(path)
    with f:
        while True:
            with _decoding(path):
                x = f.read(block, dtype="float32", always_2d=True)
            if x.shape[0] == 0:
                return
            yield x, int(f.samplerate)


def check_finite(path: str | Path, x: np.ndarray) -> None:
    """Refuse decoded samples that hold NaN or inf."""
    if not np.isfinite(x).all():
        raise AudioError(path, "non-finite samples (NaN or inf) in the decoded audio")


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
