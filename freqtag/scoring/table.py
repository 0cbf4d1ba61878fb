"""The ensemble table: for every varying override value the runs' averaged probabilities, scored; its outputs.

Averaging probabilities (not scores) is how the paper built Table 2 and its
submission. Written as table.md (the paper's layout), table.csv, table.png and
per_tag.csv.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freqtag.runs import SPLITS
from freqtag.scoring.selection import Run, value_of
from freqtag.system.atomic import atomic_path
from freqtag.train.overrides import WHERE

__all__ = ["COLUMNS", "Row", "varying_keys", "mean_probs", "table_rows", "table_markdown", "table_csv", "per_tag_csv",
           "plot_table"]

COLUMNS = ("validation_pr_auc", "validation_roc_auc", "test_pr_auc", "test_roc_auc")


@dataclass(frozen=True)
class Row:
    """One line of the table: the average of ``runs`` runs, scored."""

    label: str
    key: str | None  # the override key of a factor row; None for ensemble/group rows
    runs: int
    scores: dict[str, float]  # COLUMNS -> value


def varying_keys(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Override keys whose value differs between runs -> their values, both in order of first appearance."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides if not k.startswith(WHERE)))
    out: dict[str, list[str]] = {}
    for key in keys:
        values = list(dict.fromkeys(value_of(r, key) for r in runs))
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
            members = [r for r in runs if value_of(r, key) == value]
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
