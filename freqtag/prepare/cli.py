"""`freqtag prepare`'s options and runner: what the user asked for, checked, then :mod:`freqtag.prepare.command`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from freqtag.data.jamendo import TASKS
from freqtag.system.exits import usage

__all__ = ["add_prepare_arguments", "run_prepare"]


SKIPPED_SHOWN = 20  # skipped files listed on screen; the report lists them all


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Compute mel128 or mel96 features from audio files (--audio-dir), or import MTG-Jamendo's distributed mel96 "
        ".npy spectrograms (--npy-dir), into one HDF5 feature store. With --splits the tracks are those of the three "
        "split TSVs; without it (audio only) every file under --audio-dir, its id being its relative path. Bad files "
        "are skipped and listed with their reason in STORE.report.tsv (exit 1 if any). An interrupted run resumes "
        "when re-run with the same arguments."
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio-dir", type=Path, help="folder of audio files (MP3, Ogg, FLAC, WAV, ...)")
    source.add_argument("--npy-dir", type=Path, help="MTG's melspecs folder (holds XX/ID.npy)")
    p.add_argument("--splits", type=Path, default=None,
                   help="folder of MTG's split TSVs, autotagging_{TASK}-{train,validation,test}.tsv (PATH relative to "
                   "--audio-dir); required with --npy-dir")  # fmt: skip
    p.add_argument("--task", default="moodtheme", choices=TASKS,
                   help="whose TSVs in --splits give the tracks (default: moodtheme; genre, instrument, top50tags "
                   "and all are in MTG's raw_30s download, not the moodtheme one)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the store to write, e.g. data/mel128.h5")
    p.add_argument("--features", default=None,
                   help="feature recipe: mel128 or mel96 (required with --audio-dir; default mel96 with --npy-dir)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1,
                   help="decoding/loading processes; 0 = in the main process (default: 1)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the mel transform runs: cpu or cuda (default: cpu; audio only)")
    p.add_argument("--min-frames", type=int, default=None,
                   help="skip audio that gives fewer frames than this (default: 128, the shortest input window; "
                   "audio only)")  # fmt: skip
    p.add_argument("--tags", type=Path, default=None,
                   help="tag list (default: MTG's list for --task beside --splits, else the TSVs' own tags)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="tracks per resumable part (default: 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prepare(args: argparse.Namespace) -> int:
    from freqtag.prepare.command import DEFAULT_MIN_FRAMES, prepare_audio, prepare_npy

    if args.workers < 0:
        return usage(f"--workers {args.workers}: must be 0 (work in the main process) or more")
    if args.audio_dir is not None:
        if args.features is None:
            return usage("--features is required with --audio-dir: mel128 or mel96")
        min_frames = DEFAULT_MIN_FRAMES if args.min_frames is None else args.min_frames
        if min_frames < 1:
            return usage(f"--min-frames {min_frames}: must be at least 1")
        report = prepare_audio(
            args.audio_dir,
            args.out,
            args.features,
            splits_dir=args.splits,
            workers=args.workers,
            device=args.device,
            min_frames=min_frames,
            tags_file=args.tags,
            progress=not args.no_progress,
            batch_size=args.batch_size,
            task=args.task,
        )
    else:
        if args.splits is None:
            return usage("--splits is required with --npy-dir: the folder of MTG's split TSVs (data/splits/split-0)")
        if args.min_frames is not None or args.device != "cpu":
            return usage("--min-frames and --device apply to --audio-dir only")
        report = prepare_npy(
            args.npy_dir,
            args.splits,
            args.out,
            features=args.features or "mel96",
            workers=args.workers,
            tags_file=args.tags,
            progress=not args.no_progress,
            batch_size=args.batch_size,
            task=args.task,
        )
    n_skipped = len(report.skipped)
    if report.already_complete:
        if n_skipped:
            print(
                f"{report.out} is already complete but lacks {n_skipped} of the {report.total} requested tracks; "
                f"{report.report} lists them (delete {report.out} to rebuild it)"
            )
            return 1
        print(f"{report.out} is already complete: it holds all {report.total} requested tracks")
        return 0
    resumed = f" ({report.resumed} kept from an interrupted run)" if report.resumed else ""
    print(f"wrote {report.out}: {report.written} of {report.total} tracks{resumed} in {report.seconds:.1f} s")
    if n_skipped:
        print(f"skipped {n_skipped} tracks, listed with reasons in {report.report}:", file=sys.stderr)
        for track_id, path, reason in report.skipped[:SKIPPED_SHOWN]:
            print(f"  {track_id}  {path}: {reason}", file=sys.stderr)
        if n_skipped > SKIPPED_SHOWN:
            print(f"  ... and {n_skipped - SKIPPED_SHOWN} more, all in {report.report}", file=sys.stderr)
        return 1
    return 0
