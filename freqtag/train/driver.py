"""Build a run from the Hydra config and carry it out: fit, SWA, whole-track evaluation, run directory.

Run directory (one Hydra job)::

    .hydra/                         Hydra's record of the config and overrides
    checkpoints/last.ckpt           resumable (ckpt_path=...), written atomically every epoch (in the background)
    checkpoints/final.ckpt          SWA weights with BatchNorm recomputed, plus what predicting needs
    predictions/{validation,test}.npz
    metrics.json
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import Dataset, Sampler

from freqtag import __version__
from freqtag.data.datamodule import DataError, JamendoDataModule
from freqtag.data.normalise import normalise
from freqtag.data.jamendo import JamendoFormatError
from freqtag.data.store import FeatureStore, StoreError
from freqtag.features import FeatureSpec
from freqtag.metrics import best_f1_thresholds, tagging_scores
from freqtag.runs import final_path, predictions_path, thresholds_path, write_final, write_predictions, write_thresholds
from freqtag.system.allocator import keep_freed_memory
from freqtag.system.atomic import atomic_save, atomic_save_bytes, atomic_write_text
from freqtag.system.faults import DiskFullError
from freqtag.system.memory import OutOfMemory, out_of_memory, release_device_memory
from freqtag.system.precision import evaluation_precision, set_fp32_precision
from freqtag.system.quiet import quiet_third_party
from freqtag.tag.models import batch_track_probabilities, masked_layers
from freqtag.train.loggers import build_logger, finish_wandb, log_final
from freqtag.train.module import TaggingModule, seed_dropout, track_probabilities
from freqtag.train.overrides import ConfigError, check_devices, check_overrides, uses_gpu
from freqtag.train.swa import SWA, recompute_batchnorm

__all__ = [
    "run", "main", "build_net", "atomic_save", "AtomicCheckpointIO", "evaluate_tracks",
    "TrainingDiverged", "ResumeError", "check_resume", "EVAL_BATCH_FRAMES", "TrackBatchSampler", "TrackBatchDataset",
    "check_eval_batch_frames", "check_async_checkpoint",
]

#: Frames per forward pass of batched whole-track evaluation (config ``eval_batch_frames``): about 25 minutes of
#: mel128, the longest single track's pass today, in GPU memory about 1.6 GiB of activations at mel128.
EVAL_BATCH_FRAMES = 65536

class TrainingDiverged(FloatingPointError):
    """The loss became NaN/inf: the run stopped; names the checkpoint that is kept and what to change."""


class ResumeError(ValueError):
    """``ckpt_path`` names a checkpoint this run cannot continue (missing, damaged, other tags or features)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (last.ckpt) written through ``atomic_save``, carrying what the run was trained on.

    ``run_info`` (tags, feature recipe, input length) is stored under the
    ``freqtag`` key, so a resume with other tags or features is refused
    before training (:func:`check_resume`) instead of loading silently.

    ``async_checkpoint``: the step loop does not wait for the disk. The
    checkpoint is serialised by ``torch.save`` into host memory on the calling
    thread (a snapshot: the bytes a synchronous save would write, taken before
    the next step changes a weight), and a background thread writes them
    atomically (temporary name, fsync, rename). One write at a time: the next
    save, a load or a removal waits for the one in flight, and so does the end
    of fit (``teardown``) or a failure. A failed write (disk full: the same
    one-line :class:`DiskFullError`) is raised by the next of these; when the
    run is already failing for another reason it is only warned about.
    Lightning's own ``AsyncCheckpointIO`` is not used: it clones tensors on
    their device (GPU memory, not host), shares non-tensor state with the
    trainer, queues any number of snapshots, and re-raises from ``teardown``
    over the run's own error.
    """

    def __init__(self, run_info: dict[str, Any] | None = None, async_checkpoint: bool = False) -> None:
        super().__init__()
        self.run_info = run_info
        self.async_checkpoint = bool(async_checkpoint)
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if self.run_info is not None:
            checkpoint = {**checkpoint, "freqtag": self.run_info}
        if not self.async_checkpoint:
            atomic_save(checkpoint, path)
            return
        self.wait()
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self._writer = threading.Thread(target=self._write, args=(buffer, Path(path)), name=f"freqtag {Path(path).name}")
        self._writer.start()

    def _write(self, buffer: io.BytesIO, path: Path) -> None:
        """The background thread: the serialised checkpoint onto disk; an error is kept for :meth:`wait`."""
        try:
            atomic_save_bytes(buffer.getbuffer(), path)
        except BaseException as e:  # noqa: BLE001 - raised on the training thread by wait()
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight (if any) is on disk under its name; raise its error (``raise_error``)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None and raise_error:
            error, self._error = self._error, None
            raise error

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: str | Path) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """End of fit (or a failure): the last write finishes first; its error is raised unless one already is."""
        failing = sys.exc_info()[1] is not None
        self.wait(raise_error=not failing)
        if failing and self._error is not None:
            error, self._error = self._error, None
            warnings.warn(f"writing a checkpoint in the background failed as well: {error}", stacklevel=2)
        super().teardown()


def run_info(dm: JamendoDataModule) -> dict[str, Any]:
    return {"tags": list(dm.tags), "features": dm.spec.to_dict(), "input_length": dm.input_length}


def check_resume(ckpt_path: str | Path, dm: JamendoDataModule) -> None:
    """Refuse, before any training, a ``ckpt_path`` that is missing, unreadable, or made with other tags/features."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ResumeError(f"ckpt_path={path}: no such file; resume from <run>/checkpoints/last.ckpt of the killed run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ResumeError(
            f"ckpt_path={path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"it is damaged or not a Lightning checkpoint: resume from another one or start again without ckpt_path"
        ) from None
    info = ckpt.get("freqtag") if isinstance(ckpt, dict) else None
    if info is None:
        return  # written before checkpoints carried it: Lightning's own checks apply
    if list(info["tags"]) != list(dm.tags):
        theirs, ours = list(info["tags"]), list(dm.tags)
        diff = next((f"tag {i + 1} is {a} there, {b} here" for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                    f"{len(theirs)} tags there, {len(ours)} here")
        raise ResumeError(
            f"ckpt_path={path} was trained on another tag list than {dm.tags_source} ({diff}): resume with the "
            f"run's own data.tags_file, or start a new run without ckpt_path"
        )
    if FeatureSpec.from_dict(info["features"]) != dm.spec:
        raise ResumeError(
            f"ckpt_path={path} was trained on '{info['features']['name']}' features, this run uses "
            f"{dm.spec.name} ({dm.store_path}) with another recipe: resume with features={info['features']['name']} "
            f"and its store, or start a new run without ckpt_path"
        )


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


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def check_eval_batch_frames(value: Any) -> int:
    """``eval_batch_frames`` as an int >= 0, or one :class:`ConfigError` line naming it and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"eval_batch_frames={value!r}: must be 0 (whole-track evaluation one track per forward pass) or a "
            f"positive number of frames per pass (default {EVAL_BATCH_FRAMES}; lower it if evaluation runs out of memory)"
        )
    return value


def check_async_checkpoint(value: Any) -> bool:
    """``async_checkpoint`` as a bool (a string such as "no" would be truthy), or one :class:`ConfigError` line."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"async_checkpoint={value!r}: must be true (last.ckpt written in a background thread) or false "
            f"(written before the next training step)"
        )
    return value


class TrackBatchSampler(Sampler[list[int]]):
    """This rank's tracks (items rank, rank+W, ..., as :class:`~freqtag.data.samplers.TrackSampler`) in batches of
    similar length, longest first. A batch is closed when one more track would take it past ``batch_frames``
    frames padded to its longest (a longer track goes alone), or when the next track is shorter than
    ``MIN_FILL`` of its longest, so padding is at most a quarter of any pass (on a real split sorted
    neighbours differ by a few frames; a small split of scattered lengths gets more passes instead).
    Deterministic; every item exactly once."""

    MIN_FILL = 0.75

    def __init__(self, lengths: np.ndarray, input_length: int, batch_frames: int, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        items = list(range(rank, len(lengths), world_size))
        size = {i: max(int(lengths[i]), input_length) for i in items}  # a short track still costs one window
        items.sort(key=lambda i: (-size[i], i))
        self.batches: list[list[int]] = []
        for i in items:
            batch = self.batches[-1] if self.batches else None
            longest = size[batch[0]] if batch else 0
            if batch and (len(batch) + 1) * longest <= batch_frames and size[i] >= self.MIN_FILL * longest:
                batch.append(i)
            else:
                self.batches.append([i])

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


class TrackBatchDataset(Dataset):
    """Whole tracks of a batch, normalised and zero padded to the longest: ``x`` (B, bands, T), ``frames`` (B,)."""

    def __init__(self, store: FeatureStore, rows: np.ndarray) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        frames = np.array([int(self.store.lengths[self.rows[i]]) for i in batch], dtype=np.int64)
        x16 = torch.zeros((len(batch), self.store.n_mels, int(frames.max())), dtype=torch.float16)
        for k, i in enumerate(batch):
            x16[k, :, : frames[k]] = torch.from_numpy(self.store.crop(int(self.rows[i]), 0, int(frames[k]))).t()
        x = normalise(x16, self.store.mean, self.store.std, frames)  # the per-track arithmetic; zero past each end
        return {"item": torch.tensor(list(batch)), "x": x, "frames": torch.from_numpy(frames)}


@torch.no_grad()
def evaluate_tracks(net: nn.Module, dm: JamendoDataModule, split: str, device: torch.device,
                    eval_batch_frames: int = 0) -> np.ndarray:  # fmt: skip
    """Whole-track probabilities (N, n_tags) in split-TSV order.

    ``eval_batch_frames`` 0: one track per forward pass (the reference's
    evaluation, and this function's default for direct callers). N > 0 (run's
    config default :data:`EVAL_BATCH_FRAMES`): tracks of similar length share a
    pass of at most N padded frames (:class:`TrackBatchSampler`), scored by
    :func:`~freqtag.tag.models.batch_track_probabilities`, whose masks keep the
    padding out of every track's windows: each row equals the one-track pass to
    float rounding (bit for bit for a track alone in its pass). Fewer, larger
    passes keep a GPU busy; a network that cannot be masked is scored one
    track per pass.

    Under DDP each rank scores its own tracks (never a repeat) and the rows are
    summed over the ranks, so every rank returns every track exactly once.
    """
    eval_batch_frames = check_eval_batch_frames(eval_batch_frames)
    net.eval().to(device)
    n = len(dm.splits[split].rows)
    probs = torch.zeros((n, len(dm.tags)), dtype=torch.float32, device=device)
    seen = torch.zeros(n, dtype=torch.int32, device=device)
    batched = eval_batch_frames > 0 and masked_layers(net) is not None
    if batched:
        dm.check()
        assert dm.reader is not None
        rows = dm.splits[split].rows
        rank, world = dm._rank()
        loader = dm._loader(TrackBatchDataset(dm.reader, rows),
                            TrackBatchSampler(dm.reader.lengths[rows], dm.input_length, eval_batch_frames, rank, world))
    else:
        loader = dm.track_loader(split)
    batch: dict[str, Any] = {}
    try:
        with evaluation_precision(device):
            for batch in loader:
                if batched:
                    items = batch["item"].to(device, non_blocking=True)  # pinned for a GPU: no host sync
                    x = batch["x"].to(device, non_blocking=True)
                    probs[items] = batch_track_probabilities(net, x, batch["frames"].tolist())
                else:
                    batch = dm.on_device(batch, device)
                    items = batch["item"]
                    probs[items] = track_probabilities(net, batch["x"])
                seen[items] += 1
    except torch.OutOfMemoryError:  # named here, where the tracks are known; nothing is formatted per track
        ids = dm.splits[split].split.track_ids
        got = [int(i) for i in batch["item"]] if "item" in batch else []
        if len(got) > 1:
            what = (f"whole-track evaluation of {split} tracks {ids[got[0]]} and {len(got) - 1} more "
                    f"({len(got)} x {int(batch['x'].shape[-1])} frames in one pass) on {device}")
            fix = (f"lower eval_batch_frames (now {eval_batch_frames}; 0 scores one track per pass), evaluate on a "
                   f"GPU with more free memory (fewer jobs on it), or run predict with --device cpu")
        else:
            what = f"whole-track evaluation of {split} track {ids[got[0]] if got else '?'} on {device}"
            fix = "evaluate on a GPU with more free memory (fewer jobs on it), or run predict with --device cpu"
        with out_of_memory(what, fix):
            raise
    if distributed():
        torch.distributed.all_reduce(probs)
        torch.distributed.all_reduce(seen)
    if not bool((seen == 1).all()):
        twice, never = int((seen > 1).sum()), int((seen == 0).sum())
        raise RuntimeError(f"{split}: {twice} tracks scored more than once and {never} never; the evaluation is wrong")
    return probs.cpu().numpy()


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
    check_devices(cfg.trainer)
    try:
        set_fp32_precision(str(cfg.get("fp32_precision", "ieee")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    eval_batch_frames = check_eval_batch_frames(cfg.get("eval_batch_frames", EVAL_BATCH_FRAMES))
    ckpt_io = AtomicCheckpointIO(async_checkpoint=check_async_checkpoint(cfg.get("async_checkpoint", True)))
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = FeatureSpec.from_dict(OmegaConf.to_container(cfg.features, resolve=True))
    dm: JamendoDataModule = instantiate(cfg.data, features=spec, _recursive_=False)
    made.append(dm)
    dm.check()  # every data problem stops the run here, before any training time is spent
    check_scorable(dm)
    set_n_tags(cfg, dm)
    net = build_net(cfg.model)
    module = TaggingModule.from_config(cfg, net, build_loss(cfg.loss, dm))

    callbacks = {name: instantiate(c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    swa = next((c for c in callbacks.values() if isinstance(c, SWA)), None)
    if swa is None:
        raise ValueError("callbacks.swa is missing: the final model is the SWA model (see REFERENCE.md)")
    if cfg.get("ckpt_path"):
        check_resume(cfg.ckpt_path, dm)
    ckpt_io.run_info = run_info(dm)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        callbacks=list(callbacks.values()),
        logger=build_logger(cfg),
        plugins=[ckpt_io],
    )
    check_launch(trainer)
    device = trainer.strategy.root_device
    if dm.in_memory:
        dm.check_fits(device, copies=trainer.num_devices if device.type == "cpu" else 1)
    try:
        with out_of_memory(
            f"training {cfg.model.filters} on {spec.name} x {dm.input_length} frames, batch {dm.batch_size}, "
            f"precision {trainer.precision}, on {device}",
            "lower data.batch_size or data.input_length, use trainer.precision=16-mixed, or run fewer jobs on "
            "this GPU",
        ):
            trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        ckpt_io.wait()  # Lightning's teardown has waited already; nothing may still be writing last.ckpt below
    except FloatingPointError as e:
        ckpt_io.wait(raise_error=False)
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            epoch = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("epoch", "?")
            kept = f"the last good checkpoint, {last} (end of epoch {epoch}), is kept: resume with ckpt_path={last}"
        else:
            kept = f"no checkpoint was written yet ({last} is written at the end of each epoch)"
        raise TrainingDiverged(
            f"{str(e).split(';')[0]}; {kept}. Lower optim.lr (now {cfg.optim.lr}) or check the data "
            f"(`freqtag info {dm.store_path}`)"
        ) from e

    finalize(module, dm, swa, device, trainer.max_epochs)
    writer = rank() == 0  # under DDP every rank evaluates its share; rank 0 writes the run directory
    final = final_path(out)
    if writer:
        write_final(final, final_checkpoint(module, cfg, dm))

    metrics: dict[str, dict[str, float]] = {}
    for split in ("validation", "test"):
        d = dm.splits[split]
        probs = evaluate_tracks(module.net, dm, split, device, eval_batch_frames)
        metrics[split] = tagging_scores(probs, d.split.labels)
        if not writer:
            continue
        write_predictions(predictions_path(out, split), d.split.track_ids, dm.tags, probs, d.split.labels)
        if split == "validation":
            thresholds = best_f1_thresholds(probs, d.split.labels)
            write_thresholds(thresholds_path(final), dm.tags, thresholds)
    if not writer:
        return metrics
    prefix = {"validation": "val", "test": "test"}
    flat = {f"{prefix[s]}/{k}": v for s, m in metrics.items() for k, v in m.items()}
    if trainer.logger is not None:
        trainer.logger.log_metrics(flat, step=trainer.global_step)
        trainer.logger.save()
        log_final(trainer.logger, cfg, flat, final)
    write_json(out / "metrics.json", {**metrics, "epochs": trainer.current_epoch, "seconds": round(time.time() - start, 1)})
    print_scores(metrics, f"{cfg.model.filters} / {spec.name} / L={dm.input_length} / {Path(str(cfg.loss._target_)).suffix[1:]}: {out}")
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


# errors a user can cause and fix: one line on stderr, no traceback (config: exit 2, data: exit 1)
USER_ERRORS = (ConfigError, DataError, StoreError, JamendoFormatError, ResumeError, TrainingDiverged, DiskFullError,
               OutOfMemory)


def user_error(e: BaseException) -> BaseException | None:
    """The user error behind ``e`` (Hydra wraps what a ``_target_`` raises), or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, USER_ERRORS):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def _fail(e: BaseException) -> None:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)


@hydra.main(config_path="pkg://freqtag.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except BaseException as e:
        finish_wandb(failed=True)
        if (known := user_error(e)) is not None:
            _fail(known)
        raise
    finish_wandb(failed=False)


def main() -> None:
    """`python train.py ...`: the overrides are checked first, then Hydra composes and runs."""
    quiet_third_party()
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        _fail(e)
    _hydra_main()
