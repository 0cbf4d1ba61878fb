"""Tagging metrics that match scikit-learn, as the MediaEval evaluation computes them.

The ranking metrics (PR-AUC = average precision, ROC-AUC) come from torchmetrics'
exact (``thresholds=None``) multilabel functions, evaluated in float64 so they
agree with ``sklearn.metrics.average_precision_score`` / ``roc_auc_score`` to
rounding error, ties included.

Tags without both a positive and a negative example are rejected with a
``ValueError`` that names them: their ROC-AUC is undefined (scikit-learn gives
NaN, torchmetrics silently 0) and AP would be 0, so a macro average over them would
quietly differ between tools. Evaluate on a split that contains every tag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import multilabel_auroc, multilabel_average_precision

__all__ = ["tagging_scores", "per_tag_scores", "best_f1_thresholds", "decision_scores"]

ArrayLike = np.ndarray | Tensor


@contextmanager
def _float64_default() -> Iterator[None]:
    """Run torchmetrics with float64 as the default dtype.

    Its exact curves build counts as ``long * 1.0``, which takes the *default*
    dtype, so float64 inputs alone still give float32 precision/recall. This
    switch is process-wide for its duration: call these metrics from one thread.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _to_tensor(x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.asarray(x))


def _prepare(
    probs: ArrayLike, targets: ArrayLike, tags: Sequence[str] | None, need_negatives: bool = True
) -> tuple[Tensor, Tensor]:
    """Validate and convert to (float64 probs, int64 0/1 targets) on the CPU."""
    p = _to_tensor(probs).to(torch.float64)
    t = _to_tensor(targets)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(f"probs {tuple(p.shape)} and targets {tuple(t.shape)} must both be (N, C)")
    if tags is not None and len(tags) != p.shape[1]:
        raise ValueError(f"{len(tags)} tag names for {p.shape[1]} columns")
    if not torch.isfinite(p).all():
        raise ValueError("probs contain NaN or inf")
    # torchmetrics would take values outside [0, 1] for logits and apply a sigmoid,
    # which in float saturates and creates ties: insist on probabilities.
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probs must lie in [0, 1] (pass sigmoid outputs, not logits)")
    if not ((t == 0) | (t == 1)).all():
        raise ValueError("targets must contain only 0 and 1")
    t = t.to(torch.int64)
    n_pos = t.sum(0)
    bad = n_pos == 0
    if need_negatives:
        bad |= n_pos == t.shape[0]
    if bad.any():
        idx = torch.nonzero(bad).flatten().tolist()
        names = [tags[i] for i in idx] if tags is not None else idx
        what = "no positive or no negative example" if need_negatives else "no positive example"
        raise ValueError(f"{len(idx)} tag(s) have {what} in targets, so the metric is undefined: {names}")
    return p, t


def tagging_scores(probs: ArrayLike, targets: ArrayLike, tags: Sequence[str] | None = None) -> dict[str, float]:
    """Macro and micro PR-AUC / ROC-AUC over tags, equal to scikit-learn's.

    ``probs`` (N, C) in [0, 1], ``targets`` (N, C) of 0/1, numpy or torch. Macro is
    the unweighted mean over tags (the paper's headline numbers); micro pools all
    (track, tag) pairs. ``tags`` only names offending columns in error messages.
    """
    p, t = _prepare(probs, targets, tags)
    c = p.shape[1]
    out: dict[str, float] = {}
    with _float64_default():
        for avg, suffix in (("macro", ""), ("micro", "_micro")):
            ap = multilabel_average_precision(p, t, num_labels=c, average=avg, thresholds=None)
            roc = multilabel_auroc(p, t, num_labels=c, average=avg, thresholds=None)
            out["pr_auc" + suffix] = float(ap)
            out["roc_auc" + suffix] = float(roc)
    return out


def per_tag_scores(
    probs: ArrayLike, targets: ArrayLike, tags: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """PR-AUC and ROC-AUC of every tag, each a float64 array of shape (C,)."""
    p, t = _prepare(probs, targets, tags)
    c = p.shape[1]
    with _float64_default():
        ap = multilabel_average_precision(p, t, num_labels=c, average=None, thresholds=None)
        roc = multilabel_auroc(p, t, num_labels=c, average=None, thresholds=None)
    return {"pr_auc": ap.numpy().astype(np.float64), "roc_auc": roc.numpy().astype(np.float64)}


def best_f1_thresholds(probs: ArrayLike, targets: ArrayLike, tags: Sequence[str] | None = None) -> np.ndarray:
    """Per tag, the score threshold t whose decisions ``probs >= t`` maximise F1.

    The candidates are the distinct scores (scikit-learn's ``precision_recall_curve``
    thresholds); among equal F1 the lowest threshold wins, as ``np.argmax`` over
    sklearn's increasing thresholds picks it. Fit on validation and apply to test:
    the reference fitted on the test ground truth (an oracle). Note the official
    MediaEval script then decides with ``>`` rather than ``>=``.
    """
    p, t = _prepare(probs, targets, tags, need_negatives=False)
    p_np, t_np = p.numpy(), t.numpy()
    out = np.empty(p_np.shape[1], dtype=np.float64)
    for j in range(p_np.shape[1]):
        order = np.argsort(-p_np[:, j], kind="stable")
        s, y = p_np[order, j], t_np[order, j]
        last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
        tp = np.cumsum(y)[last]
        fp = (last + 1) - tp
        # F1 = 2tp / (tp + fp + P); exact integer ratios, so equal F1 compare equal.
        f1 = 2.0 * tp / (tp + fp + tp[-1])
        best = np.flatnonzero(f1 == f1.max())[-1]  # scores descend: last = lowest threshold
        out[j] = s[last[best]]
    return out


def decision_scores(
    probs: ArrayLike, targets: ArrayLike, thresholds: ArrayLike | Sequence[float]
) -> dict[str, float]:
    """Precision, recall and F1 (macro and micro) of the decisions ``probs >= thresholds``.

    Macro averages the per-tag values (F1 per tag, not F1 of the mean P and R), with
    0 for a tag that has no predicted or no true positive, matching scikit-learn's
    ``precision_recall_fscore_support(..., zero_division=0)``.
    """
    p = _to_tensor(probs).to(torch.float64).numpy()
    y = _to_tensor(targets).numpy().astype(bool)
    thr = np.asarray(thresholds, dtype=np.float64)
    if p.ndim != 2 or p.shape != y.shape or thr.shape != (p.shape[1],):
        raise ValueError(f"probs {p.shape}, targets {y.shape}, thresholds {thr.shape} must be (N, C), (N, C), (C,)")
    d = p >= thr
    tp = (d & y).sum(0).astype(np.float64)
    fp = (d & ~y).sum(0).astype(np.float64)
    fn = (~d & y).sum(0).astype(np.float64)

    def prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            rec = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
            f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        return prec, rec, f1

    pm, rm, fm = prf(tp, fp, fn)
    pu, ru, fu = prf(tp.sum(), fp.sum(), fn.sum())
    return {
        "precision": float(pm.mean()), "recall": float(rm.mean()), "f1": float(fm.mean()),
        "precision_micro": float(pu), "recall_micro": float(ru), "f1_micro": float(fu),
    }
