"""A crash-isolating process pool: a loader run over jobs in workers, every failure a per-job skip reason.

Used by ``freqtag prepare`` (loading tracks into a store) and by the taggers'
feature and network workers (:mod:`freqtag.tag.runner`).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from freqtag.data.store import DTYPE

__all__ = ["Job", "Result", "SkipTrack", "PrepareError", "run_jobs", "CRASH_REASON", "CHUNK_SIZE", "one_line"]

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


def one_line(text: str) -> str:
    return " ".join(str(text).split())


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
    return one_line(str(e)) if isinstance(e, SkipTrack) else one_line(f"{type(e).__name__}: {e}")


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


def run_jobs(  # over 60 lines: the docstring is a third; the pool loop and its crash recovery belong together
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
    context.set_forkserver_preload(["__main__", "freqtag.prepare.pool", *preload])
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
