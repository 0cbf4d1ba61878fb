"""The MediaEval submission format: predictions/decisions matrices, thresholds, results.tsv, and `freqtag evaluate`.

MediaEval's files, as the task's evaluation script reads and writes them:
``predictions.npy`` (float64, tracks x tags, rows in split-TSV order, columns
in tag-list order), ``decisions.npy`` (bool, same shape), and ``results.tsv``:
one ``metric<TAB>value`` line per metric with 6 decimals, in the order
ROC-AUC, PR-AUC, precision, recall, F-score, macro first, then micro.

Decisions are ``probs >= threshold`` with one threshold per tag, chosen to
maximise the tag's F-score on *validation* and applied to test. (The original
submission chose them on the test ground truth, an oracle.)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from freqtag import runs
from freqtag.system.atomic import atomic_path, atomic_write_text

__all__ = [
    "RESULT_METRICS",
    "SubmissionError",
    "mediaeval_results",
    "format_results",
    "read_thresholds",
    "write_submission",
    "load_predictions",
    "load_ground_truth",
    "add_evaluate_arguments",
    "run_evaluate",
]

# the official evaluation script's names and order
RESULT_METRICS = (
    "ROC-AUC-macro", "PR-AUC-macro", "precision-macro", "recall-macro", "F-score-macro",
    "ROC-AUC-micro", "PR-AUC-micro", "precision-micro", "recall-micro", "F-score-micro",
)  # fmt: skip


class SubmissionError(ValueError):
    """A predictions, ground-truth or thresholds file that cannot be used as given (names it and the fix)."""


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def mediaeval_results(
    probs: np.ndarray, targets: np.ndarray, decisions: np.ndarray | None = None, tags: Sequence[str] | None = None
) -> dict[str, float]:
    """The official metrics (scikit-learn's definitions) in the official order; without decisions, the AUCs only."""
    from freqtag.metrics import decision_scores, tagging_scores

    scores = tagging_scores(probs, targets, tags)
    out = {
        "ROC-AUC-macro": scores["roc_auc"], "PR-AUC-macro": scores["pr_auc"],
        "ROC-AUC-micro": scores["roc_auc_micro"], "PR-AUC-micro": scores["pr_auc_micro"],
    }  # fmt: skip
    if decisions is not None:
        if decisions.shape != probs.shape:
            raise SubmissionError(f"decisions {decisions.shape} and predictions {probs.shape} differ in shape")
        # decisions as 0/1 scores with threshold 0.5 are exactly the decisions
        d = decision_scores(decisions.astype(np.float64), targets, np.full(probs.shape[1], 0.5))
        out |= {
            "precision-macro": d["precision"], "recall-macro": d["recall"], "F-score-macro": d["f1"],
            "precision-micro": d["precision_micro"], "recall-micro": d["recall_micro"], "F-score-micro": d["f1_micro"],
        }  # fmt: skip
    return {k: out[k] for k in RESULT_METRICS if k in out}


def format_results(results: dict[str, float]) -> str:
    """``metric<TAB>value`` lines, 6 decimals (the official results.tsv)."""
    return "".join(f"{k}\t{v:.6f}\n" for k, v in results.items())


def read_thresholds(path: str | Path, tags: Sequence[str] | None = None) -> np.ndarray:
    """Per-tag thresholds from a ``tag<TAB>threshold`` file listing exactly ``tags`` (in their order when given)."""
    try:
        return runs.read_thresholds(path, tags)
    except runs.RunFileError as e:
        raise SubmissionError(str(e)) from None


def write_submission(
    out: Path,
    tags: Sequence[str],
    validation_probs: np.ndarray,
    validation_targets: np.ndarray,
    test_probs: np.ndarray,
    test_targets: np.ndarray,
) -> dict[str, float]:
    """Write predictions.npy, decisions.npy, thresholds.tsv and results.tsv for the test split; return the results.

    Thresholds maximise each tag's F-score on validation; test decisions are ``test_probs >= threshold``.
    """
    from freqtag.metrics import best_f1_thresholds

    thresholds = best_f1_thresholds(validation_probs, validation_targets, tags)
    predictions = np.asarray(test_probs, dtype=np.float64)
    decisions = predictions >= thresholds
    results = mediaeval_results(predictions, test_targets, decisions, tags)
    atomic_save_npy(out / "predictions.npy", predictions)
    atomic_save_npy(out / "decisions.npy", decisions)
    runs.write_thresholds(out / "thresholds.tsv", tags, thresholds)
    atomic_write_text(out / "results.tsv", format_results(results))
    return results


# ------------------------------------------------------------------ evaluate


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SubmissionError(f"{path}: not a readable .npy {what} matrix ({e})") from None
    if not isinstance(data, np.ndarray):  # an .npz archive
        data.close()
        raise SubmissionError(f"{path}: not a readable .npy {what} matrix (it is an .npz archive)")
    return data


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """``probs`` (float64 N x C) from our predictions .npz (with ``tags``, ``track_ids``, ``targets``) or a MediaEval .npy."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"predictions file {path} does not exist")
    if path.suffix == ".npz":
        try:
            p = runs.read_predictions(path)
        except runs.RunFileError as e:
            raise SubmissionError(str(e)) from None
        data = {"probs": p.probs, "targets": p.targets, "tags": p.tags, "track_ids": p.track_ids}
    else:
        data = {"probs": _load_npy(path, "predictions")}
    probs = data["probs"]
    if probs.ndim != 2 or not np.issubdtype(probs.dtype, np.floating):
        raise SubmissionError(f"{path}: predictions must be a float (tracks x tags) matrix, got {probs.dtype} {probs.shape}")
    data["probs"] = probs.astype(np.float64)
    return data


def load_ground_truth(path: str | Path, tags_file: str | Path | None = None) -> dict[str, np.ndarray]:
    """``targets`` (uint8 N x C) from a ground-truth .npy; with ``track_ids`` and ``tags`` from a split TSV or our .npz."""
    from freqtag.data.jamendo import read_split, task_of, task_tags

    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"ground-truth file {path} does not exist")
    if path.suffix == ".npy":
        gt = _load_npy(path, "ground-truth")
        if gt.ndim != 2 or not np.isin(gt, (0, 1)).all():
            raise SubmissionError(f"{path}: ground truth must be a 0/1 (tracks x tags) matrix, got {gt.dtype} {gt.shape}")
        return {"targets": gt.astype(np.uint8)}
    if path.suffix == ".npz":  # another predictions file of ours: its targets
        data = load_predictions(path)
        return {k: data[k] for k in ("targets", "track_ids", "tags")}
    if path.suffix != ".tsv":
        raise SubmissionError(f"ground truth {path}: expected a 0/1 .npy matrix, a split .tsv or a predictions .npz")
    tags = task_tags(path.parent, task_of(path), tags_file)[0]
    split = read_split(path, tags)
    return {"targets": split.labels, "track_ids": np.array(split.track_ids, dtype=str), "tags": np.array(tags, dtype=str)}


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Score predictions with the MediaEval metrics: macro and micro ROC-AUC and PR-AUC, and with decisions "
        "(--decisions, or --thresholds applied as probs >= threshold) precision, recall and F-score. PREDICTIONS is "
        "a run's predictions/<split>.npz or a MediaEval predictions.npy (rows in split-TSV order); GROUNDTRUTH is a "
        "0/1 .npy or the split TSV (optional for an .npz, which holds its targets)."
    )
    p.add_argument("predictions", type=Path, help="predictions .npz (ours) or .npy (MediaEval, float tracks x tags)")
    p.add_argument("groundtruth", type=Path, nargs="?", default=None, help="ground truth: a 0/1 .npy or a split TSV")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--decisions", type=Path, help="a MediaEval decisions.npy (bool tracks x tags)")
    how.add_argument("--thresholds", type=Path, help="per-tag thresholds, tag<TAB>threshold (a run's checkpoints/thresholds.tsv)")
    p.add_argument("--tags", type=Path, default=None,
                   help="tag list for a TSV ground truth (default: MTG's list for the TSV's task found beside it, "
                   "else the task's TSVs' own tags)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="also write the lines to this results.tsv")


def run_evaluate(args: argparse.Namespace) -> int:
    pred = load_predictions(args.predictions)
    probs = pred["probs"]
    if args.groundtruth is None:
        if "targets" not in pred:
            raise SubmissionError(f"{args.predictions} holds no targets: give GROUNDTRUTH (a 0/1 .npy or the split TSV)")
        truth = {"targets": pred["targets"]}
    else:
        truth = load_ground_truth(args.groundtruth, args.tags)
    targets = truth["targets"]
    source = args.groundtruth or args.predictions
    if targets.shape != probs.shape:
        raise SubmissionError(
            f"predictions {args.predictions} are {probs.shape} but the ground truth {source} is {targets.shape} "
            f"(tracks x tags): score predictions against the split they were made for"
        )
    for key, what in (("tags", "tag lists"), ("track_ids", "track ids")):
        if key in pred and key in truth and not np.array_equal(pred[key], truth[key]):
            i = int(np.flatnonzero(pred[key] != truth[key])[0])
            raise SubmissionError(
                f"{args.predictions} and {source} differ in their {what} (row {i}: {str(pred[key][i])!r} vs {str(truth[key][i])!r})"
            )
    tags = [str(t) for t in (pred.get("tags") if "tags" in pred else truth.get("tags", []))] or None
    decisions = None
    if args.decisions is not None:
        decisions = _load_npy(args.decisions, "decisions")
        if decisions.shape != probs.shape or not np.isin(decisions, (0, 1)).all():
            raise SubmissionError(
                f"{args.decisions}: decisions must be a bool {probs.shape} matrix like the predictions, "
                f"got {decisions.dtype} {decisions.shape}"
            )
        decisions = decisions.astype(bool)
    elif args.thresholds is not None:
        thresholds = read_thresholds(args.thresholds, tags)
        if thresholds.shape != (probs.shape[1],):
            raise SubmissionError(f"{args.thresholds} gives {thresholds.size} thresholds for {probs.shape[1]} tags")
        decisions = probs >= thresholds
    text = format_results(mediaeval_results(probs, targets, decisions, tags))
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out, text)
    return 0
