"""`freqtag predict`'s outputs: one record per file as JSON, JSONL, CSV or a table, and plot names.

Failed files are part of every output (an ``error`` field, column or row), so
a caller reading the output alone knows what was not tagged.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["FORMATS", "FileResult", "Report", "render", "output_format", "plot_names"]

FORMATS = ("table", "json", "jsonl", "csv")
_EXT_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "table"}


@dataclass
class FileResult:
    """One file through every model: per-model window outputs and their average.

    ``windows[m]`` is (W_m, n_tags) window probabilities for predict, or
    (W, D) layer activations for embed; ``probs`` is the mean over models of
    each model's mean over its windows.
    """

    path: Path
    duration_s: float
    probs: np.ndarray
    windows: list[np.ndarray]
    passes: int = 1
    plots: list[Path] = field(default_factory=list)


@dataclass
class Report:
    """What the output writers need besides the results."""

    tags: list[str]  # display names
    top: int
    thresholds: np.ndarray
    threshold_source: str
    models: list[Any]
    with_windows: bool


def output_format(args: argparse.Namespace) -> str:
    """``--format``, else from ``--out``'s extension, else a table on a terminal and JSON when piped."""
    if args.format:
        return args.format
    if args.out is not None:
        return _EXT_FORMAT.get(args.out.suffix.lower(), "json")
    return "table" if sys.stdout.isatty() else "json"


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
                "checkpoint": m.source or str(m.path),
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


def plot_names(files: Sequence[Path]) -> dict[Path, str]:
    """A distinct, readable file name stem per input file (its path below their common folder)."""
    if not files:
        return {}
    resolved = [f.resolve() for f in files]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    return {f: str(r.relative_to(root)).replace(os.sep, "__") for f, r in zip(files, resolved)}
