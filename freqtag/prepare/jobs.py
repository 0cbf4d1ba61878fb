"""What ``freqtag prepare`` loads: the job lists (one :class:`Job` per track, in store order) and the loaders.

A job list is the canonical store order (train, validation, test, each in
file order); a loader turns one job into (frames, bands) features, or raises
:class:`SkipTrack` for a bad file. Both run in pool workers, so they are
module-level functions (picklable by reference).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from freqtag.data import jamendo
from freqtag.features import FeatureSpec
from freqtag.prepare.pool import Job, SkipTrack
from freqtag.prepare.report import report_path

__all__ = ["read_split_dir", "npy_jobs", "audio_jobs", "load_npy", "load_audio", "load_audio_features",
           "preflight_npy", "preflight_audio"]


def read_split_dir(splits_dir: str | Path, tags_file: str | Path | None = None, task: str = "moodtheme"
                   ) -> dict[str, jamendo.Split]:  # fmt: skip
    """The three splits of a task in a folder, refusing a track that appears in two of them.

    prepare needs the tracks, not the labels: the tag list (given, MTG's file for
    the task, or the TSVs' own tags) only validates the TSVs.
    """
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise FileNotFoundError(
            f"splits folder {splits_dir} does not exist: point --splits at the folder holding "
            f"{jamendo.split_file('.', 'train', task).name} and its validation/test siblings (MTG's data/splits/split-0)"
        )
    splits = jamendo.read_splits(splits_dir, jamendo.task_tags(splits_dir, task, tags_file)[0], task)
    seen: dict[str, str] = {}
    for name, split in splits.items():
        for track_id in split.track_ids:
            if track_id in seen:
                raise jamendo.JamendoFormatError(
                    f"{split.path}: track {track_id} is also in the {seen[track_id]} split; "
                    f"a track belongs to one split only"
                )
            seen[track_id] = name
    return splits


def npy_jobs(npy_dir: str | Path, splits: dict[str, jamendo.Split]) -> list[Job]:
    """One job per track, in store order; PATH ``48/948.mp3`` is read from ``npy_dir/48/948.npy``."""
    npy_dir = Path(npy_dir)
    return [
        Job(track_id, str(npy_dir / Path(path).with_suffix(".npy")))
        for name in jamendo.SPLITS
        for track_id, path in zip(splits[name].track_ids, splits[name].paths)
    ]


# ------------------------------------------------------------------------ loaders


def load_npy(job: Job, n_mels: int) -> np.ndarray:
    """An MTG ``.npy`` (bands, frames) as (frames, bands); a bad file raises :class:`SkipTrack`."""
    path = Path(job.source)
    if not path.is_file():
        raise SkipTrack("missing file")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, not an .npy, pickled objects...: all mean "unreadable"
        raise SkipTrack(f"unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(x, np.ndarray):
        raise SkipTrack("unreadable: not a single .npy array")
    if x.dtype.kind != "f":
        raise SkipTrack(f"dtype {x.dtype}, expected floating point")
    if x.ndim != 2 or x.shape[0] != n_mels:
        raise SkipTrack(f"wrong shape {x.shape}, expected ({n_mels}, frames)")
    return x.T


def preflight_npy(jobs: Sequence[Job], n_mels: int, npy_dir: Path, features: str, look: int = 50) -> None:
    """Fail fast on a wrong folder or wrong features instead of skipping every track.

    Looks only at the first few files: if none exists the folder is wrong; if
    every readable one has another band count, the feature kind is wrong.
    """
    sample = jobs[:look]
    present = [j for j in sample if os.path.isfile(j.source)]
    if sample and not present:
        raise FileNotFoundError(
            f"none of the first {len(sample)} tracks is in {npy_dir} (e.g. {sample[0].source}): "
            f"--npy-dir must be the folder holding MTG's 00/ .. 99/ subfolders of ID.npy files"
        )
    bands = []
    for job in present[:5]:
        try:
            shape = np.load(job.source, mmap_mode="r", allow_pickle=False).shape
        except Exception:
            continue  # a bad file is reported by the run itself
        bands.append(shape[0] if len(shape) == 2 else None)
    if bands and all(b != n_mels for b in bands) and len(set(bands)) == 1 and bands[0] is not None:
        raise ValueError(
            f"{present[0].source} has {bands[0]} bands but --features {features} has {n_mels}: "
            f"MTG's distributed .npy files are mel96; choose the features that match the files"
        )


def store_files(out: Path) -> tuple[set[Path], set[Path]]:
    """What a run writes beside ``out`` (files, folders), never to be taken for audio."""
    out = out.resolve()
    report = report_path(out)
    files = {out, out.with_name(out.name + ".tmp"), report, report.with_name(report.name + ".tmp")}
    return files, {out.with_name(out.name + ".partial")}


def audio_jobs(
    audio_dir: str | Path, splits: dict[str, jamendo.Split] | None = None, out: str | Path | None = None
) -> list[Job]:
    """One job per track, in store order.

    With ``splits``: the tracks of the three splits (train, validation, test),
    their PATH read relative to ``audio_dir`` (MTG's low-quality ``ID.low.mp3``
    is taken when ``ID.mp3`` is absent). Without: every file under
    ``audio_dir``, sorted, its id being its relative path (``a/b.mp3``); files
    that are not audio are jobs too, so the run reports them. The store's own
    files (``out``, its ``.partial/``, report, ``.tmp``) are left out.
    """
    audio_dir = Path(audio_dir)
    if splits is not None:
        jobs = []
        for name in jamendo.SPLITS:
            for track_id, path in zip(splits[name].track_ids, splits[name].paths):
                source = audio_dir / path
                if not source.exists() and source.suffix == ".mp3":
                    low = source.with_suffix(".low.mp3")
                    source = low if low.exists() else source
                jobs.append(Job(track_id, str(source)))
        return jobs
    skip_files, skip_dirs = store_files(Path(out)) if out is not None else (set(), set())
    found = []
    for root, dirs, files in os.walk(audio_dir):
        here = Path(root)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skip_dirs]
        for name in files:
            path = here / name
            if path.resolve() not in skip_files:
                found.append(path)
    ids = {p: p.relative_to(audio_dir).as_posix() for p in found}
    return [Job(ids[p], str(p)) for p in sorted(found, key=ids.__getitem__)]


def load_audio(job: Job, spec: FeatureSpec, min_frames: int) -> np.ndarray:
    """A job's mono waveform at the recipe's rate, trimmed (see :func:`freqtag.audio.whole.waveform`)."""
    from freqtag.audio import whole as audio

    try:
        return audio.waveform(job.source, spec, min_frames)
    except audio.AudioError as e:
        raise SkipTrack(e.reason) from None


def load_audio_features(job: Job, spec: FeatureSpec, min_frames: int) -> np.ndarray:
    """A job's features, decoded and transformed here (a CPU worker; see :func:`prepare_audio`)."""
    from freqtag.audio import whole as audio

    try:
        return audio.features_from_file(job.source, spec, min_frames=min_frames)
    except audio.AudioError as e:
        raise SkipTrack(e.reason) from None


def preflight_audio(jobs: Sequence[Job], audio_dir: Path, look: int = 50) -> None:
    """Fail fast when the split TSVs' PATHs are not under --audio-dir at all."""
    sample = jobs[:look]
    if sample and not any(os.path.isfile(j.source) for j in sample):
        raise FileNotFoundError(
            f"none of the first {len(sample)} tracks is in {audio_dir} (e.g. {sample[0].source}): --audio-dir must be "
            f"the folder that the PATH column of the split TSVs is relative to (MTG's audio folder, holding 00/ .. 99/)"
        )
