"""The tagging metrics against scikit-learn, the tool the reference scores come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from freqtag.metrics import best_f1_thresholds, decision_scores, per_tag_scores, tagging_scores

N, C = 500, 56


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Seeded probs with many ties (2 decimals) and tag rates from 1% to 30%, like the dataset's."""
    rng = np.random.default_rng(0)
    rates = np.linspace(0.01, 0.3, C)
    y = (rng.random((N, C)) < rates).astype(np.int64)
    y[0], y[1] = 1, 0  # every tag has a positive and a negative
    # Scores that carry some signal, so the metrics are away from 0.5.
    probs = np.clip(0.35 * y + 0.65 * rng.random((N, C)), 0, 1).round(2)
    return probs, y


def test_tagging_scores_equal_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, y = data
    assert len(np.unique(probs)) <= 101  # heavy ties
    got = tagging_scores(probs, y)
    want = {
        "pr_auc": average_precision_score(y, probs, average="macro"),
        "roc_auc": roc_auc_score(y, probs, average="macro"),
        "pr_auc_micro": average_precision_score(y, probs, average="micro"),
        "roc_auc_micro": roc_auc_score(y, probs, average="micro"),
    }
    assert got.keys() == want.keys()
    for k in want:
        assert isinstance(got[k], float)
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_tagging_scores_accept_torch_float32(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, y = data
    p32 = torch.from_numpy(probs).float()
    got = tagging_scores(p32, torch.from_numpy(y).float())
    p = p32.double().numpy()  # sklearn on the very same values
    assert got["pr_auc"] == pytest.approx(average_precision_score(y, p, average="macro"), abs=1e-6)
    assert got["roc_auc_micro"] == pytest.approx(roc_auc_score(y, p, average="micro"), abs=1e-6)


def test_per_tag_scores_equal_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, y = data
    got = per_tag_scores(probs, y)
    assert got["pr_auc"].shape == got["roc_auc"].shape == (C,)
    np.testing.assert_allclose(got["pr_auc"], average_precision_score(y, probs, average=None), atol=1e-6)
    np.testing.assert_allclose(got["roc_auc"], roc_auc_score(y, probs, average=None), atol=1e-6)
    # The macro scores are the plain means of these.
    macro = tagging_scores(probs, y)
    assert macro["pr_auc"] == pytest.approx(got["pr_auc"].mean(), abs=1e-12)


def test_degenerate_tags_are_named() -> None:
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1]])
    p = np.array([[0.9, 0.1, 0.4], [0.2, 0.3, 0.5], [0.8, 0.2, 0.6]])
    with pytest.raises(ValueError, match=r"2 tag\(s\).*\['calm', 'sad'\]"):
        tagging_scores(p, y, tags=["happy", "calm", "sad"])
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        per_tag_scores(p, y)


@pytest.mark.parametrize(
    ("probs", "targets", "match"),
    [
        (np.array([[2.0, 0.1], [-1.0, 0.2]]), np.array([[1, 0], [0, 1]]), "logits"),
        (np.array([[np.nan, 0.1], [0.5, 0.2]]), np.array([[1, 0], [0, 1]]), "NaN"),
        (np.array([[0.5, 0.1], [0.5, 0.2]]), np.array([[1, 0.5], [0, 1]]), "0 and 1"),
        (np.array([[0.5, 0.1]]), np.array([[1, 0], [0, 1]]), r"\(N, C\)"),
    ],
)
def test_bad_inputs_raise(probs: np.ndarray, targets: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tagging_scores(probs, targets)


def test_best_f1_thresholds_small_example() -> None:
    # Tag 0: scores 0.9(+) 0.8(-) 0.7(+) 0.1(-): t=0.9 gives F1 2/3, t=0.7 gives 2*2/(3+2)=0.8.
    # Tag 1: t=0.6 (2 pos of 2 found, 1 false) and t=0.9 (1 of 2, none false) both give 2/3:
    #        the lower threshold wins, as with argmax over sklearn's increasing thresholds.
    p = np.array([[0.9, 0.9], [0.8, 0.6], [0.7, 0.2], [0.1, 0.6]])
    y = np.array([[1, 1], [0, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(best_f1_thresholds(p, y), [0.7, 0.6])


def test_best_f1_thresholds_match_sklearn_curve(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, y = data
    thr = best_f1_thresholds(probs, y)
    assert thr.shape == (C,)
    for j in range(C):
        prec, rec, cand = precision_recall_curve(y[:, j], probs[:, j])
        with np.errstate(invalid="ignore"):
            f = np.nan_to_num(2 * prec * rec / (prec + rec))
        # The F1 reached at our threshold is the best on sklearn's curve ...
        d = probs[:, j] >= thr[j]
        f_ours = 2 * (d & (y[:, j] == 1)).sum() / (d.sum() + y[:, j].sum())
        assert f_ours == pytest.approx(f.max(), abs=1e-12)
        # ... and it is sklearn's choice whenever that choice is not a rounding-level tie.
        if np.sum(f >= f.max() - 1e-12) == 1:
            assert thr[j] == cand[np.argmax(f)]


def test_decision_scores_equal_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, y = data
    thr = best_f1_thresholds(probs, y)
    thr[:3] = 1.5  # three tags with no predicted positive: precision 0 by convention
    got = decision_scores(probs, y, thr)
    d = (probs >= thr).astype(int)
    for avg, suffix in (("macro", ""), ("micro", "_micro")):
        p, r, f, _ = precision_recall_fscore_support(y, d, average=avg, zero_division=0)
        assert got["precision" + suffix] == pytest.approx(p, abs=1e-12)
        assert got["recall" + suffix] == pytest.approx(r, abs=1e-12)
        assert got["f1" + suffix] == pytest.approx(f, abs=1e-12)
