"""Bad data stops a run before any training, with one line naming the file and the fix.

Each case breaks one thing of a tiny dataset (tests/tiny_data.py) and runs
:func:`freqtag.train.driver.run` as `python train.py` would; the error must be one
that ``train.py`` prints as one line (a user error, not a traceback) and no
checkpoint may exist (the error came before any training step). One case
goes through `python train.py` itself.
"""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import DictConfig
from tiny_data import Tiny, config, make_tiny
from tiny_data import run as run_command

from freqtag.data import jamendo
from freqtag.data.store import FeatureStore, StoreError
from freqtag.data.store_writer import StoreWriter
from freqtag.features import FeatureSpec
from freqtag.tag.predict import main as predict_main
from freqtag.train.checkpoints import ResumeError, check_resume
from freqtag.train.driver import run
from freqtag.train.main import user_error


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def refused(cfg: DictConfig, *words: str) -> str:
    """Run, expect a one-line user error holding ``words``, and no training done."""
    with pytest.raises(Exception) as info:
        run(cfg)
    err = user_error(info.value)
    assert err is not None, f"not a user error (train.py would print a traceback): {info.value!r}"
    message = str(err)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # stopped before any training step
    return message


def copy_store(t: Tiny, tmp: Path) -> Path:
    out = tmp / "store.h5"
    shutil.copy(t.store, out)
    return out


def copy_splits(t: Tiny, tmp: Path) -> Path:
    out = tmp / "split-0"
    shutil.copytree(t.splits, out)
    return out


# ------------------------------------------------------------------ the store


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_in_the_store(tiny: Tiny, tmp_path: Path, value: float) -> None:
    store = copy_store(tiny, tmp_path)
    s = FeatureStore(store)
    victim = tiny.order[30]  # a validation track: every split is checked, not only train
    with h5py.File(store, "r+") as f:
        f["features"][int(s.offsets[s.row[victim]]) + 5, 17] = value
        f["features"][int(s.offsets[s.row[victim]]) + 6, 3] = value
    refused(config(tiny, tmp_path / "run", store=store), str(store), f"{victim} (2 values)", "1 tracks hold NaN/inf",
            "freqtag prepare", "data.check_finite=false")  # fmt: skip


def test_the_writer_refuses_non_finite_features(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s.h5", FeatureSpec.load("mel96"), ["a", "b"])
    bad = np.zeros((40, 96), np.float32)
    bad[3, 3] = 1e6  # finite in float32, inf in the store's float16
    with pytest.raises(StoreError, match="track b: 1 NaN/inf values .*fix or leave out its source file"):
        writer.add([("a", np.zeros((40, 96), np.float32)), ("b", bad)])
    assert writer.done == set()  # nothing of the refused batch was kept


def edit(store: Path, fn) -> None:  # type: ignore[no-untyped-def]
    with h5py.File(store, "r+") as f:
        fn(f)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: f["tracks/offset"].__setitem__(3, f["tracks/offset"][3] + 1), "does not start where the previous"),
        (lambda f: f["tracks/length"].__setitem__(39, f["tracks/length"][39] + 7), "the index covers"),
        (lambda f: f["tracks/length"].__setitem__(0, 0), "has 0 frames in the index"),
        (lambda f: f["tracks/id"].__setitem__(1, f["tracks/id"][0]), "is listed twice"),
        (lambda f: f.attrs.__setitem__("format", "other"), "is not a freqtag feature store"),
    ],
    ids=["gap", "index-longer-than-data", "empty-track", "duplicate-id", "not-a-store"],
)
def test_store_index_and_data_disagree(tiny: Tiny, tmp_path: Path, damage, says: str) -> None:  # type: ignore[no-untyped-def]
    store = copy_store(tiny, tmp_path)
    edit(store, damage)
    refused(config(tiny, tmp_path / "run", store=store), str(store), says)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_store_cut_short(tiny: Tiny, tmp_path: Path, keep: float) -> None:
    """A copy that stopped early: refused on open, whichever part is missing."""
    store = copy_store(tiny, tmp_path)
    data = store.read_bytes()
    store.write_bytes(data[: int(len(data) * keep)])
    refused(config(tiny, tmp_path / "run", store=store), str(store), "rebuild it")


def test_store_of_other_features_one_line_through_train_py(tiny: Tiny, tmp_path: Path) -> None:
    res = run_command(tiny.train_args(tmp_path / "run", "features=mel128"), cwd=tmp_path)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0] == (
        f"train.py: error: {tiny.store} holds 'mel96' features but the run asks for features=mel128 with a different "
        f"recipe: choose features=mel96 or point data.store at a mel128 store"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------- the split TSVs


def drop_from_store(t: Tiny, tmp: Path, gone: list[str]) -> Path:
    """A store like the tiny one without some tracks (made by the real writer)."""
    src = FeatureStore(t.store)
    out = tmp / "fewer.h5"
    keep = [x for x in src.track_ids if x not in gone]
    writer = StoreWriter(out, src.spec, keep)
    writer.add([(x, src.track(x)) for x in keep])
    writer.finish(keep[:24], "train")
    return out


def test_split_tracks_missing_from_the_store_stop_by_default(tiny: Tiny, tmp_path: Path) -> None:
    gone = tiny.order[33:36]  # three test tracks
    store = drop_from_store(tiny, tmp_path, gone)
    test_tsv = jamendo.split_file(tiny.splits, "test")
    refused(config(tiny, tmp_path / "run", store=store), f"{test_tsv}: 3 of 8 tracks are not in {store}",
            ", ".join(gone), "re-run `freqtag prepare`", "data.missing_tracks=skip")  # fmt: skip


def test_split_tracks_missing_from_the_store_skipped_on_request(tiny: Tiny, tmp_path: Path) -> None:
    gone = tiny.order[33:36]
    store = drop_from_store(tiny, tmp_path, gone)
    metrics = run(config(tiny, tmp_path / "run", "data.missing_tracks=skip", "trainer.max_epochs=1", store=store))
    test = np.load(tmp_path / "run" / "predictions" / "test.npz")
    assert list(test["track_ids"]) == [x for x in tiny.order[32:] if x not in gone]  # the 5 present, in TSV order
    assert np.isfinite(metrics["test"]["roc_auc"])


def test_a_tag_left_without_positives_by_skipping(tiny: Tiny, tmp_path: Path) -> None:
    """Skipping can leave a tag with no positive test track: its score would fail after training, so stop now."""
    store = drop_from_store(tiny, tmp_path, [tiny.order[33], tiny.order[37]])  # test tracks 1 and 5: tags 1, 5, 9...
    refused(config(tiny, tmp_path / "run", "data.missing_tracks=skip", store=store),
            "test.tsv: 14 tags have no positive (or no negative) track in the test split (mood/theme---adventure, ",
            "PR-AUC/ROC-AUC is undefined")  # fmt: skip


def test_every_track_of_a_split_missing_even_with_skip(tiny: Tiny, tmp_path: Path) -> None:
    store = drop_from_store(tiny, tmp_path, tiny.order[24:32])  # the whole validation split
    refused(config(tiny, tmp_path / "run", "data.missing_tracks=skip", store=store),
            "validation.tsv: none of its 8 tracks is in", str(store))  # fmt: skip


def test_empty_split(tiny: Tiny, tmp_path: Path) -> None:
    splits = copy_splits(tiny, tmp_path)
    test_tsv = jamendo.split_file(splits, "test")
    test_tsv.write_text(test_tsv.read_text().splitlines()[0] + "\n")  # the header only
    refused(config(tiny, tmp_path / "run", splits=splits), f"{test_tsv}: the test split is empty")


def test_split_tag_not_in_the_tag_list(tiny: Tiny, tmp_path: Path) -> None:
    splits = copy_splits(tiny, tmp_path)
    train = jamendo.split_file(splits, "train")
    lines = train.read_text().splitlines()
    lines[2] += "\tmood/theme---bogus"
    train.write_text("\n".join(lines) + "\n")
    refused(config(tiny, tmp_path / "run", splits=splits), f"{train}:3", "bogus")


# ------------------------------------------------- a tag list that differs


@pytest.fixture(scope="module")
def trained(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    run(config(tiny, out))
    return out


def swapped_tags(t: Tiny, tmp: Path) -> Path:
    tags = t.tags.read_text().splitlines()
    tags[0], tags[1] = tags[1], tags[0]
    out = tmp / "moodtheme_split.txt"
    out.write_text("\n".join(tags) + "\n")
    return out


def test_resume_with_another_tag_list(tiny: Tiny, trained: Path, tmp_path: Path) -> None:
    last = trained / "checkpoints" / "last.ckpt"
    cfg = config(tiny, tmp_path / "run", f"+ckpt_path={last}", "trainer.max_epochs=3", tags=swapped_tags(tiny, tmp_path))
    refused(cfg, f"ckpt_path={last} was trained on another tag list than", "tag 1 is mood/theme---action there, "
            "mood/theme---adventure here", "the run's own data.tags_file")  # fmt: skip


def test_resume_with_other_features(tiny: Tiny, trained: Path) -> None:
    dm = types.SimpleNamespace(tags=tiny.tags.read_text().split(), spec=FeatureSpec.load("mel128"),
                               tags_file=tiny.tags, store_path=Path("mel128.h5"))  # fmt: skip
    with pytest.raises(ResumeError, match="trained on 'mel96' features, this run uses mel128 .*features=mel96"):
        check_resume(trained / "checkpoints" / "last.ckpt", dm)


@pytest.mark.parametrize("kind", ["missing", "damaged"])
def test_resume_from_a_missing_or_damaged_checkpoint(tiny: Tiny, trained: Path, tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "last.ckpt"
    if kind == "damaged":
        ckpt.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    cfg = config(tiny, tmp_path / "run", f"+ckpt_path={ckpt}")
    refused(cfg, f"ckpt_path={ckpt}", "no such file" if kind == "missing" else "cannot be read")


def test_predict_refuses_checkpoints_with_different_tags(trained: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    final = torch.load(trained / "checkpoints" / "final.ckpt", weights_only=True)
    final["tags"] = [final["tags"][1], final["tags"][0], *final["tags"][2:]]
    other = tmp_path / "other.ckpt"
    torch.save(final, other)
    wav = tmp_path / "a.wav"
    t = np.arange(4 * 12000) / 12000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 12000)
    code = predict_main(["--ckpt", str(trained), str(other), str(wav), "--threshold", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and f"{other} has a different tag list from {trained / 'checkpoints' / 'final.ckpt'}" in err
    # thresholds.tsv that lacks a tag of the checkpoint
    thresholds = trained / "checkpoints" / "thresholds.tsv"
    copy = tmp_path / "run" / "checkpoints"
    copy.mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "final.ckpt", copy)
    (copy / "thresholds.tsv").write_text("".join(thresholds.read_text().splitlines(keepends=True)[1:]))
    code = predict_main(["--ckpt", str(tmp_path / "run"), str(wav)])
    err = capsys.readouterr().err
    assert code == 2 and f"{copy / 'thresholds.tsv'}: no threshold for 1 tags" in err
