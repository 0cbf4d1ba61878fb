"""`freqtag predict` / `python predict.py`: tag audio files with one checkpoint or an ensemble.

Per file: decode once (in this process in blocks, or in feature workers:
:mod:`freqtag.tag.runner`), give every model the features its checkpoint names,
score the whole track in chunks of windows (:mod:`freqtag.tag.models`: the same
probabilities as training's whole-track evaluation), average the window
probabilities per model and then over the models. Unreadable files are
reported and skipped (exit status 1); the rest are still tagged. Inputs are
:mod:`freqtag.tag.inputs`, outputs :mod:`freqtag.tag.formats`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from freqtag.system.atomic import atomic_write_text
from freqtag.system.exits import usage
from freqtag.tag.commands import add_run_arguments, decision_thresholds, load_for_run, report_failed, run_files
from freqtag.tag.formats import FORMATS, FileResult, Report, output_format, plot_names, render
from freqtag.tag.inputs import expand_inputs, split_checkpoints
from freqtag.tag.runner import OOM_FIX, tag_file

__all__ = [
    "add_predict_arguments",
    "parse_threshold",
    "run_predict",
    "main",
    "expand_inputs",
    "split_checkpoints",
    "tag_file",
    "FileResult",
    "Report",
    "render",
    "FORMATS",
    "OOM_FIX",
]


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    """``freqtag predict``'s options (``python predict.py`` takes the same)."""
    p.description = (
        "Tag audio files: the top tags, all 56 probabilities and the decisions per file, as a table, JSON, JSONL or "
        "CSV, optionally with taggram plots. Exit status: 0 all files tagged, 1 some failed (reported, the others "
        "tagged), 2 usage error."
    )
    add_run_arguments(p, ensemble=True)
    p.add_argument("--top", type=int, default=5, help="tags listed per file (default: 5)")
    p.add_argument("--threshold", default="auto",
                   help="'auto' (per-tag thresholds chosen on validation by training, default) or a probability")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from --out's extension, else table on a terminal, json otherwise)")
    p.add_argument("--out", type=Path, default=None, help="write the output here (atomically) instead of stdout")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="write a taggram and a bar chart (PNG) per file into DIR")
    p.add_argument("--windows", action="store_true", help="include per-window probabilities (json/jsonl only)")


def parse_threshold(value: str) -> float | None:
    """``--threshold``: None for auto, else the probability; ValueError says what is wrong."""
    if value == "auto":
        return None
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"--threshold {value}: use auto or a probability between 0 and 1") from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"--threshold {value}: a probability must be between 0 and 1")
    return t


def run_predict(args: argparse.Namespace) -> int:
    """Tag every input; 0 when all were tagged, 1 when some failed, 2 for a usage error."""
    if args.top < 1:
        return usage(f"--top {args.top}: must be at least 1", "predict")
    try:
        fixed = parse_threshold(args.threshold)
    except ValueError as e:
        return usage(str(e), "predict")
    fmt = output_format(args)
    if args.windows and fmt not in ("json", "jsonl"):
        return usage(f"--windows needs --format json or jsonl (the output format is {fmt})", "predict")
    models = load_for_run(args, "predict")
    if isinstance(models, int):
        return models
    chosen = decision_thresholds(models, fixed, "predict")
    if isinstance(chosen, int):
        return chosen
    thresholds, source = chosen

    from freqtag.data.jamendo import short_tag

    files, failed = expand_inputs(args.inputs)
    rep = Report(tags=[short_tag(t) for t in models[0].tags], top=min(args.top, len(models[0].tags)),
                 thresholds=thresholds, threshold_source=source, models=models, with_windows=args.windows)
    names = plot_names(files)
    results: list[FileResult] = []

    def keep(r: FileResult) -> None:
        if args.plot is not None:
            from freqtag.tag.taggram import plot_file

            r.plots = plot_file(r, models, rep.tags, thresholds, args.plot / names[r.path], top=rep.top)
        results.append(r)

    run_files(args, models, files, failed, keep, "predict")
    text = render(results, failed, rep, fmt)
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}: {len(results)} files tagged ({fmt})", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return report_failed("predict", len(results), failed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python predict.py ...``: the same options as ``freqtag predict``."""
    parser = argparse.ArgumentParser(prog="predict.py")
    add_predict_arguments(parser)
    parser.description = "Tag audio files with trained freqtag checkpoints (see `freqtag predict --help`)."
    args = parser.parse_args(argv)
    from freqtag.system.quiet import quiet_third_party

    quiet_third_party()
    try:
        return run_predict(args)
    except KeyboardInterrupt:
        print("predict.py: interrupted", file=sys.stderr)
        return 130
