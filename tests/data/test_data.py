"""The DataModule: crops, whole tracks, in-memory mode, workers, rank shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from freqtag.data.datamodule import DataError, JamendoDataModule
from freqtag.data.jamendo import MOODTHEME_TAGS, TAGS_FILE, split_file, write_split
from freqtag.data.ring import RingOverwrite
from freqtag.data.samplers import CropSampler
from freqtag.data.store_writer import StoreWriter
from freqtag.features import FeatureSpec

SPEC = FeatureSpec.load("mel96")
L = 64


def make_data(root: Path, n: int = 30, seed: int = 0) -> dict[str, Path]:
    """A tiny dataset in the real layout: random frames, lengths from 20 to 300 frames."""
    rng = np.random.default_rng(seed)
    tags = list(MOODTHEME_TAGS)
    ids = [f"track_{i:07d}" for i in range(n)]
    lengths = rng.integers(20, 300, size=n)
    frames = {t: rng.normal(-20, 15, size=(int(k), SPEC.n_mels)).astype(np.float32) for t, k in zip(ids, lengths)}
    labels = np.zeros((n, len(tags)), dtype=np.uint8)
    labels[np.arange(n), rng.integers(0, len(tags), size=n)] = 1
    parts = {"train": slice(0, n // 2), "validation": slice(n // 2, 3 * n // 4), "test": slice(3 * n // 4, n)}
    for split, sl in parts.items():
        sel = ids[sl]
        write_split(split_file(root / "split-0", split), sel, [f"{i % 100:02d}/{i}.mp3" for i in range(len(sel))],
                    [frames[t].shape[0] / SPEC.frames_per_second for t in sel], labels[sl], tags)
    (root / TAGS_FILE).write_text("\n".join(tags) + "\n")
    w = StoreWriter(root / "mel96.h5", SPEC, ids)
    w.add([(t, frames[t]) for t in ids])
    w.finish(ids[parts["train"]], "train")
    return {"frames": frames, "labels": labels, "ids": ids}


def module(root: Path, **kw) -> JamendoDataModule:
    args = dict(store=str(root / "mel96.h5"), splits_dir=str(root / "split-0"), tags_file=str(root / TAGS_FILE),
                features=SPEC, input_length=L, batch_size=8, num_workers=0, seed=3)
    args.update(kw)
    dm = JamendoDataModule(**args)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("data")
    return root, make_data(root)


def batches(dm: JamendoDataModule, loader) -> list[dict[str, torch.Tensor]]:
    return [dm.on_device(b, torch.device("cpu")) for b in loader]


@pytest.mark.parametrize("mode", [dict(), dict(in_memory=True), dict(num_workers=2)], ids=["store", "in-memory", "workers"])
def test_crops_are_exact_normalised_slices(data, mode):
    root, d = data
    dm = module(root, **mode)
    sampler = dm.train_dataloader().sampler
    items, starts = sampler.crops()
    split = dm.splits["train"].split
    seen = 0
    for batch in batches(dm, dm.train_dataloader()):
        x = batch["x"]
        assert x.shape[1:] == (SPEC.n_mels, L) and x.dtype == torch.float32
        for k in range(len(x)):
            i, s = items[seen], starts[seen]
            raw = d["frames"][split.track_ids[i]].astype(np.float16).astype(np.float32)
            want = np.zeros((L, SPEC.n_mels), dtype=np.float32)
            chunk = raw[s : s + L]
            want[: len(chunk)] = (chunk - dm.mean) / dm.std
            np.testing.assert_allclose(x[k].numpy().T, want, atol=1e-5)
            np.testing.assert_array_equal(batch["y"][k].numpy(), split.labels[i])
            seen += 1
    assert seen == len(split)


def test_every_track_once_per_epoch_and_epochs_differ(data):
    root, _ = data
    dm = module(root)
    sampler = dm.train_dataloader().sampler
    a_items, a_starts = sampler.crops()
    assert sorted(a_items) == list(range(len(dm.splits["train"].rows)))
    sampler.set_epoch(1)
    b_items, b_starts = sampler.crops()
    assert not np.array_equal(a_items, b_items)
    lengths = dm.crop_dataset("train").lengths()
    assert np.all(b_starts <= np.maximum(lengths[b_items] - L, 0)) and np.all(b_starts >= 0)


def test_starts_are_uniform_over_valid_positions():
    sampler = CropSampler(np.array([L + 3] * 4000), L, 32, seed=0)
    _, starts = sampler.crops()
    counts = np.bincount(starts, minlength=4)
    assert counts.shape == (4,) and counts.min() > 850  # 4 positions, about 1000 each


def test_in_memory_mode_gives_the_same_batches(data):
    root, _ = data
    disk, ram = module(root), module(root, in_memory=True)
    for a, b in zip(batches(disk, disk.train_dataloader()), batches(ram, ram.train_dataloader()), strict=True):
        torch.testing.assert_close(a["x"], b["x"])
        torch.testing.assert_close(a["y"], b["y"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_give_the_same_batches(data, context):
    root, _ = data
    dm0, dm2 = module(root), module(root, num_workers=2, multiprocessing_context=context)
    for a, b in zip(batches(dm0, dm0.train_dataloader()), batches(dm2, dm2.train_dataloader()), strict=True):
        torch.testing.assert_close(a["x"], b["x"])


def test_a_batch_held_too_long_is_an_error_not_wrong_data(data):
    # worker processes write crops into a fixed ring of shared slots; a consumer that keeps every batch
    # unused while the workers run on must get an error, never another batch's crops
    root, _ = data
    dm = module(root, num_workers=2, batch_size=1)
    loader = dm.train_dataloader()
    held = list(loader)  # 15 batches, 10 slots
    assert len(held) > 10
    with pytest.raises(RingOverwrite, match="on_after_batch_transfer.*data.num_workers=0"):
        dm.on_device(held[0], torch.device("cpu"))
    dm.on_device(held[-1], torch.device("cpu"))  # the newest batches are still their own


def test_crops_leave_their_slot_when_moved_to_another_device(data):
    root, _ = data
    dm = module(root, num_workers=2)
    ref = module(root)
    for raw, want in zip(dm.train_dataloader(), ref.train_dataloader(), strict=True):
        raw = dm.on_before_batch_transfer(raw, 0)
        moved = dm.transfer_batch_to_device(raw, torch.device("meta"), 0)
        assert "slot" not in moved and moved["x16"].device.type == "meta"
        assert moved["x16"].shape == want["x16"].shape and moved["x16"].dtype == torch.float16


def test_rank_shares_partition_each_global_batch(data):
    root, _ = data
    dm = module(root)
    lengths = dm.crop_dataset("train").lengths()
    whole = list(CropSampler(lengths, L, 8, seed=5))
    shares = [list(CropSampler(lengths, L, 8, seed=5, rank=r, world_size=3)) for r in range(3)]
    for k, batch in enumerate(whole):
        assert sorted(sum((s[k] for s in shares), [])) == sorted(batch)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_last_batch_is_kept_only_if_every_rank_gets_two_crops(world):
    # BatchNorm in training mode needs 2+ values per channel: one crop per rank (at input_length=32) would crash
    for rest in range(0, 8):
        lengths = np.full(16 + rest, L + 5)
        shares = [list(CropSampler(lengths, L, 16, seed=3, rank=r, world_size=world)) for r in range(world)]
        kept = rest // world >= 2
        whole = list(CropSampler(lengths, L, 16, seed=3, min_last=1))
        for s in shares:
            assert len(s) == 1 + kept and all(len(b) >= 2 for b in s)
        for k in range(1 + kept):  # the same crops as before, from (seed, epoch): a batch is only dropped
            assert sorted(sum((s[k] for s in shares), [])) == sorted(whole[k])
        evaluation = list(CropSampler(lengths, L, 16, seed=3, world_size=world, min_last=1))
        assert len(evaluation) == 1 + (rest >= world)  # evaluation crops: one per rank suffices


def test_whole_tracks_in_split_order_any_length(data):
    root, d = data
    dm = module(root)
    split = dm.splits["test"].split
    got = batches(dm, dm.track_loader("test"))
    assert [int(b["item"]) for b in got] == list(range(len(split)))
    for b, track in zip(got, split.track_ids):
        raw = d["frames"][track].astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(b["x"][0].numpy().T, (raw - dm.mean) / dm.std, atol=1e-5)


def test_store_stats_come_from_train_tracks(data):
    root, d = data
    dm = module(root)
    train = np.concatenate([d["frames"][t].astype(np.float16).astype(np.float64) for t in dm.splits["train"].split.track_ids])
    assert dm.mean == pytest.approx(train.mean(), rel=1e-9)
    assert dm.std == pytest.approx(train.std(), rel=1e-9)
    np.testing.assert_allclose(dm.positive_rates(), dm.splits["train"].split.labels.mean(0))


def test_missing_store_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="(?s)freqtag prepare --features mel96 --npy-dir .*make train"):
        module(tmp_path)


def test_missing_tracks_stop_or_skip(tmp_path):
    make_data(tmp_path)
    extra = tmp_path / "split-0" / "autotagging_moodtheme-test.tsv"
    extra.write_text(extra.read_text() + "track_9999999\tartist_1\talbum_1\t99/9999999.mp3\t10.0\tmood/theme---calm\n")
    with pytest.raises(DataError, match=r"1 of \d+ tracks are not in .*track_9999999.*data.missing_tracks=skip"):
        module(tmp_path)
    dm = module(tmp_path, missing_tracks="skip")
    assert "track_9999999" not in dm.splits["test"].split.track_ids


def test_bad_settings_are_named(data):
    root, _ = data
    with pytest.raises(DataError, match="data.input_length=100"):
        module(root, input_length=100)
    with pytest.raises(DataError, match="features=mel128"):
        module(root, features=FeatureSpec.load("mel128"))
