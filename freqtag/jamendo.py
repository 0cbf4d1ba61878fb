"""MTG-Jamendo metadata: split TSVs and the tag list, turned into label matrices.

Labels never live in a feature store; they always come from these files, so
one store serves every split and tag set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
]

SPLITS = ("train", "validation", "test")
HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")
SPLIT_PATTERN = "autotagging_moodtheme-{split}.tsv"
TAG_PREFIX = "mood/theme---"
TAGS_FILE = "moodtheme_split.txt"
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
    _row: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._row.update({t: i for i, t in enumerate(self.track_ids)})

    def __len__(self) -> int:
        return len(self.track_ids)

    def row(self, track_id: str) -> int:
        return self._row[track_id]

    def positive_rates(self) -> np.ndarray:
        """Fraction of tracks carrying each tag (the p_i of the weighted loss)."""
        if len(self) == 0:
            raise JamendoFormatError(f"{self.path}: the split is empty; positive rates are undefined")
        return self.labels.mean(axis=0, dtype=np.float64)


def short_tag(tag: str) -> str:
    """'mood/theme---happy' -> 'happy' (for display only)."""
    return tag[len(TAG_PREFIX) :] if tag.startswith(TAG_PREFIX) else tag


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


def find_tags_file(splits_dir: str | Path) -> Path:
    """The tag list beside a splits folder: in it, or one or two levels up (MTG's layouts)."""
    here = Path(splits_dir)
    for folder in (here, here.parent, here.parent.parent, here.parent / "tags", here.parent.parent / "tags"):
        if (folder / TAGS_FILE).is_file():
            return folder / TAGS_FILE
    raise FileNotFoundError(
        f"no {TAGS_FILE} in {here} or the folders above it: pass the tag list explicitly "
        f"(MTG-Jamendo's data/tags/{TAGS_FILE})"
    )


def split_file(splits_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid values: {', '.join(SPLITS)}")
    return Path(splits_dir) / SPLIT_PATTERN.format(split=split)


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


def read_splits(splits_dir: str | Path, tags: list[str] | tuple[str, ...]) -> dict[str, Split]:
    """The three splits of a directory, keyed train/validation/test."""
    return {s: read_split(split_file(splits_dir, s), tags, name=s) for s in SPLITS}


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
