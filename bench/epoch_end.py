"""Epoch ends (#14.5): whole-track evaluation one track per pass vs batched, and the stall at a checkpoint.

1. ``evaluation``: :func:`freqtag.train.evaluation.evaluate_tracks` on the same test
   split, ``eval_batch_frames=0`` (one track per forward pass, as before) against
   ``--batch-frames`` (tracks of similar length sharing a pass, masked),
   alternating over ``--rounds`` after a warm-up pass. The tracks are random
   mel frames in a real feature store, with lengths drawn log-uniformly
   (seeded): ``--tracks`` full tracks of ``--min-s`` to ``--max-s`` seconds
   (MTG-Jamendo's), and ``--short-tracks`` clips of 1.4-46 s (the synthetic
   demo's 60-2000 frames), where a pass's fixed cost weighs more. The model is the paper's
   ``freq_dep`` at mel128 x 224, random weights. Both must give the same
   probabilities (checked: max |diff|, tolerance 1e-5).

2. ``checkpoint``: a Lightning-sized last.ckpt (the paper's model at mel128:
   weights, SGD momentum, the SWA average; about 213 MB) saved through
   :class:`freqtag.train.checkpoints.AtomicCheckpointIO` with ``async_checkpoint`` false
   and true, alternating over ``--rounds``, into ``--dir`` (fsynced). Figures:
   ``stall_s``, the time the caller spends in ``save_checkpoint`` (what the step
   loop waits for); ``steps_after_s``, ``--steps`` real training steps (the same
   network, batch ``--step-batch``, SGD) started right after it returns, while a
   background write may still compete for the cores; ``write_done_s``, when the
   file is whole under its name (async: noted by the writing thread);
   and the same steps without any save (``steps_alone_s``) for reference.

Every figure carries the load average (1 min) read just before and after it:
the machine here has 2 cores shared with other work.

    python bench/epoch_end.py [--tracks 16] [--min-s 30] [--max-s 300] [--short-tracks 48] [--rounds 3]
                              [--batch-frames 65536] [--steps 2] [--step-batch 4] [--dir data/bench/epoch_end]
                              [--out bench/results/epoch_end.json] [--only evaluation|checkpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from machine import machine  # noqa: E402


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn: Callable[[], Any]) -> tuple[float, Any, list[float]]:
    """(seconds, result, [load before, load after])."""
    before = load1()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out, [before, load1()]


def fstype(path: Path) -> str:
    """The file system that ``path`` is on (from /proc/mounts: the longest mount point above it)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        pass
    return kind


# ------------------------------------------------------------------ 1. evaluation


def make_split(root: Path, n: int, min_s: float, max_s: float) -> Any:
    """A store with ``n`` test tracks (and a few train/validation ones) of log-uniform lengths; its DataModule."""
    from freqtag.data import jamendo
    from freqtag.data.datamodule import JamendoDataModule
    from freqtag.data.store_writer import StoreWriter
    from freqtag.features import FeatureSpec

    spec = FeatureSpec.load("mel128")
    tags = list(jamendo.MOODTHEME_TAGS)
    rng = np.random.default_rng(0)
    counts = {"train": 4, "validation": 4, "test": n}
    store = root / "mel128.h5"
    splits = root / "split-0"
    root.mkdir(parents=True, exist_ok=True)
    (root / "moodtheme_split.txt").write_text("\n".join(tags) + "\n")
    order, arrays, number = [], {}, 0
    for split, k in counts.items():
        ids = [f"track_{number + i:07d}" for i in range(k)]
        number += k
        seconds = np.exp(rng.uniform(np.log(min_s), np.log(max_s), size=k))
        labels = np.zeros((k, len(tags)), np.uint8)
        for i, t in enumerate(ids):
            labels[i, i % len(tags)] = 1
            frames = int(seconds[i] * spec.frames_per_second)
            arrays[t] = (rng.standard_normal((frames, spec.n_mels), dtype=np.float32) * 20.2 + 1.1)
        jamendo.write_split(jamendo.split_file(splits, split), ids, [f"00/{t}.mp3" for t in ids], seconds, labels, tags)
        order += ids
    if not store.exists():
        writer = StoreWriter(store, spec, order)
        writer.add([(t, arrays[t]) for t in order])
        writer.finish(order[: counts["train"]], "train")
    dm = JamendoDataModule(str(store), str(splits), str(root / "moodtheme_split.txt"), features=spec,
                           input_length=224, batch_size=32)  # fmt: skip
    dm.check()
    return dm


def evaluation(args: argparse.Namespace, scratch: Path, tracks: int, min_s: float, max_s: float) -> dict[str, Any]:
    from freqtag.model import FreqTagNet
    from freqtag.train.evaluation import TrackBatchSampler, evaluate_tracks

    dm = make_split(scratch / f"eval-{tracks}-{min_s}-{max_s}", tracks, min_s, max_s)
    torch.manual_seed(0)
    net = FreqTagNet(128, 224, 56, "freq_dep").eval()
    cpu = torch.device("cpu")
    lengths = dm.reader.lengths[dm.splits["test"].rows]
    sampler = TrackBatchSampler(lengths, 224, args.batch_frames)
    padded = sum(len(b) * max(max(int(lengths[i]), 224) for i in b) for b in sampler)
    methods = {"per_track": 0, "batched": args.batch_frames}
    evaluate_tracks(net, dm, "validation", cpu, args.batch_frames)  # warm-up: allocator, thread pool
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    loads: dict[str, list[list[float]]] = {m: [] for m in methods}
    probs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, frames in methods.items():
            s, probs[name], load = timed(lambda f=frames: evaluate_tracks(net, dm, "test", cpu, f))
            seconds[name].append(round(s, 3))
            loads[name].append(load)
    diff = float(np.abs(probs["per_track"] - probs["batched"]).max())
    assert diff < 1e-5, diff
    median = {m: float(np.median(v)) for m, v in seconds.items()}
    return {
        "model": "freq_dep mel128 x 224 (random weights)",
        "tracks": tracks,
        "track_seconds": [min_s, max_s],
        "frames": {"total": int(lengths.sum()), "min": int(lengths.min()), "max": int(lengths.max()),
                   "padded_total_batched": int(padded)},
        "batch_frames": args.batch_frames,
        "passes": {"per_track": tracks, "batched": len(sampler)},
        "seconds": seconds,
        "load_avg_1min_before_after": loads,
        "tracks_per_s_median": {m: round(tracks / v, 3) for m, v in median.items()},
        "speedup_median": round(median["per_track"] / median["batched"], 3),
        "max_abs_diff": diff,
    }  # fmt: skip


# ------------------------------------------------------------------ 2. checkpoint stall


def paper_checkpoint() -> tuple[dict[str, Any], torch.nn.Module, torch.optim.Optimizer]:
    """A last.ckpt as Lightning dumps it for the paper's model at mel128: weights, SGD momentum, SWA average."""
    from freqtag.model import FreqTagNet

    torch.manual_seed(0)
    net = FreqTagNet(128, 224, 56, "freq_dep")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=2e-5)
    step(net, opt, batch=2)  # momentum buffers exist
    ckpt = {
        "epoch": 10, "global_step": 1000, "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"T_max": 200, "eta_min": 0.0, "base_lrs": [0.5], "last_epoch": 10}],
        "callbacks": {"SWA{'fraction': 0.2}": {"n_averaged": 3, "average": [p.detach().clone() for p in net.parameters()]}},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 11, "completed": 10}}}},
    }  # fmt: skip
    return ckpt, net, opt


def step(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: int) -> None:
    x = torch.randn(batch, 128, 224)
    y = (torch.rand(batch, 56) < 0.05).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    from freqtag.train.checkpoints import AtomicCheckpointIO

    class Timed(AtomicCheckpointIO):
        """Notes when the background write has the file whole under its name."""

        done_at = 0.0

        def _write(self, buffer: Any, path: Path) -> None:
            super()._write(buffer, path)
            self.done_at = time.perf_counter()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "last.ckpt"
    ckpt, net, opt = paper_checkpoint()
    size = sum(t.numel() * t.element_size() for t in _tensors(ckpt))
    net.train()
    step(net, opt, args.step_batch)  # warm-up
    rows: dict[str, dict[str, list]] = {}
    for r in range(args.rounds):
        alone, _, load = timed(lambda: [step(net, opt, args.step_batch) for _ in range(args.steps)])
        rows.setdefault("no_save", {}).setdefault("steps_alone_s", []).append(round(alone, 3))
        rows["no_save"].setdefault("load", []).append(load)
        for mode in ((False, True) if r % 2 == 0 else (True, False)):  # alternating which goes first
            name = "async" if mode else "sync"
            io = Timed({"tags": ["t"]}, async_checkpoint=mode)
            before = load1()
            t0 = time.perf_counter()
            io.save_checkpoint(ckpt, path)
            stall = time.perf_counter() - t0
            for _ in range(args.steps):
                step(net, opt, args.step_batch)
            steps_after = time.perf_counter() - t0 - stall
            io.wait()
            done = (io.done_at if mode else t0 + stall) - t0
            r = rows.setdefault(name, {})
            r.setdefault("stall_s", []).append(round(stall, 3))
            r.setdefault("steps_after_s", []).append(round(steps_after, 3))
            r.setdefault("write_done_s", []).append(round(done, 3))
            r.setdefault("save_plus_steps_s", []).append(round(stall + steps_after, 3))
            r.setdefault("load", []).append([before, load1()])
            assert torch.load(path, weights_only=False, map_location="cpu", mmap=True)["epoch"] == 10
    med = {name: {k: float(np.median(v)) for k, v in r.items() if k != "load"} for name, r in rows.items()}
    for name in ("sync", "async"):  # what the save cost the step loop in all: save + steps against the steps alone
        med[name]["cost_vs_no_save_s"] = round(med[name]["save_plus_steps_s"] - med["no_save"]["steps_alone_s"], 3)
    return {
        "checkpoint_mb": round(size / 1e6, 1),
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "dir": str(folder),
        "filesystem": fstype(folder),
        "steps": args.steps,
        "step_batch": args.step_batch,
        "model": "freq_dep mel128 x 224, SGD nesterov, CPU float32",
        "rounds": rows,
        "median": med,
    }


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracks", type=int, default=16)
    p.add_argument("--min-s", type=float, default=30.0)
    p.add_argument("--max-s", type=float, default=300.0)
    p.add_argument("--short-tracks", type=int, default=48, help="a second set: clips of 1.4-46 s (the demo's lengths)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-frames", type=int, default=65536)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--step-batch", type=int, default=4)
    p.add_argument("--dir", default=str(REPO / "data" / "bench" / "epoch_end"))
    p.add_argument("--only", choices=["evaluation", "checkpoint"])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "epoch_end.json"))
    args = p.parse_args()
    from freqtag.system.allocator import keep_freed_memory

    keep_freed_memory()  # as training does
    out = Path(args.out)
    result: dict[str, Any] = {"bench": "epoch_end"}
    if args.only and out.is_file():  # one part again: the other part's figures are kept
        result = json.loads(out.read_text())
    if args.only in (None, "evaluation"):
        sets = {"full_tracks": (args.tracks, args.min_s, args.max_s), "short_clips": (args.short_tracks, 1.4, 46.0)}
        part: dict[str, Any] = {"machine": machine(), "settings": vars(args)}
        for name, (n, lo, hi) in sets.items():
            if n <= 0:
                continue
            e = part[name] = evaluation(args, Path(args.dir), n, lo, hi)
            print(f"evaluation {name}: {n} tracks of {lo:g}-{hi:g} s, {e['passes']['per_track']} vs "
                  f"{e['passes']['batched']} passes; per-track {e['seconds']['per_track']} s, batched "
                  f"{e['seconds']['batched']} s (x{e['speedup_median']}), max |diff| {e['max_abs_diff']:.1e}; "
                  f"load {e['load_avg_1min_before_after']}")
        part["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        result["evaluation"] = part
    if args.only in (None, "checkpoint"):
        c = {"machine": machine(), "settings": vars(args), **checkpoint(args)}
        c["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        result["checkpoint"] = c
        for name in ("sync", "async"):
            m = c["median"][name]
            print(f"checkpoint {name}: stall {m['stall_s']:.3f} s, {args.steps} steps after {m['steps_after_s']:.3f} s "
                  f"(alone {c['median']['no_save']['steps_alone_s']:.3f} s; the save cost {m['cost_vs_no_save_s']:.3f} s "
                  f"in all), on disk after {m['write_done_s']:.3f} s")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
