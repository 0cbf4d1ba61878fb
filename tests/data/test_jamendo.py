"""The MTG-Jamendo metadata reader, on the real split files and on small broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from freqtag.data import jamendo

SPLIT_SIZES = {"train": 9949, "validation": 3802, "test": 4231}


@pytest.fixture(scope="module")
def real(shared_data: Path) -> tuple[list[str], dict[str, jamendo.Split]]:
    tags = jamendo.read_tags(shared_data / "moodtheme_split.txt")
    return tags, jamendo.read_splits(shared_data / "split-0", tags)


def test_split_sizes_and_tags(real, shared_data: Path) -> None:
    tags, splits = real
    assert {name: len(s) for name, s in splits.items()} == SPLIT_SIZES
    assert len(tags) == 56
    assert tuple(tags) == jamendo.MOODTHEME_TAGS
    assert tags == sorted(tags)
    assert jamendo.find_tags_file(shared_data / "split-0") == shared_data / "moodtheme_split.txt"


def test_labels_match_the_raw_text(real, shared_data: Path) -> None:
    """Positive counts recomputed from the file text, independently of the parser."""
    tags, splits = real
    for name, split in splits.items():
        lines = (shared_data / "split-0" / f"autotagging_moodtheme-{name}.tsv").read_text().splitlines()[1:]
        for tag in ("mood/theme---happy", "mood/theme---sad", "mood/theme---christmas", "mood/theme---film"):
            count = sum(1 for line in lines if f"\t{tag}\t" in line + "\t")
            assert split.labels[:, tags.index(tag)].sum() == count, (name, tag)
            assert split.positive_rates()[tags.index(tag)] == pytest.approx(count / len(lines))
        assert split.labels.sum() == sum(len(line.split("\t")) - 5 for line in lines)
        assert split.track_ids[0] == lines[0].split("\t")[0]
        assert split.paths[0] == lines[0].split("\t")[3]


def test_label_matrix_shape_and_row_sums(real) -> None:
    tags, splits = real
    train = splits["train"]
    assert train.labels.shape == (9949, 56) and train.labels.dtype == np.uint8
    for split in splits.values():
        rows = split.labels.sum(axis=1)
        assert rows.min() >= 1 and rows.max() <= 8
    assert splits["train"].labels.sum(axis=1).max() == 8
    assert train.labels.sum(axis=1).mean() == pytest.approx(1.8, abs=0.1)
    assert train.labels.sum(axis=0).min() == 59  # the rarest moodtheme tag: 59 train tracks


def test_no_artist_in_two_splits(real) -> None:
    _, splits = real
    artists = {name: set(s.artist_ids) for name, s in splits.items()}
    assert not artists["train"] & artists["validation"]
    assert not artists["train"] & artists["test"]
    assert not artists["validation"] & artists["test"]


HEADER = "\t".join(jamendo.HEADER)
TAGS = list(jamendo.MOODTHEME_TAGS)
GOOD = "track_0000001\tartist_000001\talbum_000001\t01/1.mp3\t200.0\tmood/theme---happy"


def write_tsv(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "autotagging_moodtheme-train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("lines", "where", "what"),
    [
        ((HEADER, GOOD, "track_0000002\ta\tb\t02/2.mp3\t100.0\tmood/theme---nope"), 3, "unknown tag"),
        ((HEADER, GOOD, GOOD.replace("happy", "sad")), 3, "duplicate track id track_0000001"),
        ((HEADER, GOOD, "track_0000002\ta\tb\t02/2.mp3"), 3, "malformed line"),
        ((HEADER, "track_0000002\ta\tb\t02/2.mp3\tlong\tmood/theme---sad"), 2, "DURATION"),
        (("TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS", GOOD), 1, "header"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, lines, where: int, what: str) -> None:
    path = write_tsv(tmp_path, *lines)
    with pytest.raises(jamendo.JamendoFormatError) as e:
        jamendo.read_split(path, TAGS)
    assert f"{path}:{where}:" in str(e.value)
    assert what in str(e.value)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="split file"):
        jamendo.read_split(tmp_path / "nope.tsv", TAGS)
    with pytest.raises(FileNotFoundError, match="moodtheme_split.txt"):
        jamendo.find_tags_file(tmp_path)


def test_tag_list_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "tags.txt"
    path.write_text("mood/theme---happy\nmood/theme---sad\nmood/theme---happy\n")
    with pytest.raises(jamendo.JamendoFormatError, match=f"{path}:3:"):
        jamendo.read_tags(path)


def test_write_split_round_trip(tmp_path: Path) -> None:
    labels = np.zeros((2, len(TAGS)), dtype=np.uint8)
    labels[0, [1, 5]] = 1
    labels[1, 55] = 1
    path = tmp_path / "autotagging_moodtheme-test.tsv"
    jamendo.write_split(path, ["track_1", "track_2"], ["01/1.mp3", "02/2.mp3"], [10.0, 20.5], labels, TAGS)
    split = jamendo.read_split(path, TAGS)
    assert split.name == "test" and split.track_ids == ("track_1", "track_2")
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.durations, [10.0, 20.5])
