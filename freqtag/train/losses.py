"""Multi-label tagging losses: plain, class-weighted and focal binary cross-entropy.

Every loss takes raw logits ``(B, C)`` and float targets ``(B, C)`` in [0, 1] and
returns the mean over batch and tags, so the three are interchangeable in the
training loop and comparable in magnitude. Half-precision logits (autocast) are
promoted to float32 first: the log-sigmoid terms lose too much in fp16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BCELoss", "WeightedBCELoss", "FocalLoss", "mixup_loss"]


def _promote(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and lift both tensors to at least float32."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype), targets.to(dtype)


class BCELoss(nn.Module):
    """Binary cross-entropy with logits, mean over batch and tags (``bce``)."""

    needs_pos_rates: ClassVar[bool] = False

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = _promote(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="mean")


class WeightedBCELoss(nn.Module):
    """BCE with per-tag weights from the train positive rates p_i (``weighted``).

    Positives get 2/(1+p_i) and negatives 2p_i/(1+p_i): a rare tag's few positives
    count about twice while its many negatives are damped, and the two weights sum
    to 2 so the loss scale stays near plain BCE.
    """

    needs_pos_rates: ClassVar[bool] = True

    w_pos: Tensor
    w_neg: Tensor

    def __init__(self, pos_rates: Sequence[float] | np.ndarray | Tensor) -> None:
        super().__init__()
        if isinstance(pos_rates, Tensor):
            p = pos_rates.detach().to("cpu", torch.float64)
        elif isinstance(pos_rates, np.ndarray):
            p = torch.from_numpy(pos_rates.astype(np.float64))
        else:
            # list(...) also accepts the OmegaConf ListConfig that Hydra hands over.
            p = torch.from_numpy(np.asarray(list(pos_rates), dtype=np.float64))
        if p.ndim != 1 or p.numel() == 0:
            raise ValueError(f"pos_rates must be a non-empty 1-D sequence, got shape {tuple(p.shape)}")
        if not torch.isfinite(p).all():
            bad = torch.nonzero(~torch.isfinite(p)).flatten().tolist()
            raise ValueError(f"pos_rates must be finite; non-finite at tag indices {bad}")
        if ((p < 0) | (p > 1)).any():
            bad = torch.nonzero((p < 0) | (p > 1)).flatten().tolist()
            raise ValueError(f"pos_rates must lie in [0, 1]; out of range at tag indices {bad}: {p[bad].tolist()}")
        self.register_buffer("w_pos", (2.0 / (1.0 + p)).float(), persistent=False)
        self.register_buffer("w_neg", (2.0 * p / (1.0 + p)).float(), persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = _promote(logits, targets)
        if logits.shape[-1] != self.w_pos.numel():
            raise ValueError(f"logits have {logits.shape[-1]} tags but pos_rates has {self.w_pos.numel()}")
        w_pos, w_neg = self.w_pos.to(logits.dtype), self.w_neg.to(logits.dtype)
        # log(sigmoid(x)) and log(1 - sigmoid(x)) = log(sigmoid(-x)), both stable for any x.
        ll = w_pos * targets * F.logsigmoid(logits) + w_neg * (1.0 - targets) * F.logsigmoid(-logits)
        return -ll.mean()

    def extra_repr(self) -> str:
        return f"num_tags={self.w_pos.numel()}"


class FocalLoss(nn.Module):
    """Sigmoid focal loss, FL = -alpha_t (1 - p_t)^gamma log(p_t), mean (``focal``).

    alpha weights positives and 1 - alpha negatives; (1 - p_t)^gamma shrinks the
    loss of tags already predicted well. For soft targets alpha_t = y*alpha +
    (1-y)*(1-alpha), p_t = y*p + (1-y)*(1-p) and -log(p_t) is replaced by the
    soft-target cross-entropy (torchvision's ``sigmoid_focal_loss`` convention);
    for 0/1 targets this is exactly the formula above.
    """

    needs_pos_rates: ClassVar[bool] = False

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not (math.isfinite(gamma) and gamma >= 0.0):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = _promote(logits, targets)
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        loss = ce * (targets * self.alpha + (1.0 - targets) * (1.0 - self.alpha))
        if self.gamma != 0.0:
            # 1 - p_t written without the subtraction, so it keeps its precision when
            # p_t is close to 1; the clamp keeps the gradient of x**gamma finite at
            # x = 0 (sigmoid underflow, |logit| > ~100) when gamma < 1.
            one_minus_pt = targets * torch.sigmoid(-logits) + (1.0 - targets) * torch.sigmoid(logits)
            one_minus_pt = one_minus_pt.clamp_min(torch.finfo(one_minus_pt.dtype).tiny)
            loss = loss * one_minus_pt.pow(self.gamma)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


def mixup_loss(loss: nn.Module, logits: Tensor, y_a: Tensor, y_b: Tensor, lam: float | Tensor,
               rest: float | Tensor | None = None) -> Tensor:
    """lam * L(logits, y_a) + (1 - lam) * L(logits, y_b), the reference's mixup loss.

    Mixing the losses rather than the targets keeps every loss on hard 0/1 targets.
    ``rest``: 1 - lam when it is given already (the compiled step passes both as tensors).
    """
    return lam * loss(logits, y_a) + ((1.0 - lam) if rest is None else rest) * loss(logits, y_b)
