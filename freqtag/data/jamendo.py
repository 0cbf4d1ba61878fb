"""MTG-Jamendo metadata: split TSVs and the tag list, turned into label matrices.

Labels never live in a feature store; they always come from these files, so
one store serves every split and tag set.

MTG-Jamendo has five autotagging tasks, each with five splits (``split-0`` ..
``split-4``): ``autotagging_{task}-{train,validation,test}.tsv`` for
``moodtheme``, ``genre``, ``instrument`` and ``top50tags``, and
``autotagging-{split}.tsv`` for ``all`` (every tag). A task's tag list is MTG's
own file where one exists (``moodtheme_split.txt``, ``top50.txt``), otherwise
every tag of the task's three TSVs, sorted (:func:`task_tags` says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "SPLITS",
    "HEADER",
    "JamendoFormatError",
    "Split",
    "read_tags",
    "read_split",
    "read_splits",
    "split_file",
    "write_split",
    "short_tag",
    "find_tags_file",
    "MOODTHEME_TAGS",
    "TAGS_FILE",
    "TASKS",
    "TAG_LISTS",
    "check_task",
    "tags_in_splits",
    "task_tags",
    "task_of",
]

SPLITS = ("train", "validation", "test")
HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")
TASKS = ("moodtheme", "genre", "instrument", "top50tags", "all")
TAG_PREFIX = "mood/theme---"
TAGS_FILE = "moodtheme_split.txt"
# MTG's own tag-list files (data/tags/ in its repository); the other tasks take their TSVs' tags
TAG_LISTS = {"moodtheme": TAGS_FILE, "top50tags": "top50.txt"}
# The 56 mood/theme tags of MTG-Jamendo, alphabetical (the column order of
# every matrix). Kept here so that the synthetic demo runs without the
# dataset; a test checks it against the real moodtheme_split.txt.
MOODTHEME_TAGS: tuple[str, ...] = tuple(
    TAG_PREFIX + t
    for t in (
    'action', 'adventure', 'advertising', 'background', 'ballad', 'calm', 'children',
    'christmas', 'commercial', 'cool', 'corporate', 'dark', 'deep', 'documentary',
    'drama', 'dramatic', 'dream', 'emotional', 'energetic', 'epic', 'fast',
    'film', 'fun', 'funny', 'game', 'groovy', 'happy', 'heavy',
    'holiday', 'hopeful', 'inspiring', 'love', 'meditative', 'melancholic', 'melodic',
    'motivational', 'movie', 'nature', 'party', 'positive', 'powerful', 'relaxing',
    'retro', 'romantic', 'sad', 'sexy', 'slow', 'soft', 'soundscape',
    'space', 'sport', 'summer', 'trailer', 'travel', 'upbeat', 'uplifting',
    )
)


class JamendoFormatError(ValueError):
    """A metadata file that does not follow the MTG-Jamendo format (names file and line)."""


@dataclass(frozen=True)
class Split:
    """One split: tracks in file order and their multi-hot labels in tag-list order."""

    name: str
    path: Path
    tags: tuple[str, ...]
    track_ids: tuple[str, ...]
    artist_ids: tuple[str, ...]
    paths: tuple[str, ...]
    durations: np.ndarray  # float64 (N,), seconds
    labels: np.ndarray  # uint8 (N, n_tags)

    def __len__(self) -> int:
        return len(self.track_ids)

    def positive_rates(self) -> np.ndarray:
        """Fraction of tracks carrying each tag (the p_i of the weighted loss)."""
        if len(self) == 0:
            raise JamendoFormatError(f"{self.path}: the split is empty; positive rates are undefined")
        return self.labels.mean(axis=0, dtype=np.float64)


def short_tag(tag: str) -> str:
    """'mood/theme---happy' -> 'happy', 'genre---rock' -> 'rock' (for display only)."""
    return tag.split("---", 1)[1] if "---" in tag else tag


def read_tags(path: str | Path) -> list[str]:
    """The tag vocabulary, one tag a line; its order is every matrix's column order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tag list {path} does not exist (MTG-Jamendo's moodtheme_split.txt)")
    tags: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        tag = line.strip()
        if not tag:
            continue
        if tag in seen:
            raise JamendoFormatError(f"{path}:{lineno}: tag '{tag}' is listed twice")
        seen.add(tag)
        tags.append(tag)
    if not tags:
        raise JamendoFormatError(f"{path}: the tag list is empty")
    return tags


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; valid values: {', '.join(TASKS)}")
    return task


def find_tags_file(splits_dir: str | Path, task: str = "moodtheme") -> Path:
    """MTG's tag list of ``task`` beside a splits folder: in it, one or two levels up, or in a ``tags/`` there."""
    name = TAG_LISTS.get(check_task(task))
    here = Path(splits_dir)
    if name is not None:
        for folder in (here, here.parent, here.parent.parent, here.parent / "tags", here.parent.parent / "tags"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"no {name} in {here} or the folders above it: pass the tag list explicitly (MTG-Jamendo's data/tags/{name})"
        if name else f"MTG-Jamendo has no tag-list file for the {task} task (its tags are those of its TSVs)"
    )


def split_file(splits_dir: str | Path, split: str, task: str = "moodtheme") -> Path:
    """``autotagging_{task}-{split}.tsv`` (``autotagging-{split}.tsv`` for the ``all`` task) in ``splits_dir``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid values: {', '.join(SPLITS)}")
    stem = "autotagging" if check_task(task) == "all" else f"autotagging_{task}"
    return Path(splits_dir) / f"{stem}-{split}.tsv"


def task_of(path: str | Path) -> str:
    """The task of a split TSV from its MTG name (``autotagging_genre-test.tsv`` -> genre); moodtheme otherwise."""
    stem = Path(path).name.rsplit("-", 1)[0]
    if stem == "autotagging":
        return "all"
    task = stem.removeprefix("autotagging_")
    return task if task in TASKS else "moodtheme"


def tags_in_splits(splits_dir: str | Path, task: str) -> list[str]:
    """Every tag named in the task's three split TSVs, sorted (the tag list of tasks MTG gives none for)."""
    tags: set[str] = set()
    for split in SPLITS:
        path = split_file(splits_dir, split, task)
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} does not exist (the {task} task, {split} split)")
        with path.open(newline="") as f:
            next(f, None)  # the header; read_split checks it
            for line in f:
                tags.update(t for t in line.rstrip("\r\n").split("\t")[5:] if t)
    if not tags:
        raise JamendoFormatError(f"{split_file(splits_dir, 'train', task)}: the {task} TSVs name no tag")
    return sorted(tags)


def task_tags(splits_dir: str | Path, task: str = "moodtheme", tags_file: str | Path | None = None
              ) -> tuple[list[str], str]:  # fmt: skip
    """The tag list of a task and where it came from: ``tags_file``, MTG's file for the task, or the TSVs' tags."""
    if tags_file is not None:
        return read_tags(tags_file), str(tags_file)
    try:
        found = find_tags_file(splits_dir, task)
    except FileNotFoundError:
        return tags_in_splits(splits_dir, task), f"every tag of the {task} split TSVs in {splits_dir}, sorted"
    return read_tags(found), str(found)


# over 60 lines: one reader of the split TSV format, each column's check beside it
def read_split(path: str | Path, tags: list[str] | tuple[str, ...], name: str | None = None) -> Split:
    """Parse one split TSV; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    column = {t: i for i, t in enumerate(tags)}
    ids: list[str] = []
    artists: list[str] = []
    paths: list[str] = []
    durations: list[float] = []
    rows: list[list[int]] = []
    first_line: dict[str, int] = {}
    with path.open(newline="") as f:
        lines = f.read().splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise JamendoFormatError(f"{path}:1: expected the header {chr(9).join(HEADER)!r}")
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 6:
            raise JamendoFormatError(
                f"{path}:{lineno}: malformed line, {len(cols)} tab-separated columns, expected "
                f"TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION and at least one tag"
            )
        track_id, artist, _album, track_path, duration = cols[:5]
        if not track_id:
            raise JamendoFormatError(f"{path}:{lineno}: empty TRACK_ID")
        if track_id in first_line:
            raise JamendoFormatError(
                f"{path}:{lineno}: duplicate track id {track_id} (first on line {first_line[track_id]})"
            )
        first_line[track_id] = lineno
        try:
            seconds = float(duration)
        except ValueError:
            raise JamendoFormatError(f"{path}:{lineno}: DURATION {duration!r} is not a number") from None
        hot: list[int] = []
        for tag in cols[5:]:
            if tag not in column:
                raise JamendoFormatError(
                    f"{path}:{lineno}: unknown tag {tag!r} (not in the tag list of {len(tags)} tags)"
                )
            hot.append(column[tag])
        ids.append(track_id)
        artists.append(artist)
        paths.append(track_path)
        durations.append(seconds)
        rows.append(hot)
    labels = np.zeros((len(ids), len(tags)), dtype=np.uint8)
    for i, hot in enumerate(rows):
        labels[i, hot] = 1
    return Split(
        name=name or path.stem.rsplit("-", 1)[-1],
        path=path,
        tags=tuple(tags),
        track_ids=tuple(ids),
        artist_ids=tuple(artists),
        paths=tuple(paths),
        durations=np.asarray(durations, dtype=np.float64),
        labels=labels,
    )


def read_splits(splits_dir: str | Path, tags: list[str] | tuple[str, ...], task: str = "moodtheme") -> dict[str, Split]:
    """The three splits of a task in a directory, keyed train/validation/test."""
    return {s: read_split(split_file(splits_dir, s, task), tags, name=s) for s in SPLITS}


def write_split(
    path: str | Path,
    track_ids: list[str],
    paths: list[str],
    durations: list[float] | np.ndarray,
    labels: np.ndarray,
    tags: list[str] | tuple[str, ...],
    artist_ids: list[str] | None = None,
    album_ids: list[str] | None = None,
) -> None:
    """Write a split TSV in MTG's format (one extra column per tag)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(HEADER)]
    for i, track_id in enumerate(track_ids):
        hot = [tags[j] for j in np.flatnonzero(labels[i])]
        if not hot:
            raise ValueError(f"track {track_id} has no tag; every MTG track has at least one")
        artist = artist_ids[i] if artist_ids else f"artist_{i:06d}"
        album = album_ids[i] if album_ids else f"album_{i:06d}"
        lines.append("\t".join([track_id, artist, album, paths[i], f"{float(durations[i]):.1f}", *hot]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
