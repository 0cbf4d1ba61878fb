"""The LightningModule: the reference recipe (mixup, Nesterov SGD, per-epoch cosine decay).

Randomness that shapes training is tied to ``(seed, epoch, step)`` so that a
run resumed from ``last.ckpt`` continues exactly as the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from .losses import mixup_loss
from .metrics import tagging_scores

__all__ = ["TaggingModule", "track_probabilities", "seed_dropout"]


def seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the generator that dropout masks on ``device`` come from, and only that one.

    ``torch.manual_seed`` also queues a seed for every lazily initialised
    accelerator, with a formatted stack trace each time: 0.1 ms a step for nothing.
    """
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def track_probabilities(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Whole-track scoring: sigmoid per window, averaged over the windows -> (B, n_tags)."""
    return torch.sigmoid(net(x).float()).mean(dim=-1)


class TaggingModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        lr: float = 0.5,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 2e-5,
        mixup_alpha: float = 0.2,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss"])
        self.net = net
        self.loss = loss
        self._val_items: list[torch.Tensor] = []
        self._val_probs: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- training -----------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout masks depend on (seed, step, rank) only, so a resumed run replays them exactly
        # (Lightning skips on_train_epoch_start for the epoch it resumes in, so seed per step)
        seed_dropout((self.hparams.seed * 1_000_003 + self.global_step) * 64 + self.global_rank, self.device)

    def mixup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Reference mixup: one lam ~ Beta(a, a) per batch, a random permutation of the batch."""
        alpha = self.hparams.mixup_alpha
        if alpha <= 0:
            return x, torch.arange(len(x), device=x.device), 1.0
        rng = np.random.default_rng([self.hparams.seed, self.global_step, 2])
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        return lam * x + (1.0 - lam) * x[perm], perm, lam

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        y = batch["y"].float()
        x, perm, lam = self.mixup(batch["x"])
        logits = self.net(x).squeeze(-1)
        loss = mixup_loss(self.loss, logits, y, y[perm], lam)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss at epoch {self.current_epoch}, step {self.global_step}; "
                f"the last good checkpoint is kept in checkpoints/last.ckpt"
            )
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    # -- the cheap per-epoch check: centre crops of the validation tracks ----
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.net(batch["x"]).squeeze(-1).float()
        y = batch["y"]
        self.log("val/crop_loss", self.loss(logits, y.float()), on_epoch=True, batch_size=len(y), sync_dist=True)
        self._val_items.append(batch["item"].detach())
        self._val_probs.append(torch.sigmoid(logits).detach())
        self._val_targets.append(y.detach())

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        # each rank scored its own tracks: put them in their rows and sum over ranks (uneven shares are fine)
        n = len(self.trainer.val_dataloaders.dataset)
        items = torch.cat(self._val_items).long()
        probs = torch.zeros(n, self._val_probs[0].shape[-1], device=self.device, dtype=torch.float32)
        targets = torch.zeros_like(probs)
        seen = torch.zeros(n, device=self.device, dtype=torch.float32)
        probs[items] = torch.cat(self._val_probs)
        targets[items] = torch.cat(self._val_targets).float()
        seen[items] = 1.0
        self._val_items.clear()
        self._val_probs.clear()
        self._val_targets.clear()
        probs, targets, seen = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in (probs, targets, seen))
        if self.trainer.sanity_checking:
            return
        keep = seen > 0
        try:
            scores = tagging_scores(probs[keep].cpu(), targets[keep].cpu())
        except ValueError:  # a tag with no positive among the crops seen (tiny sanity runs)
            return
        # the same figures on every rank (computed from the summed rows): sync_dist only marks them as global
        self.log("val/crop_pr_auc", scores["pr_auc"], prog_bar=True, sync_dist=True)
        self.log("val/crop_roc_auc", scores["roc_auc"], prog_bar=True, sync_dist=True)

    # -- optimisation -------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
        # per-epoch cosine decay from lr to 0 over max_epochs, no warm-up (the reference schedule)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs), eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
