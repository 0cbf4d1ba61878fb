"""Training throughput of freqtag's Lightning + Hydra stack against a plain PyTorch loop.

What is measured: training samples per second, one step = fetch the batch,
gather the crops (in-memory mode), mixup, forward, loss, backward, gradient-norm
clipping (0.25), SGD Nesterov step, on the CPU in 32-bit.

- ``lightning``: the real stack. The run's config composed by Hydra from
  ``conf/`` (``data=synthetic``, ``data.in_memory=true``, ``data.num_workers=0``,
  ``trainer.precision=32-true``), the DataModule, network, loss and
  ``TaggingModule`` built from it as ``freqtag.train.driver.run`` builds them, and a
  real ``pl.Trainer(...).fit`` (from ``conf/trainer``; logger, checkpointing,
  progress bar, validation and the SWA callback switched off: they act at
  epoch ends, not per step).
- ``plain``: the reference's way. The same network class (``FreqTagNet``, same
  init seed) and loss, ``torch.optim.SGD`` and a hand-written loop: for each
  batch: mixup (lam ~ Beta(0.2, 0.2), random permutation), forward, loss,
  ``zero_grad``, ``backward``, ``clip_grad_norm_(0.25)``, ``step``,
  ``loss.item()``; the cosine schedule stepped per epoch. It reads the SAME
  batches from the same in-memory DataModule loader (same crops, same gather
  and normalisation), so data loading is identical on both sides and the
  difference is the training framework alone.

Why: the issue asks that Lightning + Hydra cost nothing measurable. Hydra's
cost is one-off (composing and instantiating: reported as ``setup_s``, outside
the timed steps); Lightning's would show per step. Each block (one method, one
shape) starts from a fresh network and optimizer, runs ``--warmup`` untimed
steps, then ``--steps`` timed ones; a step's time runs from the end of the
previous step to the end of this one (``on_train_batch_end`` in Lightning).
Blocks alternate (lightning/plain, then plain/lightning, ...) over ``--rounds``
rounds to spread drift. The overhead is reported with a standard error, and
called measurable when it exceeds twice that.

    python bench/train_step.py [--steps 6] [--warmup 1] [--rounds 2] [--models freq_dep [convs] [probe]]
                               [--shapes mel128:224 mel96:128] [--malloc keep|default]
                               [--variants eager [fused] [compiled] [compiled+fused]] [--compile-mode default]
                               [--no-plain] [--optimizer] [--ops] [--out bench/results/train_step.json]

``--variants`` (issue #14): the Lightning step as configured by the run's
settings: ``eager`` (the defaults), ``fused`` (``optim.fused=true``: fused
SGD; the default on a GPU), ``compiled`` (``compile=true``, with
``--compile-mode``) and ``compiled+fused``. Each variant is a Lightning block
of its own, reported with its speed-up over ``eager`` (± one standard error);
a compiled block's first step holds the compilation (``first_step_s``), the
warm-up keeps it out of the timed steps. ``--no-plain`` leaves the plain loop
out. Each block records the 1-minute load average at its end
(``load_avg_1min``): on a shared machine the figures are only as steady as it.
``--optimizer`` times clipping + the SGD step alone over each model's
parameters (per-tensor loop, foreach, fused); ``--ops`` counts the ATen
operations of one eager step by phase (each at least one kernel launch on a
GPU; FreqDepConv in its GPU form), the basis of the README's GPU estimates.

Memory: ``train.py`` keeps freed memory in the process (``keep_freed_memory``,
``freqtag/system/allocator.py``); the bench does the same for both methods (one
process) unless ``--malloc default``. With glibc's defaults a step page-faults
its buffers back in, and how many depends on the order of earlier frees: the
minor faults per step of each block are recorded.

``--models probe`` adds a one-layer network (a 1x1 convolution and a mean)
through both methods, at least 300 steps a block: its step is almost all
framework (batch hooks, mixup, loss, optimizer), so the difference between
the two is Lightning's own per-step cost, too small to see next to a real
network's step.

Data: the synthetic demo datasets ``<data dir>/synthetic/<features>-n<tracks>-s0``
(made on first use; data dir: $FREQTAG_DATA_DIR or ./data).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from machine import machine  # bench/machine.py, beside this script
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from freqtag.data.datamodule import JamendoDataModule
from freqtag.features import FeatureSpec
from freqtag.model import FILTERS, FreqTagNet
from freqtag.system.allocator import keep_freed_memory
from freqtag.train.driver import build_loss, build_net, resolve_precision, set_n_tags
from freqtag.train.losses import WeightedBCELoss
from freqtag.train.module import TaggingModule

REPO = Path(__file__).resolve().parents[1]
METHODS = ("lightning", "plain")
#: --variants: the run settings (config overrides) of each Lightning variant; "eager" is the "lightning" method
VARIANTS: dict[str, tuple[str, ...]] = {
    "eager": (),
    "fused": ("optim.fused=true",),
    "compiled": ("compile=true",),
    "compiled+fused": ("compile=true", "optim.fused=true"),
}
INIT_SEED = 1234  # both methods start from the same weights
PROBE = "probe"
PROBE_STEPS = 300


def probe_net(n_mels: int, n_tags: int) -> torch.nn.Module:
    """One 1x1 convolution and a mean: a step of it is almost all framework, so the probe shows that cost."""
    return torch.nn.Sequential(torch.nn.Conv1d(n_mels, n_tags, 1), torch.nn.AdaptiveAvgPool1d(1))


@dataclass
class Block:
    """The timed steps of one method on one configuration, over all rounds."""

    step_s: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    setup_s: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults per step, one figure per block
    first_step_s: list[float] = field(default_factory=list)  # fit start to the end of step 1 (compiling included)
    load_avg: list[float] = field(default_factory=list)  # the 1-minute load average at each block's end

    def add(self, ends: list[float], sizes: list[int], warmup: int, setup: float, faults: int) -> None:
        if len(ends) <= warmup:
            raise RuntimeError(f"only {len(ends)} steps ran, {warmup} of them warm-up")
        self.step_s += [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:])]
        self.samples += sizes[warmup:]
        self.setup_s.append(setup)
        self.faults.append(faults // len(ends))
        self.load_avg.append(round(os.getloadavg()[0], 2))

    def summary(self) -> dict[str, Any]:
        ms = [1000 * s for s in self.step_s]
        return {
            "samples_per_s": round(sum(self.samples) / sum(self.step_s), 3),
            "step_ms_mean": round(statistics.fmean(ms), 1),
            "step_ms_median": round(statistics.median(ms), 1),
            "step_ms_stdev": round(statistics.stdev(ms), 1) if len(ms) > 1 else None,
            "steps": len(ms),
            "samples": sum(self.samples),
            "setup_s": [round(s, 3) for s in self.setup_s],
            "minor_faults_per_step": self.faults,
            "first_step_s": [round(s, 2) for s in self.first_step_s],
            "load_avg_1min": self.load_avg,
            "step_ms": [round(v, 1) for v in ms],
        }


# --------------------------------------------------------------------- config


def config(features: str, length: int, model: str, args: argparse.Namespace, out: Path,
           extra: tuple[str, ...] = ()) -> DictConfig:
    """The run's config as `python train.py` would compose it, with the bench's overrides (and ``extra``)."""
    overrides = [
        "data=synthetic", f"features={features}", f"model={model}", "loss=weighted",
        f"data.input_length={length}", f"data.batch_size={args.batch_size}",
        "data.in_memory=true", "data.num_workers=0",
        f"data.synthetic.tracks={args.tracks}", "data.synthetic.seed=0",
        "trainer.accelerator=cpu", "trainer.precision=32-true", *extra,
    ]
    with initialize_config_module("freqtag.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):  # what the hydra:runtime resolvers would give inside `train.py`
        cfg.paths.data_dir = str(args.data_dir)
        cfg.paths.output_dir = str(out)
    return cfg


# ------------------------------------------------------------------ lightning


class StepTimer(pl.Callback):
    """perf_counter at the end of every training batch (after the optimizer step) and the batch size."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.sizes: list[int] = []
        self.start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.ends.append(time.perf_counter())
        self.sizes.append(len(batch["y"]))


def lightning_block(features: str, length: int, model: str, dm: JamendoDataModule, args: argparse.Namespace,
                    out: Path, variant: str = "eager") -> tuple[list[float], list[int], float, float]:
    """Hydra compose + instantiate (as freqtag.train.driver.run does) and Trainer.fit for warmup + steps steps.

    Returns the step ends, batch sizes, setup seconds and the seconds from the fit's start to step 1's end.
    """
    t0 = time.perf_counter()
    extra = (*VARIANTS[variant], f"compile_mode={args.compile_mode}")
    cfg = config(features, length, "freq_dep" if model == PROBE else model, args, out, extra)
    torch.manual_seed(INIT_SEED)
    set_n_tags(cfg, dm)  # model.n_tags: null takes the tag list's length, as in training
    net = probe_net(dm.spec.n_mels, len(dm.tags)) if model == PROBE else build_net(cfg.model)
    module = TaggingModule.from_config(cfg, net, build_loss(cfg.loss, dm))
    timer = StepTimer()
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        max_steps=args.warmup + args.steps,
    )
    setup = time.perf_counter() - t0
    trainer.fit(module, datamodule=dm)
    return timer.ends, timer.sizes, setup, timer.ends[0] - timer.start


# ---------------------------------------------------------------------- plain


def plain_block(n_mels: int, length: int, model: str, dm: JamendoDataModule, args: argparse.Namespace,
                hp: dict[str, Any]) -> tuple[list[float], list[int], float]:
    """The reference's loop over the same batches: mixup, forward, loss, backward, clip, step.

    ``hp``: the numbers of the recipe (optim, mixup_alpha, gradient_clip_val, max_epochs) read from the
    composed config, so that both methods train with the same settings.
    """
    t0 = time.perf_counter()
    torch.manual_seed(INIT_SEED)
    net = probe_net(n_mels, len(dm.tags)) if model == PROBE else FreqTagNet(n_mels, length, n_tags=len(dm.tags), filters=model)
    criterion = WeightedBCELoss(dm.positive_rates())
    opt = torch.optim.SGD(net.parameters(), lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"],
                          weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp["max_epochs"], eta_min=0.0)
    alpha, clip = hp["mixup_alpha"], hp["gradient_clip_val"]
    total = args.warmup + args.steps
    loader = dm.train_dataloader()
    setup = time.perf_counter() - t0
    net.train()
    ends: list[float] = []
    sizes: list[int] = []
    epoch = 0
    while len(ends) < total:
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        running = 0.0
        for batch in loader:
            batch = dm.on_device(batch, torch.device("cpu"))
            x, y = batch["x"], batch["y"].float()
            lam = float(np.random.beta(alpha, alpha))
            perm = torch.randperm(len(x))
            x = lam * x + (1 - lam) * x[perm]
            logits = net(x).squeeze(-1)
            loss = lam * criterion(logits, y) + (1 - lam) * criterion(logits, y[perm])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            running += loss.item()
            ends.append(time.perf_counter())
            sizes.append(len(y))
            if len(ends) == total:
                break
        sched.step()
        epoch += 1
    return ends, sizes, setup


# ---------------------------------------------------------------------- report






def compare(lt: Block, pt: Block) -> dict[str, Any]:
    """Lightning's extra time per step, with its standard error (step times taken as independent)."""
    lm, pm = statistics.fmean(lt.step_s), statistics.fmean(pt.step_s)
    var = sum(statistics.variance(b.step_s) / len(b.step_s) for b in (lt, pt) if len(b.step_s) > 1)
    se = math.sqrt(var)
    over = lm - pm
    ratio = (sum(lt.samples) / sum(lt.step_s)) / (sum(pt.samples) / sum(pt.step_s))
    return {
        "ratio_lightning_over_plain": round(ratio, 4),
        "overhead_ms_per_step": round(1000 * over, 1),
        "overhead_se_ms": round(1000 * se, 1),
        "overhead_pct": round(100 * over / pm, 2),
        "measurable": bool(se > 0 and abs(over) > 2 * se),
    }


class _OpCounter(TorchDispatchMode):
    """ATen operations that compute (views left out), by the phase set in ``phase``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = ""
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model: str, n_mels: int, length: int, n_tags: int) -> dict[str, Any]:
    """ATen operations of one eager training step, each at least one kernel launch on a GPU, by phase.

    The step as a GPU runs it: FreqDepConv in its GPU form (``bmm``), foreach clipping, and the SGD update
    foreach (torch's default on a GPU) or fused (``optim.fused``, freqtag's default there). Counted on the
    CPU (the operations do not depend on the device; a foreach or fused operation is one launch per chunk
    of tensors on a GPU). The batch size does not change the counts.
    """
    from freqtag.model import FreqDepConv

    out: dict[str, Any] = {}
    for kind in ("foreach", "fused"):
        torch.manual_seed(INIT_SEED)
        net = probe_net(n_mels, n_tags) if model == PROBE else FreqTagNet(n_mels, length, n_tags=n_tags, filters=model)
        for m in net.modules():
            if isinstance(m, FreqDepConv):
                m.impl = "bmm"
        module = TaggingModule(net, WeightedBCELoss(np.full(n_tags, 0.1)))  # mixup and loss only; SGD below
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5,
                              **({"fused": True} if kind == "fused" else {"foreach": True}))
        x, y = torch.randn(4, n_mels, length), (torch.rand(4, n_tags) < 0.2).float()
        counter = _OpCounter()
        for step in range(2):  # the first step makes the momentum buffers
            with counter if step else contextlib.nullcontext():
                counter.phase = "mixup+forward+loss"
                lam, perm = module.mixup_draw(len(x), x.device)
                loss = module.mixed_loss(x, y, perm, lam, 1.0 - lam)
                counter.phase = "backward"
                loss.backward()
                counter.phase = "clip"
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25, foreach=True)
                counter.phase = f"sgd_{kind}"
                opt.step()
                opt.zero_grad(set_to_none=True)
        out[kind] = {**counter.counts, "total": sum(counter.counts.values())}
    return out


def optimizer_ms(model: str, n_mels: int, length: int, n_tags: int, reps: int = 10) -> dict[str, Any]:
    """ms per clipping (0.25) + Nesterov SGD step over the network's parameters, by kernel: the CPU's
    per-tensor loop, foreach, fused (random gradients; 3 untimed steps first make the momentum buffers)."""
    torch.manual_seed(INIT_SEED)
    net = probe_net(n_mels, n_tags) if model == PROBE else FreqTagNet(n_mels, length, n_tags=n_tags, filters=model)
    start = [p.detach().clone() for p in net.parameters()]
    grads = [torch.randn_like(p) * 0.1 for p in start]
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in start)}
    for kind, kw in (("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, nesterov=True, weight_decay=2e-5, **kw)
        for i in range(3 + reps):
            if i == 3:
                t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 0.25, foreach=kind != "loop")
            opt.step()
        out[kind] = round(1000 * (time.perf_counter() - t0) / reps, 1)
    out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return out


def speedup(vt: Block, et: Block) -> dict[str, Any]:
    """A variant's samples/s over eager's, with a standard error from the step times (taken as independent)."""
    vm, em = statistics.fmean(vt.step_s), statistics.fmean(et.step_s)
    rel_var = sum(statistics.variance(b.step_s) / len(b.step_s) / m**2 for b, m in ((vt, vm), (et, em))
                  if len(b.step_s) > 1)
    ratio = (sum(vt.samples) / sum(vt.step_s)) / (sum(et.samples) / sum(et.step_s))
    se = ratio * math.sqrt(rel_var)
    return {"speedup_vs_eager": round(ratio, 4), "speedup_se": round(se, 4),
            "measurable": bool(se > 0 and abs(ratio - 1) > 2 * se)}


def method_name(variant: str) -> str:
    return "lightning" if variant == "eager" else f"lightning:{variant}"


def parse_shape(text: str) -> tuple[str, int]:
    features, _, length = text.partition(":")
    if features not in ("mel128", "mel96") or not length.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected FEATURES:LENGTH, e.g. mel128:224 or mel96:128")
    return features, int(length)


def quiet() -> None:
    """Lightning's start-up messages and the few-workers hint (num_workers=0 is on purpose here)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # Lightning 2.6 on torch 2.11


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per block (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every block (>= 1)")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per method and configuration, alternating order")
    parser.add_argument("--models", nargs="+", default=["freq_dep"], choices=(*FILTERS, PROBE),
                        help="freq_dep, convs, and probe: a one-layer network, whose step is almost all framework")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[("mel128", 224), ("mel96", 128)],
                        metavar="FEATURES:LENGTH", help="default: mel128:224 mel96:128")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tracks", type=int, default=1000, help="tracks of the synthetic dataset (60%% train)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: freed memory stays in the process, as train.py does (default); default: glibc's")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FREQTAG_DATA_DIR", REPO / "data")))
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=tuple(VARIANTS),
                        help="Lightning step variants (issue #14): eager, fused (optim.fused=true), compiled "
                             "(compile=true), compiled+fused; default: eager")
    parser.add_argument("--compile-mode", default="default", help="compile_mode of the compiled variants")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="time the plain PyTorch loop too (default; --no-plain: the Lightning variants only)")
    parser.add_argument("--optimizer", action="store_true",
                        help="also time clipping + SGD over each model's parameters: per-tensor loop, foreach, fused")
    parser.add_argument("--ops", action="store_true",
                        help="also count the ATen operations (GPU kernel launches) of one eager step per model/shape")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_step.json")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.malloc == "keep" else False
    args.data_dir = args.data_dir.resolve()
    quiet()

    info = {**machine(), "pytorch_lightning": pl.__version__}
    print(f"torch {info['torch']}, Lightning {info['pytorch_lightning']}, {info['torch_threads']} threads, "
          f"{info['cpus_usable']} usable CPUs, {info['cpu']}, load average {info['load_avg_1_5_15']}")
    print(f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps per block, {args.rounds} rounds, "
          f"malloc {args.malloc}{' (freed memory kept)' if kept else ''}")

    combos = [(model, features, length) for model in args.models for features, length in args.shapes]
    # the probe's steps take a few ms: many more of them for the same precision
    probe_args = argparse.Namespace(**{**vars(args), "steps": max(args.steps, PROBE_STEPS), "warmup": max(args.warmup, 5)})
    # methods: "lightning" (the eager variant), "lightning:<variant>" for the others, then "plain"
    methods = [method_name(v) for v in dict.fromkeys(args.variants)] + (["plain"] if args.plain else [])
    blocks = {(c, m): Block() for c in combos for m in methods}
    dms: dict[tuple[str, int], JamendoDataModule] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freqtag-bench-") as tmp:
        out = Path(tmp)
        # One in-memory DataModule per shape, built from the composed config and shared by both methods.
        for features, length in args.shapes:
            cfg = config(features, length, "freq_dep", args, out)
            spec = FeatureSpec.from_dict(OmegaConf.to_container(cfg.features, resolve=True))  # type: ignore[arg-type]
            dm: JamendoDataModule = instantiate(cfg.data, features=spec, _recursive_=False)
            dm.prepare_data()
            dm.check()
            dms[(features, length)] = dm
            hp = {**OmegaConf.to_container(cfg.optim), "mixup_alpha": float(cfg.mixup_alpha),  # type: ignore[dict-item]
                  "gradient_clip_val": float(cfg.trainer.gradient_clip_val), "max_epochs": int(cfg.trainer.max_epochs)}
            assert cfg.trainer.gradient_clip_algorithm == "norm"
        for r in range(args.rounds):
            for i, combo in enumerate(combos):
                model, features, length = combo
                dm = dms[(features, length)]
                k = (r + i) % len(methods)
                order = methods[k:] + methods[:k]  # rotated every round and configuration, to spread drift
                a = probe_args if model == PROBE else args
                for method in order:
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    if method == "plain":
                        called = time.perf_counter()
                        ends, sizes, setup = plain_block(dm.spec.n_mels, length, model, dm, a, hp)
                        first = ends[0] - called - setup
                    else:
                        variant = method.partition(":")[2] or "eager"
                        ends, sizes, setup, first = lightning_block(features, length, model, dm, a, out, variant)
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                    blocks[(combo, method)].add(ends, sizes, a.warmup, setup, faults)
                    blocks[(combo, method)].first_step_s.append(first)
                    last = blocks[(combo, method)].step_s[-a.steps:]
                    print(f"  round {r + 1} {model:8} {features}/{length:<4} {method:24} "
                          f"{sum(sizes[a.warmup:]) / sum(last):7.2f} samples/s  "
                          f"(step {1000 * statistics.fmean(last):7.1f} ms, {blocks[(combo, method)].faults[-1]} page faults/step, "
                          f"setup {setup:.2f} s, first step {first:.1f} s, load {os.getloadavg()[0]:.2f})", flush=True)
    elapsed = time.perf_counter() - started

    results = []
    if args.plain:
        print(f"\n{'model':8} {'input':12} {'lightning/s':>11} {'plain/s':>9} {'ratio':>7} {'overhead ms/step':>20}")
    for combo in combos:
        model, features, length = combo
        entry: dict[str, Any] = {"model": model, "features": features, "n_mels": dms[(features, length)].spec.n_mels,
                                 "input_length": length}
        if "lightning" in methods:
            entry["lightning"] = blocks[(combo, "lightning")].summary()
        if args.plain:
            entry["plain"] = blocks[(combo, "plain")].summary()
        if args.plain and "lightning" in methods:
            lt, pt = blocks[(combo, "lightning")], blocks[(combo, "plain")]
            cmp = compare(lt, pt)
            entry.update(cmp)
            print(f"{model:8} {features + '/' + str(length):12} {lt.summary()['samples_per_s']:11.2f} "
                  f"{pt.summary()['samples_per_s']:9.2f} {cmp['ratio_lightning_over_plain']:7.3f} "
                  f"{cmp['overhead_ms_per_step']:+9.1f} ± {cmp['overhead_se_ms']:.1f} "
                  f"({cmp['overhead_pct']:+.1f}%{', measurable' if cmp['measurable'] else ''})")
        entry["variants"] = {}
        for method in (m for m in methods if m != "plain"):
            variant = method.partition(":")[2] or "eager"
            summary = blocks[(combo, method)].summary()
            if "lightning" in methods and method != "lightning":
                summary.update(speedup(blocks[(combo, method)], blocks[(combo, "lightning")]))
            entry["variants"][variant] = summary
        results.append(entry)
    if args.plain and "lightning" in methods:
        print("ratio = Lightning+Hydra samples/s over plain samples/s (1 = no cost); ± is one standard error")
    if len(methods) - args.plain > 1:
        print(f"\n{'model':8} {'input':12} {'variant':16} {'samples/s':>9} {'step ms':>8} {'first step s':>12} "
              f"{'speed-up vs eager':>20} {'load (1 min)':>14}")
        for entry in results:
            for variant, v in entry["variants"].items():
                up = (f"{v['speedup_vs_eager']:.3f} ± {v['speedup_se']:.3f}" if "speedup_vs_eager" in v else "")
                print(f"{entry['model']:8} {entry['features'] + '/' + str(entry['input_length']):12} {variant:16} "
                      f"{v['samples_per_s']:9.2f} {v['step_ms_mean']:8.1f} {max(v['first_step_s']):12.1f} {up:>20} "
                      f"{', '.join(f'{x:.1f}' for x in v['load_avg_1min']):>14}")
    if args.optimizer:
        print("\nclipping + SGD step, ms (random gradients over the network's parameters)")
        for entry in results:
            n_tags = len(dms[(entry["features"], entry["input_length"])].tags)
            o = entry["optimizer_ms"] = optimizer_ms(entry["model"], entry["n_mels"], entry["input_length"], n_tags)
            print(f"{entry['model']:8} {entry['features'] + '/' + str(entry['input_length']):12} "
                  f"{o['parameters'] / 1e6:5.1f} M parameters: loop {o['loop']}, foreach {o['foreach']}, "
                  f"fused {o['fused']} (load {o['load_avg_1min']})")
    if args.ops:
        print("\nATen operations of one eager step (~ kernel launches on a GPU; FreqDepConv as bmm, foreach clipping)")
        for entry in results:
            n_tags = len(dms[(entry["features"], entry["input_length"])].tags)
            entry["ops_per_step"] = ops_per_step(entry["model"], entry["n_mels"], entry["input_length"], n_tags)
            for kind, c in entry["ops_per_step"].items():
                print(f"{entry['model']:8} {entry['features'] + '/' + str(entry['input_length']):12} SGD {kind:8} "
                      + ", ".join(f"{k} {v}" for k, v in c.items()))
    print(f"total {elapsed:.0f} s")

    result = {
        "bench": "train_step",
        "machine": {**info, "load_avg_end": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                     "variants": list(dict.fromkeys(args.variants)), "compile_mode": args.compile_mode,
                     "plain": args.plain,
                     "tracks": args.tracks, "precision": "32-true", "loss": "weighted", "recipe": hp,
                     "in_memory": True, "num_workers": 0, "malloc": args.malloc, "freed_memory_kept": kept,
                     "seconds": round(elapsed, 1)},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
