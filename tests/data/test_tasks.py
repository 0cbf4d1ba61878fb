"""Every MTG-Jamendo task and split: file names, tag lists (MTG's file or the TSVs' tags), and a whole run on one.

The tag lists are read from the real split-0 metadata in ../shared (skipped without it); the
run trains on a tiny generated dataset in genre format (8 tags, no tag-list file, as MTG's genre).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from tiny_data import config, make_tiny

from freqtag.data import jamendo
from freqtag.train.driver import run
from freqtag.train.overrides import ConfigError

GENRES = [f"genre---{g}" for g in ("ambient", "blues", "classical", "electronic", "folk", "jazz", "pop", "rock")]


def raw_tags(path: Path) -> set[str]:
    """The tags of a TSV read as plain text (independent of freqtag's reader)."""
    lines = path.read_text().splitlines()[1:]
    return {t for line in lines for t in line.split("\t")[5:] if t}


def test_split_file_names_follow_mtg(tmp_path):
    assert jamendo.split_file(tmp_path, "train", "genre").name == "autotagging_genre-train.tsv"
    assert jamendo.split_file(tmp_path, "test", "top50tags").name == "autotagging_top50tags-test.tsv"
    assert jamendo.split_file(tmp_path, "validation", "all").name == "autotagging-validation.tsv"
    assert jamendo.split_file(tmp_path, "train").name == "autotagging_moodtheme-train.tsv"
    with pytest.raises(ValueError, match="unknown task 'mood'; valid values: moodtheme, genre"):
        jamendo.split_file(tmp_path, "train", "mood")


@pytest.mark.parametrize(("task", "prefix", "n_tags"), [("genre", "genre---", 87), ("instrument", "instrument---", 40)])
def test_tasks_without_a_list_take_every_tag_of_their_tsvs(shared_data, task, prefix, n_tags):
    """87 genre and 40 instrument tags, as MTG-Jamendo's paper lists; sorted; each TSV row labelled as written."""
    splits = shared_data / "split-0"
    tags, source = jamendo.task_tags(splits, task)
    want = set().union(*(raw_tags(jamendo.split_file(splits, s, task)) for s in jamendo.SPLITS))
    assert tags == sorted(want) and len(tags) == n_tags and all(t.startswith(prefix) for t in tags)
    assert "every tag of the" in source and task in source
    split = jamendo.read_split(jamendo.split_file(splits, "validation", task), tags)
    assert split.labels.shape == (len(split), n_tags) and split.labels.sum(1).min() >= 1
    first = jamendo.split_file(splits, "validation", task).read_text().splitlines()[1].split("\t")
    assert [tags[j] for j in np.flatnonzero(split.labels[0])] == sorted(first[5:])


def test_top50_and_moodtheme_use_mtgs_own_lists(shared_data):
    splits = shared_data / "split-0"
    top, source = jamendo.task_tags(splits, "top50tags")
    assert source.endswith("tags/top50.txt") and len(top) == 50
    assert raw_tags(jamendo.split_file(splits, "train", "top50tags")) <= set(top)
    mood, source = jamendo.task_tags(splits, "moodtheme")
    assert source.endswith("moodtheme_split.txt") and tuple(mood) == jamendo.MOODTHEME_TAGS
    assert jamendo.short_tag("genre---rock") == "rock" and jamendo.short_tag("mood/theme---happy") == "happy"


def test_a_genre_run_takes_its_size_from_the_tag_list(tmp_path):
    """data.task=genre: output layer, loss, metrics, predictions, thresholds and final.ckpt all have 8 tags."""
    tiny = make_tiny(tmp_path / "data", task="genre", tags=GENRES)
    cfg = config(tiny, tmp_path / "run", "data.task=genre", "trainer.max_epochs=1", "callbacks.swa.fraction=1.0")
    with open_dict(cfg):
        cfg.data.tags_file = None
    assert cfg.model.n_tags is None  # the config leaves it to the tag list
    metrics = run(cfg)
    assert set(metrics) == {"validation", "test"}
    final = torch.load(tmp_path / "run/checkpoints/final.ckpt", weights_only=True)
    assert final["tags"] == GENRES and final["model"]["n_tags"] == 8
    assert final["state_dict"]["output.1.weight"].shape[0] == 8
    assert final["data"]["task"] == "genre" and final["data"]["split"] == 0
    assert "every tag of the genre split TSVs" in final["data"]["tags_source"]
    assert final["data"]["dataset"] == "mtg-jamendo" and final["data"]["train_tracks"] == 24
    with np.load(tmp_path / "run/predictions/test.npz") as z:
        assert z["probs"].shape == (8, 8) and list(z["tags"]) == GENRES
    thresholds = (tmp_path / "run/checkpoints/thresholds.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in thresholds] == GENRES


def test_a_wrong_n_tags_is_a_config_error(tmp_path):
    tiny = make_tiny(tmp_path / "data", task="genre", tags=GENRES)
    cfg = config(tiny, tmp_path / "run", "data.task=genre", "model.n_tags=56")
    with open_dict(cfg):
        cfg.data.tags_file = None
    with pytest.raises(ConfigError, match=r"model.n_tags=56 but the tag list .* has 8 tags: leave model.n_tags=null"):
        run(cfg)


def test_bad_task_or_split_names_the_setting(tmp_path):
    tiny = make_tiny(tmp_path / "data")
    from freqtag.data.datamodule import DataError

    for override, match in (("data.task=mood", "data.task='mood': valid values are moodtheme, genre"),
                            ("data.split=7", "data.split=7: MTG-Jamendo's splits are 0, 1, 2, 3 and 4")):
        with pytest.raises(Exception) as e:
            run(config(tiny, tmp_path / "run", override))
        assert match in str(e.value) or match in str(e.value.__cause__), (override, e.value)
        assert isinstance(e.value, DataError) or isinstance(e.value.__cause__, DataError)


def test_prepare_takes_every_track_of_the_chosen_task(tmp_path):
    from freqtag.data.store import FeatureStore
    from freqtag.prepare.command import prepare_npy

    tiny = make_tiny(tmp_path / "data", task="genre", tags=GENRES)
    report = prepare_npy(tiny.npy, tiny.splits, tmp_path / "genre.h5", task="genre", workers=0, progress=False)
    assert not report.skipped
    assert sorted(FeatureStore(tmp_path / "genre.h5").track_ids) == sorted(tiny.order)
    with pytest.raises(FileNotFoundError, match="autotagging_moodtheme-train.tsv"):
        prepare_npy(tiny.npy, tiny.splits, tmp_path / "mood.h5", workers=0, progress=False)


def test_evaluate_reads_a_genre_ground_truth_with_its_own_tags(shared_data):
    from freqtag.scoring.submission import load_ground_truth

    tsv = shared_data / "split-0" / "autotagging_genre-test.tsv"
    gt = load_ground_truth(tsv)
    assert list(gt["tags"]) == jamendo.task_tags(shared_data / "split-0", "genre")[0]
    assert gt["targets"].shape == (len(tsv.read_text().splitlines()) - 1, 87)
    assert jamendo.task_of(tsv) == "genre" and jamendo.task_of("x/autotagging-test.tsv") == "all"
