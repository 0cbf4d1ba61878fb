"""The synthetic demo dataset: real formats, deterministic, learnable, and location-dependent."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import freqtag.data.synthetic as synthetic
from freqtag.data.jamendo import MOODTHEME_TAGS, SPLITS, TAGS_FILE, read_splits, read_tags, split_file
from freqtag.data.store import FeatureStore
from freqtag.data.synthetic import N_REGIONS, synthesize
from freqtag.features import FeatureSpec


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo size (1000 tracks): what `make train` learns."""
    out = synthesize(tmp_path_factory.mktemp("synth") / "demo", tracks=1000, seed=0)
    tags = read_tags(out / TAGS_FILE)
    return out, read_splits(out / "split-0", tags), FeatureStore(out / "mel96.h5")


def _store_content(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("features", "tracks/id", "tracks/offset", "tracks/length")}, dict(f.attrs)


def test_formats_tags_and_splits(demo):
    out, splits, store = demo
    assert read_tags(out / TAGS_FILE) == list(MOODTHEME_TAGS)
    assert store.spec == FeatureSpec.load("mel96") and store.n_mels == 96
    assert store.stats_split == "train" and store.stats_tracks == len(splits["train"])
    sizes = [len(splits[s]) for s in SPLITS]
    assert sum(sizes) == 1000 and sizes == [600, 200, 200]
    all_ids = [t for s in SPLITS for t in splits[s].track_ids]
    assert sorted(all_ids) == sorted(store.track_ids) and len(set(all_ids)) == 1000
    artists = [set(splits[s].artist_ids) for s in SPLITS]
    assert not (artists[0] & artists[1] or artists[0] & artists[2] or artists[1] & artists[2])
    for s in SPLITS:
        split = splits[s]
        positives = split.labels.sum(axis=0)
        assert positives.min() >= 3, f"{s}: a tag has only {positives.min()} positives"
        per_track = split.labels.sum(axis=1)
        assert per_track.min() >= 1 and per_track.max() <= 3 and 1.6 < per_track.mean() < 2.0
        lengths = np.array([store.length(t) for t in split.track_ids])
        assert np.allclose(split.durations, lengths / store.spec.frames_per_second, atol=0.051)
        assert (lengths < 128).sum() >= 5 and (lengths < 224).sum() > (lengths < 128).sum()
        assert lengths.max() > 1000
        for t, p in zip(split.track_ids, split.paths):
            n = int(t.split("_")[1])
            assert p == f"{n % 100:02d}/{n}.mp3"
    # roughly the real statistics of mel96, so normalisation matters
    assert -28 < store.mean < -21 and 16 < store.std < 23


def test_mel128_and_small_dataset(tmp_path):
    out = synthesize(tmp_path / "s", tracks=300, seed=3, features="mel128")
    splits = read_splits(out / "split-0", read_tags(out / TAGS_FILE))
    store = FeatureStore(out / "mel128.h5")
    assert store.spec.name == "mel128" and store.n_mels == 128
    assert -3 < store.mean < 5 and 16 < store.std < 24
    for s in SPLITS:  # even 300 tracks hold every tag in every split
        assert splits[s].labels.sum(axis=0).min() >= 1


def test_deterministic(tmp_path):
    a = synthesize(tmp_path / "a", tracks=300, seed=1)
    b = synthesize(tmp_path / "b", tracks=300, seed=1)
    c = synthesize(tmp_path / "c", tracks=300, seed=2)
    for s in SPLITS:
        assert split_file(a / "split-0", s).read_bytes() == split_file(b / "split-0", s).read_bytes()
        assert split_file(a / "split-0", s).read_bytes() != split_file(c / "split-0", s).read_bytes()
    (da, aa), (db, ab), (dc, _) = (_store_content(x / "mel96.h5") for x in (a, b, c))
    assert aa == ab
    for k in da:
        np.testing.assert_array_equal(da[k], db[k])
    assert not np.array_equal(da["features"][:1000], dc["features"][:1000])
    # a track does not depend on the others: the same track of a bigger dataset differs only by its labels
    x = synthetic._track(1, 7, np.array([5, 10]), 300, 96, "mel96")
    np.testing.assert_array_equal(x, synthetic._track(1, 7, np.array([5, 10]), 300, 96, "mel96"))


def test_atomic_and_reusable(tmp_path, monkeypatch):
    out = tmp_path / "d"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.StoreWriter, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, tracks=300)
    assert list(tmp_path.iterdir()) == []  # nothing that looks complete, no debris
    monkeypatch.undo()
    synthesize(out, tracks=300)
    stamp = (out / "mel96.h5").stat().st_mtime_ns
    assert synthesize(out, tracks=300) == out and (out / "mel96.h5").stat().st_mtime_ns == stamp  # reused
    synthesize(out, tracks=300, seed=5)  # other arguments: rebuilt in place
    assert '"seed": 5' in (out / synthetic.MANIFEST).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="mine"):
        synthesize(tmp_path / "mine", tracks=300)
    with pytest.raises(ValueError, match="300"):
        synthesize(tmp_path / "tiny", tracks=50)


def _band_means(store, split, crop=None, seed=0):
    """Per-band time average of each track (of one random crop if ``crop``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in split.track_ids:
        x = (store.track(t).astype(np.float32) - store.mean) / store.std
        if crop is not None and len(x) > crop:
            s = rng.integers(0, len(x) - crop + 1)
            x = x[s : s + crop]
        rows.append(x.mean(axis=0))
    return np.stack(rows)


def _macro_auc(train_x, train_y, val_x, val_y):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mu) / sd, (val_x - mu) / sd
    aucs = []
    for j in range(train_y.shape[1]):
        model = LogisticRegression(C=0.1, max_iter=1000).fit(train_x, train_y[:, j])
        aucs.append(roc_auc_score(val_y[:, j], model.decision_function(val_x)))
    return float(np.mean(aucs))


def test_learnable_and_location_matters(demo):
    """A linear model on per-band means learns the tags, but not perfectly
    (combs and jitter need a real feature extractor); folding the four
    regions together, i.e. ignoring *where* a motif sits, loses most of it."""
    _, splits, store = demo
    train, val = splits["train"], splits["validation"]
    xtr, xva = _band_means(store, train), _band_means(store, val)
    where = _macro_auc(xtr, train.labels, xva, val.labels)

    def fold(x):  # the four region slices averaged: the motif kept, its region lost
        return x.reshape(len(x), N_REGIONS, -1).mean(axis=1)

    anywhere = _macro_auc(fold(xtr), train.labels, fold(xva), val.labels)
    cropped = _macro_auc(_band_means(store, train, 128), train.labels, _band_means(store, val, 128, 1), val.labels)
    print(f"band means {where:.3f}, regions folded {anywhere:.3f}, 128-frame crops {cropped:.3f}")
    assert 0.75 < where < 0.95
    assert anywhere < where - 0.1
    assert cropped > 0.72  # the signal is in every crop, not only in the whole track
