"""`freqtag prepare` and `freqtag info`, run as the installed console script on a small MTG-layout tree."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_store, freqtag, kill_when_parts

from freqtag.data.store import FeatureStore
from freqtag.prepare.command import PrepareError, prepare_npy
from freqtag.prepare.jobs import npy_jobs, read_split_dir
from freqtag.prepare.report import read_report, report_path

COUNTS = {"train": 40, "validation": 10, "test": 10}
# (split, row in our small TSV) -> what is wrong with its file, and the reason's key words
BAD = {
    ("train", 5): ("corrupt", "unreadable"),
    ("train", 12): ("wrong shape", "wrong shape (50, 96)"),
    ("validation", 2): ("missing", "missing file"),
    ("test", 3): ("nan", "non-finite values: 1 NaN"),
}


class Tree:
    """A small dataset in MTG's layout: split TSVs of real rows, npy/XX/ID.npy files."""

    def __init__(self, root: Path, shared: Path) -> None:
        self.root = root
        self.splits = root / "splits"
        self.clean_splits = root / "clean_splits"
        self.npy = root / "npy"
        self.tags = shared / "moodtheme_split.txt"
        self.arrays: dict[str, np.ndarray] = {}  # good tracks: (bands, frames) float32 as written
        self.order: list[str] = []
        self.train: list[str] = []
        self.bad: dict[str, str] = {}  # track id -> expected reason words
        rng = np.random.default_rng(7)
        for split, n in COUNTS.items():
            name = f"autotagging_moodtheme-{split}.tsv"
            lines = (shared / "split-0" / name).read_text().splitlines()
            header, rows = lines[0], lines[1 : n + 1]
            clean = [header]
            for i, row in enumerate(rows):
                track_id, path = row.split("\t")[0], row.split("\t")[3]
                self.order.append(track_id)
                target = self.npy / Path(path).with_suffix(".npy")
                target.parent.mkdir(parents=True, exist_ok=True)
                x = rng.normal(-24.0, 19.0, size=(96, int(rng.integers(20, 90)))).astype(np.float32)
                kind, reason = BAD.get((split, i), ("good", ""))
                if kind == "good":
                    self.arrays[track_id] = x
                    clean.append(row)
                    if split == "train":
                        self.train.append(track_id)
                else:
                    self.bad[track_id] = reason
                if kind in ("good", "nan"):
                    if kind == "nan":
                        x[10, 3] = np.nan
                    np.save(target, x)
                elif kind == "corrupt":
                    np.save(target, x)
                    target.write_bytes(target.read_bytes()[:200])
                elif kind == "wrong shape":
                    np.save(target, x.T[:50].copy())
            for folder, kept in ((self.splits, [header, *rows]), (self.clean_splits, clean)):
                folder.mkdir(exist_ok=True)
                (folder / name).write_text("\n".join(kept) + "\n")

    def args(self, out: Path, *extra: str, splits: Path | None = None) -> list[str]:
        return [
            "prepare", "--npy-dir", str(self.npy), "--splits", str(splits or self.splits),
            "--out", str(out), "--tags", str(self.tags), "--no-progress", *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Tree:
    return Tree(tmp_path_factory.mktemp("mtg"), shared_data)


@pytest.fixture(scope="module")
def reference(tree: Tree) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted single-worker run, shared by the tests that compare against it."""
    out = tree.root / "reference" / "mel96.h5"
    return out, freqtag(*tree.args(out))


def test_bad_files_are_skipped_and_listed(tree: Tree, reference) -> None:
    out, run = reference
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert f"wrote {out}: 56 of 60 tracks" in run.stdout
    assert "skipped 4 tracks" in run.stderr and str(report_path(out)) in run.stderr
    report = read_report(report_path(out))
    assert {t for t, _, _ in report} == set(tree.bad)
    for track_id, path, reason in report:
        assert tree.bad[track_id] in reason
        assert path.endswith(".npy") and Path(path).parent.parent == tree.npy
    assert report_path(out).read_text().splitlines()[0] == "track_id\tpath\treason"

    store = FeatureStore(out)
    assert store.track_ids == [t for t in tree.order if t not in tree.bad]
    for track_id, x in tree.arrays.items():
        got = store.track(track_id)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, x.T.astype(np.float16))
    train = np.concatenate([tree.arrays[t].astype(np.float16).astype(np.float64).ravel() for t in tree.train])
    assert store.mean == pytest.approx(train.mean(), rel=1e-9)
    assert store.std == pytest.approx(train.std(), rel=1e-7)
    assert store.stats_split == "train" and store.stats_tracks == len(tree.train) == 38
    assert not out.with_name(out.name + ".partial").exists()


def test_finished_store_is_not_rewritten(tree: Tree, reference) -> None:
    out, _ = reference
    before = out.stat().st_mtime_ns, report_path(out).read_text()
    again = freqtag(*tree.args(out))
    assert again.returncode == 1
    assert "already complete" in again.stdout and "lacks 4 of the 60" in again.stdout
    assert str(report_path(out)) in again.stdout
    assert (out.stat().st_mtime_ns, report_path(out).read_text()) == before
    # the same store asked only for the good tracks holds them all
    clean = freqtag(*tree.args(out, splits=tree.clean_splits))
    assert clean.returncode == 0 and "already complete: it holds all 56" in clean.stdout


def test_clean_run_exits_zero(tree: Tree, reference, tmp_path: Path) -> None:
    out = tmp_path / "clean.h5"
    run = freqtag(*tree.args(out, splits=tree.clean_splits))
    assert run.returncode == 0, run.stderr
    assert read_report(report_path(out)) == []
    assert_same_store(out, reference[0])  # same tracks, same train statistics


def test_two_workers_give_the_same_store(tree: Tree, reference, tmp_path: Path) -> None:
    out = tmp_path / "w2.h5"
    run = freqtag(*tree.args(out, "--workers", "2", "--batch-size", "7"))
    assert run.returncode == 1, run.stderr
    assert_same_store(out, reference[0])
    assert read_report(report_path(out)) == read_report(report_path(reference[0]))


SLOW_RUN = textwrap.dedent(
    """
    import functools, sys, time
    from freqtag.prepare import jobs as prepare
    from freqtag.prepare.assemble import build_store
    from freqtag.features import FeatureSpec

    def slow_load(job, n_mels):
        time.sleep(0.05)
        return prepare.load_npy(job, n_mels)

    npy, splits_dir, tags, out = sys.argv[1:]
    splits = prepare.read_split_dir(splits_dir, tags)
    build_store(
        prepare.npy_jobs(npy, splits), functools.partial(slow_load, n_mels=96), out,
        FeatureSpec.load("mel96"), splits["train"].track_ids, batch_size=2, progress=False,
    )
    """
)


def test_killed_run_resumes_to_the_same_store(tree: Tree, reference, tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(tree.npy), str(tree.splits), str(tree.tags), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    kill_when_parts(proc, partial, timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()
    kept = len(list(partial.glob("part-*.npz")))
    assert 2 <= kept < 28  # interrupted mid-way: 56 good tracks make 28 parts of 2

    run = freqtag(*tree.args(out))
    assert run.returncode == 1, run.stderr
    assert "kept from an interrupted run" in run.stdout
    assert_same_store(out, reference[0])
    assert read_report(report_path(out)) == read_report(report_path(reference[0]))
    assert not partial.exists()


def test_info_and_track_export(tree: Tree, reference, tmp_path: Path) -> None:
    out, _ = reference
    run = freqtag("info", str(out))
    assert run.returncode == 0, run.stderr
    store = FeatureStore(out)
    for text in ("tracks", "56", "hours", "frames", f"{store.n_frames:,}", "mean", "std", "train split, 38 tracks",
                 "spec.name", "mel96", "spec.n_mels", "96", f"{store.mean:.4f}", f"{store.std:.4f}"):  # fmt: skip
        assert text in run.stdout, text

    track_id = tree.train[3]
    target = tmp_path / "sub" / "one.npy"
    run = freqtag("info", str(out), "--track", track_id, "--npy", str(target))
    assert run.returncode == 0, run.stderr
    x = np.load(target)
    assert x.dtype == np.float32 and x.shape == tree.arrays[track_id].shape
    np.testing.assert_array_equal(x, tree.arrays[track_id].astype(np.float16).astype(np.float32))

    unknown = freqtag("info", str(out), "--track", "track_9999999", "--npy", str(target))
    assert unknown.returncode in (1, 2) and "track_9999999" in unknown.stderr and "Traceback" not in unknown.stderr
    half = freqtag("info", str(out), "--track", track_id)
    assert half.returncode == 2 and "--npy" in half.stderr


def one_line_error(run: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert run.returncode == code, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freqtag: error:"), run.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_user_errors_are_one_clear_line(tree: Tree, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    one_line_error(freqtag(*tree.args(out)[:2], str(tmp_path / "nowhere"), *tree.args(out)[3:]), 1, "nowhere", "--npy-dir")
    one_line_error(freqtag(*tree.args(out, splits=tmp_path / "nosplits")), 1, "nosplits", "--splits")
    one_line_error(freqtag(*tree.args(out, "--features", "mel200")), 1, "mel200", "mel96")
    one_line_error(freqtag(*tree.args(out, "--features", "mel128")), 1, "128", "--features mel128")
    one_line_error(freqtag("info", str(tmp_path / "none.h5")), 1, "none.h5", "freqtag prepare")
    one_line_error(freqtag(*tree.args(tmp_path)), 1, str(tmp_path), "folder")

    bad = tmp_path / "bad_splits"
    bad.mkdir()
    for f in tree.splits.iterdir():
        (bad / f.name).write_text(f.read_text())
    train = bad / "autotagging_moodtheme-train.tsv"
    lines = train.read_text().splitlines()
    lines[4] = lines[4] + "\tmood/theme---bogus"
    train.write_text("\n".join(lines) + "\n")
    one_line_error(freqtag(*tree.args(out, splits=bad)), 1, f"{train}:5:", "bogus")
    assert not out.exists()

    assert freqtag("prepare", "--splits", str(tree.splits)).returncode == 2  # argparse usage error
    assert freqtag().returncode == 2


def test_partial_of_other_features_is_refused(tree: Tree, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    (tmp_path / "p.h5.partial").mkdir()
    (tmp_path / "p.h5.partial" / "spec.json").write_text(
        __import__("freqtag.features", fromlist=["FeatureSpec"]).FeatureSpec.load("mel128").to_json()
    )
    one_line_error(freqtag(*tree.args(out)), 1, "p.h5.partial", "mel128", "--features mel128")


def test_api_report_and_job_order(tree: Tree, tmp_path: Path) -> None:
    splits = read_split_dir(tree.splits, tree.tags)
    jobs = npy_jobs(tree.npy, splits)
    assert [j.track_id for j in jobs] == tree.order
    report = prepare_npy(tree.npy, tree.clean_splits, tmp_path / "api.h5", progress=False, batch_size=5)
    assert (report.total, report.written, report.skipped, report.resumed) == (56, 56, [], 0)
    assert not report.already_complete and report.seconds > 0
    again = prepare_npy(tree.npy, tree.splits, tmp_path / "api.h5", progress=False)
    assert again.already_complete and again.written == 56
    assert {t for t, _, _ in again.skipped} == set(tree.bad)


def test_nothing_readable_is_an_error_not_an_empty_store(tree: Tree, tmp_path: Path) -> None:
    npy = tmp_path / "npy"
    for job in npy_jobs(tree.npy, read_split_dir(tree.splits, tree.tags)):
        target = npy / Path(job.source).relative_to(tree.npy)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "none.h5"
    with pytest.raises(PrepareError, match="none of the 60 tracks could be read"):
        prepare_npy(npy, tree.splits, out, tags_file=tree.tags, progress=False)
    assert not out.exists() and len(read_report(report_path(out))) == 60


def test_synth_command_prints_store_info(tmp_path: Path) -> None:
    """The CLI wiring of `freqtag synth` (the data itself is tested with freqtag.data.synthetic)."""
    run = freqtag("synth", "--out", str(tmp_path / "demo"), "--tracks", "300", "--seed", "1")
    assert run.returncode == 0, run.stderr
    store = FeatureStore(tmp_path / "demo" / "mel96.h5")
    assert len(store) == 300
    assert "300" in run.stdout and "spec.name" in run.stdout and f"{store.mean:.4f}" in run.stdout
