"""Build a run from the Hydra config and carry it out: fit, SWA, whole-track evaluation, run directory.

Run directory (one Hydra job)::

    .hydra/                         Hydra's record of the config and overrides
    checkpoints/last.ckpt           resumable (ckpt_path=...), written atomically every epoch (in the background)
    checkpoints/final.ckpt          SWA weights with BatchNorm recomputed, plus what predicting needs
    predictions/{validation,test}.npz
    metrics.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from freqtag import __version__
from freqtag.data.datamodule import DataError, JamendoDataModule
from freqtag.features import FeatureSpec
from freqtag.metrics import best_f1_thresholds, tagging_scores
from freqtag.runs import final_path, predictions_path, thresholds_path, write_final, write_predictions, write_thresholds
from freqtag.system.allocator import keep_freed_memory
from freqtag.system.atomic import atomic_write_text
from freqtag.system.memory import out_of_memory, release_device_memory
from freqtag.system.precision import set_fp32_precision
from freqtag.train.checkpoints import AtomicCheckpointIO, check_async_checkpoint, check_resume, run_info
from freqtag.train.evaluation import EVAL_BATCH_FRAMES, check_eval_batch_frames, distributed, evaluate_tracks, rank
from freqtag.train.loggers import build_logger, log_final
from freqtag.train.module import TaggingModule, seed_dropout
from freqtag.train.overrides import ConfigError, check_devices, uses_gpu
from freqtag.train.swa import SWA, recompute_batchnorm

__all__ = ["run", "build_net", "build_loss", "set_n_tags", "resolve_precision", "finalize", "check_scorable",
           "TrainingDiverged"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN/inf: the run stopped; names the checkpoint that is kept and what to change."""


def build_net(model_cfg: dict[str, Any] | DictConfig) -> nn.Module:
    return instantiate(model_cfg)


def set_n_tags(cfg: DictConfig, dm: JamendoDataModule) -> None:
    """``model.n_tags: null`` takes the tag list's length (56 mood/theme, 87 genre, ...); a number must agree."""
    n = cfg.model.get("n_tags")
    if n is None:
        with open_dict(cfg):
            cfg.model.n_tags = len(dm.tags)
    elif int(n) != len(dm.tags):
        raise ConfigError(
            f"model.n_tags={n} but the tag list ({dm.tags_source}) has {len(dm.tags)} tags: leave model.n_tags=null "
            f"(the tag list decides)"
        )


def build_loss(loss_cfg: DictConfig, dm: JamendoDataModule) -> nn.Module:
    cls = get_class(loss_cfg._target_)
    if getattr(cls, "needs_pos_rates", False):
        return instantiate(loss_cfg, pos_rates=dm.positive_rates().tolist())
    return instantiate(loss_cfg)


def resolve_precision(precision: str | int, accelerator: Any = "auto") -> str | int:
    """'auto': mixed precision (16-mixed, as the reference's AMP) on a GPU, 32-bit on the CPU.

    Decided by the accelerator the run actually uses: a visible GPU must not
    turn a ``trainer.accelerator=cpu`` run into a (slow, different) bf16 one.
    """
    if precision == "auto":
        return "16-mixed" if uses_gpu(accelerator) else "32-true"
    return precision


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def finalize(module: TaggingModule, dm: JamendoDataModule, swa: SWA, device: torch.device, max_epochs: int) -> None:
    """SWA weights into the network, then BatchNorm statistics from one pass over train crops (no mixup).

    Under DDP every rank holds the same average and makes the same pass over
    whole global batches (the single-process result); rank 0's weights and
    statistics are then broadcast so that all ranks hold one model, bit for bit.
    """
    swa.apply(module)
    module.net.to(device)
    loader = iter(dm.crop_loader("train", shuffle=True, epoch=max_epochs, all_ranks=True))
    # dropout is active in this pass: its masks come from a generator seeded here, after the loader drew its
    # own seed, so they do not depend on how many loader iterators training happened to create (one per
    # epoch without workers, one in all with persistent workers)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_dropout(module.hparams.seed * 1_000_003 + 999_983, device)
        recompute_batchnorm(module.net, (dm.on_device(batch, device)["x"] for batch in loader))
    if distributed():
        for t in module.net.state_dict().values():
            torch.distributed.broadcast(t, src=0)


def final_checkpoint(module: TaggingModule, cfg: DictConfig, dm: JamendoDataModule) -> dict[str, Any]:
    return {
        "state_dict": {k: v.detach().cpu() for k, v in module.net.state_dict().items()},
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "features": dm.spec.to_dict(),
        "tags": list(dm.tags),
        "input_length": dm.input_length,
        "mean": dm.mean,
        "std": dm.std,
        "data": dm.dataset_info(),
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


def check_scorable(dm: JamendoDataModule) -> None:
    """The final scores need a positive and a negative track of every tag in validation and test: check it first.

    Otherwise a split that lacks one (a small custom dataset, or tracks left
    out with data.missing_tracks=skip) fails only after all the training.
    """
    for name in ("validation", "test"):
        split = dm.splits[name].split
        positives = split.labels.sum(0)
        undefined = [t for t, n in zip(dm.tags, positives) if n == 0 or n == len(split)]
        if undefined:
            raise DataError(
                f"{split.path}: {len(undefined)} tags have no positive (or no negative) track in the {name} split "
                f"({', '.join(undefined[:5])}{' ...' if len(undefined) > 5 else ''}), so their PR-AUC/ROC-AUC is "
                f"undefined: use a split where every tag of {dm.tags_source} has both"
            )


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Train one model as the config says and write its run directory; returns the final metrics.

    Whatever happens, the run's memory (the in-memory store, the network on
    its GPU) is given back before returning: a joblib worker runs the next
    grid job in this same process.
    """
    dm: list[JamendoDataModule] = []
    try:
        return _run(cfg, dm)
    finally:
        for d in dm:
            d.release()
        release_device_memory()


def _run(cfg: DictConfig, made: list[JamendoDataModule]) -> dict[str, dict[str, float]]:
    start = time.time()
    eval_batch_frames, ckpt_io = _settings(cfg)
    dm, module, swa, trainer = _build(cfg, made, ckpt_io)
    device = trainer.strategy.root_device
    if dm.in_memory:
        dm.check_fits(device, copies=trainer.num_devices if device.type == "cpu" else 1)
    _fit(cfg, dm, module, trainer, ckpt_io)
    finalize(module, dm, swa, device, trainer.max_epochs)
    metrics = _evaluate(cfg, dm, module, trainer, eval_batch_frames)
    if rank() == 0:
        out = Path(cfg.paths.output_dir)
        write_json(out / "metrics.json", {**metrics, "epochs": trainer.current_epoch, "seconds": round(time.time() - start, 1)})
        print_scores(metrics, f"{cfg.model.filters} / {dm.spec.name} / L={dm.input_length} / "
                              f"{Path(str(cfg.loss._target_)).suffix[1:]}: {out}")
    return metrics


def _settings(cfg: DictConfig) -> tuple[int, AtomicCheckpointIO]:
    """The settings that need no data, checked first: devices, float32 precision, allocator, evaluation, last.ckpt."""
    check_devices(cfg.trainer)
    try:
        set_fp32_precision(str(cfg.get("fp32_precision", "ieee")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    eval_batch_frames = check_eval_batch_frames(cfg.get("eval_batch_frames", EVAL_BATCH_FRAMES))
    ckpt_io = AtomicCheckpointIO(async_checkpoint=check_async_checkpoint(cfg.get("async_checkpoint", True)))
    return eval_batch_frames, ckpt_io


def _build(cfg: DictConfig, made: list[JamendoDataModule],
           ckpt_io: AtomicCheckpointIO) -> tuple[JamendoDataModule, TaggingModule, SWA, pl.Trainer]:  # fmt: skip
    """Data (checked: every data problem stops the run here, before any training time is spent), module, trainer."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = FeatureSpec.from_dict(OmegaConf.to_container(cfg.features, resolve=True))
    dm: JamendoDataModule = instantiate(cfg.data, features=spec, _recursive_=False)
    made.append(dm)
    dm.check()
    check_scorable(dm)
    set_n_tags(cfg, dm)
    net = build_net(cfg.model)
    module = TaggingModule.from_config(cfg, net, build_loss(cfg.loss, dm))

    callbacks = {name: instantiate(c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    swa = next((c for c in callbacks.values() if isinstance(c, SWA)), None)
    if swa is None:
        raise ValueError("callbacks.swa is missing: the final model is the average of the last epochs' weights "
                         "(SWA); keep callbacks.swa (conf/callbacks/default.yaml)")
    max_epochs = cfg.trainer.get("max_epochs")
    if cfg.get("ckpt_path"):
        check_resume(cfg.ckpt_path, dm, max_epochs)
    ckpt_io.run_info = run_info(dm, max_epochs)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        callbacks=list(callbacks.values()),
        logger=build_logger(cfg),
        plugins=[ckpt_io],
    )
    check_launch(trainer)
    return dm, module, swa, trainer


def _fit(cfg: DictConfig, dm: JamendoDataModule, module: TaggingModule, trainer: pl.Trainer,
         ckpt_io: AtomicCheckpointIO) -> None:  # fmt: skip
    """``trainer.fit``; running out of memory or a non-finite loss is one line naming the fix."""
    device = trainer.strategy.root_device
    try:
        with out_of_memory(
            f"training {cfg.model.filters} on {dm.spec.name} x {dm.input_length} frames, batch {dm.batch_size}, "
            f"precision {trainer.precision}, on {device}",
            "lower data.batch_size or data.input_length, use trainer.precision=16-mixed, or run fewer jobs on "
            "this GPU",
        ):
            trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        ckpt_io.wait()  # Lightning's teardown has waited already; nothing may still be writing last.ckpt below
    except FloatingPointError as e:
        ckpt_io.wait(raise_error=False)
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            epoch = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("epoch", "?")
            kept = f"the last good checkpoint, {last} (end of epoch {epoch}), is kept: resume with ckpt_path={last}"
        else:
            kept = f"no checkpoint was written yet ({last} is written at the end of each epoch)"
        raise TrainingDiverged(
            f"{str(e).split(';')[0]}; {kept}. Lower optim.lr (now {cfg.optim.lr}) or check the data "
            f"(`freqtag info {dm.store_path}`)"
        ) from e


def _evaluate(cfg: DictConfig, dm: JamendoDataModule, module: TaggingModule, trainer: pl.Trainer,
              eval_batch_frames: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """final.ckpt, whole-track scores of validation and test, predictions and thresholds, logged.

    Under DDP every rank evaluates its share; rank 0 writes the run directory.
    """
    out = Path(cfg.paths.output_dir)
    writer = rank() == 0
    final = final_path(out)
    if writer:
        write_final(final, final_checkpoint(module, cfg, dm))
    metrics: dict[str, dict[str, float]] = {}
    for split in ("validation", "test"):
        d = dm.splits[split]
        probs = evaluate_tracks(module.net, dm, split, trainer.strategy.root_device, eval_batch_frames)
        metrics[split] = tagging_scores(probs, d.split.labels)
        if not writer:
            continue
        write_predictions(predictions_path(out, split), d.split.track_ids, dm.tags, probs, d.split.labels)
        if split == "validation":
            thresholds = best_f1_thresholds(probs, d.split.labels)
            write_thresholds(thresholds_path(final), dm.tags, thresholds)
    if writer and trainer.logger is not None:
        prefix = {"validation": "val", "test": "test"}
        flat = {f"{prefix[s]}/{k}": v for s, m in metrics.items() for k, v in m.items()}
        trainer.logger.log_metrics(flat, step=trainer.global_step)
        trainer.logger.save()
        log_final(trainer.logger, cfg, flat, final)
    return metrics


def check_launch(trainer: pl.Trainer) -> None:
    """Refuse a multirun whose jobs would spawn DDP ranks by re-running the script (each rank a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if trainer.world_size <= 1 or not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is not None and env.creates_processes_externally:
        return  # SLURM (submitit) or torchrun started the ranks: fine
    raise ValueError(
        f"trainer.devices={trainer.num_devices} in a multirun: Lightning would start each rank by re-running "
        f"the whole sweep. Run grids with one device per job (hydra/launcher=joblib_gpu), or one SLURM job per "
        f"run whose tasks are the ranks (hydra/launcher=slurm)"
    )


