"""The losses against hand computations written with the math module."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from freqtag.train.losses import BCELoss, FocalLoss, WeightedBCELoss, mixup_loss

CONF = Path(__file__).resolve().parents[2] / "conf" / "loss"

LOGITS = [
    [2.0, -1.0, 0.5, -3.0],
    [-0.5, 1.5, -2.0, 0.0],
    [3.0, 0.25, -1.25, 4.0],
]
TARGETS = [
    [1.0, 0.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, 1.0],
    [1.0, 1.0, 0.0, 0.0],
]
TARGETS_B = [
    [0.0, 0.0, 1.0, 1.0],
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 1.0, 0.0],
]
POS_RATES = [0.1, 0.5, 0.02, 1.0]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def hand_bce(logits: list[list[float]], targets: list[list[float]]) -> float:
    return mean([
        -(y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x)))
        for xr, yr in zip(logits, targets) for x, y in zip(xr, yr)
    ])


def hand_weighted(logits: list[list[float]], targets: list[list[float]], p: list[float]) -> float:
    terms = []
    for xr, yr in zip(logits, targets):
        for x, y, pi in zip(xr, yr, p):
            w_pos, w_neg = 2 / (1 + pi), 2 * pi / (1 + pi)
            terms.append(-(w_pos * y * math.log(sig(x)) + w_neg * (1 - y) * math.log(1 - sig(x))))
    return mean(terms)


def hand_focal(logits: list[list[float]], targets: list[list[float]], alpha: float, gamma: float) -> float:
    terms = []
    for xr, yr in zip(logits, targets):
        for x, y in zip(xr, yr):
            p = sig(x)
            p_t = y * p + (1 - y) * (1 - p)
            a_t = y * alpha + (1 - y) * (1 - alpha)
            ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))  # = -log(p_t) for 0/1 targets
            terms.append(a_t * (1 - p_t) ** gamma * ce)
    return mean(terms)


def test_bce_matches_hand() -> None:
    got = BCELoss()(t(LOGITS), t(TARGETS))
    assert got.ndim == 0
    assert got.item() == pytest.approx(hand_bce(LOGITS, TARGETS), rel=1e-12)


def test_weighted_weights_from_known_rates() -> None:
    loss = WeightedBCELoss(POS_RATES)
    # 2/(1+p) and 2p/(1+p) for p = 0.1, 0.5, 0.02, 1.0
    np.testing.assert_allclose(loss.w_pos.numpy(), [2 / 1.1, 4 / 3, 2 / 1.02, 1.0], rtol=1e-6)
    np.testing.assert_allclose(loss.w_neg.numpy(), [0.2 / 1.1, 2 / 3, 0.04 / 1.02, 1.0], rtol=1e-6)
    assert loss.needs_pos_rates and not BCELoss.needs_pos_rates and not FocalLoss.needs_pos_rates
    # Buffers move with the module but are not checkpointed (they come from the split).
    assert {"w_pos", "w_neg"} <= dict(loss.named_buffers()).keys()
    assert "w_pos" not in loss.state_dict()


def test_weighted_matches_hand() -> None:
    got = WeightedBCELoss(POS_RATES)(t(LOGITS), t(TARGETS))
    # Buffers are float32, so compare at float32 precision.
    assert got.item() == pytest.approx(hand_weighted(LOGITS, TARGETS, POS_RATES), rel=1e-6)


def test_weighted_equals_bce_when_all_rates_are_one() -> None:
    got = WeightedBCELoss([1.0] * 4)(t(LOGITS), t(TARGETS))
    assert got.item() == pytest.approx(hand_bce(LOGITS, TARGETS), rel=1e-6)


@pytest.mark.parametrize(
    ("rates", "match"),
    [
        ([[0.1, 0.2]], "1-D"),
        ([], "non-empty"),
        ([0.1, float("nan")], "finite"),
        ([0.1, float("inf")], "finite"),
        ([0.1, 1.5], r"\[0, 1\]"),
        ([-0.01, 0.5], r"\[0, 1\]"),
    ],
)
def test_weighted_rejects_bad_rates(rates: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WeightedBCELoss(rates)


def test_weighted_rejects_wrong_tag_count() -> None:
    with pytest.raises(ValueError, match="tags"):
        WeightedBCELoss([0.5] * 3)(t(LOGITS), t(TARGETS))


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.6, 0.5), (0.25, 0.0)])
def test_focal_matches_hand(alpha: float, gamma: float) -> None:
    got = FocalLoss(alpha, gamma)(t(LOGITS), t(TARGETS))
    assert got.item() == pytest.approx(hand_focal(LOGITS, TARGETS, alpha, gamma), rel=1e-12)


def test_focal_hard_targets_is_minus_alpha_t_log_pt() -> None:
    # The textbook form, written out for one positive and one negative entry.
    x_pos, x_neg = 0.5, -1.0
    p_pos, p_neg = sig(x_pos), 1 - sig(x_neg)  # p_t of each
    want = mean([-0.25 * (1 - p_pos) ** 2 * math.log(p_pos), -0.75 * (1 - p_neg) ** 2 * math.log(p_neg)])
    got = FocalLoss()(t([[x_pos, x_neg]]), t([[1.0, 0.0]]))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_focal_soft_targets() -> None:
    soft = [[0.3, 0.0, 1.0, 0.8], [0.5, 0.9, 0.1, 0.0], [1.0, 0.2, 0.6, 0.4]]
    got = FocalLoss(0.25, 2.0)(t(LOGITS), t(soft))
    assert got.item() == pytest.approx(hand_focal(LOGITS, soft, 0.25, 2.0), rel=1e-12)


def test_focal_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)


def stable_bce(x: float, y: float) -> float:
    """max(x, 0) - x*y + log(1 + exp(-|x|)): BCE that is exact for large |x|."""
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_stay_finite(dtype: torch.dtype) -> None:
    x = [[50.0, -50.0, 50.0, -50.0]]
    y = [[1.0, 0.0, 0.0, 1.0]]  # two confident hits, two confident misses
    want_bce = mean([stable_bce(a, b) for a, b in zip(x[0], y[0])])  # = (0 + 0 + 50 + 50) / 4
    p = [0.3, 0.5, 0.02, 0.9]
    w_pos = [2 / (1 + q) for q in p]
    w_neg = [2 * q / (1 + q) for q in p]
    want_w = mean([(w_pos[i] if y[0][i] else w_neg[i]) * stable_bce(x[0][i], y[0][i]) for i in range(4)])
    # Focal: the misses have 1 - p_t = 1, alpha_t 0.75 (negative) and 0.25 (positive).
    want_f = mean([0.0, 0.0, 0.75 * 50.0, 0.25 * 50.0])
    for loss, want in [(BCELoss(), want_bce), (WeightedBCELoss(p), want_w), (FocalLoss(), want_f)]:
        logits = torch.tensor(x, dtype=dtype, requires_grad=True)
        out = loss(logits, torch.tensor(y, dtype=dtype))
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(logits.grad).all(), type(loss).__name__
        assert out.item() == pytest.approx(want, rel=1e-5), type(loss).__name__


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_saturated_sigmoid_has_finite_gradient(gamma: float) -> None:
    # At |x| = 200 sigmoid underflows to exactly 0 in float32, so 1 - p_t = 0.
    logits = torch.tensor([[200.0, -200.0, 200.0]], requires_grad=True)
    out = FocalLoss(0.25, gamma)(logits, torch.tensor([[1.0, 0.0, 0.0]]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()
    assert out.item() == pytest.approx(0.75 * 200.0 / 3, rel=1e-6)


def test_half_precision_logits_are_promoted() -> None:
    got = FocalLoss()(t(LOGITS).half(), t(TARGETS).half())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hand_focal(LOGITS, TARGETS, 0.25, 2.0), rel=2e-3)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        BCELoss()(t(LOGITS), t(TARGETS)[:, :3])


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_mixup_loss(lam: float) -> None:
    want = lam * hand_bce(LOGITS, TARGETS) + (1 - lam) * hand_bce(LOGITS, TARGETS_B)
    got = mixup_loss(BCELoss(), t(LOGITS), t(TARGETS), t(TARGETS_B), lam)
    assert got.item() == pytest.approx(want, rel=1e-12)
    want_w = lam * hand_weighted(LOGITS, TARGETS, POS_RATES) + (1 - lam) * hand_weighted(LOGITS, TARGETS_B, POS_RATES)
    got_w = mixup_loss(WeightedBCELoss(POS_RATES), t(LOGITS), t(TARGETS), t(TARGETS_B), lam)
    assert got_w.item() == pytest.approx(want_w, rel=1e-6)


def test_hydra_configs_instantiate() -> None:
    bce = instantiate(OmegaConf.load(CONF / "bce.yaml"))
    focal = instantiate(OmegaConf.load(CONF / "focal.yaml"))
    assert isinstance(bce, BCELoss)
    assert isinstance(focal, FocalLoss) and (focal.alpha, focal.gamma) == (0.25, 2.0)

    cfg = OmegaConf.load(CONF / "weighted.yaml")
    assert set(cfg.keys()) == {"_target_"}  # p_i come from the train split, never from the config
    for rates in (POS_RATES, np.array(POS_RATES), torch.tensor(POS_RATES)):
        weighted = instantiate(cfg, pos_rates=rates)
        assert isinstance(weighted, WeightedBCELoss)
        np.testing.assert_allclose(weighted.w_pos.numpy(), [2 / (1 + q) for q in POS_RATES], rtol=1e-6)
