"""`freqtag prepare`: turn per-track spectrogram files into one feature store.

Three separate pieces, so that a new source (audio decoded in workers) only
adds a job list and a loader:

1. list the jobs: one :class:`Job` per track, in the canonical store order
   (train, validation, test, each in file order) -- :func:`npy_jobs`;
2. run a loader over the jobs in worker processes, turning every failure into
   a per-track skip reason instead of an aborted run -- :func:`run_jobs`;
3. write the results into a resumable :class:`~freqtag.store.StoreWriter`
   and list every skipped track in ``STORE.report.tsv`` -- :func:`build_store`.

:func:`prepare_npy` wires them up for MTG-Jamendo's distributed ``.npy`` mels.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import jamendo
from .features import FeatureSpec
from .store import DTYPE, FeatureStore, StoreError, StoreWriter

__all__ = [
    "Job",
    "Result",
    "SkipTrack",
    "PrepareError",
    "PrepareReport",
    "read_split_dir",
    "npy_jobs",
    "load_npy",
    "run_jobs",
    "build_store",
    "prepare_npy",
    "report_path",
    "read_report",
]

REPORT_HEADER = ("track_id", "path", "reason")
# Tracks handed to a worker at a time, and chunks in flight per worker: enough
# to keep workers busy, few enough that finished arrays never pile up in RAM
# when writing is slower than loading (a full mel96 track is ~4 MB).
CHUNK_SIZE = 4
CHUNKS_IN_FLIGHT_PER_WORKER = 2


class PrepareError(RuntimeError):
    """A run that cannot go on (names the cause and the fix)."""


class SkipTrack(Exception):
    """Raised by a loader for one bad input file; the message is the report's reason."""


@dataclass(frozen=True)
class Job:
    """One track to load: its id and the file the loader reads."""

    track_id: str
    source: str


@dataclass(frozen=True)
class Result:
    """What a worker hands back: float16 (frames, bands) features, or why there are none."""

    track_id: str
    source: str
    features: np.ndarray | None
    reason: str | None = None


@dataclass
class PrepareReport:
    """The outcome of one run. ``total == written + len(skipped)``.

    ``written`` counts the tracks the final store holds (including those kept
    from an interrupted run, also counted in ``resumed``). With
    ``already_complete`` the store existed before the run and was left as it
    was; ``skipped`` then lists the requested tracks it lacks.
    """

    out: Path
    total: int
    written: int
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0
    already_complete: bool = False

    @property
    def report(self) -> Path:
        return report_path(self.out)


def report_path(out: str | Path) -> Path:
    """``STORE.report.tsv``, beside the store (and beside ``STORE.partial/``)."""
    out = Path(out)
    return out.with_name(out.name + ".report.tsv")


# --------------------------------------------------------------------------- jobs


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _tag_list(splits_dir: Path, tags_file: str | Path | None) -> list[str] | tuple[str, ...]:
    """The tag list: given, beside the splits, or else the built-in mood/theme list.

    prepare needs the tracks, not the labels; the tags only validate the TSVs,
    so a missing tag file is no reason to stop.
    """
    if tags_file is not None:
        return jamendo.read_tags(tags_file)
    try:
        return jamendo.read_tags(jamendo.find_tags_file(splits_dir))
    except FileNotFoundError:
        return jamendo.MOODTHEME_TAGS


def read_split_dir(splits_dir: str | Path, tags_file: str | Path | None = None) -> dict[str, jamendo.Split]:
    """The three splits of a folder, refusing a track that appears in two of them."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise FileNotFoundError(
            f"splits folder {splits_dir} does not exist: point --splits at the folder holding "
            f"{jamendo.split_file('.', 'train').name} and its validation/test siblings (MTG's data/splits/split-0)"
        )
    splits = jamendo.read_splits(splits_dir, _tag_list(splits_dir, tags_file))
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


def _checked(x: np.ndarray, n_mels: int) -> np.ndarray:
    """The checks every source shares; returns the store's float16 (frames, bands)."""
    if x.ndim != 2 or x.shape[1] != n_mels:
        raise SkipTrack(f"wrong shape {x.shape}, expected (frames, {n_mels})")
    if x.shape[0] == 0:
        raise SkipTrack("no frames")
    finite = np.isfinite(x)
    if not finite.all():
        raise SkipTrack(f"non-finite values: {int(np.isnan(x).sum())} NaN, {int(np.isinf(x).sum())} inf")
    x16 = np.ascontiguousarray(x, dtype=DTYPE)
    if not np.isfinite(x16).all():
        raise SkipTrack(f"values beyond the float16 range (max |x| = {float(np.abs(x).max()):.4g})")
    return x16


def _process(load: Callable[[Job], np.ndarray], n_mels: int, jobs: Sequence[Job]) -> list[Result]:
    """Run a loader on a chunk of jobs (in a worker); one bad file never stops the run."""
    results = []
    for job in jobs:
        try:
            results.append(Result(job.track_id, job.source, _checked(load(job), n_mels)))
        except SkipTrack as e:
            results.append(Result(job.track_id, job.source, None, _one_line(str(e))))
        except Exception as e:  # a decoder's failure on one file is that file's problem
            results.append(Result(job.track_id, job.source, None, _one_line(f"{type(e).__name__}: {e}")))
    return results


def run_jobs(
    load: Callable[[Job], np.ndarray],
    jobs: Sequence[Job],
    n_mels: int,
    workers: int = 1,
    chunk_size: int = CHUNK_SIZE,
    initializer: Callable[[], None] | None = None,
) -> Iterator[Result]:
    """Results in job order; ``load`` runs in ``workers`` spawned processes (1: in this one).

    ``load`` must be picklable (a module-level function or a ``functools.partial``
    of one). Spawned, not forked: the parent may hold threads (the progress
    bar, torch), and fork copies their locks. At most a few chunks per worker
    are in flight, so memory stays bounded however slow the consumer is.
    """
    chunks = [list(jobs[i : i + chunk_size]) for i in range(0, len(jobs), chunk_size)]
    if workers <= 1:
        if initializer is not None:
            initializer()
        for chunk in chunks:
            yield from _process(load, n_mels, chunk)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer)
    try:
        todo = iter(chunks)
        pending = deque(
            pool.submit(_process, load, n_mels, c) for c in itertools.islice(todo, workers * CHUNKS_IN_FLIGHT_PER_WORKER)
        )
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                raise PrepareError(
                    "a worker process died (out of memory, or a crash in a decoder); "
                    "re-run the same command to resume, perhaps with fewer --workers"
                ) from None
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_process, load, n_mels, nxt))
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------ writing


def _write_report(path: Path, skipped: Sequence[tuple[str, str, str]]) -> None:
    lines = ["\t".join(REPORT_HEADER)] + ["\t".join(_one_line(c) for c in row) for row in skipped]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def read_report(path: str | Path) -> list[tuple[str, str, str]]:
    """The rows of a ``STORE.report.tsv`` (empty if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return [(r[0], r[1], r[2]) for r in rows if len(r) == 3]


@contextmanager
def _progress_bar(enabled: bool, total: int, done: int) -> Iterator[Callable[[], None]]:
    """A rich bar on stderr (tracks, rate, ETA); yields the function that advances it."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:  # type: ignore[no-untyped-def]
            return Text(f"{task.speed:.1f} tracks/s" if task.speed else "- tracks/s")

    columns = (
        TextColumn("prepare"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("tracks", total=total, completed=done)
        yield functools.partial(bar.advance, task)


@contextmanager
def _status(enabled: bool, message: str) -> Iterator[None]:
    """A spinner while the store is assembled (minutes for the full dataset, with no bar to move)."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _existing_store(out: Path, spec: FeatureSpec, jobs: Sequence[Job], started: float) -> PrepareReport:
    """A finished store is never rewritten; say what it lacks of the requested tracks."""
    try:
        store = FeatureStore(out)
    except StoreError as e:
        raise StoreError(f"{e} (delete {out} or choose another --out)") from None
    if store.spec != spec:
        raise StoreError(
            f"{out} is a finished store of features '{store.spec.name}', not '{spec.name}': "
            f"choose another --out, or delete {out} to rebuild it"
        )
    report = report_path(out)
    reasons = {t: (p, r) for t, p, r in read_report(report)}
    absent = [j for j in jobs if j.track_id not in store]
    skipped = [
        (j.track_id, *reasons.get(j.track_id, (j.source, "absent from the existing store (made by an earlier run)")))
        for j in absent
    ]
    if any(j.track_id not in reasons for j in absent):
        _write_report(report, skipped)  # the store stays untouched; only the list of what it lacks
    return PrepareReport(
        out=out,
        total=len(jobs),
        written=len(jobs) - len(absent),
        skipped=skipped,
        seconds=time.monotonic() - started,
        already_complete=True,
    )


def build_store(
    jobs: Sequence[Job],
    load: Callable[[Job], np.ndarray],
    out: str | Path,
    spec: FeatureSpec,
    stats_ids: Sequence[str],
    stats_split: str = "train",
    workers: int = 1,
    batch_size: int = 64,
    progress: bool = True,
) -> PrepareReport:
    """Load every job not yet kept in ``STORE.partial/``, keep the good ones, assemble the store.

    ``batch_size`` tracks make one resumable part: a killed run loses at most
    that many tracks of work. The report is written before the store is
    assembled, so a finished store always has the report of the run that made it.
    """
    started = time.monotonic()
    out = Path(out)
    if out.is_dir():
        raise StoreError(f"--out {out} is a folder; give the store's file name, e.g. {out / (spec.name + '.h5')}")
    if out.exists():
        return _existing_store(out, spec, jobs, started)
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: must be at least 1")
    if not jobs:
        raise PrepareError("no tracks to prepare: the split files list none")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter(out, spec, [j.track_id for j in jobs])
    todo = set(writer.todo())
    pending_jobs = [j for j in jobs if j.track_id in todo]
    resumed = len(jobs) - len(pending_jobs)
    skipped: list[tuple[str, str, str]] = []
    batch: list[tuple[str, np.ndarray]] = []
    with _progress_bar(progress, total=len(jobs), done=resumed) as advance:
        for r in run_jobs(load, pending_jobs, spec.n_mels, workers=workers):
            if r.features is None:
                skipped.append((r.track_id, r.source, r.reason or "unknown"))
            else:
                batch.append((r.track_id, r.features))
                if len(batch) >= batch_size:
                    writer.add(batch)
                    batch = []
            advance()
        writer.add(batch)
    report = report_path(out)
    _write_report(report, skipped)
    if not writer.done & {j.track_id for j in jobs}:
        raise PrepareError(f"none of the {len(jobs)} tracks could be read; {report} lists why")
    with _status(progress, f"assembling {out} from {len(jobs) - len(skipped)} tracks"):
        writer.finish(stats_ids, stats_split)
    return PrepareReport(
        out=out,
        total=len(jobs),
        written=len(jobs) - len(skipped),
        skipped=skipped,
        seconds=time.monotonic() - started,
        resumed=resumed,
    )


# --------------------------------------------------------------------- npy source


def _preflight_npy(jobs: Sequence[Job], n_mels: int, npy_dir: Path, features: str, look: int = 50) -> None:
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


def prepare_npy(
    npy_dir: str | Path,
    splits_dir: str | Path,
    out: str | Path,
    features: str = "mel96",
    workers: int = 1,
    tags_file: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 64,
) -> PrepareReport:
    """Import MTG-Jamendo's distributed ``XX/ID.npy`` spectrograms into the store ``out``.

    Every track of the three split TSVs of ``splits_dir`` is imported; bad
    files are skipped and listed in ``STORE.report.tsv``. Mean/std come from
    the train split. Re-running resumes an interrupted run; a finished store
    is left untouched.
    """
    spec = FeatureSpec.load(features)
    npy_dir = Path(npy_dir)
    splits = read_split_dir(splits_dir, tags_file)
    jobs = npy_jobs(npy_dir, splits)
    out = Path(out)
    if not out.exists():
        if not npy_dir.is_dir():
            raise FileNotFoundError(
                f"npy folder {npy_dir} does not exist: --npy-dir must be the folder holding MTG's "
                f"00/ .. 99/ subfolders of ID.npy files"
            )
        _preflight_npy(jobs, spec.n_mels, npy_dir, features)
    return build_store(
        jobs,
        functools.partial(load_npy, n_mels=spec.n_mels),
        out,
        spec,
        stats_ids=splits["train"].track_ids,
        stats_split="train",
        workers=workers,
        batch_size=batch_size,
        progress=progress,
    )
