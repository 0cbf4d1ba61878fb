"""A store from jobs: load those not yet kept, keep the good ones, report the rest, assemble."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from freqtag.data.store import FeatureStore, StoreError
from freqtag.data.store_writer import StoreWriter, remove_partial
from freqtag.features import FeatureSpec
from freqtag.prepare.pool import CHUNK_SIZE, Job, PrepareError, run_jobs
from freqtag.prepare.progress import progress_bar, status
from freqtag.prepare.report import PrepareReport, read_report, report_path, write_report
from freqtag.system.faults import fault_point

__all__ = ["build_store"]


def _outcome(out: Path, jobs: Sequence[Job], skipped: list[tuple[str, str, str]], started: float, **more: Any
             ) -> PrepareReport:  # fmt: skip
    """The run's report: each requested track is in the store or in ``skipped``."""
    return PrepareReport(out=out, total=len(jobs), written=len(jobs) - len(skipped), skipped=skipped,
                         seconds=time.monotonic() - started, **more)


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
        write_report(report, skipped)  # the store stays untouched; only the list of what it lacks
    return _outcome(out, jobs, skipped, started, already_complete=True)


def build_store(  # over 60 lines: signature and docstring are half of it; the body is one load-keep-assemble sequence
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
    with progress_bar(progress, total=len(jobs), done=resumed, frames_per_second=spec.frames_per_second) as advance:
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
    write_report(report, skipped)
    fault_point("prepare.report")
    if not writer.done & {j.track_id for j in jobs}:
        raise PrepareError(f"none of the {len(jobs)} tracks could be read; {report} lists why")
    with status(progress, f"assembling {out} from {len(jobs) - len(skipped)} tracks"):
        writer.finish(stats_ids, stats_split)
    return _outcome(out, jobs, skipped, started, resumed=resumed)
