"""The LightningDataModule: the store, split TSVs and tags checked once, then the loaders and batch hooks.

Every random choice of the input pipeline is made by the samplers
(:mod:`freqtag.data.samplers`) from ``(seed, epoch)``, never inside a worker,
so a run gives the same batches with 0 or N workers, after a resume, and
under DDP. Workers only read bytes: a crop is one contiguous read from the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from freqtag.data.datasets import CropDataset, TrackDataset
from freqtag.data.jamendo import SPLITS, TASKS, Split, read_split, split_file, task_tags
from freqtag.data.normalise import normalise
from freqtag.data.ring import PREFETCH, CropRing
from freqtag.data.samplers import CropSampler, TrackSampler
from freqtag.data.store import FeatureStore, StoreError
from freqtag.features import FeatureSpec
from freqtag.system.memory import check_fits, gib, out_of_memory

__all__ = ["JamendoDataModule", "DataError"]


class DataError(RuntimeError):
    """The configured data cannot be used (names the file or setting and the fix)."""


IN_MEMORY_FIX = ("set data.in_memory=false (loader workers read crops from the store on disk), or run fewer "
                 "ranks or grid jobs per device")

PINNED_DEVICE_TYPES = ("cuda",)  # batches go to these devices from pinned host memory


@dataclass
class SplitData:
    split: Split
    rows: np.ndarray  # store row of each split track


class JamendoDataModule(pl.LightningDataModule):
    """MTG-Jamendo-format data: a feature store plus split TSVs and a tag list.

    ``synthetic`` (tracks, seed) makes the demo dataset on first use when the
    store is missing; for the real dataset a missing store is an error that
    says how to prepare it.
    """

    def __init__(
        self,
        store: str,
        splits_dir: str,
        tags_file: str | None,
        features: FeatureSpec | dict[str, Any],
        input_length: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        in_memory: bool = False,
        seed: int = 42,
        missing_tracks: str = "stop",
        check_finite: bool = True,
        synthetic: dict[str, Any] | None = None,
        multiprocessing_context: str | None = None,
        task: str = "moodtheme",
        split: int = 0,
    ) -> None:
        super().__init__()
        self.store_path = Path(store)
        self.splits_dir = Path(splits_dir)
        self.tags_file = Path(tags_file) if tags_file else None
        if task not in TASKS:
            raise DataError(f"data.task={task!r}: valid values are {', '.join(TASKS)}")
        self.task = task
        if str(split) not in {"0", "1", "2", "3", "4"}:
            raise DataError(f"data.split={split!r}: MTG-Jamendo's splits are 0, 1, 2, 3 and 4")
        self.split = int(split)
        self.tags_source = ""
        self.spec = features if isinstance(features, FeatureSpec) else FeatureSpec.from_dict(dict(features))
        if int(input_length) <= 0 or int(input_length) % 32:
            raise DataError(f"data.input_length={input_length}: must be a positive multiple of 32 (e.g. 128 or 224)")
        self.input_length = int(input_length)
        if int(batch_size) <= 0:
            raise DataError(f"data.batch_size={batch_size}: must be positive")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.in_memory = bool(in_memory)
        self.seed = int(seed)
        if missing_tracks not in ("stop", "skip"):
            raise DataError(f"data.missing_tracks={missing_tracks!r}: valid values are stop, skip")
        self.missing_tracks = missing_tracks
        self.check_finite = bool(check_finite)
        self.synthetic = dict(synthetic) if synthetic else None
        self.multiprocessing_context = multiprocessing_context
        self.reader: FeatureStore | None = None  # the store at store_path (data.store), open once checked
        self.splits: dict[str, SplitData] = {}
        self.tags: list[str] = []
        self._frames: torch.Tensor | None = None
        self._offsets: torch.Tensor | None = None

    # -- set-up -------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.synthetic is not None and not self.store_path.exists():
            from freqtag.data.synthetic import synthesize

            out = self.store_path.parent
            synthesize(out, tracks=int(self.synthetic.get("tracks", 1000)), seed=int(self.synthetic.get("seed", 0)),
                       features=self.spec.name)

    def check(self) -> None:
        """Open and cross-check store, TSVs and tags; every problem stops here, before training."""
        if self.reader is not None:
            return
        if not self.store_path.exists() and self.synthetic is None:
            raise DataError(
                f"feature store {self.store_path} does not exist. Prepare MTG-Jamendo with\n"
                f"  freqtag prepare --features {self.spec.name} "
                + ("--npy-dir <MTG melspecs dir>" if self.spec.name == "mel96" else "--audio-dir <MTG audio dir>")
                + f" --splits {self.splits_dir} --out {self.store_path}\n"
                f"or set data.store=... to where it is; to try freqtag without the dataset run `make train` "
                f"(python train.py experiment=demo)"
            )
        self.prepare_data()
        try:
            reader = FeatureStore(self.store_path)
        except StoreError as e:
            raise DataError(str(e)) from e
        if reader.spec != self.spec:
            if reader.spec.name == self.spec.name:  # same name, another recipe: an older freqtag's store
                raise DataError(
                    f"{self.store_path} was made with another '{self.spec.name}' recipe than this freqtag's "
                    f"({'; '.join(reader.spec.differences(self.spec))}): rebuild it with `freqtag prepare` "
                    f"(a synthetic store: delete its folder)"
                )
            raise DataError(
                f"{self.store_path} holds '{reader.spec.name}' features but the run asks for features="
                f"{self.spec.name} with a different recipe: choose features={reader.spec.name} or point "
                f"data.store at a {self.spec.name} store"
            )
        self.tags, self.tags_source = task_tags(self.splits_dir, self.task, self.tags_file)
        for name in SPLITS:
            split = read_split(split_file(self.splits_dir, name, self.task), self.tags, name=name)
            if len(split) == 0:
                raise DataError(f"{split.path}: the {name} split is empty")
            missing = reader.missing(split.track_ids)
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                if self.missing_tracks == "stop":
                    raise DataError(
                        f"{split.path}: {len(missing)} of {len(split)} tracks are not in {self.store_path} "
                        f"({shown}); re-run `freqtag prepare` for them, or set data.missing_tracks=skip to "
                        f"leave them out"
                    )
                keep = [i for i, t in enumerate(split.track_ids) if t in reader]
                split = _subset(split, keep)
                if len(split) == 0:
                    raise DataError(f"{split.path}: none of its {len(missing)} tracks is in {self.store_path}; "
                                    f"re-run `freqtag prepare` for them, or point data.store at their store")
            rows = np.array([reader.row[t] for t in split.track_ids], dtype=np.int64)
            self.splits[name] = SplitData(split, rows)
        if self.check_finite:  # one read of the store: NaN/inf would only show up as a NaN loss, hours later
            bad = reader.nonfinite_tracks(np.concatenate([d.rows for d in self.splits.values()]))
            if bad:
                shown = ", ".join(f"{t} ({n} values)" for t, n in bad[:5]) + (" ..." if len(bad) > 5 else "")
                raise DataError(
                    f"{self.store_path}: {len(bad)} tracks hold NaN/inf features ({shown}); rebuild the store with "
                    f"`freqtag prepare` (which skips such files), or set data.check_finite=false to train anyway"
                )
        self.reader = reader

    def setup(self, stage: str | None = None) -> None:
        self.check()

    def dataset_info(self) -> dict[str, Any]:
        """What a model trained here was trained on (kept in final.ckpt: predict warns about synthetic models)."""
        from freqtag.data.synthetic import is_synthetic

        self.check()
        return {
            "dataset": "synthetic" if is_synthetic(self.store_path.parent) else "mtg-jamendo",
            "task": self.task,
            "split": self.split,
            "tags_source": self.tags_source,
            "features": self.spec.name,
            "train_tracks": len(self.splits["train"].split),
        }

    def in_memory_bytes(self) -> int:
        """What ``in_memory=true`` puts on the training device: the store band-major, plus one crop of padding."""
        self.check()
        assert self.reader is not None
        return self.reader.band_major_bytes(pad=self.input_length)

    def check_fits(self, device: torch.device, copies: int = 1) -> None:
        """With ``in_memory``, stop before training if the store (once per rank sharing ``device``) does not fit.

        ``copies``: ranks that each hold the store in this memory (CPU DDP ranks share the host's RAM).
        """
        if not self.in_memory:
            return
        what = f"data.in_memory=true: the store {self.store_path}" + (f" x {copies} ranks" if copies > 1 else "")
        check_fits(self.in_memory_bytes() * copies, device, what, IN_MEMORY_FIX)

    def release(self) -> None:
        """Drop the in-memory store (RAM or GPU memory) now, not when the garbage collector gets to it."""
        self._frames = None
        self._offsets = None

    @property
    def mean(self) -> float:
        assert self.reader is not None
        return self.reader.mean

    @property
    def std(self) -> float:
        assert self.reader is not None
        return self.reader.std

    def positive_rates(self) -> np.ndarray:
        """p_i of the train split TSV (never read from a stored file)."""
        self.check()
        return self.splits["train"].split.positive_rates()

    # -- loaders ------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _on_gpu(self) -> bool:
        """Pinned host memory only helps (and only works) when the batches go to a GPU."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: Dataset, sampler: Sampler, ring_batch: int = 0) -> DataLoader:
        crops = isinstance(dataset, CropDataset)
        # in-memory crops are gathered in the main process (or on the GPU): workers would only pass indices
        workers = 0 if crops and dataset.in_memory else self.num_workers
        if crops and workers > 0:
            dataset.ring = CropRing(workers, ring_batch, self.spec.n_mels, self.input_length)
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=PREFETCH if workers > 0 else None,
            persistent_workers=workers > 0,
            pin_memory=self._on_gpu() and not crops,
            collate_fn=_numpy_batch if crops else None,
            multiprocessing_context=self.multiprocessing_context if workers > 0 else None,
        )

    def crop_dataset(self, split: str) -> CropDataset:
        self.check()
        assert self.reader is not None
        d = self.splits[split]
        return CropDataset(self.reader, d.rows, d.split.labels, self.input_length, in_memory=self.in_memory)

    def crop_loader(
        self, split: str, shuffle: bool, centre: bool = False, epoch: int | None = None, all_ranks: bool = False,
        min_last: int = 2,
    ) -> DataLoader:
        """Crops of a split, this rank's share of every global batch (``all_ranks``: the whole batches).

        ``min_last``: as :class:`~freqtag.data.samplers.CropSampler` (2 for crops that meet BatchNorm in training mode).

        Its batches hold numpy arrays (and, from worker processes, a slot of
        shared memory instead of the crops): pass each through the batch
        hooks (Lightning does; by hand: ``on_device``) before taking the next.
        """
        ds = self.crop_dataset(split)
        rank, world = (0, 1) if all_ranks else self._rank()
        sampler = CropSampler(ds.lengths(), self.input_length, self.batch_size, self.seed + SPLITS.index(split),
                              shuffle=shuffle, centre=centre, rank=rank, world_size=world, min_last=min_last)
        if epoch is not None:
            sampler.set_epoch(epoch)
        return self._loader(ds, sampler, ring_batch=math.ceil(self.batch_size / world))

    def train_dataloader(self) -> DataLoader:
        return self.crop_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The cheap per-epoch check: the centre crop of every validation track."""
        return self.crop_loader("validation", shuffle=False, centre=True, min_last=1)  # evaluation mode: any size

    def track_loader(self, split: str) -> DataLoader:
        """Whole tracks of a split, this rank's share, for the final evaluation."""
        self.check()
        assert self.reader is not None
        d = self.splits[split]
        rank, world = self._rank()
        return self._loader(TrackDataset(self.reader, d.rows, d.split.labels), TrackSampler(len(d.rows), rank, world))

    # -- on the device ------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> Any:
        """The batch's tensors to ``device``; to a GPU from pinned host memory, without the host waiting.

        A copy from ordinary (pageable) memory makes the host wait for the
        stream; from pinned memory it is queued and the step goes on. torch's
        caching host allocator keeps each pinned block until its copy is done.
        Crops still in their shared-memory slot are copied out into pinned
        memory first (checked to be the batch's own after the copy), so a
        worker may overwrite the slot while the GPU copy is still queued. On
        the CPU nothing moves (the crops are normalised straight out of the slot).
        """
        pin = device.type in PINNED_DEVICE_TYPES
        if "slot" in batch and device.type != "cpu":
            batch["x16"] = CropRing.read(batch, lambda x: x.pin_memory() if pin else x.to(device))
        return {k: _to_device(v, device, pin) for k, v in batch.items()}

    def on_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """A loader's batch ready for the network on ``device``: the three hooks, as Lightning runs them."""
        batch = self.transfer_batch_to_device(self.on_before_batch_transfer(batch, 0), device, 0)
        return self.on_after_batch_transfer(batch, 0)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Normalise the batch's float16 crops on its device (gathering them first in the in-memory mode)."""
        if "x" in batch:
            return batch
        valid = batch["valid"]  # on the crops' device: the short crops are zeroed there (no copy to the host)
        if "slot" in batch:  # on the CPU: normalise straight out of the shared slot
            batch["x"] = CropRing.read(batch, lambda x: normalise(x, self.mean, self.std, valid))
        else:
            x16 = batch.pop("x16") if "x16" in batch else self.gather(batch["row"], batch["start"])
            batch["x"] = normalise(x16, self.mean, self.std, valid)
        return batch

    def gather(self, rows: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Crops (B, bands, L) float16 from the in-RAM (or on-GPU) frames, one index_select.

        The frames are held band-major, (bands, total frames + L), so a crop
        is a (bands, L) window at its first frame: a strided view of every
        window, indexed by the crops' first frames, gives the batch already
        transposed. The L extra zero frames keep the last window in bounds;
        frames read past a track's end are zeroed by the normalisation.
        """
        assert self.reader is not None
        device = rows.device
        if self._frames is None or self._frames.device != device:
            self._frames = None  # a copy on another device goes before the new one is made
            with out_of_memory(f"data.in_memory=true: the store {self.store_path} "
                               f"({gib(self.in_memory_bytes())}) on {device}", IN_MEMORY_FIX):
                self._frames = self.reader.load_band_major(pad=self.input_length, device=device)
            self._offsets = torch.from_numpy(self.reader.offsets).to(device)
        frames = self._frames
        n = frames.shape[1] - self.input_length
        windows = frames.as_strided((n, frames.shape[0], self.input_length), (1, frames.shape[1], 1))
        return windows.index_select(0, self._offsets[rows] + starts)


def _to_device(value: Any, device: torch.device, pin: bool) -> Any:
    """A tensor on ``device`` without a blocking copy (pinned first when ``pin``); anything else as it is."""
    if not isinstance(value, torch.Tensor) or value.device == device:
        return value
    if pin and value.device.type == "cpu" and not value.is_pinned():
        value = value.pin_memory()
    return value.to(device, non_blocking=True)


def _numpy_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A crop batch as the worker made it: numpy arrays pickle into the pipe for almost nothing."""
    return batch


def _subset(split: Split, keep: list[int]) -> Split:
    return Split(
        name=split.name,
        path=split.path,
        tags=split.tags,
        track_ids=tuple(split.track_ids[i] for i in keep),
        artist_ids=tuple(split.artist_ids[i] for i in keep),
        paths=tuple(split.paths[i] for i in keep),
        durations=split.durations[keep],
        labels=split.labels[keep],
    )
