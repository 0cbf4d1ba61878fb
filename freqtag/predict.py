"""`freqtag predict` / `python predict.py`: tag audio files with one checkpoint or an ensemble.

Per file: decode once in blocks (:mod:`freqtag.audiostream`), give every model
the features its checkpoint names, score the whole track in chunks of windows
(:mod:`freqtag.tagger`: the same probabilities as training's whole-track
evaluation), average the window probabilities per model and then over the
models. Unreadable files are reported and skipped (exit status 1); the rest
are still tagged.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_write_text
from .audio import AUDIO_EXTENSIONS, UNSUPPORTED_EXTENSIONS, AudioError

__all__ = [
    "add_predict_arguments",
    "add_predict_parser",
    "run_predict",
    "main",
    "expand_inputs",
    "tag_file",
    "FileResult",
    "FORMATS",
]

FORMATS = ("table", "json", "jsonl", "csv")
_EXT_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "table"}


# ------------------------------------------------------------------ arguments


def add_predict_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ckpt", nargs="+", required=True, metavar="PATH",
                   help="run directories or final.ckpt files; several form an ensemble (mean of probabilities)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files, folders (searched recursively) or globs")
    p.add_argument("--top", type=int, default=5, help="tags listed per file (default: 5)")
    p.add_argument("--threshold", default="auto",
                   help="'auto' (per-tag thresholds chosen on validation by training, default) or a probability")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from --out's extension, else table on a terminal, json otherwise)")
    p.add_argument("--out", type=Path, default=None, help="write the output here (atomically) instead of stdout")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="write a taggram and a bar chart (PNG) per file into DIR")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=None, metavar="WINDOWS",
                   help="windows per forward pass (default: 16384 frames' worth, e.g. 73 windows of 224); "
                   "bounds memory, never changes the result")
    p.add_argument("--low-memory", action="store_true",
                   help="give freed memory back to the system between chunks (glibc's default): a lower peak "
                   "(+590-860 MiB instead of +880-1,640 MiB measured for mel128), 2.1x slower on a CPU")
    p.add_argument("--windows", action="store_true", help="include per-window probabilities (json/jsonl only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_predict_parser(subparsers) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser(
        "predict",
        help="tag audio files with a trained checkpoint (or an ensemble)",
        description="Tag audio files: the top tags, all 56 probabilities and the decisions per file, as a table, "
        "JSON, JSONL or CSV, optionally with taggram plots. Exit status: 0 all files tagged, 1 some failed "
        "(reported, the others tagged), 2 usage error.",
    )
    return add_predict_arguments(p)


def _looks_like_checkpoint(value: str) -> bool:
    p = Path(value)
    if p.suffix.lower() in (".ckpt", ".pt", ".pth"):
        return True
    return p.is_dir() and ((p / "checkpoints" / "final.ckpt").is_file() or (p / "final.ckpt").is_file())


def split_checkpoints(args: argparse.Namespace) -> None:
    """``--ckpt A B song.mp3``: argparse gives all three to --ckpt; the first non-checkpoint starts the inputs."""
    for i, value in enumerate(args.ckpt):
        if i > 0 and not _looks_like_checkpoint(value):
            args.inputs = list(args.ckpt[i:]) + list(args.inputs)
            args.ckpt = list(args.ckpt[:i])
            return


def _threshold(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"--threshold {value}: use auto or a probability between 0 and 1") from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"--threshold {value}: a probability must be between 0 and 1")
    return t


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    if args.out is not None:
        return _EXT_FORMAT.get(args.out.suffix.lower(), "json")
    return "table" if sys.stdout.isatty() else "json"


# --------------------------------------------------------------------- inputs


def _is_audio_name(p: Path) -> bool:
    return p.suffix.lower() in AUDIO_EXTENSIONS + UNSUPPORTED_EXTENSIONS


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to tag (sorted within each input, each once) and inputs that name nothing (with the reason).

    A folder gives every file under it whose name is audio (including formats
    soundfile cannot read, so that they are reported, not silently passed
    over); a glob gives its matches; a file is taken as named.
    """
    files: list[Path] = []
    failed: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _is_audio_name(q))
            if not found:
                failed.append((raw, "folder holds no audio file (.mp3 .ogg .opus .flac .wav .aiff ...)"))
            for q in found:
                add(q)
        elif p.exists():
            add(p)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(raw), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                failed.append((raw, "no file matches this pattern"))
            for m in matches:
                add(m)
        else:
            failed.append((raw, "missing file"))
    return files, failed


# -------------------------------------------------------------------- tagging


@dataclass
class FileResult:
    """One tagged file: per-model window probabilities and their ensemble average."""

    path: Path
    duration_s: float
    probs: np.ndarray  # (n_tags,) mean over models of each model's window average
    windows: list[np.ndarray]  # per model, (W_m, n_tags)
    passes: int = 1
    plots: list[Path] = field(default_factory=list)


def tag_file(path: Path, models: Sequence[Any], chunk_windows: int | None = None, **stream_options: Any) -> FileResult:
    """Tag one file with every model: decoded once (in blocks), each model fed its own recipe's frames."""
    from .audiostream import stream_features

    specs = []
    for m in models:  # one feature stream per distinct recipe, shared by the models that use it
        if m.spec not in specs:
            specs.append(m.spec)
    streams = [m.stream(chunk_windows) for m in models]

    def sink_for(spec):  # type: ignore[no-untyped-def]
        targets = [s for s, m in zip(streams, models) if m.spec == spec]

        def sink(frames: np.ndarray) -> None:
            for s in targets:
                s.push(frames)

        return sink

    info = stream_features(path, specs, [sink_for(s) for s in specs], **stream_options)
    windows = [s.finish() for s in streams]
    probs = np.mean([w.mean(axis=0) for w in windows], axis=0).astype(np.float32)
    return FileResult(path=path, duration_s=info.duration_s, probs=probs, windows=windows, passes=info.passes)


# --------------------------------------------------------------------- output


@dataclass
class Report:
    """What the output writers need besides the results."""

    tags: list[str]  # display names
    top: int
    thresholds: np.ndarray
    threshold_source: str
    models: list[Any]
    with_windows: bool


def _record(r: FileResult, rep: Report) -> dict[str, Any]:
    order = np.argsort(-r.probs, kind="stable")[: rep.top]
    rec: dict[str, Any] = {
        "path": str(r.path),
        "duration_s": round(float(r.duration_s), 3),
        "tags": {t: float(p) for t, p in zip(rep.tags, r.probs)},
        "top": [{"tag": rep.tags[i], "probability": float(r.probs[i])} for i in order],
        "decisions": [t for t, p, th in zip(rep.tags, r.probs, rep.thresholds) if p >= th],
    }
    if rep.with_windows:
        rec["windows"] = [
            {
                "checkpoint": str(m.path),
                "features": m.spec.name,
                "window_s": m.window_s,
                "start_s": [round(i * m.window_s, 4) for i in range(len(w))],
                "probabilities": w.astype(float).round(6).tolist(),  # [window][tag], tag order of "tags"
            }
            for m, w in zip(rep.models, r.windows)
        ]
    if r.plots:
        rec["plots"] = [str(p) for p in r.plots]
    return rec


def render(results: Sequence[FileResult], failed: Sequence[tuple[str, str]], rep: Report, fmt: str) -> str:
    """The whole output as text. Failed files are listed too (an ``error`` field / column / row)."""
    records = [_record(r, rep) for r in results]
    errors = [{"path": p, "error": reason} for p, reason in failed]
    if fmt == "json":
        return json.dumps(records + errors, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records + errors)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "duration_s", "top", "decisions", *rep.tags, "error"])
        for rec in records:
            top = ";".join(f"{t['tag']}:{t['probability']:.4f}" for t in rec["top"])
            w.writerow([rec["path"], rec["duration_s"], top, ";".join(rec["decisions"]),
                        *(f"{rec['tags'][t]:.6f}" for t in rep.tags), ""])
        for e in errors:
            w.writerow([e["path"], "", "", "", *([""] * len(rep.tags)), e["error"]])
        return buf.getvalue()
    return _table(records, errors, rep)


def _table(records: list[dict[str, Any]], errors: list[dict[str, str]], rep: Report) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top {rep.top} tags (decisions: {rep.threshold_source})", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("duration", justify="right")
    table.add_column("top tags")
    table.add_column("decisions", overflow="fold")
    for rec in records:
        top = "\n".join(f"{t['tag']} {t['probability']:.3f}" for t in rec["top"])
        table.add_row(rec["path"], f"{rec['duration_s']:.1f} s", top, ", ".join(rec["decisions"]) or "-")
    for e in errors:
        table.add_row(e["path"], "", f"[red]failed[/red]: {e['error']}", "")
    buf = io.StringIO()
    width = max(100, Console().width) if sys.stdout.isatty() else 160
    Console(file=buf, width=width, force_terminal=False, soft_wrap=False).print(table)
    return buf.getvalue()


def _plot_names(files: Sequence[Path]) -> dict[Path, str]:
    """A distinct, readable file name stem per input file (its path below their common folder)."""
    if not files:
        return {}
    resolved = [f.resolve() for f in files]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    return {f: str(r.relative_to(root)).replace(os.sep, "__") for f, r in zip(files, resolved)}


OOM_FIX = "lower --batch-size (windows per forward pass), or use --device cpu"


def run_predict(args: argparse.Namespace) -> int:
    """Tag every input; 0 when all were tagged, 1 when some failed, 2 for a usage error."""
    from rich.console import Console

    from .allocator import keep_freed_memory
    from .memory import OutOfMemory, out_of_memory, release_device_memory
    from .tagger import CheckpointError, ensemble_thresholds, load_models, resolve_device

    err = Console(stderr=True)
    if not args.low_memory:  # chunk after chunk would page-fault the network's buffers back in: 2.1x slower on CPU
        keep_freed_memory()

    def usage(msg: str) -> int:
        print(f"freqtag predict: error: {msg}", file=sys.stderr)
        return 2

    split_checkpoints(args)
    if not args.inputs:
        return usage("no INPUT given: name audio files, folders or globs after the checkpoints")
    if args.top < 1:
        return usage(f"--top {args.top}: must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        return usage(f"--batch-size {args.batch_size}: must be at least 1 window")
    try:
        fixed = _threshold(args.threshold)
    except ValueError as e:
        return usage(str(e))
    fmt = _output_format(args)
    if args.windows and fmt not in ("json", "jsonl"):
        return usage(f"--windows needs --format json or jsonl (the output format is {fmt})")
    try:
        device = resolve_device(args.device)
        with out_of_memory(f"the model{'s' if len(args.ckpt) > 1 else ''} on {device}", OOM_FIX):
            models = load_models(args.ckpt, device)
        if fixed is None:
            thresholds, source = ensemble_thresholds(models)
        else:
            thresholds, source = np.full(len(models[0].tags), fixed), f"threshold {fixed:g}"
    except OutOfMemory as e:
        print(f"freqtag predict: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, OSError) as e:
        return usage(str(e))

    from .jamendo import short_tag

    files, failed = expand_inputs(args.inputs)
    rep = Report(tags=[short_tag(t) for t in models[0].tags], top=min(args.top, len(models[0].tags)),
                 thresholds=thresholds, threshold_source=source, models=models, with_windows=args.windows)
    names = _plot_names(files)
    results: list[FileResult] = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    show = not args.no_progress and len(files) > 1 and err.is_terminal
    with Progress(TextColumn("tagging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.description}"), console=err, disable=not show, transient=True) as progress:
        task = progress.add_task("", total=len(files))
        for f in files:
            progress.update(task, description=f.name)
            try:
                with out_of_memory(f"tagging on {device}", OOM_FIX):
                    r = tag_file(f, models, args.batch_size)
            except (AudioError, OutOfMemory) as e:
                reason = e.reason if isinstance(e, AudioError) else str(e)
                failed.append((str(f), reason))
                progress.console.print(f"[yellow]skipped[/yellow] {f}: {reason}")
                if isinstance(e, OutOfMemory):
                    release_device_memory()
            else:
                if args.plot is not None:
                    from .taggram import plot_file

                    r.plots = plot_file(r, models, rep.tags, thresholds, args.plot / names[f], top=rep.top)
                results.append(r)
            progress.advance(task)

    text = render(results, failed, rep, fmt)
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}: {len(results)} files tagged ({fmt})", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if failed:
        print(f"freqtag predict: {len(results)} files tagged, {len(failed)} failed:", file=sys.stderr)
        for p, reason in failed:
            print(f"  {p}: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python predict.py ...``: the same options as ``freqtag predict``."""
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Tag audio files with trained freqtag checkpoints (see `freqtag predict --help`).",
    )
    add_predict_arguments(parser)
    args = parser.parse_args(argv)
    from .quiet import quiet_third_party

    quiet_third_party()
    try:
        return run_predict(args)
    except KeyboardInterrupt:
        print("predict.py: interrupted", file=sys.stderr)
        return 130
