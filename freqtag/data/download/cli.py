"""The `freqtag download` subcommand: MTG's script's arguments, and a summary a user can act on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from freqtag.data.download.lists import DATASETS, DEFAULT_MIRROR, MIRRORS, TYPES
from freqtag.system.exits import FAILED, error, usage

__all__ = ["add_download_arguments", "run_download"]

FAILURES_SHOWN = 20  # failures listed one per line; the table shows every shard


def add_download_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Download MTG-Jamendo's tar shards (and with --unpack their tracks), each checked against the sha256 lists "
        "of your clone of MTG's repository. Shards download in parallel, resume after an interruption (re-run the "
        "same command), and a re-run skips what is verified. Exit 0 when everything asked for is present and "
        "verified, 1 when something failed (each listed with why), 2 for a usage error."
    )
    p.add_argument("--dataset", choices=DATASETS, default="autotagging_moodtheme",
                   help="which tracks (default: autotagging_moodtheme)")  # fmt: skip
    p.add_argument("--type", dest="data_type", choices=TYPES, default="audio",
                   help="melspecs (68 GB for mood/theme), audio-low or audio (152 GB) "
                   "(default: audio, as MTG's script)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder for the tars and the unpacked NN/ID files")
    p.add_argument("--mtg-repo", type=Path, required=True,
                   help="your clone of https://github.com/MTG/mtg-jamendo-dataset "
                   "(its data/download/ checksum lists)")  # fmt: skip
    p.add_argument("--mirror", "--from", dest="mirror", default=DEFAULT_MIRROR,
                   help=f"{' or '.join(MIRRORS)} (MTG's mirrors), or a base URL holding BASE/DATASET/TYPE/FILE "
                   f"(default: {DEFAULT_MIRROR})")  # fmt: skip
    p.add_argument("--shards", default=None, help="only these shards, e.g. 0-3,7 (default: all)")
    p.add_argument("--unpack", action="store_true", help="unpack each tar, checking every track against MTG's list")
    p.add_argument("--remove", action="store_true", help="delete each tar once unpacked and verified (with --unpack)")
    p.add_argument("--jobs", type=int, default=4, help="shards downloaded at once (default: 4)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds without data before a try is dropped (default: 30)")  # fmt: skip
    p.add_argument("--retries", type=int, default=5,
                   help="further tries per shard after a network error, resuming each time, with doubling waits "
                   "(default: 5)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_download(args: argparse.Namespace) -> int:
    from freqtag.data.download.fetch import FetchOptions, MirrorDown
    from freqtag.data.download.lists import UsageError
    from freqtag.data.download.run import DownloadPlan, download
    from freqtag.system.faults import DiskFullError

    if args.timeout <= 0 or args.retries < 0:
        return usage(f"--timeout {args.timeout} / --retries {args.retries}: need a positive timeout and 0 or more retries")
    options = FetchOptions(timeout=args.timeout, retries=args.retries)
    plan = DownloadPlan(args.dataset, args.data_type, args.out, args.mtg_repo, mirror=args.mirror, shards=args.shards,
                        unpack=args.unpack, remove=args.remove, jobs=args.jobs, options=options,
                        progress=not args.no_progress)  # fmt: skip
    try:
        report = download(plan)
    except UsageError as e:
        return usage(str(e))
    except (MirrorDown, DiskFullError) as e:
        error(f"{e}; the shards and tracks verified so far are kept: the same command resumes"
              if isinstance(e, MirrorDown) else str(e))  # fmt: skip
        return FAILED
    print_summary(report)
    return 1 if report.failures else 0


def print_summary(report) -> None:  # type: ignore[no-untyped-def]
    """A table of the shards on stdout; failures, one line each with why, on stderr; then the counts."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MTG-Jamendo download into {report.out}", title_justify="left")
    for column, justify in (("shard", "left"), ("result", "left"), ("size", "right"), ("tracks", "right"),
                            ("note", "left")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for s in report.shards:
        note = "failed: listed below" if s.result == "failed" else s.note
        if s.failed and s.result != "failed":
            count = f"{len(s.failed)} track{'s' * (len(s.failed) > 1)} failed (listed below)"
            note = "; ".join(filter(None, (count, s.note)))
        table.add_row(s.name, s.result, _size(s.size) if s.size else "", f"{s.tracks:,}" if s.tracks else "", note)
    console = Console(soft_wrap=False)
    console.width = max(console.width, 120)  # a shard's name is 40 characters: no wrapping in logs and pipes
    console.print(table)
    failures = report.failures
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for what, why in failures[:FAILURES_SHOWN]:
            print(f"  {what}: {why}", file=sys.stderr)
        if len(failures) > FAILURES_SHOWN:
            print(f"  ... and {len(failures) - FAILURES_SHOWN} more", file=sys.stderr)
    ok = sum(s.result != "failed" for s in report.shards)
    print(f"shards: {ok} of {len(report.shards)} asked for are verified; {_size(report.fetched)} in "
          f"{report.seconds:.1f} s ({report.fetched / max(report.seconds, 1e-9) / 1e6:.1f} MB/s)")  # fmt: skip
    if report.tracks_listed:
        print(f"tracks: {report.tracks_verified:,} of the {report.tracks_listed:,} in MTG's list are present and "
              f"verified in {report.out}")  # fmt: skip


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover
