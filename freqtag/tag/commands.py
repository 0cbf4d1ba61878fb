"""What ``predict``, ``embed`` and ``serve`` share as commands: options, models loaded with one-line errors,
decision thresholds, the progress bar and the closing report (the tagging itself: :mod:`freqtag.tag.runner`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from freqtag.system.exits import FAILED, error, usage
from freqtag.tag.formats import FileResult
from freqtag.tag.runner import OOM_FIX, network_in_workers, network_worker_bytes, tag_files

__all__ = ["default_workers", "add_run_arguments", "load_for_run", "load_checked", "decision_thresholds",
           "warn_synthetic", "run_files", "report_failed"]  # fmt: skip


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity), as ``os.sched_getaffinity`` gives them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def add_run_arguments(p: argparse.ArgumentParser, ensemble: bool) -> None:
    """The options ``predict`` and ``embed`` share (checkpoints, inputs, device, memory, workers, progress)."""
    p.add_argument("--ckpt", nargs="+" if ensemble else 1, required=True, metavar="CKPT",
                   help="run directories, final.ckpt files, https:// URLs (#sha256=HEX to check) or "
                   "hf://ORG/REPO[/FILE][@REVISION]" + ("; several form an ensemble (mean of probabilities)"
                                                        if ensemble else ""))
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files, folders (searched recursively) or globs")
    p.add_argument("--device", default="auto", help="where the network runs: auto, cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=None, metavar="WINDOWS",
                   help="windows per forward pass (default: 16384 frames' worth, e.g. 73 windows of 224); "
                   "bounds memory, never changes the result")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: the cores available): on a CPU each tags whole files on one "
                   "thread; with a GPU they decode and compute features while this one runs the network; 0: all in "
                   "this process; never changes the result")
    p.add_argument("--low-memory", action="store_true",
                   help="give freed memory back to the system between chunks (glibc's default): a lower peak "
                   "(+590-860 MiB instead of +880-1,640 MiB measured for mel128), 2.1x slower on a CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_for_run(args: argparse.Namespace, command: str) -> list[Any] | int:
    """Check the shared options and load the models; an exit status (2 usage, 1 out of memory) on failure.

    Warns (one line each) about models trained on the synthetic demo data.
    """
    from freqtag.system.allocator import keep_freed_memory
    from freqtag.tag.inputs import split_checkpoints

    if not args.low_memory:  # chunk after chunk would page-fault the network's buffers back in: 2.1x slower on CPU
        keep_freed_memory()
    split_checkpoints(args)
    if not args.inputs:
        return usage("no INPUT given: name audio files, folders or globs after the checkpoints", command)
    if args.batch_size is not None and args.batch_size < 1:
        return usage(f"--batch-size {args.batch_size}: must be at least 1 window", command)
    defaulted = args.workers is None
    if defaulted:
        args.workers = default_workers()
    if args.workers < 0:
        return usage(f"--workers {args.workers}: must be 0 (all in this process) or more", command)
    models = load_checked(args.ckpt, args.device, command)
    if isinstance(models, int):
        return models
    if defaulted:
        _fit_workers(args, models, command)
    warn_synthetic(models, command)
    return models


def load_checked(ckpts: Sequence[str], device: str, command: str) -> list[Any] | int:
    """``--ckpt`` on ``--device``, loaded; on failure its one line and an exit status (1 out of memory, else 2)."""
    from freqtag.system.memory import OutOfMemory, out_of_memory
    from freqtag.tag.models import CheckpointError, load_models, resolve_device

    try:
        dev = resolve_device(device)
        with out_of_memory(f"the model{'s' if len(ckpts) > 1 else ''} on {dev}", OOM_FIX):
            return load_models(ckpts, dev)
    except OutOfMemory as e:
        error(str(e), command)
        return FAILED
    except (CheckpointError, ValueError, OSError) as e:
        return usage(str(e), command)


def warn_synthetic(models: Sequence[Any], command: str) -> None:
    """One line per model trained on the synthetic demo data."""
    for m in models:
        if m.synthetic:
            print(f"freqtag {command}: warning: {m.source or m.path} was trained on freqtag's synthetic demo data: "
                  f"its tags say nothing about real music", file=sys.stderr)


def _fit_workers(args: argparse.Namespace, models: Sequence[Any], command: str) -> None:
    """The default --workers, lowered (one line on stderr) when that many network workers would not fit in RAM.

    Each network worker holds a forward pass's activations (about 2 GiB for mel128 at the default
    --batch-size), where feature workers needed little: 16 of them with 16 GiB free would be killed by the
    kernel, file after file. An explicit --workers is taken as given.
    """
    from freqtag.system.memory import free_bytes, gib

    if args.workers < 2 or not network_in_workers(models):
        return
    import torch

    need = network_worker_bytes(models, args.batch_size)
    free = free_bytes(torch.device("cpu"))
    fit = max(1, free // need)
    if fit < args.workers:
        print(f"freqtag {command}: {fit} workers, not {args.workers}: each needs about {gib(need)} for the network "
              f"and {gib(free)} of RAM is free (a lower --batch-size needs less; --workers N sets it)", file=sys.stderr)
        args.workers = fit


def run_files(args: argparse.Namespace, models: Sequence[Any], files: Sequence[Path], failed: list[tuple[str, str]],
              on_result: Callable[[FileResult], None], command: str, layer: str | None = None) -> None:
    """Every file through the models with a progress bar; failures are printed and appended to ``failed``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    show = not args.no_progress and len(files) > 1 and err.is_terminal
    verb = "tagging" if command == "predict" else "embedding"
    with Progress(TextColumn(verb), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.description}"), console=err, disable=not show, transient=True) as progress:
        task = progress.add_task("", total=len(files))
        for f, r in tag_files(files, models, args.batch_size, layer, args.workers, args.low_memory,
                              getattr(args, "network_workers", None)):
            progress.update(task, description=f.name)
            if isinstance(r, str):
                failed.append((str(f), r))
                progress.console.print(f"[yellow]skipped[/yellow] {f}: {r}", markup=True, highlight=False)
            else:
                on_result(r)
            progress.advance(task)


def report_failed(command: str, done: int, failed: Sequence[tuple[str, str]], what: str = "tagged") -> int:
    """The closing lines on stderr; the exit status (1 when a file failed)."""
    if not failed:
        return 0
    print(f"freqtag {command}: {done} files {what}, {len(failed)} failed:", file=sys.stderr)
    for p, reason in failed:
        print(f"  {p}: {reason}", file=sys.stderr)
    return 1


def decision_thresholds(models: Sequence[Any], fixed: float | None, command: str) -> tuple[np.ndarray, str] | int:
    """Per-tag thresholds (``fixed`` for every tag, else the models' own) and their source; exit 2 on failure."""
    from freqtag.tag.models import CheckpointError, ensemble_thresholds

    try:
        return ensemble_thresholds(models, fixed)
    except (CheckpointError, ValueError, OSError) as e:
        return usage(str(e), command)
