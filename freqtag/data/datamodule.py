"""Datasets and the LightningDataModule: random crops for training, whole tracks for evaluation.

Every random choice of the input pipeline (which crop, in which order) is
made by the samplers from ``(seed, epoch)``, never inside a worker, so a run
gives the same batches with 0 or N workers, after a resume, and under DDP.
Workers only read bytes: a crop is one contiguous read from the store.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from freqtag.data.jamendo import SPLITS, TASKS, Split, read_split, split_file, task_tags
from freqtag.data.store import FeatureStore, StoreError
from freqtag.features import FeatureSpec
from freqtag.system.memory import check_fits, gib, out_of_memory

__all__ = ["CropSampler", "CropDataset", "CropRing", "RingOverwrite", "TrackDataset", "TrackSampler", "JamendoDataModule", "DataError"]


class DataError(RuntimeError):
    """The configured data cannot be used (names the file or setting and the fix)."""


IN_MEMORY_FIX = ("set data.in_memory=false (loader workers read crops from the store on disk), or run fewer "
                 "ranks or grid jobs per device")


def _seed_for(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


class CropSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (item, start frame): one uniformly random crop per track per epoch.

    ``batch_size`` is the global batch; under DDP each of ``world_size`` ranks
    takes its share of every global batch, so the set of crops in an epoch
    does not depend on the number of ranks.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        input_length: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        centre: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.input_length = input_length
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.centre = centre
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def crops(self) -> tuple[np.ndarray, np.ndarray]:
        """(items in epoch order, start frames) for the current epoch."""
        n = len(self.lengths)
        rng = _seed_for(self.seed, self.epoch, 1)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        room = np.maximum(self.lengths - self.input_length, 0)
        if self.centre:
            starts = room // 2
        else:
            starts = np.floor(rng.random(n) * (room + 1)).astype(np.int64)
        return order, starts[order]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, starts = self.crops()
        for b in range(0, len(self), 1):
            items = order[b * self.batch_size : (b + 1) * self.batch_size]
            first = starts[b * self.batch_size : (b + 1) * self.batch_size]
            share = slice(self.rank, None, self.world_size)
            yield list(zip(items[share].tolist(), first[share].tolist()))

    def __len__(self) -> int:
        """Batches per epoch; a last batch too small to give every rank a crop is left out."""
        n = len(self.lengths)
        full, rest = divmod(n, self.batch_size)
        return full + (rest >= self.world_size)


def normalised(x16: torch.Tensor, valid: torch.Tensor | np.ndarray | None, mean: float, std: float) -> torch.Tensor:
    """(B, bands, L) float16 crops -> (B, bands, L) float32 ``(x - mean) / std``, frames past ``valid`` set to 0.

    The input is already band-major: the transposition is done where it is
    cheap (in the loader's workers, or once when the in-memory frames are
    loaded), so this is one converting copy and two in-place passes. Frames
    past ``valid`` are zeroed by one mask over the batch, built on the crops'
    device: no host decision per crop, so no copy of ``valid`` to the host
    (a sync per step on a GPU) and one kernel whatever the number of short crops.
    """
    out = torch.empty(x16.shape, dtype=torch.float32, device=x16.device)
    out.copy_(x16)
    out.sub_(mean).div_(std)
    if valid is not None:
        if isinstance(valid, np.ndarray):
            valid = torch.as_tensor(valid, device=x16.device)
        past = torch.arange(x16.shape[-1], device=x16.device) >= valid[:, None]
        out.masked_fill_(past[:, None, :], 0.0)
    return out


_RINGS: "weakref.WeakValueDictionary[int, CropRing]" = weakref.WeakValueDictionary()
_RING_IDS = itertools.count(1)
PREFETCH = 2  # batches each worker process makes ahead (the DataLoader's prefetch_factor)
PINNED_DEVICE_TYPES = ("cuda",)  # batches go to these devices from pinned host memory
RING_HOLD = 3  # batches a consumer may hold, beyond the DataLoader's prefetch, before a slot is reused


class RingOverwrite(RuntimeError):
    """A crop batch's slot was written again before the batch was used (the consumer held too many)."""


class CropRing:
    """Shared-memory slots that DataLoader workers write crop batches into; a batch carries only its slot.

    A tensor sent back from a worker costs a new shared-memory segment and a
    file descriptor handed over a socket, per tensor and per batch: measured,
    that caps the DataLoader at about 750 batches/s with nothing in them, and
    at 9k crops/s with the crops. Slots made once, before the workers start,
    cost nothing per batch. Each worker cycles through its own
    ``PREFETCH + RING_HOLD`` slots, and a slot's sequence number (0 while it
    is being written) shows whether it still holds the batch a reader asks for.
    """

    per_worker = PREFETCH + RING_HOLD

    def __init__(self, workers: int, batch: int, bands: int, length: int) -> None:
        self.id = next(_RING_IDS)
        self.x = torch.zeros((workers * self.per_worker, batch, bands, length), dtype=torch.float16).share_memory_()
        self.seq = torch.zeros(workers * self.per_worker, dtype=torch.int64).share_memory_()
        self._written = 0  # batches this worker process wrote
        _RINGS[self.id] = self

    def claim(self) -> tuple[int, int]:
        """(slot, token) for the next batch of this worker; marks the slot as being written."""
        info = get_worker_info()
        assert info is not None, "CropRing slots are written by DataLoader workers"
        self._written += 1
        slot = info.id * self.per_worker + self._written % self.per_worker
        self.seq[slot] = 0
        return slot, self._written * info.num_workers + info.id + 1

    def publish(self, slot: int, token: int) -> None:
        self.seq[slot] = token

    def check(self, slot: int, token: int) -> None:
        if int(self.seq.numpy()[slot]) != token:  # host shared memory, read through numpy: no tensor call
            raise RingOverwrite(
                f"a crop batch was overwritten in its shared-memory slot before it was used: whatever iterates "
                f"the loader held more than {RING_HOLD} batches without passing them through the DataModule's "
                f"hooks (Lightning's on_before_batch_transfer .. on_after_batch_transfer, or dm.on_device); use "
                f"each batch before taking the next, or set data.num_workers=0"
            )

    @staticmethod
    def read(batch: dict[str, Any], use: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``use`` applied to the batch's crops in their slot, checked to be still the batch's own after."""
        ring = _RINGS.get(int(batch.pop("ring")))
        if ring is None:
            raise RingOverwrite("this crop batch's DataLoader is gone, and with it the shared memory that held its "
                                "crops: keep the loader while its batches are in use")
        slot, token = int(batch.pop("slot")), int(batch.pop("token"))
        ring.check(slot, token)
        out = use(ring.x[slot, : len(batch["valid"])])
        ring.check(slot, token)
        return out


class CropDataset(Dataset):
    """Crops of ``input_length`` frames; an item is a whole batch of (track number, start) pairs.

    Each crop is one contiguous read from the store, transposed to
    (bands, L) float16 (half the bytes of float32, to the GPU too);
    ``on_after_batch_transfer`` normalises it on the batch's device. In
    worker processes the crops go into the loader's shared ``ring`` and the
    batch carries only small numpy arrays (cheap to send) and the slot. In
    the in-memory mode the DataModule gathers the crops itself.
    """

    def __init__(
        self,
        store: FeatureStore,
        rows: np.ndarray,
        labels: np.ndarray,
        input_length: int,
        in_memory: bool = False,
    ) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.ascontiguousarray(labels)
        self.input_length = input_length
        self.in_memory = in_memory
        self.ring: CropRing | None = None  # set by the DataModule for worker processes
        self._buffer: np.ndarray | None = None  # this process's (B, L, bands) read buffer

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return self.store.lengths[self.rows]

    def __getitem__(self, batch: Sequence[tuple[int, int]]) -> dict[str, Any]:
        pairs = np.array(batch, dtype=np.int64).reshape(-1, 2)
        items, starts = pairs[:, 0], pairs[:, 1]
        rows = self.rows[items]
        L = self.input_length
        valid = np.minimum(self.store.lengths[rows] - starts, L)
        out: dict[str, Any] = {"item": items, "row": rows, "start": starts, "valid": valid, "y": self.labels[items]}
        if self.in_memory:
            return out
        # time-major frames: one contiguous read per crop into this process's buffer, then one transposing
        # copy; frames past ``valid`` are left as they are (the normalisation sets them to 0)
        if self._buffer is None or len(self._buffer) < len(items):
            self._buffer = np.empty((len(items), L, self.store.n_bands), dtype=np.float16)
        x = self._buffer[: len(items)]
        frames, offsets = self.store.frames, self.store.offsets
        for k in range(len(items)):
            o, v = int(offsets[rows[k]] + starts[k]), int(valid[k])
            x[k, :v] = frames[o : o + v]
        crops = torch.from_numpy(x).transpose(1, 2)
        ring = self.ring if get_worker_info() is not None else None
        if ring is None:
            out["x16"] = crops.contiguous()
            return out
        slot, token = ring.claim()
        ring.x[slot, : len(items)].copy_(crops)
        ring.publish(slot, token)
        out.update(ring=ring.id, slot=slot, token=token)
        return out


class TrackSampler(Sampler[list[int]]):
    """One whole track per batch, this rank's share only, never padded with repeats.

    A DistributedSampler would repeat tracks to even out the ranks; a repeated
    track would be scored twice, so each rank takes items rank, rank+W, ...
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.items = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[list[int]]:
        return iter([i] for i in self.items)

    def __len__(self) -> int:
        return len(self.items)


class TrackDataset(Dataset):
    """Whole tracks, one per batch: any length scores the same as on its own."""

    def __init__(self, store: FeatureStore, rows: np.ndarray, labels: np.ndarray) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        (i,) = batch
        row = int(self.rows[i])
        x = torch.from_numpy(self.store.crop(row, 0, int(self.store.lengths[row]))).t()[None]
        return {"item": torch.tensor([i]), "x": normalised(x, None, self.store.mean, self.store.std), "y": self.labels[[i]]}


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
        self.store: FeatureStore | None = None
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
        if self.store is not None:
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
            store = FeatureStore(self.store_path)
        except StoreError as e:
            raise DataError(str(e)) from e
        if store.spec != self.spec:
            if store.spec.name == self.spec.name:  # same name, another recipe: an older freqtag's store
                raise DataError(
                    f"{self.store_path} was made with another '{self.spec.name}' recipe than this freqtag's "
                    f"({'; '.join(store.spec.differences(self.spec))}): rebuild it with `freqtag prepare` "
                    f"(a synthetic store: delete its folder)"
                )
            raise DataError(
                f"{self.store_path} holds '{store.spec.name}' features but the run asks for features="
                f"{self.spec.name} with a different recipe: choose features={store.spec.name} or point "
                f"data.store at a {self.spec.name} store"
            )
        self.tags, self.tags_source = task_tags(self.splits_dir, self.task, self.tags_file)
        for name in SPLITS:
            split = read_split(split_file(self.splits_dir, name, self.task), self.tags, name=name)
            if len(split) == 0:
                raise DataError(f"{split.path}: the {name} split is empty")
            missing = store.missing(split.track_ids)
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                if self.missing_tracks == "stop":
                    raise DataError(
                        f"{split.path}: {len(missing)} of {len(split)} tracks are not in {self.store_path} "
                        f"({shown}); re-run `freqtag prepare` for them, or set data.missing_tracks=skip to "
                        f"leave them out"
                    )
                keep = [i for i, t in enumerate(split.track_ids) if t in store]
                split = _subset(split, keep)
                if len(split) == 0:
                    raise DataError(f"{split.path}: none of its {len(missing)} tracks is in {self.store_path}; "
                                    f"re-run `freqtag prepare` for them, or point data.store at their store")
            rows = np.array([store.row[t] for t in split.track_ids], dtype=np.int64)
            self.splits[name] = SplitData(split, rows)
        if self.check_finite:  # one read of the store: NaN/inf would only show up as a NaN loss, hours later
            bad = store.nonfinite_tracks(np.concatenate([d.rows for d in self.splits.values()]))
            if bad:
                shown = ", ".join(f"{t} ({n} values)" for t, n in bad[:5]) + (" ..." if len(bad) > 5 else "")
                raise DataError(
                    f"{self.store_path}: {len(bad)} tracks hold NaN/inf features ({shown}); rebuild the store with "
                    f"`freqtag prepare` (which skips such files), or set data.check_finite=false to train anyway"
                )
        self.store = store

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
        assert self.store is not None
        return self.store.band_major_bytes(pad=self.input_length)

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
        assert self.store is not None
        return self.store.mean

    @property
    def std(self) -> float:
        assert self.store is not None
        return self.store.std

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
        assert self.store is not None
        d = self.splits[split]
        return CropDataset(self.store, d.rows, d.split.labels, self.input_length, in_memory=self.in_memory)

    def crop_loader(
        self, split: str, shuffle: bool, centre: bool = False, epoch: int | None = None, all_ranks: bool = False
    ) -> DataLoader:
        """Crops of a split, this rank's share of every global batch (``all_ranks``: the whole batches).

        Its batches hold numpy arrays (and, from worker processes, a slot of
        shared memory instead of the crops): pass each through the batch
        hooks (Lightning does; by hand: ``on_device``) before taking the next.
        """
        ds = self.crop_dataset(split)
        rank, world = (0, 1) if all_ranks else self._rank()
        sampler = CropSampler(ds.lengths(), self.input_length, self.batch_size, self.seed + SPLITS.index(split),
                              shuffle=shuffle, centre=centre, rank=rank, world_size=world)
        if epoch is not None:
            sampler.set_epoch(epoch)
        return self._loader(ds, sampler, ring_batch=math.ceil(self.batch_size / world))

    def train_dataloader(self) -> DataLoader:
        return self.crop_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The cheap per-epoch check: the centre crop of every validation track."""
        return self.crop_loader("validation", shuffle=False, centre=True)

    def track_loader(self, split: str) -> DataLoader:
        """Whole tracks of a split, this rank's share, for the final evaluation."""
        self.check()
        assert self.store is not None
        d = self.splits[split]
        rank, world = self._rank()
        return self._loader(TrackDataset(self.store, d.rows, d.split.labels), TrackSampler(len(d.rows), rank, world))

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
            batch["x"] = CropRing.read(batch, lambda x: normalised(x, valid, self.mean, self.std))
        else:
            x16 = batch.pop("x16") if "x16" in batch else self.gather(batch["row"], batch["start"])
            batch["x"] = normalised(x16, valid, self.mean, self.std)
        return batch

    def gather(self, rows: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Crops (B, bands, L) float16 from the in-RAM (or on-GPU) frames, one index_select.

        The frames are held band-major, (bands, total frames + L), so a crop
        is a (bands, L) window at its first frame: a strided view of every
        window, indexed by the crops' first frames, gives the batch already
        transposed. The L extra zero frames keep the last window in bounds;
        frames read past a track's end are zeroed by the normalisation.
        """
        assert self.store is not None
        device = rows.device
        if self._frames is None or self._frames.device != device:
            self._frames = None  # a copy on another device goes before the new one is made
            with out_of_memory(f"data.in_memory=true: the store {self.store_path} "
                               f"({gib(self.in_memory_bytes())}) on {device}", IN_MEMORY_FIX):
                self._frames = self.store.load_band_major(pad=self.input_length, device=device)
            self._offsets = torch.from_numpy(self.store.offsets).to(device)
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
