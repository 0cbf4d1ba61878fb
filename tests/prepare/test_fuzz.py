"""Fuzz: random bytes, truncated and damaged files, mislabelled extensions through `prepare` and `predict`.

Every case must come out of each command as a result or a reported failure
(never a crash, never silence), and the good files among them must all be
processed as if they were alone (nothing lost). The cases are made from a
seed, so a failure is reproducible; the fast suite runs 10, the slow one 240.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import FREQTAG
from tiny_data import config, make_tiny

from freqtag.audio.whole import features_from_file
from freqtag.data.store import FeatureStore
from freqtag.features import FeatureSpec
from freqtag.prepare.report import read_report, report_path
from freqtag.train.driver import run

FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}
KINDS = ("random", "truncated", "damaged", "mislabelled", "header+junk", "not-audio", "empty")


def good_signal(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    f0 = float(rng.uniform(100, 900))
    x = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.05 * t)) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def encode(x: np.ndarray, rate: int, ext: str, path: Path) -> bytes:
    sf.write(path, x, rate, format=FORMATS[ext])
    return path.read_bytes()


def make_cases(folder: Path, n: int, pristine: int, seed: int) -> tuple[dict[str, str], list[str]]:
    """``n`` damaged files and ``pristine`` good ones; returns {name: kind} and the good names."""
    rng = np.random.default_rng(seed)
    scratch = folder.parent / f"{folder.name}-scratch"
    scratch.mkdir(parents=True)
    folder.mkdir(parents=True)
    exts = list(FORMATS)
    originals = {}
    for ext in exts:  # one good file of each format to damage
        originals[ext] = encode(good_signal(rng, 4.0, 22050), 22050, ext, scratch / f"src{ext}")
    kinds: dict[str, str] = {}
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        ext = exts[int(rng.integers(len(exts)))]
        data = bytearray(originals[ext])
        if kind == "random":
            data = bytearray(rng.bytes(int(rng.integers(1, 40_000))))
        elif kind == "truncated":
            data = data[: int(rng.integers(1, len(data)))]
        elif kind == "damaged":
            for _ in range(int(rng.integers(1, 30))):
                at = int(rng.integers(0, len(data)))
                data[at : at + 128] = rng.bytes(len(data[at : at + 128]))
        elif kind == "mislabelled":
            ext = next(e for e in exts[int(rng.integers(len(exts))):] + exts if originals[e] != originals[ext])
        elif kind == "header+junk":
            data = data[:200] + bytearray(rng.bytes(int(rng.integers(100, 20_000))))
        elif kind == "not-audio":
            data = bytearray([b"\x89PNG\r\n\x1a\n" + rng.bytes(500), b'{"not": "audio"}\n' * 40,
                              b"\x93NUMPY\x01\x00" + rng.bytes(300)][i % 3])  # fmt: skip
        elif kind == "empty":
            data = bytearray()
        name = f"case{i:03d}-{kind}{ext}"
        (folder / name).write_bytes(bytes(data))
        kinds[name] = kind
    good = []
    for j in range(pristine):
        ext = exts[j % len(exts)]
        name = f"good{j:02d}{ext}"
        rate = (22050, 44100, 16000, 48000)[j % 4]
        encode(good_signal(rng, 3.5 + j % 3, rate), rate, ext, folder / name)
        good.append(name)
    return kinds, good


def fuzz(tmp: Path, runs: dict[str, Path], n: int, pristine: int, seed: int, workers: int) -> dict[str, int]:
    folder = tmp / "inputs"
    kinds, good = make_cases(folder, n, pristine, seed)
    names = sorted([*kinds, *good])
    env = {**os.environ, "COLUMNS": "200"}

    # prepare: every file is in the store or in the report, never both; every good file is in the store
    out = tmp / "fuzz.h5"
    prep = subprocess.run([FREQTAG, "prepare", "--features", "mel96", "--audio-dir", str(folder), "--out", str(out),
                           "--workers", str(workers), "--min-frames", "1", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert prep.returncode in (0, 1) and "Traceback" not in prep.stderr, prep.stderr[-3000:]
    skipped = {t: reason for t, _, reason in read_report(report_path(out))}
    store = FeatureStore(out)
    assert sorted([*store.track_ids, *skipped]) == names and not set(store.track_ids) & set(skipped)
    assert set(good) <= set(store.track_ids), {g: skipped.get(g) for g in good}
    for name in good:  # processed exactly as on its own
        np.testing.assert_array_equal(
            store.track(name), features_from_file(folder / name, FeatureSpec.load("mel96"), min_frames=1).astype(np.float16)
        )
    assert all(reason.strip() for reason in skipped.values())
    assert prep.returncode == (1 if skipped else 0)

    # predict (an ensemble of a mel96 and a mel128 model): a record per file, tagged or with its error
    tags_out = tmp / "tags.jsonl"
    pred = subprocess.run([FREQTAG, "predict", "--ckpt", str(runs["mel96"]), str(runs["mel128"]), str(folder),
                           "--threshold", "0.5", "--out", str(tags_out), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert pred.returncode in (0, 1) and "Traceback" not in pred.stderr, pred.stderr[-3000:]
    records = [json.loads(line) for line in tags_out.read_text().splitlines()]
    by_name = {Path(r["path"]).name: r for r in records}
    assert sorted(by_name) == names and len(records) == len(names)
    for name, r in by_name.items():
        if "error" in r:
            assert r["error"].strip() and name in pred.stderr
        else:
            assert len(r["tags"]) == 56 and np.isfinite(list(r["tags"].values())).all()
    assert all("error" not in by_name[g] for g in good)
    failed = sum("error" in r for r in records)
    assert pred.returncode == (1 if failed else 0)
    return {"cases": n + pristine, "prepare_skipped": len(skipped), "predict_failed": failed}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained run per feature recipe (seconds each: short random tracks)."""
    base = tmp_path_factory.mktemp("fuzz-models")
    out = {}
    for features in ("mel96", "mel128"):
        run(config(make_tiny(base / f"data-{features}", features=features), base / f"run-{features}",
                   "trainer.max_epochs=1"))  # fmt: skip
        out[features] = base / f"run-{features}"
    return out


def test_fuzz_fast(runs: dict[str, Path], tmp_path: Path) -> None:
    counts = fuzz(tmp_path, runs, n=10, pristine=4, seed=1, workers=0)
    assert counts["prepare_skipped"] >= 4  # random, not-audio and empty at least


@pytest.mark.slow
def test_fuzz_240_cases(runs: dict[str, Path], tmp_path: Path) -> None:
    counts = fuzz(tmp_path, runs, n=240, pristine=12, seed=2026, workers=2)
    print(f"fuzz: {counts}")
    assert counts["prepare_skipped"] >= 100
