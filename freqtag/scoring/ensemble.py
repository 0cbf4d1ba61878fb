"""Ensembles of finished runs: the paper's Table 2, per-tag scores, and the MediaEval submission.

A run is any directory holding ``predictions/{validation,test}.npz`` and
``.hydra/overrides.yaml`` (the run layout of DESIGN.md), wherever it was
trained; only those files are read. For every override key whose value
differs between the runs, and every value of it, the probabilities of the
runs with that value are averaged and the average is scored; the
``ensemble`` row averages all runs. Averaging probabilities (not scores) is
how the paper built Table 2 and its submission.

Runs are ensembled only when they predict the same thing: the same track ids
in the same order, the same tag list and the same targets on both splits;
otherwise the ensemble refuses and says which runs differ and how.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freqtag.runs import SPLITS, Predictions, RunFileError, predictions_path, read_predictions
from freqtag.scoring.submission import write_submission
from freqtag.system.atomic import atomic_path, atomic_write_text
from freqtag.train.overrides import WHERE

__all__ = [
    "SPLITS",
    "COLUMNS",
    "EnsembleError",
    "Predictions",
    "Run",
    "Row",
    "find_runs",
    "read_overrides",
    "load_run",
    "parse_selection",
    "select_runs",
    "check_same_data",
    "varying_keys",
    "mean_probs",
    "table_rows",
    "build_ensemble",
    "EnsembleResult",
    "add_ensemble_arguments",
    "run_ensemble",
]

COLUMNS = ("validation_pr_auc", "validation_roc_auc", "test_pr_auc", "test_roc_auc")
OVERRIDES = Path(".hydra") / "overrides.yaml"
UNSET = "(default)"  # the value of a key that a run did not override
SHOWN = 5  # differing runs named in a refusal


class EnsembleError(ValueError):
    """Runs that cannot be ensembled as asked (names the runs, what is wrong and the fix)."""


@dataclass(frozen=True)
class Run:
    path: Path
    overrides: dict[str, str]  # key -> value, in the order of overrides.yaml
    predictions: dict[str, Predictions] = field(repr=False)

    @property
    def name(self) -> str:
        return _display(self.path)


@dataclass(frozen=True)
class Row:
    """One line of the table: the average of ``runs`` runs, scored."""

    label: str
    key: str | None  # the override key of a factor row; None for ensemble/group rows
    runs: int
    scores: dict[str, float]  # COLUMNS -> value


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _natural(path: Path) -> list[object]:
    """Sort key: sweep job folders 0, 1, ..., 10 in numeric order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def _is_run(folder: Path) -> bool:
    return (folder / OVERRIDES).is_file()


def _complete(folder: Path) -> bool:
    return all(predictions_path(folder, s).is_file() for s in SPLITS)


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(complete runs, unfinished runs) under ``paths``: each a run directory or a folder of them (a sweep)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise EnsembleError(f"{p} does not exist: give sweep directories (multirun/<date>/<time>) or run directories")
        if not p.is_dir():
            raise EnsembleError(f"{p} is not a directory: give sweep directories or run directories")
        here = [p] if _is_run(p) else sorted((o.parent.parent for o in p.rglob(str(OVERRIDES))), key=_natural)
        if not here:
            raise EnsembleError(
                f"{p} holds no run: a run is a directory with {OVERRIDES} and predictions/ (see DESIGN.md, run directory)"
            )
        found.extend(here)
    unique = list(dict.fromkeys(r.resolve() for r in found))
    return [r for r in unique if _complete(r)], [r for r in unique if not _complete(r)]


def read_overrides(run: Path) -> dict[str, str]:
    """The run's overrides as key -> value, parsed with Hydra's own override grammar."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    path = run / OVERRIDES
    try:
        lines = yaml.safe_load(path.read_text()) or []
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise ValueError("not a list of KEY=VALUE strings")
        parsed = OverridesParser.create().parse_overrides(lines)
    except (yaml.YAMLError, ValueError, HydraException) as e:
        raise EnsembleError(f"{path}: not a Hydra overrides list ({str(e).splitlines()[0]})") from None
    out: dict[str, str] = {}
    for o in parsed:
        key = o.key_or_group + (f"@{o.package}" if o.package else "")
        out[key] = "(deleted)" if o.is_delete() else o.get_value_element_as_str()
    return out


def _load_split(path: Path) -> Predictions:
    try:
        return read_predictions(path)
    except RunFileError as e:
        raise EnsembleError(str(e)) from None


def load_run(path: Path) -> Run:
    return Run(
        path=path,
        overrides=read_overrides(path),
        predictions={s: _load_split(predictions_path(path, s)) for s in SPLITS},
    )


def parse_selection(text: str) -> dict[str, set[str]]:
    """``"model=freq_dep,features=mel128"`` -> {model: {freq_dep}, features: {mel128}}; a repeated key means any of its values."""
    out: dict[str, set[str]] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise EnsembleError(f"selection {text!r}: {part!r} is not KEY=VALUE (e.g. model=freq_dep,features=mel128)")
        out.setdefault(key.strip(), set()).add(value.strip())
    if not out:
        raise EnsembleError(f"selection {text!r} is empty: give KEY=VALUE,... (e.g. model=freq_dep)")
    return out


def _value(run: Run, key: str) -> str:
    return run.overrides.get(key, UNSET)


def select_runs(runs: Sequence[Run], selection: dict[str, set[str]], what: str = "--select") -> list[Run]:
    """The runs whose overrides match every KEY of ``selection`` with one of its values; refuses a selection matching none."""
    for key, values in selection.items():
        present = sorted({_value(r, key) for r in runs})
        if all(v == UNSET for v in present):
            keys = sorted({k for r in runs for k in r.overrides})
            raise EnsembleError(f"{what}: no run overrides {key!r}; their override keys are: {', '.join(keys) or 'none'}")
        unknown = sorted(values - set(present))
        if unknown:
            raise EnsembleError(f"{what}: no run has {key}={'/'.join(unknown)}; the runs have {key}={', '.join(present)}")
    chosen = [r for r in runs if all(_value(r, k) in v for k, v in selection.items())]
    if not chosen:
        wanted = ",".join(f"{k}={v}" for k, vs in selection.items() for v in sorted(vs))
        raise EnsembleError(f"{what} {wanted}: no run has all of these values together")
    return chosen


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"{a.shape[0]} vs {b.shape[0]} rows"
    rows = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))
    return f"{rows.size} rows differ, first row {rows[0]}"


def check_same_data(runs: Sequence[Run]) -> None:
    """Refuse runs whose track ids, tag lists or targets differ from the first run's, on either split."""
    ref = runs[0]
    problems: list[str] = []
    for run in runs[1:]:
        diffs = []
        for split in SPLITS:
            a, b = ref.predictions[split], run.predictions[split]
            for what, x, y in (("track ids", a.track_ids, b.track_ids), ("tag list", a.tags, b.tags),
                               ("targets", a.targets, b.targets)):  # fmt: skip
                if x.shape != y.shape or not np.array_equal(x, y):
                    diffs.append(f"{split} {what} ({_first_difference(y, x)})")
                    break  # the first difference of a split says enough
        if diffs:
            problems.append(f"{run.name} vs {ref.name}: {'; '.join(diffs)}")
    if problems:
        more = f"; and {len(problems) - SHOWN} more runs" if len(problems) > SHOWN else ""
        raise EnsembleError(
            f"cannot ensemble runs that predict different data: {' | '.join(problems[:SHOWN])}{more}. "
            f"Ensemble only runs made with the same split files and tag list (data.splits_dir, data.tags_file), "
            f"or leave the odd runs out"
        )


def varying_keys(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Override keys whose value differs between runs -> their values, both in order of first appearance."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides if not k.startswith(WHERE)))
    out: dict[str, list[str]] = {}
    for key in keys:
        values = list(dict.fromkeys(_value(r, key) for r in runs))
        if len(values) > 1:
            out[key] = values
    return out


def mean_probs(runs: Sequence[Run], split: str) -> np.ndarray:
    """The float64 average of the runs' probabilities."""
    return np.mean([r.predictions[split].probs for r in runs], axis=0, dtype=np.float64)


def _score(probs: dict[str, np.ndarray], ref: Run) -> dict[str, float]:
    from freqtag.metrics import tagging_scores

    out: dict[str, float] = {}
    for split in SPLITS:
        p = ref.predictions[split]
        s = tagging_scores(probs[split], p.targets, [str(t) for t in p.tags])
        out[f"{split}_pr_auc"], out[f"{split}_roc_auc"] = s["pr_auc"], s["roc_auc"]
    return out


def _group_mean(groups: Sequence[Sequence[Run]], split: str) -> np.ndarray:
    return np.mean([mean_probs(g, split) for g in groups], axis=0)


def table_rows(
    runs: Sequence[Run], groups: Sequence[tuple[str, Sequence[Run]]] = ()
) -> tuple[list[Row], dict[str, np.ndarray]]:
    """The table's rows, and the probabilities of the final ensemble per split.

    Rows: one per value of every varying key, then ``ensemble`` (all runs);
    with groups, one row per group and ``groups``, the mean of the group means,
    which is then the final ensemble (the original submission's construction).
    """
    ref = runs[0]
    rows: list[Row] = []
    for key, values in varying_keys(runs).items():
        for value in values:
            members = [r for r in runs if _value(r, key) == value]
            rows.append(Row(f"{key}={value}", key, len(members), _score({s: mean_probs(members, s) for s in SPLITS}, ref)))
    final = {s: mean_probs(runs, s) for s in SPLITS}
    rows.append(Row("ensemble", None, len(runs), _score(final, ref)))
    if groups:
        for label, members in groups:
            rows.append(Row(f"group {label}", None, len(members), _score({s: mean_probs(members, s) for s in SPLITS}, ref)))
        final = {s: _group_mean([m for _, m in groups], s) for s in SPLITS}
        n = len({id(r) for _, m in groups for r in m})
        rows.append(Row("groups", None, n, _score(final, ref)))
    return rows, final


# --------------------------------------------------------------------- outputs

HEADINGS = ("val PR-AUC", "val ROC-AUC", "test PR-AUC", "test ROC-AUC")


def table_markdown(rows: Sequence[Row]) -> str:
    """The paper's Table 2 layout, 4 decimals; in each column the best of the rows of one key is bold."""
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.key is not None:
            for c in COLUMNS:
                best[r.key, c] = max(best.get((r.key, c), -np.inf), round(r.scores[c], 4))
    lines = ["| row | runs | " + " | ".join(HEADINGS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            text = f"{r.scores[c]:.4f}"
            cells.append(f"**{text}**" if r.key is not None and round(r.scores[c], 4) == best[r.key, c] else text)
        lines.append(f"| {r.label} | {r.runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("row", "runs", *COLUMNS))
    for r in rows:
        w.writerow((r.label, r.runs, *(repr(r.scores[c]) for c in COLUMNS)))
    return buf.getvalue()


def per_tag_csv(final: dict[str, np.ndarray], ref: Run) -> str:
    """Per-tag PR-AUC and ROC-AUC of the final ensemble on both splits, with each split's positives."""
    from freqtag.metrics import per_tag_scores

    tags = [str(t) for t in ref.predictions["test"].tags]
    scores = {s: per_tag_scores(final[s], ref.predictions[s].targets, tags) for s in SPLITS}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("tag", *COLUMNS, "validation_positives", "test_positives"))
    for j, tag in enumerate(tags):
        w.writerow((tag, *(repr(float(scores[s][m][j])) for s in SPLITS for m in ("pr_auc", "roc_auc")),
                    *(int(ref.predictions[s].targets[:, j].sum()) for s in SPLITS)))  # fmt: skip
    return buf.getvalue()


def plot_table(rows: Sequence[Row], path: Path) -> None:
    """Dots per row, one panel per metric, validation and test side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.arange(len(rows))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, metric, title in zip(axes, ("pr_auc", "roc_auc"), ("PR-AUC (macro)", "ROC-AUC (macro)")):
        for split, marker, color in (("validation", "o", "tab:blue"), ("test", "s", "tab:orange")):
            ax.scatter([r.scores[f"{split}_{metric}"] for r in rows], y, marker=marker, color=color, label=split, zorder=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.4)
        ax.grid(axis="y", alpha=0.15)
    axes[0].set_yticks(y, [f"{r.label} ({r.runs})" for r in rows])
    axes[1].legend(loc="lower right", fontsize="small")
    fig.suptitle("Ensembles of runs: average probabilities, scored (runs in parentheses)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class EnsembleResult:
    runs: list[Run]
    rows: list[Row]
    results: dict[str, float]  # the submission's results.tsv figures (test)
    out: Path


def build_ensemble(
    paths: Sequence[str | Path],
    out: str | Path,
    select: str | None = None,
    groups: Sequence[str] = (),
    skip_unfinished: bool = False,
) -> EnsembleResult:
    """Find, check and ensemble the runs under ``paths``; write table.md/.csv/.png, per_tag.csv and submission/."""
    complete, unfinished = find_runs(paths)
    if unfinished and not skip_unfinished:
        names = ", ".join(_display(p) for p in unfinished[:SHOWN]) + (" ..." if len(unfinished) > SHOWN else "")
        raise EnsembleError(
            f"{len(unfinished)} run(s) have no predictions/validation.npz and test.npz (unfinished or failed): {names}; "
            f"finish them (resume with ckpt_path=<run>/checkpoints/last.ckpt) or pass --skip-unfinished"
        )
    if unfinished:
        print(f"skipping {len(unfinished)} unfinished run(s): {', '.join(_display(p) for p in unfinished)}", file=sys.stderr)
    if not complete:
        raise EnsembleError(f"no finished run under {', '.join(map(str, paths))}")
    runs = [load_run(p) for p in complete]
    if select:
        runs = select_runs(runs, parse_selection(select))
    check_same_data(runs)
    chosen_groups = [(g, select_runs(runs, parse_selection(g), what=f"--groups {g}")) for g in groups]
    rows, final = table_rows(runs, chosen_groups)

    out = Path(out)
    ref = runs[0]
    atomic_write_text(out / "table.md", table_markdown(rows))
    atomic_write_text(out / "table.csv", table_csv(rows))
    plot_table(rows, out / "table.png")
    atomic_write_text(out / "per_tag.csv", per_tag_csv(final, ref))
    tags = [str(t) for t in ref.predictions["test"].tags]
    results = write_submission(
        out / "submission", tags,
        final["validation"], ref.predictions["validation"].targets,
        final["test"], ref.predictions["test"].targets,
    )  # fmt: skip
    return EnsembleResult(runs=runs, rows=rows, results=results, out=out)


# ------------------------------------------------------------------------- CLI


def add_ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "For every override key whose value differs between the runs, and every value of it, average the "
        "probabilities of the runs with that value and score the average on validation and test; the ensemble row "
        "averages all runs. Writes table.md, table.csv, table.png, per_tag.csv and submission/ (predictions.npy, "
        "decisions.npy, thresholds.tsv, results.tsv; thresholds maximise each tag's F-score on validation and are "
        "applied to test)."
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a sweep directory or run directories")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: ensemble/ in the first PATH)")
    p.add_argument("--select", default=None, metavar="KEY=VALUE,...",
                   help="only the runs with these override values, e.g. model=freq_dep,features=mel128 "
                   "(a key given twice means either value)")  # fmt: skip
    p.add_argument("--groups", nargs="+", default=(), metavar="KEY=VALUE,...",
                   help="make the final ensemble the mean of these groups' means, e.g. --groups "
                   "model=convs,features=mel96 model=freq_dep,features=mel128 (the original submission)")  # fmt: skip
    p.add_argument("--skip-unfinished", action="store_true", help="leave out runs without predictions (listed on stderr)")
    p.add_argument("--wandb", action="store_true",
                   help="also log the table (a wandb.Table), the plot and the submission figures to W&B, in the runs' "
                   "group (WANDB_MODE=offline/disabled are honoured)")  # fmt: skip
    p.add_argument("--wandb-project", default="freqtag", help="W&B project (default: freqtag, as logger=wandb)")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (default: yours)")
    p.add_argument("--wandb-group", default=None,
                   help="W&B group (default: the sweep the runs were trained in, as logger=wandb named it)")  # fmt: skip


def run_ensemble(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else args.paths[0] / "ensemble"
    result = build_ensemble(args.paths, out, select=args.select, groups=args.groups, skip_unfinished=args.skip_unfinished)
    print(f"{len(result.runs)} runs")
    print(table_markdown(result.rows), end="")
    print("submission (test; thresholds from validation):")
    for k, v in result.results.items():
        print(f"  {k:16s} {v:.6f}")
    print(f"wrote {out}/: table.md, table.csv, table.png, per_tag.csv, submission/")
    if args.wandb:
        from freqtag.train.loggers import group_of, log_ensemble, run_group

        groups = {run_group(r.path) for r in result.runs}
        group = args.wandb_group or (groups.pop() if len(groups) == 1 and None not in groups else None)
        if group is None and len(args.paths) == 1 and not _is_run(args.paths[0]):
            group = group_of(args.paths[0].resolve())  # a sweep folder given by hand
        run_id = log_ensemble(out / "table.csv", out / "table.png", result.results, [r.name for r in result.runs],
                              project=args.wandb_project, entity=args.wandb_entity, group=group)
        print(f"logged to W&B: project {args.wandb_project}, group {group or '(none)'}, run {run_id}")
    return 0
