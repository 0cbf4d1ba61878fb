"""Whole-track evaluation of a trained network on a split, batched by track length, split over DDP ranks."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from freqtag.data.datamodule import JamendoDataModule
from freqtag.data.normalise import normalise
from freqtag.data.store import FeatureStore
from freqtag.system.memory import out_of_memory
from freqtag.system.precision import evaluation_precision
from freqtag.train.module import track_probabilities
from freqtag.train.overrides import ConfigError
from freqtag.wholetrack import batch_track_probabilities, masked_layers

__all__ = ["EVAL_BATCH_FRAMES", "check_eval_batch_frames", "TrackBatchSampler", "TrackBatchDataset",
           "evaluate_tracks", "distributed", "rank"]

#: Frames per forward pass of batched whole-track evaluation (config ``eval_batch_frames``): about 25 minutes of
#: mel128, the longest single track's pass today, in GPU memory about 1.6 GiB of activations at mel128.
EVAL_BATCH_FRAMES = 65536


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


class TrackBatchSampler(Sampler[list[int]]):
    """This rank's tracks (items rank, rank+W, ..., as :class:`~freqtag.data.datamodule.TrackSampler`) in batches of
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

    def __init__(self, reader: FeatureStore, rows: np.ndarray) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        frames = np.array([int(self.reader.lengths[self.rows[i]]) for i in batch], dtype=np.int64)
        x16 = torch.zeros((len(batch), self.reader.n_mels, int(frames.max())), dtype=torch.float16)
        for k, i in enumerate(batch):
            x16[k, :, : frames[k]] = torch.from_numpy(self.reader.crop(int(self.rows[i]), 0, int(frames[k]))).t()
        x = normalise(x16, self.reader.mean, self.reader.std, frames)  # the per-track arithmetic; zero past each end
        return {"item": torch.tensor(list(batch)), "x": x, "frames": torch.from_numpy(frames)}


@torch.no_grad()
def evaluate_tracks(net: nn.Module, dm: JamendoDataModule, split: str, device: torch.device,
                    eval_batch_frames: int = 0) -> np.ndarray:  # fmt: skip
    """Whole-track probabilities (N, n_tags) in split-TSV order.

    ``eval_batch_frames`` 0: one track per forward pass (the reference's
    evaluation, and this function's default for direct callers). N > 0 (run's
    config default :data:`EVAL_BATCH_FRAMES`): tracks of similar length share a
    pass of at most N padded frames (:class:`TrackBatchSampler`), scored by
    :func:`~freqtag.wholetrack.batch_track_probabilities`, whose masks keep the
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
        with out_of_memory(*_failed_pass(dm, split, batch, device, eval_batch_frames)):
            raise
    if distributed():
        torch.distributed.all_reduce(probs)
        torch.distributed.all_reduce(seen)
    if not bool((seen == 1).all()):
        twice, never = int((seen > 1).sum()), int((seen == 0).sum())
        raise RuntimeError(f"{split}: {twice} tracks scored more than once and {never} never; the evaluation is wrong")
    return probs.cpu().numpy()


def _failed_pass(dm: JamendoDataModule, split: str, batch: dict[str, Any], device: torch.device,
                 eval_batch_frames: int) -> tuple[str, str]:  # fmt: skip
    """(what ran out of memory, the fix) for the pass of ``batch``: its tracks, frames and settings."""
    ids = dm.splits[split].split.track_ids
    got = [int(i) for i in batch["item"]] if "item" in batch else []
    if len(got) > 1:
        what = (f"whole-track evaluation of {split} tracks {ids[got[0]]} and {len(got) - 1} more "
                f"({len(got)} x {int(batch['x'].shape[-1])} frames in one pass) on {device}")
        fix = (f"lower eval_batch_frames (now {eval_batch_frames}; 0 scores one track per pass), evaluate on a "
               f"GPU with more free memory (fewer jobs on it), or run predict with --device cpu")
        return what, fix
    what = f"whole-track evaluation of {split} track {ids[got[0]] if got else '?'} on {device}"
    return what, "evaluate on a GPU with more free memory (fewer jobs on it), or run predict with --device cpu"
