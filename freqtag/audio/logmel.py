"""The recipes' log-mel transform, batched on a torch device.

:class:`LogMel` takes mono waveforms at the recipe's rate, as
:func:`freqtag.audio.whole.waveform` makes them, and returns (frames, n_mels)
float32 features: framing, window, FFT, power, mel filterbank,
``db_multiplier * log10(max(x, amin))``, optional first frame dropped. The
recipes (``conf/features/*.yaml``, read as :class:`freqtag.features.FeatureSpec`):

- ``mel128`` is torchaudio's ``MelSpectrogram`` + ``AmplitudeToDB`` (44.1 kHz,
  n_fft 2048, hop 1024, 0-16 kHz, 128 HTK bands without norm, power 2,
  reflect padding, 10*log10) on the trimmed signal, first frame dropped; equal
  to the reference preprocessing (librosa's trim, torchaudio) to float32
  rounding, ~1e-5 dB.
- ``mel96`` is MTG's Essentia recipe as torchaudio formulates it (12 kHz
  resampled linearly, ``Spectrogram(n_fft=512, hop_length=256, power=2,
  center=True, pad_mode="constant")`` with a symmetric Hann window, 96 Slaney
  filters of unit area over 0-6 kHz, ``20*log10``). Essentia yields one more
  trailing frame (a last, mostly zero-padded frame); we do not add it: the
  spec has no field for it, it holds at most the last 21 ms of the track, and
  whole-track evaluation uses non-overlapping windows.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torchaudio

from freqtag.audio.threads import one_torch_thread
from freqtag.features import FeatureSpec

__all__ = ["LogMel", "cached_logmel", "mel_filterbank", "analysis_window", "BLOCK_FRAMES"]

# Frames per transform block (see LogMel): a fixed shape per recipe.
BLOCK_FRAMES = 512


def mel_filterbank(spec: FeatureSpec) -> torch.Tensor:
    """(n_fft//2 + 1, n_mels) float32: torchaudio's ``melscale_fbanks`` with the recipe's scale and norm."""
    return torchaudio.functional.melscale_fbanks(
        spec.n_fft // 2 + 1,
        spec.f_min,
        spec.f_max,
        spec.n_mels,
        spec.sample_rate,
        norm=spec.mel_norm,
        mel_scale=spec.mel_scale,
    )


def analysis_window(spec: FeatureSpec) -> torch.Tensor:
    """(win_length,) float32 Hann window: periodic (torchaudio's default) or symmetric (Essentia's, MTG's files).

    The two differ by a 1/win_length stretch; on mel96 that alone moves the
    median bin by 0.02 dB against Essentia's output.
    """
    return torch.hann_window(spec.win_length, periodic=spec.window == "hann_periodic")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device}: not a torch device ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: no CUDA device is available here (torch.cuda.is_available() is False); "
            f"use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return dev


class LogMel:
    """The recipe's log-mel spectrogram of many waveforms, batched on ``device``.

    ``LogMel(spec)(waves)`` takes mono signals at ``spec.sample_rate`` (numpy
    or torch, any lengths) and returns one float32 (frames, n_mels) numpy
    array per signal, frames as :func:`freqtag.audio.frames.frame_count` says.

    Each signal is padded by n_fft//2 on both sides (``spec.pad_mode``, as
    ``torch.stft(center=True)`` does) and cut into frames; the frames of all
    signals are packed into blocks of ``block_frames`` rows (the last one zero
    filled), and every block goes through the same fixed-shape computation:
    window, real FFT, ``|X|**power``, mel filterbank, dB. Fixed shapes make a
    frame's result independent of its neighbours in the batch. This is
    torchaudio's ``MelSpectrogram`` arithmetic, less two wasted steps: FFT bins
    above f_max (all-zero filterbank rows) are dropped before the product, and
    power 2 is ``re**2 + im**2`` (so results agree with torchaudio to float32
    rounding, ~1e-6 dB, instead of bit for bit).
    """

    def __init__(self, spec: FeatureSpec, device: str | torch.device = "cpu", block_frames: int = BLOCK_FRAMES) -> None:
        self.spec = spec
        self.device = _device(device)
        self.block_frames = int(block_frames)
        window = analysis_window(spec)
        if spec.win_length < spec.n_fft:  # centred in the frame, as torch.stft does
            left = (spec.n_fft - spec.win_length) // 2
            window = torch.nn.functional.pad(window, (left, spec.n_fft - spec.win_length - left))
        self.window = window.to(self.device)
        self.filterbank = mel_filterbank(spec).to(self.device)
        # FFT bins above the last one any band uses (above f_max) are never computed into the product
        used = torch.nonzero(self.filterbank.abs().sum(dim=1)).flatten()
        self.n_bins = int(used.max()) + 1 if used.numel() else 1
        self._bank = self.filterbank[: self.n_bins].contiguous()

    def _padded(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        if t.ndim != 1:
            raise ValueError(f"LogMel takes mono signals (1-D), got shape {tuple(t.shape)}")
        half = self.spec.n_fft // 2
        if self.spec.pad_mode == "constant":
            return torch.nn.functional.pad(t, (half, half))
        return torch.nn.functional.pad(t[None, None], (half, half), mode=self.spec.pad_mode)[0, 0]

    def _block(self, windowed: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(windowed, dim=-1)[:, : self.n_bins]
        if self.spec.power == 2.0:  # |X|^2 without the square root of abs()
            power = spectrum.real.square() + spectrum.imag.square()
        else:
            power = spectrum.abs().pow(self.spec.power)
        mel = torch.matmul(power, self._bank)
        return self.spec.db_multiplier * torch.log10(torch.clamp(mel, min=self.spec.amin))

    def __call__(self, waves: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
        if self.device.type == "cpu":
            with one_torch_thread():  # see there: small ops, many threads, slow
                return self._run(waves)
        return self._run(waves)

    @torch.inference_mode()
    def _run(self, waves: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
        spec = self.spec
        views = []  # (frames, n_fft) strided views, no copy
        for x in waves:
            n = int(x.shape[0])
            if n == 0 or (spec.pad_mode == "reflect" and n <= spec.n_fft // 2):
                raise ValueError(f"a signal of {n} samples is too short for {spec.name} (needs > {spec.n_fft // 2})")
            views.append(self._padded(x).unfold(0, spec.n_fft, spec.hop_length))
        pieces: list[list[torch.Tensor]] = [[] for _ in views]
        buffer = torch.zeros(self.block_frames, spec.n_fft, device=self.device)
        owners: list[tuple[int, int, int]] = []  # (signal, row in buffer, rows)
        filled = 0

        def flush() -> None:
            nonlocal filled
            if filled:
                if filled < self.block_frames:
                    buffer[filled:].zero_()
                out = self._block(buffer)
                for i, row, rows in owners:
                    pieces[i].append(out[row : row + rows])
                owners.clear()
                filled = 0

        for i, view in enumerate(views):
            start = 0
            while start < view.shape[0]:
                rows = min(view.shape[0] - start, self.block_frames - filled)
                torch.mul(view[start : start + rows], self.window, out=buffer[filled : filled + rows])
                owners.append((i, filled, rows))
                filled += rows
                start += rows
                if filled == self.block_frames:
                    flush()
        flush()
        first = int(spec.drop_first_frame)
        return [torch.cat(p)[first:].cpu().numpy() for p in pieces]


@functools.lru_cache(maxsize=8)
def cached_logmel(spec: FeatureSpec, device: str = "cpu") -> LogMel:
    """One :class:`LogMel` per recipe and device in a process: its window and filterbank are built once."""
    return LogMel(spec, device)
