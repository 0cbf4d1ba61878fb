"""The HDF5 feature store: writer/reader round trip, resume, statistics, processes."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from freqtag.data.store import DTYPE, FeatureStore, StoreError, store_summary
from freqtag.data.store_writer import StoreWriter
from freqtag.features import FeatureSpec

SPEC = FeatureSpec.load("mel96")


def make_tracks(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"track_{i:07d}": (rng.normal(-20, 15, size=(int(rng.integers(30, 200)), SPEC.n_mels))).astype(np.float32)
        for i in range(n)
    }


def write_store(path: Path, tracks: dict[str, np.ndarray], train: list[str], batch: int = 5) -> Path:
    writer = StoreWriter(path, SPEC, list(tracks))
    items = list(tracks.items())
    for i in range(0, len(items), batch):
        writer.add(items[i : i + batch])
    return writer.finish(train, "train")


@pytest.fixture()
def tracks() -> dict[str, np.ndarray]:
    return make_tracks()


@pytest.fixture()
def store_path(tmp_path: Path, tracks) -> Path:
    return write_store(tmp_path / "mel96.h5", tracks, list(tracks)[:8])


def test_a_store_whose_spec_still_has_center_opens_as_today(store_path: Path, tmp_path: Path) -> None:
    """Stores written before FeatureSpec lost its unused ``center`` field read as today's (and resume as them)."""
    old = {**SPEC.to_dict(), "center": True}
    assert "center" not in SPEC.to_dict()
    with h5py.File(store_path, "r+") as f:
        f.attrs["spec"] = json.dumps(old, sort_keys=True)
    assert FeatureStore(store_path).spec == SPEC
    partial = tmp_path / "resumed.h5.partial"
    partial.mkdir()
    (partial / "spec.json").write_text(json.dumps(old))
    assert StoreWriter(tmp_path / "resumed.h5", SPEC, ["a"]).todo() == ["a"]


def test_round_trip(store_path: Path, tracks) -> None:
    store = FeatureStore(store_path)
    assert store.track_ids == list(tracks)
    assert store.spec == SPEC and store.n_mels == 96
    assert store.n_frames == sum(len(x) for x in tracks.values())
    assert store.frames.dtype == np.float16
    for i, (track_id, x) in enumerate(tracks.items()):
        got = store.track(track_id)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, x.astype(np.float16))
        assert store.length(track_id) == len(x) == store.lengths[i]
    assert "nope" not in store and store.missing(["nope", "track_0000000"]) == ["nope"]
    with h5py.File(store_path) as f:
        assert f["features"].dtype == DTYPE and f.attrs["stats_split"] == "train"
    summary = store_summary(store)
    assert summary["tracks"] == len(tracks) and summary["spec"]["name"] == "mel96"
    assert summary["hours"] == pytest.approx(store.n_frames / SPEC.frames_per_second / 3600, abs=1e-3)


def test_crops_are_exact(store_path: Path, tracks) -> None:
    store = FeatureStore(store_path)
    rng = np.random.default_rng(1)
    for row, x in enumerate(tracks.values()):
        for _ in range(5):
            length = int(rng.integers(1, len(x) + 1))
            start = int(rng.integers(0, len(x) - length + 1))
            np.testing.assert_array_equal(store.crop(row, start, length), x[start : start + length].astype(np.float16))
    np.testing.assert_array_equal(store.frames, np.concatenate(list(tracks.values())).astype(np.float16))


def test_stats_from_train_ids_only(tmp_path: Path, tracks) -> None:
    train = list(tracks)[2:7]
    store = FeatureStore(write_store(tmp_path / "s.h5", tracks, train))
    x = np.concatenate([tracks[t].astype(np.float16).astype(np.float64) for t in train])
    assert store.mean == pytest.approx(x.mean(), rel=1e-9)
    assert store.std == pytest.approx(x.std(), rel=1e-7)
    assert store.stats_tracks == 5 and store.stats_split == "train"
    everything = np.concatenate([v.astype(np.float16).astype(np.float64) for v in tracks.values()])
    assert store.mean != pytest.approx(everything.mean(), rel=1e-6)


def test_store_order_is_canonical_not_arrival(tmp_path: Path, tracks) -> None:
    writer = StoreWriter(tmp_path / "s.h5", SPEC, list(tracks))
    items = list(tracks.items())[::-1]
    writer.add(items[:4])
    writer.add(items[4:])
    store = FeatureStore(writer.finish(list(tracks), "train"))
    assert store.track_ids == list(tracks)
    assert np.all(np.diff(store.offsets) > 0)


def _crop_in_child(store: FeatureStore, row: int) -> np.ndarray:
    return store.crop(row, 3, 20)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pickle_and_read_in_other_processes(store_path: Path, tracks, method: str) -> None:
    store = FeatureStore(store_path)
    store.track(list(tracks)[0])  # open the map in the parent first
    assert store._map is not None
    blob = pickle.dumps(store)
    assert len(blob) < 10_000  # the index and the path, never the frames or a handle
    clone = pickle.loads(blob)
    assert clone._map is None
    np.testing.assert_array_equal(clone.crop(1, 3, 20), store.crop(1, 3, 20))
    with multiprocessing.get_context(method).Pool(1) as pool:
        got = pool.starmap(_crop_in_child, [(store, 0), (store, 1)])
    for row, x in zip((0, 1), got):
        np.testing.assert_array_equal(x, list(tracks.values())[row][3:23].astype(np.float16))


def test_resume_sees_done_tracks(tmp_path: Path, tracks) -> None:
    out = tmp_path / "s.h5"
    ids = list(tracks)
    first = StoreWriter(out, SPEC, ids)
    first.add([(t, tracks[t]) for t in ids[:4]])
    first.add([(t, tracks[t]) for t in ids[4:6]])
    del first  # as if the process died
    assert not out.exists() and (tmp_path / "s.h5.partial").is_dir()
    second = StoreWriter(out, SPEC, ids)
    assert second.done == set(ids[:6])
    assert second.todo() == ids[6:]
    second.add([(t, tracks[t]) for t in second.todo()])
    resumed = FeatureStore(second.finish(ids[:8], "train"))
    whole = FeatureStore(write_store(tmp_path / "whole.h5", tracks, ids[:8]))
    np.testing.assert_array_equal(resumed.frames, whole.frames)
    assert (resumed.mean, resumed.std) == (whole.mean, whole.std)
    assert not (tmp_path / "s.h5.partial").exists()


def test_damaged_and_stale_parts_are_redone(tmp_path: Path, tracks) -> None:
    out = tmp_path / "s.h5"
    ids = list(tracks)
    writer = StoreWriter(out, SPEC, ids)
    writer.add([(t, tracks[t]) for t in ids[:3]])
    writer.add([(t, tracks[t]) for t in ids[3:6]])
    parts = sorted((tmp_path / "s.h5.partial").glob("part-*.npz"))
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # torn write
    (tmp_path / "s.h5.partial" / "part-000009.npz.tmp").write_bytes(b"half")
    again = StoreWriter(out, SPEC, ids)
    assert again.done == set(ids[:3])
    assert not list((tmp_path / "s.h5.partial").glob("*.tmp"))


def test_partial_with_another_spec_is_refused(tmp_path: Path, tracks) -> None:
    out = tmp_path / "s.h5"
    StoreWriter(out, SPEC, list(tracks)).add(list(tracks.items())[:2])
    with pytest.raises(StoreError, match=r"features 'mel96', not 'mel128'.*--features mel96"):
        StoreWriter(out, FeatureSpec.load("mel128"), list(tracks))


def test_no_final_file_before_finish(tmp_path: Path, tracks) -> None:
    out = tmp_path / "s.h5"
    writer = StoreWriter(out, SPEC, list(tracks))
    writer.add(list(tracks.items()))
    assert not out.exists() and not (tmp_path / "s.h5.tmp").exists()
    with pytest.raises(StoreError, match="re-run the same `freqtag prepare`"):
        FeatureStore(out)
    writer.finish([], "train")
    assert out.exists() and not (tmp_path / "s.h5.tmp").exists()


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="duplicate"):
        StoreWriter(tmp_path / "s.h5", SPEC, ["a", "a"])
    writer = StoreWriter(tmp_path / "s.h5", SPEC, ["a"])
    with pytest.raises(StoreError, match=r"expected \(frames, 96\)"):
        writer.add([("a", np.zeros((96, 10), np.float32).T[:, :50])])


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist.*freqtag prepare"):
        FeatureStore(tmp_path / "none.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a freqtag feature store"):
        FeatureStore(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable freqtag store"):
        FeatureStore(tmp_path / "junk.h5")


def test_many_parts_do_not_exhaust_file_descriptors(tmp_path: Path) -> None:
    """finish keeps only a few parts open: 300 one-track parts under a 100-descriptor limit."""
    resource = pytest.importorskip("resource")
    tracks = {f"t{i}": np.full((2, SPEC.n_mels), i, np.float32) for i in range(300)}
    writer = StoreWriter(tmp_path / "s.h5", SPEC, list(tracks))
    for item in tracks.items():
        writer.add([item])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
    try:
        out = writer.finish(list(tracks), "train")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    np.testing.assert_array_equal(FeatureStore(out).track("t299"), np.full((2, 96), 299, np.float16))


def test_finish_without_tracks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no track was added"):
        StoreWriter(tmp_path / "s.h5", SPEC, ["a"]).finish([], "train")
    assert not (tmp_path / "s.h5").exists()
