"""Stochastic weight averaging exactly as the reference does it.

Equal-weight average of the weights at the end of each of the last
``fraction`` of the epochs, while the cosine schedule carries on untouched;
then BatchNorm statistics recomputed for the averaged weights with one pass
over train crops without mixup. Lightning's ``StochasticWeightAveraging``
swaps in its own learning-rate schedule, so it is not this.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from torch import nn

__all__ = ["SWA", "recompute_batchnorm", "average_dtype"]


def average_dtype(dtype: torch.dtype) -> torch.dtype:
    """Averages are kept in float32 at least (bf16/fp16 parameters would lose the small updates)."""
    return torch.promote_types(dtype, torch.float32)


class SWA(pl.Callback):
    """Keep the running average of the parameters of the last epochs; its state rides in last.ckpt."""

    def __init__(self, fraction: float = 0.2) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"callbacks.swa.fraction={fraction}: must be in (0, 1]")
        self.fraction = fraction
        self.n_averaged = 0
        self.average: dict[str, torch.Tensor] = {}

    def first_epoch(self, max_epochs: int) -> int:
        """0-based first averaged epoch: 160 of 200 (epochs 161-200 counted from 1)."""
        return max_epochs - max(1, math.ceil(self.fraction * max_epochs - 1e-9))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.first_epoch(trainer.max_epochs):
            return
        self.update(pl_module)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the current parameters into the average, which lives on each parameter's device."""
        self.n_averaged += 1
        for k, p in module.named_parameters():
            p = p.detach()
            dtype = average_dtype(p.dtype)
            if k not in self.average:
                self.average[k] = p.to(dtype, copy=True)
                continue
            avg = self.average[k]
            if avg.device != p.device or avg.dtype != dtype:  # came back from last.ckpt on the CPU
                avg = self.average[k] = avg.to(p.device, dtype)
            avg += (p.to(dtype) - avg) / self.n_averaged

    def apply(self, module: nn.Module) -> None:
        """Load the averaged parameters into ``module`` (BatchNorm still to be recomputed)."""
        if not self.n_averaged:
            raise RuntimeError("SWA: no epoch was averaged (did training reach the last 20% of its epochs?)")
        with torch.no_grad():
            for k, p in module.named_parameters():
                p.copy_(self.average[k].to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "n_averaged": self.n_averaged,
                "average": {k: v.cpu() for k, v in self.average.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning hands the state over on the CPU: each average moves to its parameter's device in ``update``."""
        self.fraction = state_dict["fraction"]
        self.n_averaged = state_dict["n_averaged"]
        self.average = {k: v.clone() for k, v in state_dict["average"].items()}


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as a plain average over ``batches``.

    The network is in train mode during the pass (as in ``torch.optim.swa_utils.update_bn``),
    so dropout behaves as it did when the statistics were first learnt. Returns the samples seen.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    was_training = net.training
    net.train()
    seen = 0
    try:
        for x in batches:
            net(x)
            seen += len(x)
    finally:
        for m in norms:
            m.momentum = momenta[m]
        net.train(was_training)
    return seen
