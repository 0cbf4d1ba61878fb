"""Random-crop throughput of the training DataLoader: freqtag's store against the reference's .npy files.

What is measured: crops per second delivered by the TRAINING DataLoader, as the
training loop receives them: normalised float32 tensors (B, bands, L), for one
epoch = one uniformly random crop of every train track. Three pipelines, fed
the SAME crops (the (track, start) pairs of freqtag's CropSampler for that
epoch), with the same batch size and number of workers:

- ``reference``: the authors' way. One float32 ``.npy`` of shape (bands, frames)
  per track (written here from the same store, so the values are the store's
  float16 values exactly); a Dataset whose ``__getitem__`` does
  ``np.load(path, mmap_mode="r")[:, start:start+L]``, normalises with the global
  mean/std and zero pads a track shorter than L (the synthetic set has short
  tracks; real MTG tracks are minutes long, so the reference never had to);
  default collate; ``DataLoader(batch_size=B, num_workers=W)``, which re-forks
  its workers every epoch as the reference's did.
- ``store``: ``JamendoDataModule.train_dataloader()`` reading the HDF5 store
  (one contiguous memory-mapped read per crop, float16, transposed to
  (bands, L) in the worker, written into the loader's shared-memory ring;
  the batch that crosses the worker pipe holds only small numpy arrays and a
  slot number), plus the DataModule's batch hooks (``on_device``) run on the
  CPU (to float32 straight out of the slot, normalise, zero the padding), so
  its output is the same tensor as the reference's.
- ``in-memory``: the same with ``in_memory=True``: the store is held in RAM
  band-major and ``on_after_batch_transfer`` gathers a batch with one
  ``index_select`` over a strided view of every window (the one-time load of
  the store is inside the cold pass). This mode uses no worker processes
  (they would only pass indices), whatever ``--workers`` says.

Why: the issue asks whether the single-file store is worth it (target: store
>= 3x the reference, in-memory >= 10x). Checks: the first batches of every
pipeline are compared element by element with the reference's (they must agree
to float32 rounding: all start from the same float16-rounded values; the
measured difference is 0).

The main process runs ``on_after_batch_transfer`` with ``--threads`` torch
threads, default 1: in training it runs on the GPU, so the CPU stand-in should
not compete with the workers for cores (with torch's default of one thread per
core, its OpenMP threads and the W workers oversubscribe the CPU; try
``--threads 0`` to see it). The reference's main process does no tensor work.
The in-memory mode has no workers, so its main process gets the cores the
others' W workers take: W torch threads (``--memory-threads``); the extra row
``in-memory/1t`` is the same with one thread, for information.

Passes: first a COLD pass of each pipeline (epoch 0): the page cache of its
files is dropped just before with ``posix_fadvise(DONTNEED)`` (only our own
files; nothing machine-wide), and the pass includes worker start-up and, for
in-memory, loading the store. Then every file is read through once, so it is
in the page cache, and ``--rounds`` WARM passes follow (epochs 1..R, the
pipelines in rotating order each round); the figure is the median. The
fraction of each pipeline's files resident in the page cache before every pass
is measured (mincore) and recorded.

    python bench/loader.py [--tracks 2000] [--workers 2] [--batch-size 32] [--length 224]
                           [--rounds 3] [--threads 1] [--memory-threads W] [--out bench/results/loader.json]

``--tracks`` is the number of TRAIN tracks (= crops per epoch); the synthetic
dataset is made with ceil(tracks / 0.6) tracks in all (its split is 60/20/20)
under ``<data dir>/synthetic/`` and the .npy copies under ``<data dir>/bench/``
(data dir: $FREQTAG_DATA_DIR or ./data, which git ignores); both are reused by
later runs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import mmap
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from machine import machine  # bench/machine.py, beside this script
from torch.utils.data import DataLoader, Dataset, Sampler

from freqtag.data.datamodule import JamendoDataModule
from freqtag.data.samplers import CropSampler
from freqtag.data.jamendo import TAGS_FILE
from freqtag.data.store import FeatureStore
from freqtag.data.synthetic import SPLIT_FRACTIONS, synthesize
from freqtag.features import FeatureSpec

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # same float16 values, float32 arithmetic on both sides: only rounding may differ

Batch = tuple[torch.Tensor, torch.Tensor]  # (x float32 (B, bands, L), y (B, tags))


# ----------------------------------------------------------------- the reference


class ReferenceCropDataset(Dataset):
    """The reference's training Dataset: one .npy per track, memory-mapped per crop.

    The reference drew the start inside ``__getitem__``; here the key is the
    (item, start) pair so that it reads exactly the crops freqtag's sampler chose.
    """

    def __init__(self, paths: list[str], labels: np.ndarray, length: int, mean: float, std: float) -> None:
        self.paths = paths
        self.labels = labels.astype(np.float32)
        self.length = length
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, start = key
        x = np.load(self.paths[i], mmap_mode="r")[:, start : start + self.length]
        x = (x - self.mean) / self.std
        if x.shape[1] < self.length:  # a track shorter than a crop: zero (= the mean) on the right
            x = np.pad(x, ((0, 0), (0, self.length - x.shape[1])))
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(self.labels[i])


class PairSampler(Sampler[tuple[int, int]]):
    """The crops of a CropSampler, one (item, start) pair at a time, in its order."""

    def __init__(self, crops: CropSampler) -> None:
        self.crops = crops

    def set_epoch(self, epoch: int) -> None:
        self.crops.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, starts = self.crops.crops()
        return iter(zip(order.tolist(), starts.tolist()))

    def __len__(self) -> int:
        return len(self.crops.lengths)


# ------------------------------------------------------------------ page cache


def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_PAGE = mmap.PAGESIZE


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), or None where that cannot be asked."""
    if _LIBC is None:
        return None
    total = resident = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + _PAGE - 1) // _PAGE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                vec = np.zeros(pages, dtype=np.uint8)
                if _LIBC.mincore(addr, size, vec.ctypes.data) != 0:
                    return None
                resident += int(np.count_nonzero(vec & 1))
            finally:
                _LIBC.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return resident / total if total else None


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (written back first: dirty pages cannot be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(paths: list[Path]) -> None:
    """Read every byte once, so that the files are in the page cache."""
    buf = bytearray(1 << 22)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ------------------------------------------------------------------------ data


def make_dataset(data_dir: Path, train_tracks: int, seed: int, features: str) -> Path:
    """The synthetic dataset folder with at least ``train_tracks`` train tracks (made once, then reused)."""
    total = max(300, math.ceil(train_tracks / SPLIT_FRACTIONS[0]))
    out = data_dir / "synthetic" / f"{features}-n{total}-s{seed}"
    t0 = time.perf_counter()
    synthesize(out, tracks=total, seed=seed, features=features)
    took = time.perf_counter() - t0
    if took > 1:
        print(f"made the synthetic dataset {out} in {took:.0f} s")
    return out


def write_npy(store_path: Path, ids: tuple[str, ...], npy_dir: Path) -> list[Path]:
    """One float32 (bands, frames) .npy per track, from the store, at ``XX/ID.npy`` (reused when complete).

    Reads through its own FeatureStore, dropped on return, so that this process
    keeps no map of the store (mapped pages cannot be dropped from the page cache).
    """
    paths = [npy_dir / t[-2:] / f"{t}.npy" for t in ids]
    stat = store_path.stat()
    marker = npy_dir / "complete.json"
    stamp = {"store": str(store_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tracks": len(ids)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp and all(p.is_file() for p in paths):
        return paths
    t0 = time.perf_counter()
    marker.unlink(missing_ok=True)
    store = FeatureStore(store_path)
    for t, p in zip(ids, paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, np.ascontiguousarray(store.track(t).T, dtype=np.float32))
    del store
    gc.collect()
    marker.write_text(json.dumps(stamp) + "\n")
    print(f"wrote {len(paths)} .npy files to {npy_dir} in {time.perf_counter() - t0:.0f} s")
    return paths


# ---------------------------------------------------------------------- timing


Convert = Callable[[Any], Batch]  # loader output -> (x, y) as the training step sees it


@dataclass
class Pipeline:
    name: str
    make: Callable[[], tuple[DataLoader, Convert]]  # a new loader (and, for ours, a new DataModule)
    files: list[Path]
    workers: int
    threads: int = 0  # torch threads of the main process during its passes (0: the --threads setting)
    passes: list[dict[str, Any]] = field(default_factory=list)
    loader: DataLoader | None = None
    convert: Convert | None = None

    def fresh(self) -> None:
        """New loader; the old one goes away with its workers (and its DataModule: store map, in-memory
        frames), since mapped pages cannot be dropped from the page cache."""
        self.drop()
        self.loader, self.convert = self.make()

    def drop(self) -> None:
        self.loader = self.convert = None
        gc.collect()


def run_epoch(p: Pipeline, epoch: int, keep: int = 0, limit: int | None = None) -> tuple[dict[str, Any], list[Batch]]:
    """One full epoch through ``p`` (or its first ``limit`` batches); returns the figures and the first ``keep`` batches."""
    if p.loader is None:
        p.fresh()
    loader, convert = p.loader, p.convert
    assert loader is not None and convert is not None
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    threads = torch.get_num_threads()
    if p.threads:
        torch.set_num_threads(p.threads)
    cached = resident_fraction(p.files) if limit is None else None
    kept: list[Batch] = []
    crops = 0
    first = None
    t0 = time.perf_counter()
    for n, raw in enumerate(loader):
        if limit is not None and n >= limit:
            break
        x, y = convert(raw)
        crops += x.shape[0]
        if first is None:
            first = time.perf_counter() - t0
        if len(kept) < keep:
            kept.append((x.clone(), y.clone()))
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {"epoch": epoch, "crops": crops, "seconds": round(seconds, 4), "crops_per_s": round(crops / seconds, 1),
            "first_batch_s": round(first or 0.0, 4), "page_cache_before": None if cached is None else round(cached, 3)}, kept


def compare(kept: dict[str, list[Batch]]) -> dict[str, Any]:
    """Each pipeline's first batches against the reference's: max |diff| of x, labels equal, same shapes."""
    ref = kept["reference"]
    out: dict[str, Any] = {"batches": len(ref), "tolerance": TOLERANCE}
    ok = True
    for name, batches in kept.items():
        if name == "reference":
            continue
        diff = 0.0
        same_labels = len(batches) == len(ref)
        for (xr, yr), (x, y) in zip(ref, batches):
            if x.shape != xr.shape or x.dtype != xr.dtype:
                print(f"{name}: batch {tuple(x.shape)} {x.dtype}, reference {tuple(xr.shape)} {xr.dtype}")
                diff = float("inf")
                continue
            diff = max(diff, (x - xr).abs().max().item())
            same_labels &= bool(torch.equal(y.float(), yr.float()))
        out[name] = {"max_abs_diff": diff, "labels_equal": same_labels}
        ok &= diff <= TOLERANCE and same_labels
    out["identical"] = ok
    return out






def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=2000, help="train tracks = crops per epoch (default 2000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=224, help="crop length in frames (a multiple of 32)")
    parser.add_argument("--features", default="mel128", choices=("mel128", "mel96"))
    parser.add_argument("--rounds", type=int, default=3, help="warm passes (epochs) per pipeline; the median is reported")
    parser.add_argument("--check-batches", type=int, default=3, help="first batches compared between the pipelines")
    parser.add_argument("--warmup-batches", type=int, default=5, help="untimed batches per pipeline before the warm passes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (default 1; 0: torch's default, one per core)")
    parser.add_argument("--memory-threads", type=int, default=None,
                        help="torch threads of the in-memory pipeline, which has no workers (default: --workers)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FREQTAG_DATA_DIR", REPO / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loader.json")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    main_threads = torch.get_num_threads()
    memory_threads = max(1, args.workers if args.memory_threads is None else args.memory_threads)

    info = {**machine(), "torch_default_threads": default_threads}
    print(f"torch {info['torch']}, numpy {info['numpy']}, {info['cpus_usable']} usable CPUs of {info['cpu_count']}, "
          f"{info['cpu']}, load average {info['load_avg_1_5_15']}")
    folder = make_dataset(args.data_dir, args.tracks, args.seed, args.features)
    spec = FeatureSpec.load(args.features)

    def datamodule(in_memory: bool, workers: int = args.workers) -> JamendoDataModule:
        dm = JamendoDataModule(
            store=str(folder / f"{args.features}.h5"), splits_dir=str(folder / "split-0"),
            tags_file=str(folder / TAGS_FILE), features=spec, input_length=args.length,
            batch_size=args.batch_size, num_workers=workers, in_memory=in_memory, seed=42,
        )
        dm.setup("fit")
        return dm

    dm = datamodule(False)  # for the split, the stats and the reference's sampler; never maps the store here
    assert dm.reader is not None
    store_file = dm.reader.path
    train = dm.splits["train"]
    npy = write_npy(store_file, train.split.track_ids, args.data_dir / "bench" / f"npy-{folder.name}")
    n_crops = len(train.rows)
    print(f"{n_crops} train tracks ({len(dm.reader)} in the store, {store_file.stat().st_size / 2**20:.0f} MiB); "
          f"crops {spec.n_mels} x {args.length}, batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} torch thread(s) in the main process")

    ref_ds = ReferenceCropDataset([str(p) for p in npy], train.split.labels, args.length, dm.mean, dm.std)

    def reference() -> tuple[DataLoader, Convert]:
        # The reference reads the crops our sampler chooses: the CropSampler of a (never iterated)
        # train_dataloader() of the same DataModule, so the same code and seed pick them.
        crops = dm.train_dataloader().sampler
        assert isinstance(crops, CropSampler)
        loader = DataLoader(ref_ds, sampler=PairSampler(crops), batch_size=args.batch_size, num_workers=args.workers)
        return loader, lambda b: (b[0], b[1])

    def ours(in_memory: bool, workers: int) -> Callable[[], tuple[DataLoader, Convert]]:
        def make() -> tuple[DataLoader, Convert]:
            new = datamodule(in_memory, workers)

            def convert(b: dict[str, torch.Tensor]) -> Batch:
                b = new.on_device(b, torch.device("cpu"))  # the batch hooks on the CPU: float32, normalised, (B, bands, L)
                return b["x"], b["y"]

            return new.train_dataloader(), convert
        return make

    pipelines = {
        "reference": Pipeline("reference", reference, npy, args.workers),
        "store": Pipeline("store", ours(False, args.workers), [store_file], args.workers),
        "in-memory": Pipeline("in-memory", ours(True, args.workers), [store_file], 0, memory_threads),
    }
    if memory_threads != 1:
        pipelines["in-memory/1t"] = Pipeline("in-memory/1t", ours(True, args.workers), [store_file], 0, 1)

    # Cold passes (epoch 0), each with new loaders (new workers) after its files were dropped from the
    # page cache; the previous pipeline's workers are gone first, as their maps would pin pages. The
    # first batches are kept for the comparison.
    print("cold: page cache of the pipeline's files dropped before its pass; includes worker start-up"
          + (" and loading the store (in-memory)" if "in-memory" in pipelines else ""))
    kept: dict[str, list[Batch]] = {}
    for name, p in pipelines.items():
        p.fresh()
        evict(p.files)
        figures, kept[name] = run_epoch(p, 0, keep=args.check_batches)
        p.passes.append({"pass": "cold", **figures})
        p.drop()
        print(f"  {name:12} {figures['crops_per_s']:9.1f} crops/s  (page cache before: "
              f"{figures['page_cache_before']}, first batch after {figures['first_batch_s']:.3f} s)", flush=True)
    gc.collect()
    check = compare(kept)
    del kept

    # Warm passes: every file read through once (in the page cache), workers started by a few untimed
    # batches; then the rounds, pipelines in rotating order to spread drift.
    read_through([store_file, *npy])
    for p in pipelines.values():
        p.fresh()
        run_epoch(p, 10_000, limit=args.warmup_batches)
    print(f"warm: files in the page cache, workers started; {args.rounds} epochs each")
    names = list(pipelines)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            figures, _ = run_epoch(pipelines[name], 1 + r)
            pipelines[name].passes.append({"pass": "warm", **figures})
            print(f"  {name:12} {figures['crops_per_s']:9.1f} crops/s  (epoch {1 + r}, page cache before: "
                  f"{figures['page_cache_before']})", flush=True)

    summary: dict[str, dict[str, float]] = {}
    for name, p in pipelines.items():
        warm = [q["crops_per_s"] for q in p.passes if q["pass"] == "warm"]
        cold = [q["crops_per_s"] for q in p.passes if q["pass"] == "cold"]
        summary[name] = {"cold_crops_per_s": cold[0], "warm_crops_per_s": statistics.median(warm) if warm else float("nan")}
    for name, s in summary.items():
        for kind in ("cold", "warm"):
            s[f"{kind}_speedup"] = round(s[f"{kind}_crops_per_s"] / summary["reference"][f"{kind}_crops_per_s"], 2)
    targets = {"store >= 3x reference (warm)": summary["store"]["warm_speedup"] >= 3,
               "in-memory >= 10x reference (warm)": summary["in-memory"]["warm_speedup"] >= 10}

    print(f"\n{'pipeline':13} {'workers':>7} {'threads':>7} {'cold crops/s':>13} {'x ref':>6} {'warm crops/s':>13} {'x ref':>6}   "
          f"(warm: median of {args.rounds})")
    for name, s in summary.items():
        print(f"{name:13} {pipelines[name].workers:7d} {pipelines[name].threads or main_threads:7d} {s['cold_crops_per_s']:13.1f} {s['cold_speedup']:6.2f} "
              f"{s['warm_crops_per_s']:13.1f} {s['warm_speedup']:6.2f}")
    print(f"\nsame batches as the reference (first {check['batches']}, epoch 0): " + "; ".join(
        f"{n} max|diff| {check[n]['max_abs_diff']:.1e}, labels {'equal' if check[n]['labels_equal'] else 'DIFFER'}"
        for n in pipelines if n != "reference") + f" -> {'identical' if check['identical'] else 'MISMATCH'} "
        f"(tolerance {TOLERANCE:g})")
    for what, met in targets.items():
        print(f"target {what}: {'met' if met else 'NOT met'}")

    result = {
        "bench": "loader", "machine": {**info, "load_avg_end": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"features": args.features, "bands": spec.n_mels, "length": args.length, "batch_size": args.batch_size,
                     "workers": args.workers, "train_tracks": n_crops, "store_tracks": len(dm.reader),
                     "store": str(store_file), "store_bytes": store_file.stat().st_size,
                     "npy_bytes": sum(p.stat().st_size for p in npy), "rounds": args.rounds,
                     "warmup_batches": args.warmup_batches, "main_threads": main_threads,
                     "in_memory_threads": memory_threads},
        "summary": summary, "targets": targets, "check": check,
        "passes": {name: p.passes for name, p in pipelines.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if check["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
