"""MTG's checksum lists, shard selection and mirrors: everything a download is told before it starts.

The lists come from the user's clone of MTG's repository
(``data/download/{dataset}_{type}_sha256_{tars,tracks}.txt``, one ``SHA256 NAME``
per line), so freqtag never carries a copy that could drift from MTG's.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

__all__ = ["DATASETS", "TYPES", "MIRRORS", "DEFAULT_MIRROR", "MTG_REPO_URL", "UsageError", "list_path",
           "read_checksums", "load_lists", "shard_number", "parse_shards", "select_shards", "mirror_base",
           "shard_url"]  # fmt: skip

DATASETS = ("autotagging_moodtheme", "raw_30s")
TYPES = ("melspecs", "audio-low", "audio")
# MTG's two public mirrors, by the names MTG's scripts/download/download.py gives them (--from)
MIRRORS = {
    "mtg-fast": "https://cdn.freesound.org/mtg-jamendo",
    "mtg": "https://essentia.upf.edu/documentation/datasets/mtg-jamendo",
}
DEFAULT_MIRROR = "mtg-fast"
MTG_REPO_URL = "https://github.com/MTG/mtg-jamendo-dataset"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"-(\d+)\.tar$")


class UsageError(ValueError):
    """An argument that cannot work (exit status 2): the message names it and the fix."""


def list_path(mtg_repo: Path, dataset: str, data_type: str, kind: str) -> Path:
    """Where MTG's repository keeps the ``kind`` ("tars" or "tracks") checksum list."""
    return Path(mtg_repo) / "data" / "download" / f"{dataset}_{data_type}_sha256_{kind}.txt"


def read_checksums(path: Path) -> dict[str, str]:
    """``{name: sha256}`` from a ``SHA256 NAME`` list; a malformed line is an error naming it."""
    sums: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not _SHA256.fullmatch(fields[0].lower()):
            raise ValueError(f"{path}:{number}: expected 'SHA256 NAME', got {line[:80]!r}: "
                             f"restore the file from {MTG_REPO_URL} (git checkout -- {Path(path).name})")  # fmt: skip
        sums[fields[1]] = fields[0].lower()
    if not sums:
        raise ValueError(f"{path} is empty: restore it from {MTG_REPO_URL}")
    return sums


def load_lists(mtg_repo: Path, dataset: str, data_type: str, tracks: bool) -> tuple[dict[str, str], dict[str, str]]:
    """The tar list and (when ``tracks``) the per-track list; a missing file is a usage error with the fix."""
    wanted = ("tars", "tracks") if tracks else ("tars",)
    lists: list[dict[str, str]] = []
    for kind in wanted:
        path = list_path(mtg_repo, dataset, data_type, kind)
        if not path.is_file():
            need = " (--unpack checks every track against it)" if kind == "tracks" else ""
            raise UsageError(f"--mtg-repo {mtg_repo}: {path.relative_to(mtg_repo)} not found{need}: give the folder "
                             f"of a clone of MTG's repository (git clone {MTG_REPO_URL})")  # fmt: skip
        lists.append(read_checksums(path))
    return lists[0], lists[1] if tracks else {}


def shard_number(name: str) -> int:
    """``autotagging_moodtheme_melspecs-07.tar`` -> 7."""
    match = _SHARD.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not named DATASET_TYPE-NN.tar as MTG's shards are")
    return int(match.group(1))


def parse_shards(spec: str) -> set[int]:
    """``"0-3,7"`` -> {0, 1, 2, 3, 7}."""
    numbers: set[int] = set()
    try:
        for part in spec.split(","):
            first, dash, last = part.strip().partition("-")
            lo, hi = int(first), int(last) if dash else int(first)
            if lo < 0 or hi < lo:
                raise ValueError
            numbers.update(range(lo, hi + 1))
    except ValueError:
        raise UsageError(f"--shards {spec!r}: expected shard numbers and ranges, e.g. 0-3,7") from None
    return numbers


def select_shards(tars: dict[str, str], spec: str | None) -> list[str]:
    """The tar names asked for, in shard order."""
    by_number = {shard_number(name): name for name in tars}
    if spec is None:
        return [by_number[n] for n in sorted(by_number)]
    wanted = parse_shards(spec)
    unknown = sorted(wanted - by_number.keys())
    if unknown:
        raise UsageError(f"--shards {spec}: no shard {', '.join(map(str, unknown[:5]))} in the list; "
                         f"it has shards {min(by_number)}-{max(by_number)}")  # fmt: skip
    return [by_number[n] for n in sorted(wanted)]


def mirror_base(mirror: str) -> str:
    """A mirror name (``mtg-fast``, ``mtg``) or any ``http(s)://`` base URL -> the base URL."""
    if mirror in MIRRORS:
        return MIRRORS[mirror]
    if re.match(r"https?://[^/]", mirror):
        return mirror.rstrip("/")
    raise UsageError(f"--mirror {mirror!r}: use {' or '.join(MIRRORS)}, or a base URL http(s)://HOST/PATH "
                     "under which the files sit as BASE/DATASET/TYPE/FILE")  # fmt: skip


def shard_url(base: str, dataset: str, data_type: str, name: str) -> str:
    return f"{base}/{dataset}/{data_type}/{quote(name)}"
