"""Bringing a signal to a recipe's rate, whole or in blocks, with the same output bits either way.

``sinc`` is torchaudio's band-limited resampling (Hann-windowed sinc); ``linear``
is libsamplerate's SRC_LINEAR as Essentia's ``MonoLoader(resampleQuality=4)``
runs it (no anti-aliasing filter: energy above the new Nyquist folds into the
top bands, as in MTG's files). :class:`BlockResampler` and
:class:`LinearBlockResampler` take the signal in blocks (the streamed path) and
give the outputs of :func:`resample` on the whole signal.
"""

from __future__ import annotations

import math

import numpy as np

from freqtag.audio.threads import one_torch_thread

# torch is imported where it is needed: a worker that only decodes 44.1 kHz files for mel128 never pays its import.

__all__ = [
    "resample",
    "linear_step",
    "linear_count",
    "linear_outputs",
    "BlockResampler",
    "LinearBlockResampler",
    "block_resampler",
    "Signal",
]

Signal = tuple[int, str]  # (sample rate, resample method): recipes sharing one share the resampled signal


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


class BlockResampler:
    """torchaudio's default resampling of a signal that arrives in blocks; outputs equal the whole-signal call.

    ``torchaudio.functional.resample`` (after dividing both rates by their gcd
    to ``a`` -> ``b``) pads the signal with ``width`` zeros on the left, and
    output block t (b samples) reads input ``[t*a - width, t*a + width + a)``.
    A segment that starts at input ``k*a`` gives output blocks ``k + t'``; those
    whose input lies inside the segment are exact, the rest are recomputed by
    the next call, whose segment starts ``context`` samples earlier.
    """

    def __init__(self, orig_rate: int, new_rate: int, segment: int) -> None:
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
        return resample(x, *self.rates)  # one thread there: a segment's outputs equal the whole-signal call's

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
    """:func:`resample` ``linear`` of a signal that arrives in blocks; outputs equal the whole-signal call.

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
    orig_rate: int, signal: Signal, segment: int
) -> BlockResampler | LinearBlockResampler:
    """The streamed resampler of ``signal`` (rate, method) for a file at ``orig_rate``."""
    rate, method = signal
    if method == "linear":
        return LinearBlockResampler(orig_rate, rate)
    return BlockResampler(orig_rate, rate, segment)
