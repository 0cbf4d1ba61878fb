"""A whole download: shards fetched in parallel, each verified, then unpacked and its tracks verified.

Each worker takes one shard through every step (skip what is verified,
fetch, check, rename, unpack, remove), so with ``--remove`` the disk holds at
most ``--jobs`` tars at a time. A full disk or a mirror that does not answer
stops the run (one line says why); any other failure is one shard's, listed
at the end with its reason, and the other shards go on.
"""

from __future__ import annotations

import fcntl
import os
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from freqtag.data.download.fetch import FetchError, FetchOptions, MirrorDown, fetch
from freqtag.data.download.lists import DEFAULT_MIRROR, UsageError, load_lists, mirror_base, select_shards, shard_url
from freqtag.data.download.state import VerifiedState
from freqtag.data.download.unpack import clean_stale_temporaries, unpack_shard
from freqtag.system.faults import DiskFullError, disk_full, fault_point

__all__ = ["DownloadPlan", "ShardOutcome", "DownloadReport", "download", "check_out"]

LOCK_NAME = ".freqtag-download.lock"
_KEPT = "the shards and tracks verified so far are kept: the same command resumes"


@dataclass
class DownloadPlan:
    dataset: str
    data_type: str
    out: Path
    mtg_repo: Path
    mirror: str = DEFAULT_MIRROR
    shards: str | None = None
    unpack: bool = False
    remove: bool = False
    jobs: int = 4
    options: FetchOptions = field(default_factory=FetchOptions)
    progress: bool = True


@dataclass
class ShardOutcome:
    name: str
    result: str = ""  # verified earlier | downloaded | resumed | failed
    size: int = 0
    fetches: int = 0
    tracks: int = 0  # tracks of this shard on disk and verified
    written: int = 0  # of which written by this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard or track, why)
    note: str = ""


@dataclass
class DownloadReport:
    out: Path
    shards: list[ShardOutcome]
    tracks_listed: int
    tracks_verified: int
    missing: list[str]  # listed tracks in none of the shards (when every shard was asked for)
    fetched: int  # bytes received from the mirror in this run
    seconds: float

    @property
    def failures(self) -> list[tuple[str, str]]:
        listed = [f for s in self.shards for f in s.failed]
        if self.missing:
            listed.append((self.missing[0], f"in MTG's per-track list but in none of the shards "
                                            f"({len(self.missing)} such tracks)"))  # fmt: skip
        return listed


@dataclass
class _Context:
    plan: DownloadPlan
    tars: dict[str, str]
    tracks: dict[str, str]
    base: str
    state: VerifiedState
    bar: "_Bar"
    stop: threading.Event = field(default_factory=threading.Event)


def download(plan: DownloadPlan) -> DownloadReport:
    """Fetch, verify and (with ``plan.unpack``) unpack the shards asked for; see the module docstring."""
    started = time.monotonic()
    if plan.remove and not plan.unpack:
        raise UsageError("--remove deletes each tar once unpacked and verified: add --unpack")
    if plan.jobs < 1:
        raise UsageError(f"--jobs {plan.jobs}: must be at least 1")
    tars, tracks = load_lists(plan.mtg_repo, plan.dataset, plan.data_type, tracks=plan.unpack)
    names = select_shards(tars, plan.shards)
    base = mirror_base(plan.mirror)
    check_out(plan.out)
    with _only_run(plan.out):
        clean_stale_temporaries(plan.out)  # the only run here: any temporary is a killed run's
        state = VerifiedState(plan.out)
        with _Bar.shown(plan.progress, len(names)) as bar:
            ctx = _Context(plan, tars, tracks, base, state, bar)
            outcomes = _run_all(ctx, names)
        state.save()
    verified = sum(state.recorded(t, sha) for t, sha in tracks.items())
    everything = len(names) == len(tars) and not any(o.failed for o in outcomes)
    missing = sorted(t for t, sha in tracks.items() if not state.recorded(t, sha)) if everything else []
    return DownloadReport(plan.out, outcomes, len(tracks), verified, missing, bar.fetched,
                          time.monotonic() - started)  # fmt: skip


def check_out(out: Path) -> None:
    """Fail now, not after an hour of downloading, when ``--out`` cannot be written to."""
    probe = Path(out) / f".freqtag-probe.{os.getpid()}"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out} is not writable ({e.strerror or e}): choose another folder, "
                         "or make it writable") from None  # fmt: skip


@contextmanager
def _only_run(out: Path) -> Iterator[None]:
    """Hold ``out/.freqtag-download.lock`` (flock, freed by the OS however the run ends): two runs would trample
    each other's partial files."""
    with open(out / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out {out}: another freqtag download is writing there; wait for it to end, "
                             "or choose another --out") from None  # fmt: skip
        yield


def _run_all(ctx: _Context, names: list[str]) -> list[ShardOutcome]:
    """Every shard through :func:`_shard` on ``--jobs`` threads; a fatal error stops them all."""
    outcomes: dict[str, ShardOutcome] = {}
    with ThreadPoolExecutor(ctx.plan.jobs, thread_name_prefix="download") as pool:
        futures: dict[Future[ShardOutcome], str] = {pool.submit(_shard, ctx, n): n for n in names}
        try:
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
        except BaseException:  # full disk, mirror down, Ctrl-C: the others stop at their next block
            ctx.stop.set()
            for future in futures:
                future.cancel()
            raise
    return [outcomes[n] for n in names]


def _shard(ctx: _Context, name: str) -> ShardOutcome:
    outcome = ShardOutcome(name)
    state, tar = ctx.state, ctx.plan.out / name
    if ctx.plan.unpack and _unpacked_earlier(ctx, name):
        outcome.result, outcome.tracks = "verified earlier", len(state.unpacked[name])
        _remove_tar(ctx, name, outcome)
        ctx.bar.shard_done(outcome)
        return outcome
    if state.verify(name, ctx.tars[name]):
        outcome.result = "verified earlier"
    else:
        if tar.exists():
            tar.unlink()
            outcome.note = "the tar on disk did not match its checksum: fetched again"
        if not _download(ctx, name, outcome):
            ctx.bar.shard_done(outcome)
            return outcome
    outcome.size = tar.stat().st_size
    if ctx.plan.unpack:
        _unpack(ctx, name, outcome)
    ctx.bar.shard_done(outcome)
    return outcome


def _unpacked_earlier(ctx: _Context, name: str) -> bool:
    """All tracks an earlier run unpacked from this shard are still there and unchanged."""
    tracks = ctx.state.unpacked.get(name, [])
    return bool(tracks) and all(t in ctx.tracks and ctx.state.verify(t, ctx.tracks[t]) for t in tracks)


def _download(ctx: _Context, name: str, outcome: ShardOutcome) -> bool:
    """Fetch the shard to ``NAME.part`` and rename it once its sha256 matches; a mismatch is fetched once more."""
    part = ctx.plan.out / f"{name}.part"
    url = shard_url(ctx.base, ctx.plan.dataset, ctx.plan.data_type, name)
    meter = ctx.bar.meter(name)
    got = ""
    for _ in range(2):
        outcome.fetches += 1
        try:
            got, resumed = fetch(url, part, ctx.plan.options, meter, ctx.stop)
        except MirrorDown:
            raise
        except FetchError as e:
            outcome.result = "failed"
            outcome.failed.append((name, str(e)))
            return False
        except OSError as e:
            if disk_full(e):
                raise DiskFullError(part, _KEPT) from None
            raise
        if got == ctx.tars[name]:
            _commit(part, ctx.plan.out / name)
            ctx.state.record(name, got)
            ctx.state.save()
            outcome.result = "resumed" if resumed else "downloaded"
            return True
        meter.advance(-part.stat().st_size, received=False)
        part.unlink()
    outcome.result = "failed"
    outcome.failed.append((name, f"sha256 {got[:12]}... twice, {ctx.tars[name][:12]}... in MTG's list: the mirror "
                                 "serves another file; try another --mirror"))  # fmt: skip
    return False


def _commit(part: Path, final: Path) -> None:
    """Make the verified bytes durable, then give them the final name."""
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    fault_point("download.verified")
    os.replace(part, final)
    fault_point("download.renamed")


def _unpack(ctx: _Context, name: str, outcome: ShardOutcome) -> None:
    try:
        result = unpack_shard(ctx.plan.out / name, ctx.plan.out, ctx.tracks, ctx.state, ctx.stop, ctx.bar.track)
    except tarfile.TarError as e:  # its sha256 matched MTG's list, so the list itself names a broken tar
        outcome.failed.append((name, f"not a readable tar ({e}) although it matches MTG's list: report it to MTG"))
        return
    outcome.tracks, outcome.written = len(result.tracks), result.written
    outcome.failed += result.failed
    if not result.failed:
        ctx.state.set_unpacked(name, result.tracks)
    ctx.state.save()
    if result.failed and ctx.plan.remove:
        outcome.note = "tar kept"
    elif not result.failed:
        _remove_tar(ctx, name, outcome)


def _remove_tar(ctx: _Context, name: str, outcome: ShardOutcome) -> None:
    tar = ctx.plan.out / name
    if ctx.plan.remove and tar.exists():
        tar.unlink()
        ctx.state.forget(name)
        ctx.state.save()
        outcome.note = "tar removed"


class _Meter:
    """One shard's share of the bar."""

    def __init__(self, bar: "_Bar", name: str) -> None:
        self.bar, self.name = bar, name

    def advance(self, n: int, received: bool = True) -> None:
        self.bar.advance(n, received)

    def expect(self, size: int) -> None:
        self.bar.expect(self.name, size)


class _Bar:
    """One rich bar over the bytes to fetch (bytes, rate, time left), with shards and tracks done."""

    def __init__(self, progress: Any, shards: int) -> None:
        self.progress, self.shards = progress, shards
        self.task = progress.add_task("download", total=None, shards=0, tracks=0) if progress else None
        self.sizes: dict[str, int] = {}  # shards whose size the mirror has told
        self.unfetched = 0  # shards finished without fetching (verified earlier, failed at once)
        self.finished = self.tracks = self.fetched = 0
        self.lock = threading.Lock()

    @classmethod
    @contextmanager
    def shown(cls, enabled: bool, shards: int) -> Iterator["_Bar"]:
        if not enabled:
            yield cls(None, shards)
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,  # fmt: skip
        )

        columns = (TextColumn("download"), BarColumn(bar_width=24), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), TextColumn(f"{{task.fields[shards]}}/{shards} shards"),
                   TextColumn("{task.fields[tracks]:,} tracks"))  # fmt: skip
        with Progress(*columns, console=Console(stderr=True)) as progress:
            yield cls(progress, shards)

    def meter(self, name: str) -> _Meter:
        return _Meter(self, name)

    def advance(self, n: int, received: bool = True) -> None:
        """``n`` bytes more (or fewer) on disk; ``received`` when they came over the network in this run."""
        with self.lock:
            self.fetched += n if received else 0
        if self.task is not None:
            self.progress.update(self.task, advance=n)

    def expect(self, name: str, size: int) -> None:
        with self.lock:
            self.sizes[name] = size
        self._refresh()

    def shard_done(self, outcome: ShardOutcome) -> None:
        with self.lock:
            self.finished += 1
            self.unfetched += outcome.name not in self.sizes
        self._refresh()

    def _total(self) -> int | None:
        """The known sizes, plus their mean for each shard still to be asked for; None while nothing is known."""
        pending = self.shards - self.unfetched - len(self.sizes)
        if not self.sizes:
            return None if pending else self.fetched
        known = sum(self.sizes.values())
        return known + max(pending, 0) * known // len(self.sizes)

    def _refresh(self) -> None:
        if self.task is not None:
            with self.lock:
                total, finished = self._total(), self.finished
            self.progress.update(self.task, total=total, shards=finished)

    def track(self) -> None:
        with self.lock:
            self.tracks += 1
        if self.task is not None:
            self.progress.update(self.task, tracks=self.tracks)
