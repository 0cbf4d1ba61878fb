"""The two feature recipes from audio (freqtag.audio): against the reference chains, the recipe's
definitions, and audio that is real, generated, or broken."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from audio_signals import tone

from freqtag.audio.frames import frame_count
from freqtag.audio.logmel import LogMel, mel_filterbank
from freqtag.audio.loudness import nonsilent_interval
from freqtag.audio.resample import LinearBlockResampler, linear_count, linear_step, resample
from freqtag.audio.stream import stream_features
from freqtag.audio.whole import features_from_file
from freqtag.features import LEGACY_DEFAULTS, FeatureSpec

# librosa.load imports audioread, which imports modules Python 3.13 drops
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:audioread")

MEL128 = FeatureSpec.load("mel128")
MEL96 = FeatureSpec.load("mel96")


@pytest.fixture(scope="session")
def clips(shared_data: Path) -> Path:
    """../shared/data/audio: vibe_ace.ogg (61 s stereo 44.1 kHz Vorbis), house_lo.mp3 (7 s mono 11.025 kHz)."""
    folder = shared_data.parent / "audio"
    if not (folder / "vibe_ace.ogg").is_file() or not (folder / "house_lo.mp3").is_file():
        pytest.skip(f"the shared audio clips are not in {folder}")
    return folder


def reference_mel128(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The reference preprocessing, with librosa and torchaudio: (frames, 128) dB and the trim interval."""
    y, sr = librosa.load(path, sr=None, mono=True)
    assert sr == 44100
    trimmed, interval = librosa.effects.trim(y, top_db=60)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=44100, n_fft=2048, win_length=2048, hop_length=1024, f_min=0.0, f_max=16000.0, n_mels=128,
        power=2.0, center=True, pad_mode="reflect", norm=None, mel_scale="htk",
    )  # fmt: skip
    db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)(mel(torch.from_numpy(trimmed)))
    return db[:, 1:].T.numpy(), interval


def reference_mel96(y: np.ndarray, sr: int) -> np.ndarray:
    """The torchaudio formulation of MTG's Essentia recipe (12 kHz, n_fft 512, hop 256, symmetric Hann, 96 Slaney
    bands of unit area over 0-6 kHz, 20*log10): (frames, 96) dB.

    On the signal resampled linearly (tested on its own below and, against Essentia, in test_essentia.py).
    """
    y12 = torch.from_numpy(resample(y, sr, 12000, "linear"))
    power = torchaudio.transforms.Spectrogram(
        n_fft=512, hop_length=256, power=2, center=True, pad_mode="constant",
        window_fn=functools.partial(torch.hann_window, periodic=False),
    )(y12)  # fmt: skip
    fb = torchaudio.functional.melscale_fbanks(257, 0, 6000, 96, 12000, norm="slaney", mel_scale="slaney")
    return (20 * torch.log10(torch.clamp(power.T @ fb, min=1e-10))).numpy()


# ------------------------------------------------------------------ real music


def test_mel128_equals_the_reference_preprocessing_on_real_music(clips: Path) -> None:
    ref, interval = reference_mel128(clips / "vibe_ace.ogg")
    y, _ = librosa.load(clips / "vibe_ace.ogg", sr=None, mono=True)
    assert nonsilent_interval(y, 60.0) == tuple(int(i) for i in interval)
    ours = features_from_file(clips / "vibe_ace.ogg", MEL128)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (2608, 128)
    assert np.abs(ours - ref).max() < 1e-3


def test_mel96_equals_the_torchaudio_formulation_on_real_music(clips: Path) -> None:
    for name, frames in (("vibe_ace.ogg", 2881), ("house_lo.mp3", 341)):  # 44.1 kHz stereo; 11.025 kHz mono
        y, sr = librosa.load(clips / name, sr=None, mono=True)
        ref = reference_mel96(y, sr)
        ours = features_from_file(clips / name, MEL96)
        assert ours.shape == ref.shape == (frames, 96), name
        assert np.abs(ours - ref).max() < 1e-3, name


# -------------------------------------------------------- the recipes' definitions


def slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox scale: linear (3 bands per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27.0))


def slaney_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


def test_mel96_filterbank_is_96_slaney_triangles_of_unit_area() -> None:
    fb = LogMel(MEL96).filterbank.double().numpy()  # (257, 96)
    assert fb.shape == (257, 96)
    # from the definition: 98 edges equally spaced in Slaney mel over 0-6000 Hz, a triangle
    # between edges i and i+2 peaking at edge i+1, of height 2/(f[i+2]-f[i]) so its area is 1
    edges = slaney_hz(np.linspace(slaney_mel(0.0), slaney_mel(6000.0), 96 + 2))
    bins = np.arange(257) * 12000 / 512
    expected = np.zeros((257, 96))
    for i in range(96):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rising, falling = (bins - lo) / (mid - lo), (hi - bins) / (hi - mid)
        expected[:, i] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (hi - lo)
        assert 0.5 * (hi - lo) * (2.0 / (hi - lo)) == pytest.approx(1.0)  # the continuous triangle's area
    np.testing.assert_allclose(fb, expected, rtol=1e-4, atol=1e-6)  # float32 rounding at the feet
    # and librosa's Slaney filters, the usual implementation of the same definition
    ref = librosa.filters.mel(sr=12000, n_fft=512, n_mels=96, fmin=0.0, fmax=6000.0, htk=False, norm="slaney")
    np.testing.assert_allclose(fb, ref.T, rtol=1e-4, atol=1e-6)
    # band 0 starts at 0 Hz, the last ends at 6 kHz; the lowest bands are 200/3 Hz apart
    assert edges[0] == 0.0 and edges[-1] == pytest.approx(6000.0)
    assert edges[2] - edges[1] == pytest.approx((edges[1] - edges[0]), rel=1e-9)


def numpy_log_mel(y: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """An independent float64 numpy implementation of a recipe on a signal at its rate."""
    half = spec.n_fft // 2
    padded = np.pad(y.astype(np.float64), half, mode=spec.pad_mode)
    n_frames = 1 + (padded.size - spec.n_fft) // spec.hop_length
    frames = np.stack([padded[i * spec.hop_length : i * spec.hop_length + spec.n_fft] for i in range(n_frames)])
    period = spec.n_fft if spec.window == "hann_periodic" else spec.n_fft - 1  # symmetric: zero at both ends
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(spec.n_fft) / period)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = power @ mel_filterbank(spec).double().numpy()
    db = spec.db_multiplier * np.log10(np.maximum(mel, spec.amin))
    return db[1:] if spec.drop_first_frame else db


@pytest.mark.parametrize("spec", [MEL96, MEL128], ids=lambda s: s.name)
def test_db_formula_and_floor(spec: FeatureSpec) -> None:
    y = tone(3.0, spec.sample_rate, freq=1000.0)
    gap = slice(spec.sample_rate, 2 * spec.sample_rate)  # one second of digital silence in the middle
    y[gap] = 0.0
    ours = LogMel(spec)([y])[0]
    ref = numpy_log_mel(y, spec)
    assert ours.shape == ref.shape
    loud = ref > ref.max() - 100.0  # float32 FFT rounding dominates far below the peak
    assert np.abs(ours - ref)[loud].max() < 1e-3
    # frames wholly inside the silent second are at the floor: multiplier * log10(1e-10)
    first = int(spec.drop_first_frame)
    inside = [
        i - first for i in range(first, ref.shape[0] + first)
        if i * spec.hop_length - spec.n_fft // 2 >= gap.start and i * spec.hop_length + spec.n_fft // 2 <= gap.stop
    ]  # fmt: skip
    assert len(inside) > 10
    assert np.all(ours[inside] == np.float32(spec.db_multiplier * -10.0))  # -200 dB (mel96), -100 dB (mel128)


def test_trim_equals_librosa_on_generated_signals() -> None:
    sr = 44100
    rng = np.random.default_rng(3)
    music = tone(2.0, sr)
    fade = np.linspace(0.0, 1.0, sr, dtype=np.float32) ** 4
    signals = {
        "silence around": np.concatenate([np.zeros(12345, np.float32), music, np.zeros(30001, np.float32)]),
        "fades": np.concatenate([music[:sr] * fade, music, music[:sr] * fade[::-1]]),
        "quiet noise floor": np.concatenate(
            [1e-4 * rng.standard_normal(20000), music, 2e-4 * rng.standard_normal(9000)]
        ).astype(np.float32),
        "short": music[:1500],
        "odd length": music[: 3 * 512 + 17],
        "click": np.concatenate([np.zeros(50000, np.float32), [0.9], np.zeros(70000, np.float32)]).astype(np.float32),
        "near -60 dB": np.concatenate([music * 1e-3 * 1.02, music, music * 1e-3 * 0.98]),
    }  # fmt: skip
    for name, y in signals.items():
        y = y.astype(np.float32)
        expected = librosa.effects.trim(y, top_db=60)[1]
        assert nonsilent_interval(y, 60.0) == (int(expected[0]), int(expected[1])), name
        for top_db in (20.0, 40.0):
            expected = librosa.effects.trim(y, top_db=top_db)[1]
            assert nonsilent_interval(y, top_db) == (int(expected[0]), int(expected[1])), (name, top_db)


# ---------------------------------------------------------- resampling, spec fields


def stepwise_linear(x: np.ndarray, step: float) -> np.ndarray:
    """libsamplerate's linear converter as its loop runs, one output at a time (independent of freqtag's vector form).

    It interpolates between a previous sample (at first: the first sample) and
    the current one at fraction t, adds the step to t, moves on one sample per
    whole unit of t, and stops when the current sample would lie past the end.
    """
    out = []
    prev, cur, t = float(x[0]), 0, 0.0
    while True:
        out.append(prev + t * float(np.float32(x[cur] - np.float32(prev))))  # the difference in float32, as in C
        t += step
        while t >= 1.0:
            t -= 1.0
            cur += 1
            if cur >= x.shape[0]:
                return np.array(out, dtype=np.float32)
            prev = float(x[cur - 1])


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000])
def test_linear_resampling_follows_libsamplerates_loop(rate: int) -> None:
    rng = np.random.default_rng(rate)
    step = linear_step(rate, 12000)
    assert step == 1.0 / float(np.float32(12000) / np.float32(rate))  # Essentia's float32 ratio, not rate/12000
    for n in (1, 2, 3, 7, 1000, 4321):
        x = rng.standard_normal(n).astype(np.float32)
        ours = resample(x, rate, 12000, "linear")
        ref = stepwise_linear(x, step)
        assert ours.dtype == np.float32 and ours.shape == (linear_count(n, step),), (rate, n)
        # t accumulated vs k*step: the last bits, and at 8/16/32 kHz (steps 2/3, 4/3, 8/3, whose sums fall
        # just short of whole numbers) the loop may add one output on the very last sample
        extra = 1 if rate in (8000, 16000, 32000) else 0
        assert 0 <= ref.shape[0] - ours.shape[0] <= extra, (rate, n, ref.shape, ours.shape)
        assert ours[0] == x[0]  # the first output is the first sample
        np.testing.assert_allclose(ours, ref[: ours.shape[0]], rtol=0, atol=1e-6)
    assert resample(x, 12000, 12000, "linear") is x


def test_linear_resampling_streamed_equals_the_whole_signal(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for rate in (44100, 11025, 48000):
        x = tone(3.0, rate, 5000.0, noise=0.1, seed=rate)
        whole = resample(x, rate, 12000, "linear")
        resampler, parts, i = LinearBlockResampler(rate, 12000), [], 0
        while i < x.size:
            n = int(rng.choice([0, 1, 2, 255, 4096, 30000]))  # empty, single-sample and odd blocks
            parts.append(resampler.push(x[i : i + n]))
            i += n
        parts.append(resampler.finish())
        np.testing.assert_array_equal(np.concatenate(parts), whole)  # bit for bit
    # and through the streamed feature path: small decode blocks and transform segments, the same frames
    sf.write(tmp_path / "a.wav", tone(9.0, 44100, 7000.0, noise=0.1), 44100, subtype="FLOAT")
    frames: list[np.ndarray] = []
    info = stream_features(tmp_path / "a.wav", [MEL96], [frames.append], decode_block=3001, segment=4096)
    assert info.passes == 1
    np.testing.assert_array_equal(np.concatenate(frames), features_from_file(tmp_path / "a.wav", MEL96))


def test_linear_resampling_keeps_aliased_energy() -> None:
    """A 7 kHz tone at 44.1 kHz folds to 5 kHz at 12 kHz with linear interpolation; the sinc filter removes it."""
    x = tone(2.0, 44100, 7000.0, noise=0.0)
    db = {m: LogMel(dataclasses.replace(MEL96, resample=m))([resample(x, 44100, 12000, m)])[0].mean(axis=0)
          for m in ("linear", "sinc")}  # fmt: skip
    band = int(mel_filterbank(MEL96).numpy()[round(5000 * 512 / 12000)].argmax())
    assert db["linear"].argmax() == band
    assert db["linear"][band] - db["sinc"][band] > 40.0


def test_specs_saved_before_the_resample_and_window_fields() -> None:
    """An old spec reads as what freqtag then computed: sinc resampling, periodic Hann."""
    assert LEGACY_DEFAULTS == {"resample": "sinc", "window": "hann_periodic"}
    for spec in (MEL96, MEL128):
        old = json.loads(spec.to_json())
        del old["resample"], old["window"]
        legacy = FeatureSpec.from_dict(old)
        assert (legacy.resample, legacy.window) == ("sinc", "hann_periodic")
    assert FeatureSpec.from_dict({k: v for k, v in MEL128.to_dict().items() if k not in LEGACY_DEFAULTS}) == MEL128
    old96 = FeatureSpec.from_dict({k: v for k, v in MEL96.to_dict().items() if k not in LEGACY_DEFAULTS})
    assert old96 != MEL96 and old96.name == MEL96.name
    assert old96.differences(MEL96) == ["resample: 'sinc' != 'linear'", "window: 'hann_periodic' != 'hann_symmetric'"]
    assert (MEL96.resample, MEL96.window, MEL128.resample, MEL128.window) == ("linear", "hann_symmetric", "sinc",
                                                                              "hann_periodic")  # fmt: skip


def test_spec_names_its_bad_values_and_keys() -> None:
    with pytest.raises(ValueError, match=r"feature spec 'mel96': resample='cubic'; valid values: sinc, linear"):
        FeatureSpec.from_dict({**MEL96.to_dict(), "resample": "cubic"})
    with pytest.raises(ValueError, match=r"window='hamming'; valid values: hann_periodic, hann_symmetric"):
        FeatureSpec.from_dict({**MEL96.to_dict(), "window": "hamming"})
    with pytest.raises(ValueError, match=r"unknown keys \['resampler'\], missing keys \[\]"):
        FeatureSpec.from_dict({**MEL96.to_dict(), "resampler": "linear"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        MEL96.resample = "sinc"  # type: ignore[misc]


# ------------------------------------------------------------- batched transform


@pytest.mark.parametrize("spec", [MEL96, MEL128], ids=lambda s: s.name)
def test_batched_transform_equals_torchaudio_and_ignores_batch_company(spec: FeatureSpec) -> None:
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (50_000, 300_000, 7_777, 123_456)]
    transform = LogMel(spec, block_frames=64)
    alone = [transform([w])[0] for w in waves]
    together = transform(waves)
    reverse = transform(waves[::-1])[::-1]
    for w, a, b, c in zip(waves, alone, together, reverse):
        assert a.shape == (frame_count(w.size, spec), spec.n_mels)
        np.testing.assert_array_equal(a, b)  # bit for bit, whatever the other tracks of the batch
        np.testing.assert_array_equal(a, c)
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length, hop_length=spec.hop_length,
            f_min=spec.f_min, f_max=spec.f_max, n_mels=spec.n_mels, power=spec.power, center=True,
            pad_mode=spec.pad_mode, norm=spec.mel_norm, mel_scale=spec.mel_scale,
            window_fn=functools.partial(torch.hann_window, periodic=spec.window == "hann_periodic"),
        )(torch.from_numpy(w))  # fmt: skip
        ref = (spec.db_multiplier * torch.log10(torch.clamp(mel, min=spec.amin))).T.numpy()[int(spec.drop_first_frame) :]
        assert np.abs(a - ref).max() < 1e-3


def test_device_that_is_not_there_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    with pytest.raises(ValueError, match="--device cuda: no CUDA device.*--device cpu"):
        LogMel(MEL128, "cuda")
    with pytest.raises(ValueError, match="--device tpu"):
        LogMel(MEL128, "tpu")
