"""`freqtag prepare --audio-dir`: real and generated audio, bad files, splits, resume, worker crashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import assert_same_store, freqtag, kill_when_parts  # the same store-equality check as the npy import

from freqtag.audio.whole import features_from_file
from freqtag.data import jamendo
from freqtag.data.store import FeatureStore, StoreError
from freqtag.data.store_writer import StoreWriter
from freqtag.features import LEGACY_DEFAULTS, FeatureSpec
from freqtag.prepare.assemble import build_store
from freqtag.prepare.command import prepare_audio
from freqtag.prepare.jobs import audio_jobs, load_audio
from freqtag.prepare.pool import CRASH_REASON
from freqtag.prepare.report import read_report, report_path

MEL128 = FeatureSpec.load("mel128")
MEL96 = FeatureSpec.load("mel96")

# relative path -> the words its reason must hold (files that give no features)
BAD = {
    "bad/silence.wav": "silent",
    "bad/short.wav": "too short: 1.00 s after trimming gives 43 frames of mel128",
    "bad/corrupt.mp3": "corrupt or not audio",
    "bad/empty.ogg": "empty file (0 bytes)",
    "bad/header_only.mp3": "corrupt or not audio",
    "bad/song.m4a": "unsupported audio format .m4a",
    "bad/cover.jpg": "not an audio file name (.jpg",
}
GOOD = ["gen/chirp.ogg", "gen/long_cut.mp3", "gen/noise.flac", "gen/tone.wav", "real/house_lo.mp3", "real/vibe_ace.ogg"]


def signal_of(seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * (220 + 200 * seed) * t * (1 + 0.1 * t)) + 0.03 * rng.standard_normal(t.size)
    return np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)


def make_audio_dir(root: Path, clips: Path) -> Path:
    """Real clips, generated audio (several formats, rates, channels) and every kind of bad file."""
    for sub in ("real", "gen", "bad"):
        (root / sub).mkdir(parents=True)
    shutil.copy(clips / "vibe_ace.ogg", root / "real")
    shutil.copy(clips / "house_lo.mp3", root / "real")
    sf.write(root / "gen/tone.wav", signal_of(4.0, 44100, 1), 44100)
    sf.write(root / "gen/noise.flac", signal_of(3.5, 48000, 2, channels=2), 48000)
    sf.write(root / "gen/chirp.ogg", signal_of(4.0, 22050, 3), 22050)
    sf.write(root / "gen/long.mp3", signal_of(10.0, 44100, 4), 44100)
    data = (root / "gen/long.mp3").read_bytes()
    (root / "gen/long.mp3").unlink()
    (root / "gen/long_cut.mp3").write_bytes(data[: int(len(data) * 0.6)])  # a truncated MP3: its first 6 s decode
    (root / "bad/header_only.mp3").write_bytes(data[:300])
    sf.write(root / "bad/silence.wav", np.zeros((5 * 44100, 2), np.float32), 44100)
    sf.write(root / "bad/short.wav", signal_of(1.0, 44100, 5), 44100)
    (root / "bad/corrupt.mp3").write_bytes(np.random.default_rng(0).bytes(30_000))
    (root / "bad/empty.ogg").write_bytes(b"")
    (root / "bad/song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(100))
    (root / "bad/cover.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    return root


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> Path:
    folder = shared_data.parent / "audio"
    if not (folder / "vibe_ace.ogg").is_file() or not (folder / "house_lo.mp3").is_file():
        pytest.skip(f"the shared audio clips are not in {folder}")
    return folder


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory, clips: Path) -> Path:
    return make_audio_dir(tmp_path_factory.mktemp("audio") / "music", clips)


@pytest.fixture(scope="module")
def mel128_run(audio_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder as a whole, mel128, one worker process (the default), no progress bar."""
    out = audio_dir.parent / "stores" / "mel128.h5"
    return out, freqtag("prepare", "--features", "mel128", "--audio-dir", str(audio_dir), "--out", str(out), "--no-progress")


def test_folder_of_audio_good_and_bad(audio_dir: Path, mel128_run) -> None:
    out, run = mel128_run
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert f"wrote {out}: {len(GOOD)} of {len(GOOD) + len(BAD)} tracks" in run.stdout
    assert f"skipped {len(BAD)} tracks" in run.stderr and str(report_path(out)) in run.stderr
    report = read_report(report_path(out))
    assert {t: p for t, p, _ in report} == {t: str(audio_dir / t) for t in BAD}
    for track_id, _, reason in report:
        assert BAD[track_id] in reason, (track_id, reason)
        assert f"{track_id}  {audio_dir / track_id}: {reason}" in run.stderr  # on screen too

    store = FeatureStore(out)
    assert store.track_ids == GOOD  # ids are relative paths, sorted
    assert store.spec == MEL128 and store.stats_split == "all" and store.stats_tracks == len(GOOD)
    for track_id in GOOD:
        expected = features_from_file(audio_dir / track_id, MEL128).astype(np.float16)
        np.testing.assert_array_equal(store.track(track_id), expected)
    assert store.length("real/vibe_ace.ogg") == 2608
    assert 255 < store.length("gen/long_cut.mp3") < 262  # 60% of 10 s at 43.07 frames/s
    assert not out.with_name(out.name + ".partial").exists()


SLOW_RUN = textwrap.dedent(
    """
    import functools, sys, time
    from freqtag.prepare import jobs as prepare
    from freqtag.prepare.assemble import build_store
    from freqtag.audio.logmel import LogMel
    from freqtag.features import FeatureSpec

    def slow_load(job, spec):
        time.sleep(0.25)
        return prepare.load_audio(job, spec, 128)

    audio_dir, out = sys.argv[1:]
    spec = FeatureSpec.load("mel128")
    jobs = prepare.audio_jobs(audio_dir, None, out)
    build_store(
        jobs, functools.partial(slow_load, spec=spec), out, spec, [j.track_id for j in jobs], stats_split="all",
        batch_size=1, progress=False, transform=LogMel(spec),
    )
    """
)


def test_killed_run_resumes_to_the_same_store(audio_dir: Path, mel128_run, tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(audio_dir), str(out)], stderr=subprocess.PIPE)
    kill_when_parts(proc, partial, timeout=60)
    assert not out.exists() and partial.is_dir()  # the store appears under its name only when complete
    assert 2 <= len(list(partial.glob("part-*.npz"))) < len(GOOD)

    run = freqtag("prepare", "--features", "mel128", "--audio-dir", str(audio_dir), "--out", str(out),
                  "--workers", "2", "--no-progress")  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "kept from an interrupted run" in run.stdout
    assert_same_store(out, mel128_run[0])  # same bits, whatever the workers and the interruption
    assert read_report(report_path(out)) == read_report(report_path(mel128_run[0]))
    assert not partial.exists()


def test_splits_mel96_in_process_with_progress(audio_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    """MTG layout: PATH XX/ID.mp3 relative to --audio-dir; ID.low.mp3 stands in; store in split order."""
    tags = jamendo.read_tags(shared_data / "moodtheme_split.txt")
    mtg = tmp_path / "mtg_audio"
    rows = {  # split -> [(track id, PATH, file to put there, or None)]
        "train": [("track_0000002", "02/2.mp3", "gen/tone.wav"), ("track_0000101", "01/101.mp3", "real/house_lo.mp3"),
                  ("track_0000207", "07/207.mp3", "bad/short.wav")],
        "validation": [("track_0000300", "00/300.mp3", "gen/chirp.ogg"), ("track_0000301", "01/301.mp3", None)],
        "test": [("track_0000402", "02/402.mp3", "gen/long_cut.mp3")],
    }  # fmt: skip
    for split, items in rows.items():
        for i, (_, path, source) in enumerate(items):
            if source is not None:
                target = mtg / path
                if source.endswith(".ogg") or source.endswith(".wav"):
                    target = target.with_suffix(".low.mp3")  # only the low-quality file: taken instead
                    x, sr = sf.read(audio_dir / source, dtype="float32")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    sf.write(target, x, sr, format="MP3")
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(audio_dir / source, target)
        labels = np.zeros((len(items), len(tags)), np.uint8)
        labels[:, 3] = 1
        jamendo.write_split(jamendo.split_file(tmp_path / "splits", split), [t for t, _, _ in items],
                            [p for _, p, _ in items], [30.0] * len(items), labels, tags)  # fmt: skip
    out = tmp_path / "mel96.h5"
    run = freqtag("prepare", "--features", "mel96", "--audio-dir", str(mtg), "--splits", str(tmp_path / "splits"),
                  "--tags", str(shared_data / "moodtheme_split.txt"), "--out", str(out), "--workers", "0",
                  "--min-frames", "1")  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "files" in run.stderr and "h audio" in run.stderr  # the progress bar's last state
    assert read_report(report_path(out)) == [("track_0000301", str(mtg / "01/301.mp3"), "missing file")]
    store = FeatureStore(out)
    assert store.track_ids == ["track_0000002", "track_0000101", "track_0000207", "track_0000300", "track_0000402"]
    assert store.spec == MEL96 and store.stats_split == "train" and store.stats_tracks == 3
    np.testing.assert_array_equal(
        store.track("track_0000101"), features_from_file(audio_dir / "real/house_lo.mp3", MEL96).astype(np.float16)
    )
    assert store.length("track_0000207") == 1 + 12000 // 256  # 1 s: kept with --min-frames 1

    # the same again is a finished store, not rewritten
    again = freqtag("prepare", "--features", "mel96", "--audio-dir", str(mtg), "--splits", str(tmp_path / "splits"),
                    "--tags", str(shared_data / "moodtheme_split.txt"), "--out", str(out), "--no-progress")  # fmt: skip
    assert again.returncode == 1 and "already complete but lacks 1 of the 6" in again.stdout


def old_store(out: Path, spec: FeatureSpec) -> Path:
    """A store as freqtag wrote it before the recipes named their resampler and window (its spec lacks both)."""
    writer = StoreWriter(out, spec, ["a"])
    writer.add([("a", np.zeros((200, spec.n_mels), np.float32))])
    writer.finish(["a"], "all")
    old = {k: v for k, v in spec.to_dict().items() if k not in LEGACY_DEFAULTS}
    with h5py.File(out, "r+") as f:
        f.attrs["spec"] = json.dumps(old, sort_keys=True)
    return out


def test_old_mel96_store_is_not_todays_mel96(audio_dir: Path, tmp_path: Path) -> None:
    """An old mel96 store was resampled with sinc (or imported from MTG's .npy: freqtag cannot tell): never reused
    as today's mel96. An old mel128 store is today's mel128, whose recipe did not change."""
    old96 = FeatureStore(old_store(tmp_path / "old96.h5", MEL96))
    assert old96.spec != MEL96 and (old96.spec.resample, old96.spec.window) == ("sinc", "hann_periodic")
    with pytest.raises(StoreError, match="old96.h5 is a finished store"):
        prepare_audio(audio_dir / "gen", tmp_path / "old96.h5", "mel96", workers=0, progress=False, min_frames=1)
    assert FeatureStore(old_store(tmp_path / "old128.h5", MEL128)).spec == MEL128


def crashing_load(job, spec, min_frames):  # type: ignore[no-untyped-def]
    """A loader whose process dies on one file, as a decoder crash would kill it."""
    if job.source.endswith("tone.wav"):
        os._exit(139)
    return load_audio(job, spec, min_frames)


def test_a_worker_that_dies_skips_its_file_only(audio_dir: Path, mel128_run, tmp_path: Path) -> None:
    import functools

    from freqtag.audio.logmel import LogMel

    jobs = [j for j in audio_jobs(audio_dir) if j.track_id.startswith(("gen/", "real/h"))]
    out = tmp_path / "crash.h5"
    report = build_store(
        jobs, functools.partial(crashing_load, spec=MEL128, min_frames=128), out, MEL128,
        [j.track_id for j in jobs], stats_split="all", workers=2, progress=False, transform=LogMel(MEL128), chunk_size=2,
    )  # fmt: skip
    assert report.skipped == [("gen/tone.wav", str(audio_dir / "gen/tone.wav"), CRASH_REASON)]
    store = FeatureStore(out)
    reference = FeatureStore(mel128_run[0])
    assert store.track_ids == [j.track_id for j in jobs if j.track_id != "gen/tone.wav"]
    for track_id in store.track_ids:
        np.testing.assert_array_equal(store.track(track_id), reference.track(track_id))


def one_line_error(run: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert run.returncode == code, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freqtag: error:"), run.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_user_errors_are_one_clear_line(audio_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.h5")
    base = ["prepare", "--audio-dir", str(audio_dir), "--out", out]
    one_line_error(freqtag(*base), 2, "--features is required with --audio-dir")
    one_line_error(freqtag(*base, "--features", "mel128", "--min-frames", "0"), 2, "--min-frames 0")
    one_line_error(freqtag("prepare", "--features", "mel128", "--audio-dir", str(tmp_path / "nowhere"), "--out", out),
                   1, "nowhere", "--audio-dir")  # fmt: skip
    if not torch.cuda.is_available():
        one_line_error(freqtag(*base, "--features", "mel96", "--device", "cuda"), 1, "--device cuda", "--device cpu")
    assert not Path(out).exists() and not Path(out + ".partial").exists()


@pytest.mark.slow
def test_damaged_real_files_never_stop_the_run(clips: Path, tmp_path: Path) -> None:
    """Real files cut at random places or with random bytes overwritten: each is read or skipped, never fatal."""
    rng = np.random.default_rng(11)
    folder = tmp_path / "damaged"
    folder.mkdir()
    sf.write(tmp_path / "flac.flac", sf.read(clips / "house_lo.mp3", dtype="float32")[0], 11025)
    originals = [(clips / "vibe_ace.ogg").read_bytes(), (clips / "house_lo.mp3").read_bytes(),
                 (tmp_path / "flac.flac").read_bytes()]  # fmt: skip
    suffixes = [".ogg", ".mp3", ".flac"]
    for i in range(36):
        data = bytearray(originals[i % 3])
        if i % 2:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 20))):
                at = int(rng.integers(0, len(data)))
                data[at : at + 64] = rng.bytes(len(data[at : at + 64]))
        (folder / f"{i:02d}{suffixes[i % 3]}").write_bytes(bytes(data))
    out = tmp_path / "damaged.h5"
    run = freqtag("prepare", "--features", "mel96", "--audio-dir", str(folder), "--out", str(out),
                  "--workers", "2", "--min-frames", "1", "--no-progress", timeout=600)  # fmt: skip
    assert run.returncode in (0, 1), run.stderr
    assert "Traceback" not in run.stderr
    skipped = read_report(report_path(out))
    if out.exists():
        assert len(FeatureStore(out)) + len(skipped) == 36
    else:  # nothing readable at all is an error of its own, still one clear line
        assert "none of the 36 tracks could be read" in run.stderr
