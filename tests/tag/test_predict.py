"""Tagging audio: every output format read back, ensembles of mel96 + mel128, bad files, chunked == whole.

The checkpoints are two tiny models trained in this session on generated data
(tests/tagging_models.py); the audio is generated here, plus the real clips of
../shared/data/audio when present.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import REPO
from tagging_models import trained_runs

from freqtag.audio import stream as audiostream
from freqtag.audio.whole import features_from_file
from freqtag.data.store import FeatureStore
from freqtag.metrics import best_f1_thresholds
from freqtag.tag.models import load_model, read_thresholds
from freqtag.tag.predict import main, tag_file

CLIPS = REPO.parent / "shared" / "data" / "audio"
N_TAGS = 56


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return trained_runs(tmp_path_factory)


def tone(seconds: float, rate: int, seed: int, channels: int = 1, silence_s: float = 0.0) -> np.ndarray:
    """A chord with a slow tremolo and some noise; optional digital silence at both ends."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110.0 * (1 + seed)
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3, 5)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * t))
    x = 0.2 * x + 0.02 * rng.standard_normal(t.size)
    if silence_s:
        n = int(silence_s * rate)
        x[:n] = 0.0
        x[-n:] = 0.0
    x = x.astype(np.float32)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1) if channels > 1 else x


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio")
    (d / "sub").mkdir()
    files = {
        "flac": d / "a.flac",
        "wav": d / "sub" / "b.wav",
        "short": d / "short.wav",
        "bad": d / "bad.mp3",
    }
    sf.write(files["flac"], tone(20, 48000, 0, channels=2, silence_s=1.0), 48000)
    sf.write(files["wav"], tone(9, 22050, 1), 22050)
    sf.write(files["short"], tone(0.4, 44100, 2), 44100)  # shorter than one window: padded, as in training
    files["bad"].write_bytes(b"ID3\x03\x00\x00\x00" + np.random.default_rng(0).bytes(4000))
    return files


def whole_track_windows(model, path: Path) -> np.ndarray:
    """The reference: the whole-file features (prepare's path), the whole track in one forward pass."""
    x = model.normalise(features_from_file(path, model.spec))
    with torch.no_grad():
        return torch.sigmoid(model.net(x)).transpose(1, 2)[0].numpy()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_format_parses_back_and_agrees(runs, audio, capsys):
    model = load_model(runs["mel96"])
    thresholds = read_thresholds(model.thresholds_file, model.tags)
    good = [audio["flac"], audio["wav"], audio["short"]]
    common = ["--ckpt", runs["mel96"], *good, "--top", "3", "--no-progress"]

    code, out, _ = run_cli(capsys, *common, "--format", "json")
    assert code == 0
    records = json.loads(out)
    assert [r["path"] for r in records] == [str(p) for p in good]
    for r, path in zip(records, good):
        assert set(r) == {"path", "duration_s", "tags", "top", "decisions"}
        probs = np.array(list(r["tags"].values()))
        assert len(probs) == N_TAGS and ((probs > 0) & (probs < 1)).all()
        expected = whole_track_windows(model, path).mean(axis=0)
        np.testing.assert_allclose(probs, expected, atol=1e-5)  # = training's whole-track evaluation
        assert [t["probability"] for t in r["top"]] == sorted(probs, reverse=True)[:3]
        assert r["decisions"] == [t for t, p, th in zip(r["tags"], probs, thresholds) if p >= th]
        assert r["duration_s"] == pytest.approx(sf.info(path).duration, abs=1e-3)
    assert records[2]["duration_s"] < 1.0  # the short file is scored too

    code, out, _ = run_cli(capsys, *common, "--format", "jsonl")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines == records

    code, out, _ = run_cli(capsys, *common, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["path"] for r in rows] == [str(p) for p in good]
    for row, rec in zip(rows, records):
        np.testing.assert_allclose([float(row[t]) for t in rec["tags"]], list(rec["tags"].values()), atol=1e-6)
        assert row["decisions"].split(";") == (rec["decisions"] or [""])
        assert [x.split(":")[0] for x in row["top"].split(";")] == [t["tag"] for t in rec["top"]]
        assert row["error"] == ""

    code, out, _ = run_cli(capsys, *common, "--format", "table")
    assert code == 0
    for rec in records:
        assert Path(rec["path"]).name in out
        for t in rec["top"]:
            assert f"{t['tag']} {t['probability']:.3f}" in out


def test_out_file_format_from_extension_and_windows(runs, audio, tmp_path, capsys):
    out = tmp_path / "res" / "tags.jsonl"
    code, stdout, err = run_cli(capsys, "--ckpt", runs["mel128"], audio["flac"], "--out", out, "--windows", "--no-progress")
    assert code == 0 and stdout == "" and "wrote" in err
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    (w,) = rec["windows"]
    model = load_model(runs["mel128"])
    probs = np.array(w["probabilities"])
    assert w["features"] == "mel128" and probs.shape == (len(w["start_s"]), N_TAGS)
    np.testing.assert_allclose(probs, whole_track_windows(model, audio["flac"]), atol=1e-5)
    np.testing.assert_allclose(probs.mean(axis=0), list(rec["tags"].values()), atol=1e-5)
    assert not list(out.parent.glob(".*tmp"))


def test_ensemble_of_mel96_and_mel128_decodes_each_file_once(runs, audio, monkeypatch):
    clips = sorted(CLIPS.glob("*")) if CLIPS.is_dir() else []
    clips = [c for c in clips if c.suffix in (".ogg", ".mp3")]
    files = [audio["flac"], audio["wav"], *clips]
    models = [load_model(runs["mel96"]), load_model(runs["mel128"])]
    opened: list[Path] = []
    real = audiostream.decoded_blocks
    monkeypatch.setattr(audiostream, "decoded_blocks", lambda p, *a: (opened.append(p), real(p, *a))[1])
    for f in files:
        r = tag_file(f, models)
        singles = [whole_track_windows(m, f) for m in models]
        for w, s in zip(r.windows, singles):
            np.testing.assert_allclose(w, s, atol=1e-5)
        np.testing.assert_allclose(r.probs, np.mean([s.mean(axis=0) for s in singles], axis=0), atol=1e-5)
        assert r.passes == 1
    assert opened == files  # one decode per file, both recipes fed from it
    if not clips:
        pytest.skip(f"generated audio only: the real clips are not in {CLIPS}")


def test_corrupt_file_among_good_ones(runs, audio, tmp_path, capsys):
    code, out, err = run_cli(capsys, "--ckpt", runs["mel96"], audio["flac"], audio["bad"], audio["wav"],
                             tmp_path / "missing.ogg", "--format", "json", "--no-progress")
    assert code == 1
    records = json.loads(out)
    tagged = [r["path"] for r in records if "tags" in r]
    assert tagged == [str(audio["flac"]), str(audio["wav"])]
    errors = {r["path"]: r["error"] for r in records if "error" in r}
    assert "corrupt or not audio" in errors[str(audio["bad"])]
    assert errors[str(tmp_path / "missing.ogg")] == "missing file"
    assert str(audio["bad"]) in err and "2 files tagged, 2 failed" in err


def test_folder_and_glob_inputs(runs, audio, capsys):
    folder = audio["flac"].parent
    code, out, _ = run_cli(capsys, "--ckpt", runs["mel96"], folder, str(folder / "sub" / "*.wav"), "--format", "jsonl",
                           "--no-progress")
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    # the folder gives every audio name below it (the corrupt one fails); the glob's match is already in
    assert code == 1
    assert sorted(paths) == sorted(str(p) for p in (audio["flac"], audio["wav"], audio["short"], audio["bad"]))


def test_long_file_in_chunks_equals_whole(runs, audio, tmp_path):
    """Blocks of decoding, resampling, trimming (a second decode pass) and windows: the whole-file result."""
    long = tmp_path / "long.flac"
    sf.write(long, tone(60, 48000, 3, channels=2, silence_s=2.0), 48000)
    models = [load_model(runs["mel96"]), load_model(runs["mel128"])]
    r = tag_file(long, models, chunk_windows=5, decode_block=30011, replay_samples=500_000, segment=300_007)
    assert r.passes == 2  # mel128's trimming needed the file twice: only 0.5 M resampled samples were kept
    for m, w in zip(models, r.windows):
        whole = whole_track_windows(m, long)
        assert w.shape == whole.shape and w.shape[0] > 5 * 10  # dozens of forward passes of 5 windows
        np.testing.assert_allclose(w, whole, atol=1e-5)
    big = tag_file(long, models)  # default sizes: one decode, one forward pass per model
    assert big.passes == 1
    np.testing.assert_allclose(big.probs, r.probs, atol=1e-5)


def test_store_features_give_trainings_evaluation(runs):
    """The store's own features, streamed through in small chunks, give predictions/test.npz."""
    run = runs["mel96"]
    model = load_model(run)
    saved = np.load(run / "predictions" / "test.npz")
    store = FeatureStore(next((run.parent / "data-mel96").rglob("mel96.h5")))
    ids = list(saved["track_ids"])[:4]
    for i, track in enumerate(ids):
        s = model.stream(chunk_windows=2)
        frames = store.track(track).astype(np.float32)
        for k in range(0, len(frames), 50):
            s.push(frames[k : k + 50])
        np.testing.assert_allclose(s.finish().mean(axis=0), saved["probs"][i], atol=1e-5)


def test_thresholds_auto_and_fixed(runs, audio, capsys):
    m96, m128 = runs["mel96"], runs["mel128"]
    code, out, _ = run_cli(capsys, "--ckpt", m96, m128, audio["flac"], "--format", "json", "--no-progress")
    (rec,) = json.loads(out)
    val = [np.load(r / "predictions" / "validation.npz") for r in (m96, m128)]
    fitted = best_f1_thresholds(np.mean([v["probs"] for v in val], axis=0), val[0]["targets"])
    probs = np.array(list(rec["tags"].values()))
    assert code == 0 and rec["decisions"] == [t for t, p, th in zip(rec["tags"], probs, fitted) if p >= th]

    code, out, _ = run_cli(capsys, "--ckpt", m96, m128, audio["flac"], "--format", "json", "--threshold", "0.5",
                           "--no-progress")
    (rec,) = json.loads(out)
    assert rec["decisions"] == [t for t, p in rec["tags"].items() if p >= 0.5]


def test_plots_written(runs, audio, tmp_path, capsys):
    plots = tmp_path / "plots"
    code, out, _ = run_cli(capsys, "--ckpt", runs["mel96"], runs["mel128"], audio["flac"], audio["wav"],
                           "--format", "json", "--plot", plots, "--no-progress")
    assert code == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["a.flac.bars.png", "a.flac.taggram.png", "sub__b.wav.bars.png", "sub__b.wav.taggram.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000
    assert all(len(r["plots"]) == 2 for r in json.loads(out))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--top", "0"], "--top 0"),
        (["--threshold", "high"], "--threshold high"),
        (["--format", "csv", "--windows"], "--windows needs"),
        (["--batch-size", "0"], "--batch-size 0"),
    ],
)
def test_usage_errors_exit_2(runs, audio, capsys, args, says):
    code, _, err = run_cli(capsys, "--ckpt", runs["mel96"], audio["wav"], *args)
    assert code == 2 and says in err


def test_bad_checkpoint_exit_2(tmp_path, audio, capsys):
    code, _, err = run_cli(capsys, "--ckpt", tmp_path, audio["wav"])
    assert code == 2 and "checkpoints/final.ckpt" in err and str(tmp_path) in err
    junk = tmp_path / "x.ckpt"
    junk.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "--ckpt", junk, audio["wav"])
    assert code == 2 and "not a freqtag final checkpoint" in err


def test_command_lines(runs, audio, tmp_path):
    """`python predict.py` and `freqtag predict` (exit codes 0, 1, 2 through the real entry points)."""
    out = tmp_path / "o.csv"
    res = subprocess.run([sys.executable, str(REPO / "predict.py"), "--ckpt", str(runs["mel96"]), str(audio["wav"]),
                          "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert list(csv.DictReader(out.open()))[0]["path"] == str(audio["wav"])
    freqtag = str(Path(sys.executable).parent / "freqtag")
    res = subprocess.run([freqtag, "predict", "--ckpt", str(runs["mel96"]), str(audio["bad"]), "--format", "jsonl"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    assert res.returncode == 1 and "bad.mp3" in res.stderr
    res = subprocess.run([freqtag, "predict", "--ckpt", str(runs["mel96"]), "--format", "yaml", str(audio["wav"])],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr
    # --low-memory gives freed memory back between chunks instead of keeping it: the same tags either way
    tagged = [subprocess.run([freqtag, "predict", "--ckpt", str(runs["mel96"]), str(audio["wav"]), "--format", "json",
                              *extra], capture_output=True, text=True, check=True).stdout for extra in ([], ["--low-memory"])]
    assert json.loads(tagged[0]) == json.loads(tagged[1])


def test_workers_give_the_same_output_in_input_order(runs, audio, capsys):
    """Feature workers (prepare's pool) and this process give the same JSON, bit for bit, failures included."""
    files = [audio["wav"], audio["bad"], audio["flac"], audio["short"]]
    outs = []
    for workers in ("0", "2"):
        code, out, err = run_cli(capsys, "--ckpt", runs["mel96"], runs["mel128"], *files, "--format", "json",
                                 "--windows", "--no-progress", "--workers", workers)
        assert code == 1 and "3 files tagged, 1 failed" in err
        outs.append(out)
    assert outs[0] == outs[1]
    tagged = [str(f) for f in files if f != audio["bad"]]
    assert [r["path"] for r in json.loads(outs[1])] == tagged + [str(audio["bad"])]  # records, then failures


def test_a_crashing_decoder_fails_only_its_file(runs, audio):
    """A worker killed on one file (as a decoder crash would) is that file's failure; the others are tagged."""
    freqtag = str(Path(sys.executable).parent / "freqtag")
    res = subprocess.run([freqtag, "predict", "--ckpt", str(runs["mel96"]), str(audio["flac"]), str(audio["wav"]),
                          str(audio["short"]), "--workers", "2", "--format", "json", "--no-progress"],
                         capture_output=True, text=True, env={**os.environ, "FREQTAG_FAULT": "tagrun.decode:b.wav"})
    assert res.returncode == 1, res.stderr
    records = {r["path"]: r for r in json.loads(res.stdout)}
    assert "worker process died on this file" in records[str(audio["wav"])]["error"]
    assert "tags" in records[str(audio["flac"])] and "tags" in records[str(audio["short"])]


def test_synthetic_model_warns_once(runs, audio, capsys):
    code, _, err = run_cli(capsys, "--ckpt", runs["mel96"], audio["wav"], "--format", "json")
    line = f"freqtag predict: warning: {runs['mel96']} was trained on freqtag's synthetic demo data: " \
           f"its tags say nothing about real music"
    assert code == 0 and err.splitlines().count(line) == 1


@pytest.mark.parametrize("features", ["mel96", "mel128"])
def test_the_network_gives_the_same_bits_on_any_number_of_threads(runs, features):
    """What lets one-thread workers and this process's thread pool agree: no sum depends on the thread count."""
    model = load_model(runs[features])
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for frames in (7, 3 * model.input_length + 5, 679):
            x = torch.randn(1, model.spec.n_mels, frames, generator=g)
            outs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append([model.window_probabilities(x), model.window_activations(x, "collapse")])
            for other in outs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(outs[0], other)), frames
    finally:
        torch.set_num_threads(threads)


def test_onednn_convolutions_equal_torchs_own():
    """Routed to oneDNN: positional and keyword arguments, strides, padding, dilation, groups; 'same' left to torch."""
    from freqtag.wholetrack import OneDNNConvolutions

    g = torch.Generator().manual_seed(1)
    x2, w2, b2 = torch.randn(2, 8, 9, 31, generator=g), torch.randn(12, 4, 3, 3, generator=g), torch.randn(12, generator=g)
    x1, w1 = torch.randn(1, 6, 40, generator=g), torch.randn(5, 6, 1, generator=g)
    calls = [
        (torch.conv2d, (x2, w2, b2), {"stride": (2, 1), "padding": (0, 1), "dilation": 1, "groups": 2}),
        (torch.nn.functional.conv2d, (x2, w2, None, 1, 2, 2, 2), {}),
        (torch.conv1d, (x1, w1), {}),
        (torch.nn.functional.conv1d, (x1, w1, None), {"padding": "valid"}),
        (torch.nn.functional.conv1d, (x1, w1, None), {"padding": "same"}),
    ]
    routed = []
    real = torch.mkldnn_convolution
    with torch.inference_mode():
        want = [f(*a, **k) for f, a, k in calls]
        with OneDNNConvolutions():
            torch.mkldnn_convolution = lambda *a: (routed.append(1), real(*a))[1]  # type: ignore[assignment]
            try:
                got = [f(*a, **k) for f, a, k in calls]
            finally:
                torch.mkldnn_convolution = real
    assert len(routed) == 4  # all but padding="same"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_workers_run_the_network_and_both_designs_agree_bit_for_bit(runs, audio, monkeypatch):
    """On a CPU the workers run the whole pipeline (the network never runs here); feature workers, the GPU design,
    give the same bits; failures and input order too."""
    from freqtag.tag.models import TaggerModel
    from freqtag.tag.runner import network_in_workers, tag_files

    models = [load_model(runs["mel96"]), load_model(runs["mel128"])]
    assert network_in_workers(models)
    here = []
    real = TaggerModel.window_activations
    monkeypatch.setattr(TaggerModel, "window_activations", lambda self, x, layer: (here.append(1), real(self, x, layer))[1])
    files = [audio["flac"], audio["bad"], audio["wav"], audio["short"]]
    results = {}
    for label, workers, network_workers in (("in workers", 2, None), ("features", 1, False), ("here", 0, None)):
        here.clear()
        results[label] = list(tag_files(files, models, layer="fc", workers=workers, network_workers=network_workers))
        assert (len(here) == 0) == (label == "in workers"), label
    for label, got in results.items():
        assert [f for f, _ in got] == files, label
        assert "corrupt or not audio" in got[1][1], label
        for (_, a), (_, b) in zip(got, results["here"]):
            if not isinstance(b, str):
                assert a.path == b.path and a.duration_s == b.duration_s and a.passes == b.passes, label
                assert all(np.array_equal(x, y) for x, y in zip(a.windows, b.windows)), label
                assert np.array_equal(a.probs, b.probs), label


def test_default_workers_fit_in_ram(runs, audio, capsys, monkeypatch):
    """Each network worker holds a forward pass's activations: the default count is lowered to what RAM holds,
    in one line; an explicit --workers is taken as given."""
    from freqtag.system import memory
    from freqtag.tag import commands
    from freqtag.tag.models import load_models
    from freqtag.tag.runner import network_worker_bytes

    need = network_worker_bytes(load_models([runs["mel96"]]))
    monkeypatch.setattr(commands, "default_workers", lambda: 8)
    monkeypatch.setattr(memory, "_host_available", lambda: 3 * need + 1)
    seen = []  # the workers tag_files is given (it is not run: the count is what is tested)
    monkeypatch.setattr(commands, "tag_files", lambda files, models, *a: (seen.append(a[2]), iter(()))[1])
    code, _, err = run_cli(capsys, "--ckpt", runs["mel96"], audio["wav"], audio["short"], "--format", "json",
                           "--no-progress")
    assert code == 0 and seen == [3]
    assert "freqtag predict: 3 workers, not 8: each needs about" in err and "--batch-size" in err
    code, _, err = run_cli(capsys, "--ckpt", runs["mel96"], audio["wav"], audio["short"], "--format", "json",
                           "--no-progress", "--workers", "5")
    assert code == 0 and seen == [3, 5] and "workers, not" not in err
