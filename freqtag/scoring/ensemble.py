"""`freqtag ensemble`: ensembles of finished runs, the paper's Table 2, per-tag scores, the MediaEval submission.

For every override key whose value differs between the runs, and every value
of it, the probabilities of the runs with that value are averaged and the
average is scored; the ``ensemble`` row averages all runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from freqtag.scoring.selection import (
    SHOWN,
    EnsembleError,
    Run,
    check_same_data,
    display,
    find_runs,
    is_run,
    load_run,
    parse_selection,
    select_runs,
)
from freqtag.scoring.submission import write_submission
from freqtag.scoring.table import Row, per_tag_csv, plot_table, table_csv, table_markdown, table_rows
from freqtag.system.atomic import atomic_write_text

__all__ = ["EnsembleResult", "build_ensemble", "add_ensemble_arguments", "run_ensemble"]


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
        names = ", ".join(display(p) for p in unfinished[:SHOWN]) + (" ..." if len(unfinished) > SHOWN else "")
        raise EnsembleError(
            f"{len(unfinished)} run(s) have no predictions/validation.npz and test.npz (unfinished or failed): {names}; "
            f"finish them (resume with ckpt_path=<run>/checkpoints/last.ckpt) or pass --skip-unfinished"
        )
    if unfinished:
        print(f"skipping {len(unfinished)} unfinished run(s): {', '.join(display(p) for p in unfinished)}", file=sys.stderr)
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
        if group is None and len(args.paths) == 1 and not is_run(args.paths[0]):
            group = group_of(args.paths[0].resolve())  # a sweep folder given by hand
        run_id = log_ensemble(out / "table.csv", out / "table.png", result.results, [r.name for r in result.runs],
                              project=args.wandb_project, entity=args.wandb_entity, group=group)
        print(f"logged to W&B: project {args.wandb_project}, group {group or '(none)'}, run {run_id}")
    return 0
