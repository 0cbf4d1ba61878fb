"""Decoding files to features (freqtag.audio.decode, freqtag.audio.whole, freqtag.audio.stream): formats, rates and
channels, and the refusals of files that give no features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_signals import tone

from freqtag.audio.decode import AudioError, decode
from freqtag.audio.frames import frame_count
from freqtag.audio.logmel import mel_filterbank
from freqtag.audio.stream import stream_features
from freqtag.audio.whole import features_from_file
from freqtag.features import FeatureSpec

MEL128 = FeatureSpec.load("mel128")
MEL96 = FeatureSpec.load("mel96")


# ----------------------------------------------------------- decoding, formats


def test_formats_rates_and_channels_agree(tmp_path: Path) -> None:
    sr = 22050
    left, right = tone(4.0, sr, 440.0, seed=1), tone(4.0, sr, 2500.0, amp=0.1, seed=2)
    stereo = np.stack([left, right], axis=1)
    sf.write(tmp_path / "mono.wav", (left + right) / np.float32(2), sr, subtype="FLOAT")
    sf.write(tmp_path / "stereo.wav", stereo, sr, subtype="FLOAT")
    for name, kwargs in {"a.flac": {"subtype": "PCM_24"}, "a.ogg": {}, "a.mp3": {}}.items():
        sf.write(tmp_path / name, stereo, sr, **kwargs)
    for spec in (MEL96, MEL128):
        mono = features_from_file(tmp_path / "mono.wav", spec)
        # channels are averaged in float32, then resampled: the same features as the averaged file
        np.testing.assert_array_equal(features_from_file(tmp_path / "stereo.wav", spec), mono)
        x, rate = decode(tmp_path / "stereo.wav")
        assert rate == sr and x.dtype == np.float32 and x.ndim == 1
        assert mono.shape[0] == frame_count(round(4.0 * spec.sample_rate), spec)
        loud = mono > mono.max() - 60
        np.testing.assert_allclose(features_from_file(tmp_path / "a.flac", spec)[loud], mono[loud], atol=0.05)
        for lossy in ("a.ogg", "a.mp3"):  # lossy codecs: the same bands carry the energy
            got = features_from_file(tmp_path / lossy, spec)
            assert abs(got.shape[0] - mono.shape[0]) <= 2, lossy
            n = min(got.shape[0], mono.shape[0])
            peak = np.argsort(mono[:n].mean(axis=0))[-2:]
            assert set(np.argsort(got[:n].mean(axis=0))[-2:]) == set(peak), lossy
    # 440 Hz lands in the mel96 band whose triangle holds 440 Hz
    fb = mel_filterbank(MEL96).numpy()
    assert features_from_file(tmp_path / "mono.wav", MEL96).mean(axis=0).argmax() == fb[round(440 * 512 / 12000)].argmax()


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_audio_raises_audio_error_with_its_reason(tmp_path: Path) -> None:
    sr = 44100
    rng = np.random.default_rng(5)
    sf.write(tmp_path / "good.mp3", tone(5.0, sr), sr)
    mp3 = (tmp_path / "good.mp3").read_bytes()
    sf.write(tmp_path / "good.flac", tone(5.0, sr), sr)
    flac = (tmp_path / "good.flac").read_bytes()
    nan = tone(5.0, sr)
    nan[1000] = np.nan
    sf.write(tmp_path / "nan.wav", nan, sr, subtype="FLOAT")
    sf.write(tmp_path / "silence.wav", np.zeros(5 * sr, np.float32), sr)
    sf.write(tmp_path / "hiss.wav", (1e-6 * rng.standard_normal(5 * sr)).astype(np.float32), sr, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", tone(1.0, sr), sr)
    cases = {
        write_bytes(tmp_path / "empty.ogg", b""): "empty file (0 bytes)",
        write_bytes(tmp_path / "random.mp3", rng.bytes(40_000)): "corrupt or not audio",
        write_bytes(tmp_path / "random.ogg", rng.bytes(40_000)): "corrupt or not audio: Format not recognised",
        write_bytes(tmp_path / "text.wav", b"not a wave\n" * 50): "corrupt or not audio",
        write_bytes(tmp_path / "header_only.mp3", mp3[:300]): "corrupt or not audio",
        write_bytes(tmp_path / "cut.flac", flac[: len(flac) // 2]): "corrupt or not audio",
        write_bytes(tmp_path / "song.m4a", b"\x00\x00\x00\x20ftypM4A "): "unsupported audio format .m4a",
        write_bytes(tmp_path / "notes.txt", b"hello"): "not an audio file name (.txt",
        tmp_path / "missing.mp3": "missing file",
        tmp_path / "nan.wav": "non-finite samples",
        tmp_path / "silence.wav": "silent: the loudest frame is digital silence",
        tmp_path / "hiss.wav": "silent: the loudest frame is -120 dBFS",
        tmp_path / "short.wav": "too short: 1.00 s after trimming gives 43 frames of mel128, fewer than the 128",
    }
    for path, words in cases.items():
        with pytest.raises(AudioError) as caught:
            features_from_file(path, MEL128, min_frames=128)
        assert words in caught.value.reason, (path.name, caught.value.reason)
        assert str(caught.value).startswith(str(path)) and "\n" not in caught.value.reason
        assert isinstance(caught.value, ValueError)
    assert features_from_file(tmp_path / "short.wav", MEL128).shape == (43, 128)  # min_frames defaults to 1


def test_min_frames_boundary_and_truncated_mp3(tmp_path: Path) -> None:
    sr = 12000  # mel96 does not trim: frames = 1 + samples // 256
    sf.write(tmp_path / "exact.wav", tone(127 * 256 / sr, sr), sr, subtype="FLOAT")
    sf.write(tmp_path / "under.wav", tone((127 * 256 - 1) / sr, sr), sr, subtype="FLOAT")
    assert features_from_file(tmp_path / "exact.wav", MEL96, min_frames=128).shape == (128, 96)
    with pytest.raises(AudioError, match="gives 127 frames of mel96, fewer than the 128"):
        features_from_file(tmp_path / "under.wav", MEL96, min_frames=128)

    # a truncated MP3 gives the part that decodes: the leading frames of the whole file
    sf.write(tmp_path / "whole.mp3", tone(10.0, 44100), 44100)
    data = (tmp_path / "whole.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(data[: int(len(data) * 0.6)])
    whole = features_from_file(tmp_path / "whole.mp3", MEL128)
    cut = features_from_file(tmp_path / "cut.mp3", MEL128)
    assert 0.5 * whole.shape[0] < cut.shape[0] < 0.7 * whole.shape[0]
    np.testing.assert_allclose(cut[:-2], whole[: cut.shape[0] - 2], atol=1e-3)


def test_streamed_refusals_are_the_whole_file_paths(tmp_path: Path) -> None:
    """Both paths refuse a file by the same functions, so with the same reason."""
    sr = 44100
    nan = tone(5.0, sr)
    nan[3000] = np.nan
    sf.write(tmp_path / "nan.wav", nan, sr, subtype="FLOAT")
    sf.write(tmp_path / "silence.wav", np.zeros(sr, np.float32), sr)
    sf.write(tmp_path / "tiny.wav", tone(0.01, sr), sr)  # 441 samples: no mel128 frame
    write_bytes(tmp_path / "random.mp3", np.random.default_rng(1).bytes(20_000))
    for name in ("nan.wav", "silence.wav", "tiny.wav", "random.mp3", "missing.ogg"):
        for spec in (MEL128,) if name == "tiny.wav" else (MEL128, MEL96):  # mel96 pads: 120 samples give a frame
            with pytest.raises(AudioError) as whole:
                features_from_file(tmp_path / name, spec)
            with pytest.raises(AudioError) as streamed:
                stream_features(tmp_path / name, [spec], [lambda frames: None], decode_block=4096)
            assert streamed.value.reason == whole.value.reason, (name, spec.name)
