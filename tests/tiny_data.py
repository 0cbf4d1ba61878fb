"""A tiny MTG-format dataset (store, split TSVs, tag list, and the .npy files it came from) for the reliability tests.

Tracks are short (40-90 frames of mel96), so a whole training run on it,
including the final whole-track evaluation, takes seconds; every tag has a
positive and a negative in every split, so every metric is defined.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from helpers import REPO, compose_tiny, tiny_overrides
from omegaconf import DictConfig, open_dict

from freqtag.data import jamendo
from freqtag.data.store_writer import StoreWriter
from freqtag.features import FeatureSpec

TAGS = list(jamendo.MOODTHEME_TAGS)
COUNTS = {"train": 24, "validation": 8, "test": 8}


@dataclass
class Tiny:
    root: Path
    store: Path
    splits: Path
    tags: Path
    npy: Path
    order: list[str]

    def train_args(self, run_dir: Path, *extra: str, store: Path | None = None) -> list[str]:
        """`python train.py` on this dataset: the tiny run (helpers.tiny_overrides) on these files."""
        return [sys.executable, str(REPO / "train.py"), *tiny_overrides(*self.overrides(store), *extra),
                f"hydra.run.dir={run_dir}", f"paths.data_dir={self.root / 'unused'}"]  # fmt: skip

    def overrides(self, store: Path | None = None) -> list[str]:
        """This dataset instead of the synthetic one, batches of 8, two epochs."""
        return ["model=convs", "data.synthetic=null", f"data.store={store or self.store}", f"data.splits_dir={self.splits}",
                f"data.tags_file={self.tags}", "data.batch_size=8", "trainer.max_epochs=2"]  # fmt: skip


def make_tiny(root: Path, seed: int = 0, features: str = "mel96", task: str = "moodtheme",
              tags: list[str] | None = None) -> Tiny:  # fmt: skip
    """Write ``root/{npy/XX/ID.npy, split-0/*.tsv, moodtheme_split.txt, FEATURES.h5}`` (random frames).

    Another ``task`` writes its TSVs (``autotagging_{task}-*.tsv``) with ``tags`` and, like MTG for
    genre/instrument/all, no tag-list file.
    """
    spec = FeatureSpec.load(features)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = list(tags) if tags else TAGS
    tags_file = root / "moodtheme_split.txt"
    if task == "moodtheme":
        tags_file.write_text("\n".join(names) + "\n")
    splits = root / "split-0"
    order: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    train_ids: list[str] = []
    number = 1000
    for split, n in COUNTS.items():
        ids, paths = [], []
        labels = np.zeros((n, len(names)), np.uint8)
        for i in range(n):
            number += 1
            track_id = f"track_{number:07d}"
            path = f"{number % 100:02d}/{number}.mp3"
            labels[i, [j for j in range(len(names)) if j % 4 == i % 4]] = 1  # each tag: n/4 positives per split
            x = rng.normal(-24.0, 19.0, size=(spec.n_mels, int(rng.integers(40, 90)))).astype(np.float32)
            x[labels[i].argmax() % spec.n_mels] += 20.0  # a little signal to learn
            target = root / "npy" / Path(path).with_suffix(".npy")
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, x)
            arrays[track_id] = x.T
            ids.append(track_id)
            paths.append(path)
        jamendo.write_split(jamendo.split_file(splits, split, task), ids, paths, [30.0] * n, labels, names)
        order += ids
        if split == "train":
            train_ids = ids
    store = root / f"{features}.h5"
    writer = StoreWriter(store, spec, order)
    writer.add([(t, arrays[t]) for t in order])
    writer.finish(train_ids, "train")
    return Tiny(root=root, store=store, splits=splits, tags=tags_file, npy=root / "npy", order=order)


def config(t: Tiny, out: Path, *overrides: str, store: Path | None = None, splits: Path | None = None,
           tags: Path | None = None) -> DictConfig:  # fmt: skip
    """The composed config of a tiny run on ``t`` writing to ``out`` (for :func:`freqtag.train.driver.run`)."""
    cfg = compose_tiny(out, *t.overrides(store), f"features={t.store.stem}", *overrides)
    with open_dict(cfg):
        cfg.data.splits_dir = str(splits or t.splits)
        cfg.data.tags_file = str(tags or t.tags)
    return cfg


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 180,
        cwd: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


class PoisonWeights:
    """A Lightning callback that fills the first weight tensor with NaN before training step ``at_step``.

    What a diverging run does to its weights, at a chosen step: the loss of
    that step is NaN, so the run must stop and keep the last good checkpoint.
    Built by Hydra from ``+callbacks.poison._target_=tiny_data.PoisonWeights``.
    """

    def __new__(cls, at_step: int):  # type: ignore[no-untyped-def]
        import pytorch_lightning as pl
        import torch

        class _Poison(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
                if trainer.global_step == at_step:
                    with torch.no_grad():
                        next(pl_module.net.parameters()).fill_(float("nan"))

        return _Poison()


class DtypeProbe:
    """A Lightning callback recording the dtype of the network's output at each training step (in ``seen``)."""

    seen: list = []

    def __new__(cls):  # type: ignore[no-untyped-def]
        import pytorch_lightning as pl

        class _Probe(pl.Callback):
            def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
                pl_module.net.register_forward_hook(
                    lambda m, i, o: DtypeProbe.seen.append(o.dtype) if m.training else None
                )

        return _Probe()
