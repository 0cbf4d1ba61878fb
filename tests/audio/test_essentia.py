"""mel96 against Essentia itself: MTG's script (``scripts/melspectrograms.py`` in mtg-jamendo-dataset) made the
distributed ``.npy`` files, so freqtag's mel96 of the same audio must give what that script gives.

Essentia (AGPL-3.0; it decodes with FFmpeg) is a test-only dependency. Run as a script to print the figures
of README's "Features from audio" (before/after, per clip and per generated format):

    .venv/bin/python tests/audio/test_essentia.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

es = pytest.importorskip(
    "essentia.standard",
    reason="Essentia is not installed (`pip install essentia`): it computes MTG's own mel96 for these comparisons",
)
import essentia  # noqa: E402

from freqtag.audio.resample import resample  # noqa: E402
from freqtag.audio.whole import features_from_file  # noqa: E402
from freqtag.features import FeatureSpec  # noqa: E402

essentia.log.infoActive = False  # its INFO lines would fill the test output

MEL96 = FeatureSpec.load("mel96")
# what freqtag computed before the recipe said how to resample and which window (an old store's mel96)
LEGACY_MEL96 = dataclasses.replace(MEL96, resample="sinc", window="hann_periodic")
CLIPS = ("vibe_ace.ogg", "house_lo.mp3")


def mtg_mel96(path: Path) -> np.ndarray:
    """(frames, 96) dB: MTG's script with its defaults (full track), transposed from its (96, frames) file."""
    audio = es.MonoLoader(filename=str(path), sampleRate=12000, resampleQuality=4)()
    window = es.Windowing(type="hann", normalized=False, zeroPadding=0)
    spectrum = es.Spectrum()
    bands = es.MelBands(
        numberBands=96, sampleRate=12000, lowFrequencyBound=0, highFrequencyBound=6000, inputSize=257,
        weighting="linear", normalize="unit_tri", warpingFormula="slaneyMel", type="power",
    )  # fmt: skip
    to_db = es.UnaryOperator(type="lin2db", scale=2)
    frames = es.FrameGenerator(audio, frameSize=512, hopSize=256, startFromZero=False)
    return np.array([to_db(bands(spectrum(window(f)))) for f in frames], dtype=np.float32)


def ffmpeg_samples(path: Path) -> tuple[np.ndarray, int]:
    """What Essentia's decoder (FFmpeg) gives: (samples, channels) float32 and the rate."""
    x, rate, channels, *_ = es.AudioLoader(filename=str(path))()
    return np.ascontiguousarray(x[:, :channels], dtype=np.float32), int(rate)


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """|dB difference| per (frame, band) over our frames (Essentia has one more, zero-padded, at the end)."""
    d = np.abs(ours - ref[: ours.shape[0]]).astype(np.float64)
    return {"median": float(np.median(d)), "mean": float(d.mean()), "p99": float(np.quantile(d, 0.99)),
            "max": float(d.max()), "top16_mean": float(d[:, -16:].mean())}  # fmt: skip


def music(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """Tones up to 11 kHz (above the 6 kHz Nyquist of 12 kHz: what the resamplers treat differently) and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = [f for f in (110, 440, 1250, 3300, 7000, 11000) if f < rate / 2]
    x = sum(0.1 * np.sin(2 * np.pi * f * t * (1 + 0.01 * t)) for f in tones)
    x = x + 0.02 * rng.standard_normal(t.size)
    return np.stack([x * (1.0 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> Path:
    folder = shared_data.parent / "audio"
    if not all((folder / name).is_file() for name in CLIPS):
        pytest.skip(f"the shared audio clips are not in {folder}")
    return folder


# ------------------------------------------------------------------ the resampler


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000])
def test_linear_resampling_equals_essentias_monoloader(tmp_path: Path, rate: int) -> None:
    """Same input samples (a float WAV both decoders read exactly): the same 12 kHz samples, first and last included."""
    x = music(2.3, rate, 1, seed=rate)[:, 0]
    path = tmp_path / f"x{rate}.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    theirs = es.MonoLoader(filename=str(path), sampleRate=12000, resampleQuality=4)()
    ours = resample(x, rate, 12000, "linear")
    # at 8/16/32 kHz libsamplerate's accumulated position can fall just short of the last sample: one more output
    extra = theirs.shape[0] - ours.shape[0]
    assert extra == 0 or (rate in (8000, 16000, 32000) and extra == 1), (ours.shape, theirs.shape)
    theirs = theirs[: ours.shape[0]]
    assert ours.dtype == np.float32
    assert ours[0] == theirs[0] and ours[-1] == theirs[-1]
    # libsamplerate accumulates the position step by step, freqtag computes k*step: the last bits may differ
    # (at 8/16/32 kHz, where positions land on whole samples, in ~10% of the outputs; elsewhere < 0.1%)
    assert np.abs(ours - theirs).max() < 1e-7
    assert np.mean(ours == theirs) > (0.85 if extra or rate in (8000, 16000, 32000) else 0.999)


def test_linear_resampling_of_the_clips_equals_essentia(clips: Path) -> None:
    for name in CLIPS:
        x, rate = ffmpeg_samples(clips / name)
        mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] == 2 else x[:, 0]
        theirs = es.MonoLoader(filename=str(clips / name), sampleRate=12000, resampleQuality=4)()
        ours = resample(mono, rate, 12000, "linear")
        assert ours.shape == theirs.shape, name
        assert np.abs(ours - theirs).max() < 1e-7, name


# ------------------------------------------------------------------ the recipe


def test_mel96_matches_mtgs_script_on_the_clips(clips: Path) -> None:
    for name in CLIPS:
        ref = mtg_mel96(clips / name)
        ours = features_from_file(clips / name, MEL96)
        assert ours.shape == (ref.shape[0] - 1, 96), name  # Essentia's last, zero-padded frame is left out
        now = agreement(ours, ref)
        assert now["median"] < 0.01 and now["mean"] < 0.05, (name, now)
        before = agreement(features_from_file(clips / name, LEGACY_MEL96), ref)
        assert before["top16_mean"] > 1.0 and before["mean"] > 10 * now["mean"], (name, before)  # why the fields exist


def test_mel96_of_mp3_matches_mtgs_script(tmp_path: Path) -> None:
    """The dataset is MP3: libsndfile (mpg123) and FFmpeg give the same samples to ~3e-5, the same length."""
    for rate, channels in ((44100, 2), (48000, 2), (22050, 1)):
        path = tmp_path / f"m{rate}.mp3"
        sf.write(path, music(6.0, rate, channels, seed=channels), rate, format="MP3")
        theirs, _ = ffmpeg_samples(path)
        mine, _ = sf.read(path, dtype="float32", always_2d=True)
        assert theirs.shape == mine.shape, rate
        assert np.abs(theirs - mine).max() < 1e-4, rate
        now = agreement(features_from_file(path, MEL96), mtg_mel96(path))
        assert now["median"] < 0.01 and now["mean"] < 0.05, (rate, now)


def test_ogg_vorbis_decoders_differ_in_length_only(tmp_path: Path) -> None:
    """FFmpeg ignores the end trim of a libsndfile-written Vorbis stream: extra samples at the end, start aligned."""
    path = tmp_path / "v.ogg"
    sf.write(path, music(6.0, 44100, 2), 44100)
    theirs, _ = ffmpeg_samples(path)
    mine, _ = sf.read(path, dtype="float32", always_2d=True)
    extra = theirs.shape[0] - mine.shape[0]
    assert 0 <= extra < 1024
    assert np.abs(theirs[: mine.shape[0]] - mine).max() < 1e-5
    ours, ref = features_from_file(path, MEL96), mtg_mel96(path)
    assert 0 <= ref.shape[0] - 1 - ours.shape[0] <= 2
    now = agreement(ours[:-1], ref)  # the last frame of ours sees the trimmed end
    assert now["median"] < 0.01 and now["mean"] < 0.05, now


# ------------------------------------------------------------------ the figures


def _row(label: str, a: dict[str, float]) -> str:
    return (f"| {label} | {a['median']:.4f} | {a['mean']:.4f} | {a['p99']:.3f} | {a['max']:.2f} "
            f"| {a['top16_mean']:.3f} |")  # fmt: skip


def main(folder: Path, work: Path) -> None:
    """Print the agreement table: the clips, then generated MP3/Ogg/FLAC files (libsndfile's encoders)."""
    linear_only = dataclasses.replace(MEL96, window="hann_periodic")
    print("| file, recipe | median dB | mean dB | p99 dB | max dB | top 16 bands mean dB |")
    print("|---|---|---|---|---|---|")
    for name in CLIPS:
        ref = mtg_mel96(folder / name)
        for label, spec in (("before (sinc, periodic Hann)", LEGACY_MEL96), ("linear, periodic Hann", linear_only),
                            ("now (linear, symmetric Hann)", MEL96)):  # fmt: skip
            print(_row(f"{name}, {label}", agreement(features_from_file(folder / name, spec), ref)))
    work.mkdir(parents=True, exist_ok=True)
    for fmt, rate, channels in (("mp3", 44100, 2), ("mp3", 48000, 2), ("mp3", 22050, 1), ("ogg", 44100, 2),
                                ("ogg", 11025, 1), ("flac", 44100, 2)):  # fmt: skip
        path = work / f"generated_{rate}_{channels}ch.{fmt}"
        sf.write(path, music(30.0, rate, channels, seed=rate), rate, format=fmt.upper())
        theirs, _ = ffmpeg_samples(path)
        mine, _ = sf.read(path, dtype="float32", always_2d=True)
        n = min(theirs.shape[0], mine.shape[0])
        ours, ref = features_from_file(path, MEL96), mtg_mel96(path)
        frames = ours.shape[0] - (1 if theirs.shape[0] != mine.shape[0] else 0)
        print(_row(f"{path.name} (FFmpeg - libsndfile: {theirs.shape[0] - mine.shape[0]:+d} samples, "
                   f"max {np.abs(theirs[:n] - mine[:n]).max():.1e})", agreement(ours[:frames], ref)))  # fmt: skip


if __name__ == "__main__":
    import tempfile

    here = Path(__file__).resolve().parents[2]
    clips_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent / "shared" / "data" / "audio"
    with tempfile.TemporaryDirectory() as tmp:
        main(clips_dir, Path(tmp))
