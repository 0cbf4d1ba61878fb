"""Build a run from the Hydra config and carry it out: fit, SWA, whole-track evaluation, run directory.

Run directory (one Hydra job)::

    .hydra/                         Hydra's record of the config and overrides
    checkpoints/last.ckpt           resumable (ckpt_path=...), written atomically every epoch
    checkpoints/final.ckpt          SWA weights with BatchNorm recomputed, plus what predicting needs
    predictions/{validation,test}.npz
    metrics.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import __version__
from .data import JamendoDataModule
from .features import FeatureSpec
from .metrics import best_f1_thresholds, tagging_scores
from .module import TaggingModule, track_probabilities
from .swa import SWA, recompute_batchnorm

__all__ = ["run", "main", "build_net", "atomic_save", "AtomicCheckpointIO", "evaluate_tracks", "FINAL_KEYS"]

FINAL_KEYS = ("state_dict", "model", "features", "tags", "input_length", "mean", "std", "freqtag_version")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary name, fsync, then rename: never a truncated file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (last.ckpt) written through ``atomic_save``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_save(checkpoint, path)


def build_net(model_cfg: dict[str, Any] | DictConfig) -> nn.Module:
    return instantiate(model_cfg)


def build_loss(loss_cfg: DictConfig, dm: JamendoDataModule) -> nn.Module:
    cls = get_class(loss_cfg._target_)
    if getattr(cls, "needs_pos_rates", False):
        return instantiate(loss_cfg, pos_rates=dm.positive_rates().tolist())
    return instantiate(loss_cfg)


def resolve_precision(precision: str | int) -> str | int:
    """'auto': mixed precision on a GPU, 32-bit on CPU (the reference used AMP on its GPU)."""
    if precision == "auto":
        return "16-mixed" if torch.cuda.is_available() else "32-true"
    return precision


@torch.no_grad()
def evaluate_tracks(net: nn.Module, dm: JamendoDataModule, split: str, device: torch.device) -> np.ndarray:
    """Whole-track probabilities (N, n_tags) in split-TSV order, one track per forward pass."""
    net.eval().to(device)
    loader = dm.track_loader(split)
    n = len(dm.splits[split].rows)
    probs = np.zeros((n, len(dm.tags)), dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch = dm.on_after_batch_transfer(batch, 0)
        with autocast:
            p = track_probabilities(net, batch["x"])
        probs[batch["item"].cpu().numpy()] = p.cpu().numpy()
    return probs


def save_predictions(path: Path, track_ids: tuple[str, ...], tags: list[str], probs: np.ndarray, targets: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            track_ids=np.array(track_ids, dtype=str),
            tags=np.array(tags, dtype=str),
            probs=probs.astype(np.float32),
            targets=targets.astype(np.uint8),
        )
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def finalize(module: TaggingModule, dm: JamendoDataModule, swa: SWA, device: torch.device, max_epochs: int) -> None:
    """SWA weights into the network, then BatchNorm statistics from one pass over train crops (no mixup)."""
    swa.apply(module)
    module.net.to(device)
    loader = dm.crop_loader("train", shuffle=True, epoch=max_epochs)

    def batches():
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield dm.on_after_batch_transfer(batch, 0)["x"]

    recompute_batchnorm(module.net, batches())


def final_checkpoint(module: TaggingModule, cfg: DictConfig, dm: JamendoDataModule) -> dict[str, Any]:
    return {
        "state_dict": {k: v.detach().cpu() for k, v in module.net.state_dict().items()},
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "features": dm.spec.to_dict(),
        "tags": list(dm.tags),
        "input_length": dm.input_length,
        "mean": dm.mean,
        "std": dm.std,
        "freqtag_version": __version__,
    }


def print_scores(metrics: dict[str, dict[str, float]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("split")
    for col in ("PR-AUC", "ROC-AUC", "PR-AUC micro", "ROC-AUC micro"):
        table.add_column(col, justify="right")
    for split, s in metrics.items():
        table.add_row(split, *(f"{s[k]:.4f}" for k in ("pr_auc", "roc_auc", "pr_auc_micro", "roc_auc_micro")))
    Console().print(table)


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Train one model as the config says and write its run directory; returns the final metrics."""
    start = time.time()
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = FeatureSpec.from_dict(OmegaConf.to_container(cfg.features, resolve=True))
    dm: JamendoDataModule = instantiate(cfg.data, features=spec, _recursive_=False)
    dm.check()  # every data problem stops the run here, before any training time is spent
    net = build_net(cfg.model)
    if getattr(net, "n_tags", len(dm.tags)) != len(dm.tags):
        raise ValueError(f"model.n_tags={net.n_tags} but {dm.tags_file} lists {len(dm.tags)} tags")
    module = TaggingModule(net, build_loss(cfg.loss, dm), **cfg.optim, mixup_alpha=cfg.mixup_alpha, seed=cfg.seed)

    callbacks = {name: instantiate(c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    swa = next((c for c in callbacks.values() if isinstance(c, SWA)), None)
    if swa is None:
        raise ValueError("callbacks.swa is missing: the final model is the SWA model (see REFERENCE.md)")
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision),
        callbacks=list(callbacks.values()),
        logger=logger,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    device = torch.device("cuda" if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda" else "cpu")
    finalize(module, dm, swa, device, trainer.max_epochs)
    atomic_save(final_checkpoint(module, cfg, dm), out / "checkpoints" / "final.ckpt")

    metrics: dict[str, dict[str, float]] = {}
    for split in ("validation", "test"):
        d = dm.splits[split]
        probs = evaluate_tracks(module.net, dm, split, device)
        save_predictions(out / "predictions" / f"{split}.npz", d.split.track_ids, dm.tags, probs, d.split.labels)
        metrics[split] = tagging_scores(probs, d.split.labels)
        if split == "validation":
            thresholds = best_f1_thresholds(probs, d.split.labels)
            (out / "checkpoints" / "thresholds.tsv").write_text(
                "".join(f"{t}\t{th:.8f}\n" for t, th in zip(dm.tags, thresholds))
            )
    prefix = {"validation": "val", "test": "test"}
    flat = {f"{prefix[s]}/{k}": v for s, m in metrics.items() for k, v in m.items()}
    if trainer.logger is not None:
        trainer.logger.log_metrics(flat, step=trainer.global_step)
        trainer.logger.save()
    write_json(out / "metrics.json", {**metrics, "epochs": trainer.current_epoch, "seconds": round(time.time() - start, 1)})
    print_scores(metrics, f"{cfg.model.filters} / {spec.name} / L={dm.input_length} / {Path(str(cfg.loss._target_)).suffix[1:]}: {out}")
    return metrics


@hydra.main(config_path="pkg://freqtag.conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)
