"""`freqtag prepare`: turn per-track spectrogram files, or audio files, into one feature store.

Three separate pieces, so that a source only adds a job list and a loader:

1. list the jobs: one :class:`Job` per track, in the canonical store order
   (train, validation, test, each in file order) -- :func:`npy_jobs`,
   :func:`audio_jobs`;
2. run a loader over the jobs in worker processes, turning every failure into
   a per-track skip reason instead of an aborted run, and optionally a
   batched ``transform`` of the loaded chunks in this process (the log-mel
   transform on a device) -- :func:`run_jobs`;
3. write the results into a resumable :class:`~freqtag.data.store.StoreWriter`
   and list every skipped track in ``STORE.report.tsv`` -- :func:`build_store`.

:func:`prepare_npy` wires them up for MTG-Jamendo's distributed ``.npy`` mels,
:func:`prepare_audio` for audio files: decoded, resampled and trimmed in the
workers by :func:`freqtag.audio.whole.waveform`; transformed by
:class:`freqtag.audio.logmel.LogMel` in each worker (CPU), or here in batches
(``--device cuda``, or no workers).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from freqtag.data import jamendo
from freqtag.data.store import DTYPE, FeatureStore, StoreError, StoreWriter, remove_partial
from freqtag.features import FeatureSpec
from freqtag.system.faults import fault_point

__all__ = [
    "Job",
    "Result",
    "SkipTrack",
    "PrepareError",
    "PrepareReport",
    "read_split_dir",
    "npy_jobs",
    "audio_jobs",
    "load_npy",
    "load_audio",
    "load_audio_features",
    "run_jobs",
    "build_store",
    "prepare_npy",
    "prepare_audio",
    "DEFAULT_MIN_FRAMES",
    "CRASH_REASON",
    "report_path",
    "read_report",
]

REPORT_HEADER = ("track_id", "path", "reason")
# Tracks handed to a worker at a time, and chunks in flight per worker: enough
# to keep workers busy, few enough that finished arrays never pile up in RAM
# when writing is slower than loading (a full mel96 track is ~4 MB).
CHUNK_SIZE = 4
CHUNKS_IN_FLIGHT_PER_WORKER = 2
# Decoded waveforms are big (a 10-minute track at 44.1 kHz is 106 MB): fewer per chunk.
AUDIO_CHUNK_SIZE = 2
# The shortest input window of the paper: a track that cannot fill one is skipped.
DEFAULT_MIN_FRAMES = 128


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


def _reason(e: Exception) -> str:
    return _one_line(str(e)) if isinstance(e, SkipTrack) else _one_line(f"{type(e).__name__}: {e}")


def _process(load: Callable[[Job], np.ndarray], n_mels: int, jobs: Sequence[Job], check: bool = True) -> list[Result]:
    """Run a loader on a chunk of jobs (in a worker); one bad file never stops the run.

    With ``check`` the results are the store's checked float16 features; without
    it they are whatever ``load`` returns, for a transform in the main process.
    """
    results = []
    for job in jobs:
        try:
            x = load(job)
            results.append(Result(job.track_id, job.source, _checked(x, n_mels) if check else x))
        except Exception as e:  # a decoder's failure on one file is that file's problem
            results.append(Result(job.track_id, job.source, None, _reason(e)))
    return results


def _transformed(
    results: list[Result], transform: Callable[[list[np.ndarray]], list[np.ndarray]], n_mels: int
) -> list[Result]:
    """Apply the batched transform to a chunk's loaded items, then the store's checks.

    If the batch fails as a whole, each item is tried alone, so only the items
    that fail by themselves are skipped.
    """
    good = [i for i, r in enumerate(results) if r.features is not None]
    try:
        outs: list[np.ndarray | Exception] = list(transform([results[i].features for i in good]))
    except Exception:
        outs = []
        for i in good:
            try:
                outs.append(transform([results[i].features])[0])
            except Exception as e:
                outs.append(e)
    done = list(results)
    for i, out in zip(good, outs):
        r = results[i]
        try:
            if isinstance(out, Exception):
                raise out
            done[i] = Result(r.track_id, r.source, _checked(out, n_mels))
        except Exception as e:
            done[i] = Result(r.track_id, r.source, None, _reason(e))
    return done


def run_jobs(
    load: Callable[[Job], np.ndarray],
    jobs: Sequence[Job],
    n_mels: int,
    workers: int = 0,
    chunk_size: int = CHUNK_SIZE,
    initializer: Callable[[], None] | None = None,
    transform: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
    preload: Sequence[str] = (),
    raw: bool = False,
) -> Iterator[Result]:
    """Results in job order; ``load`` runs in ``workers`` worker processes (0: in this one).

    ``load`` must be picklable (a module-level function or a ``functools.partial``
    of one). Workers are never forked from this process, which may hold
    threads (the progress bar, torch) whose locks fork would copy: they come
    from a fresh fork server that has imported the ``preload`` modules once
    (so N workers do not import torch N times), or are spawned where there is
    no fork server. At most a few chunks per worker are in flight, so memory
    stays bounded however slow the consumer is. ``initializer`` runs once in
    each worker (not in this process).

    ``transform``, if given, runs in this process on each chunk of loaded
    items (a list of ``load``'s results, in job order) and returns the
    (frames, bands) features of each: the batched step that wants one device.
    With ``raw`` (and no transform) ``load``'s results are handed back as they
    are, without the store's checks (``freqtag predict``'s feature workers).
    """
    chunks = [list(jobs[i : i + chunk_size]) for i in range(0, len(jobs), chunk_size)]
    check = transform is None and not raw

    def finish(results: list[Result]) -> list[Result]:
        return results if transform is None else _transformed(results, transform, n_mels)

    if workers < 1:
        for chunk in chunks:
            yield from finish(_process(load, n_mels, chunk, check))
        return

    context = _worker_context(preload)

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(n, mp_context=context, initializer=initializer)

    in_flight = workers * CHUNKS_IN_FLIGHT_PER_WORKER
    todo = deque(chunks)
    pending: deque[tuple[list[Job], Future]] = deque()
    pool = new_pool(workers)
    try:
        while todo or pending:
            while todo and len(pending) < in_flight:
                chunk = todo.popleft()
                pending.append((chunk, pool.submit(_process, load, n_mels, chunk, check)))
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                # A worker died (a decoder crash, or out of memory) and took the
                # pool with it. Its file is in this chunk or in one in flight:
                # this chunk is redone one file per call to find it, the others
                # go back in line (a crasher among them is found in its turn).
                pool.shutdown(wait=True, cancel_futures=True)
                todo.extendleft(reversed([c for c, _ in pending]))
                pending.clear()
                results = _isolate(new_pool, load, n_mels, chunk, check)
                pool = new_pool(workers)
            yield from finish(results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """A fork server that has imported ``preload`` (Linux, macOS), else spawn (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Taken into account when the server starts (once per process): a later,
    # different list only means the workers import the rest themselves.
    context.set_forkserver_preload(["__main__", "freqtag.prepare.command", *preload])
    return context


CRASH_REASON = "the worker process died on this file (a crash in the decoder, or out of memory)"


def _alive() -> bool:
    return True


def _isolate(
    new_pool: Callable[[int], ProcessPoolExecutor], load: Callable[[Job], np.ndarray], n_mels: int,
    chunk: list[Job], check: bool,
) -> list[Result]:  # fmt: skip
    """Run a chunk one job at a time in a one-worker pool; a job that kills its worker is skipped.

    After each death a fresh worker must run an empty call: if even that
    dies, the fault is the set-up (memory, installation), not a file, and the
    run stops (resumable) instead of skipping every file.
    """
    results = []
    pool = new_pool(1)
    try:
        for job in chunk:
            try:
                results.extend(pool.submit(_process, load, n_mels, [job], check).result())
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                results.append(Result(job.track_id, job.source, None, CRASH_REASON))
                pool = new_pool(1)
                try:
                    pool.submit(_alive).result()
                except BrokenProcessPool:
                    raise PrepareError(
                        "worker processes die before doing any work (out of memory, or a broken installation); "
                        "re-run the same command to resume, perhaps with fewer --workers"
                    ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


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
def _progress_bar(
    enabled: bool, total: int, done: int, frames_per_second: float = 1.0
) -> Iterator[Callable[[int], None]]:
    """A rich bar on stderr: files, hours of audio, rates, ETA.

    Yields ``advance(frames)``: one more file, whose features cover ``frames``
    frames (0 for a skipped file); hours of audio are counted from the frames.
    """
    if not enabled:
        yield lambda frames=0: None
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
            files = f"{task.speed:.1f} files/s" if task.speed else "- files/s"
            seconds = task.fields["seconds"]
            realtime = f" {seconds / task.elapsed:.0f}x realtime" if task.elapsed and seconds else ""
            return Text(files + realtime)

    columns = (
        TextColumn("prepare"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("files"),
        TextColumn("{task.fields[hours]:.2f} h audio"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("files", total=total, completed=done, seconds=0.0, hours=0.0)
        seconds = 0.0

        def advance(frames: int = 0) -> None:
            nonlocal seconds
            seconds += frames / frames_per_second
            bar.update(task, advance=1, seconds=seconds, hours=seconds / 3600.0)

        yield advance


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
            f"{out} is a finished store of features '{store.spec.name}', not '{spec.name}'"
            + (f" ({'; '.join(store.spec.differences(spec))})" if store.spec.name == spec.name else "")
            + f": choose another --out, or delete {out} to rebuild it"
        )
    # a run killed between the final rename and the clean-up leaves its parts: the store holds them all
    remove_partial(out.with_name(out.name + ".partial"))
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
    workers: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    transform: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
    initializer: Callable[[], None] | None = None,
    chunk_size: int = CHUNK_SIZE,
    preload: Sequence[str] = (),
) -> PrepareReport:
    """Load every job not yet kept in ``STORE.partial/``, keep the good ones, assemble the store.

    ``batch_size`` tracks make one resumable part: a killed run loses at most
    that many tracks of work. The report is written before the store is
    assembled, so a finished store always has the report of the run that made it.
    ``workers``, ``transform``, ``initializer``, ``chunk_size``, ``preload``: as :func:`run_jobs`.
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
    results = run_jobs(
        load, pending_jobs, spec.n_mels, workers=workers, chunk_size=chunk_size, initializer=initializer,
        transform=transform, preload=preload,
    )  # fmt: skip
    with _progress_bar(progress, total=len(jobs), done=resumed, frames_per_second=spec.frames_per_second) as advance:
        for r in results:
            if r.features is None:
                skipped.append((r.track_id, r.source, r.reason or "unknown"))
                advance(0)
            else:
                batch.append((r.track_id, r.features))
                if len(batch) >= batch_size:
                    writer.add(batch)
                    batch = []
                advance(r.features.shape[0])
        writer.add(batch)
    report = report_path(out)
    _write_report(report, skipped)
    fault_point("prepare.report")
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
    task: str = "moodtheme",
) -> PrepareReport:
    """Import MTG-Jamendo's distributed ``XX/ID.npy`` spectrograms into the store ``out``.

    Every track of the ``task``'s three split TSVs in ``splits_dir`` is imported; bad
    files are skipped and listed in ``STORE.report.tsv``. Mean/std come from
    the train split. Re-running resumes an interrupted run; a finished store
    is left untouched.
    """
    spec = FeatureSpec.load(features)
    npy_dir = Path(npy_dir)
    splits = read_split_dir(splits_dir, tags_file, task)
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


# ------------------------------------------------------------------- audio source


def _store_files(out: Path) -> tuple[set[Path], set[Path]]:
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
    skip_files, skip_dirs = _store_files(Path(out)) if out is not None else (set(), set())
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


def _preflight_audio(jobs: Sequence[Job], audio_dir: Path, look: int = 50) -> None:
    """Fail fast when the split TSVs' PATHs are not under --audio-dir at all."""
    sample = jobs[:look]
    if sample and not any(os.path.isfile(j.source) for j in sample):
        raise FileNotFoundError(
            f"none of the first {len(sample)} tracks is in {audio_dir} (e.g. {sample[0].source}): --audio-dir must be "
            f"the folder that the PATH column of the split TSVs is relative to (MTG's audio folder, holding 00/ .. 99/)"
        )


def prepare_audio(
    audio_dir: str | Path,
    out: str | Path,
    features: str,
    splits_dir: str | Path | None = None,
    workers: int = 1,
    device: str = "cpu",
    min_frames: int = DEFAULT_MIN_FRAMES,
    tags_file: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 64,
    task: str = "moodtheme",
) -> PrepareReport:
    """Compute ``features`` (mel128 or mel96) from audio files into the store ``out``.

    The tracks are those of the split TSVs in ``splits_dir`` (PATH relative to
    ``audio_dir``; mean/std from the train split), or without it every file
    under ``audio_dir`` (ids are relative paths; mean/std from all tracks).
    ``workers`` processes decode, resample and trim (0: this process does).
    The log-mel transform runs on ``device``: with ``cuda`` (or no workers)
    in this process, batched over the waveforms the workers hand over; with
    ``cpu`` and workers, in each worker on its own files, since handing a
    waveform between processes costs more than transforming it. Files that
    give no features (see :func:`freqtag.audio.whole.waveform`), including tracks
    shorter than ``min_frames`` frames, are skipped and listed in
    ``STORE.report.tsv``. Re-running resumes an interrupted run; a finished
    store is left untouched.
    """
    from freqtag.audio import decode as audio

    spec = FeatureSpec.load(features)
    if min_frames < 1:
        raise ValueError(f"--min-frames {min_frames}: must be at least 1")
    if workers < 0:
        raise ValueError(f"--workers {workers}: must be 0 (decode in this process) or more")
    audio_dir = Path(audio_dir)
    out = Path(out)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist: --audio-dir must be a folder of audio files")
    in_workers = workers >= 1 and str(device) == "cpu"
    # Each CPU worker transforms its own files: handing a waveform between
    # processes costs more CPU than the transform (bench/prepare.py), and the
    # features are 16x smaller. Same arithmetic either way, so the same store.
    transform = None
    if not in_workers:
        from freqtag.audio.logmel import LogMel  # torch: only this process's transform needs it here

        transform = LogMel(spec, device)  # checks the device before any work
    if splits_dir is not None:
        splits = read_split_dir(splits_dir, tags_file, task)
        jobs = audio_jobs(audio_dir, splits, out)
        stats_ids: Sequence[str] = splits["train"].track_ids
        stats_split = "train"
        if not out.exists():
            _preflight_audio(jobs, audio_dir)
    else:
        jobs = audio_jobs(audio_dir, None, out)
        stats_ids = [j.track_id for j in jobs]
        stats_split = "all"
        if not jobs:
            raise PrepareError(f"no files under {audio_dir}: --audio-dir must be a folder of audio files")
    loader = load_audio_features if in_workers else load_audio
    return build_store(
        jobs,
        functools.partial(loader, spec=spec, min_frames=min_frames),
        out,
        spec,
        stats_ids=stats_ids,
        stats_split=stats_split,
        workers=workers,
        batch_size=batch_size,
        progress=progress,
        transform=transform,
        initializer=audio.quiet_decoder_messages,
        chunk_size=CHUNK_SIZE if in_workers else AUDIO_CHUNK_SIZE,
        preload=("freqtag.audio.whole", "freqtag.audio.logmel") if in_workers else ("freqtag.audio.whole",),
    )
