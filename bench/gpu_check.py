"""Check freqtag on one real GPU in one command: figures, and assertions that fail the run (issue #13).

Run it through ``bench/gpu_check.sh``, which can first install the project offline
from a folder of wheels. Nine stages, each recorded as ``{"ok", "seconds",
"figures", "error"}`` in ``OUT/gpu_check.json``; a failing stage does not stop the
others, and the exit status is 1 when any failed:

1. ``env``: torch, CUDA, cuDNN, the GPU and its memory, the cores.
2. ``synth``: ``freqtag synth`` writes a mel96 and a mel128 synthetic store.
3. ``train_step``: samples/s of a real ``Trainer.fit`` (built as ``bench/train_step.py`` does), batch 32,
   {convs, freq_dep} x {mel96 x 128, mel128 x 224} x {16-mixed, bf16-mixed}; peak GPU memory (the
   in-memory store included); the GradScaler's skipped steps; one batch's loss on the GPU against the CPU's.
   Then the step variants of issue #14 at freq_dep/mel128 x 224/16-mixed, each against the default block:
   ``optim.fused=false`` (the unfused SGD, whose GradScaler reads found_inf on the host every step) and,
   with ``--compile``, ``compile=true compile_mode=reduce-overhead`` (its first step compiles: minutes).
4. ``loader``: crops/s of the training DataLoader delivering normalised batches on the GPU (store with
   0/4/8 workers, in-memory), against the samples/s the GPU consumes at that shape (stage 3).
5. ``short_run``: ``python train.py experiment=demo`` shrunk, stopped cleanly inside its SWA epochs, then
   resumed from its ``last.ckpt`` to the end; both exit 0 and ``final.ckpt`` loads with ``weights_only``.
6. ``grid``: ``python train.py -m hydra/launcher=joblib_gpu jobs_per_gpu=2``: two tiny jobs at once on the GPU.
7. ``ddp``: freqtag's distributed pieces (SWA ``finalize``: BatchNorm pass + broadcast; ``evaluate_tracks``:
   each rank its share + all_reduce) in 2 ranks on the one GPU over gloo with CUDA tensors (NCCL refuses
   two ranks on one GPU), against one process; every collective's tensors on the GPU; GPU against CPU.
8. ``prepare``: ``freqtag prepare --device cuda`` against ``--device cpu`` on generated audio: x real
   time of each, stores equal within one float16 step.
9. ``predict``: ``freqtag predict --device cuda`` against ``--device cpu`` with the run of stage 5:
   tracks/s of each, probabilities equal within the tolerance.

Stages 5 and 6 run in their own processes in the background, from the end of stage 4 until stage 7 is
done (none of the three measures a speed); their "seconds" run from their start.

``--cpu`` runs every stage on the CPU with tiny sizes and the same assertions where they apply, one
torch thread per process: stage 3 at one shape in float32 and one bf16-mixed block; stages 5-7 on a
few tracks cut short; stage 6 with a pretend GPU (``CUDA_VISIBLE_DEVICES=0``), its jobs one after the
other in a thread of the launching process; stage 7 over gloo with CPU tensors; stage 8's two runs
without workers. Its background stages start as soon as stage 2 has made their data, on the core the
main process leaves idle. Process start-up (importing Lightning) is most of its minute.

Tolerances: float32 on the GPU against the CPU, ``freqtag.system.precision.device_tolerance`` of
``--fp32-precision`` (absolute; 1e-5 for ``ieee``); whole-track evaluation always runs in IEEE float32
(``freqtag.system.precision``), so stage 7 uses the ``ieee`` one. Mixed precision (a 16-mixed or bf16-mixed
batch loss against the CPU's float32 loss): ``MIXED_RTOL`` = 2e-2, relative, as half precision keeps
8 (bf16) to 11 (fp16) mantissa bits.

Time on one H200 with 16 cores, estimated (no GPU was at hand to measure): start-up and env 10 s, synth
15 s, train_step 45 s (``--compile``: a few minutes more, mostly compiling), loader 15 s, short_run / grid /
ddp 50 s together (process start-up dominates), prepare 15 s, predict 15 s: about 2.8 min of the 5 allowed
(without ``--compile``). ``--cpu`` on 2 idle cores: under a minute.

    bench/gpu_check.sh [--cpu] [--wheels DIR] [--out DIR]     (the wrapper; more options pass through)
    python bench/gpu_check.py [--cpu] [--out DIR] [--work DIR | --keep-work] [--fp32-precision ieee|tf32]
                              [--only STAGE,...] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import machine  # bench/machine.py, beside this script (on PYTHONPATH for the check's processes)

import freqtag.cli
import freqtag.train.gpu_pool
from freqtag.data import jamendo
from freqtag.data.store import FeatureStore
from freqtag.data.store_writer import StoreWriter
from freqtag.features import FeatureSpec
from freqtag.model import FreqTagNet
from freqtag.system.allocator import keep_freed_memory
from freqtag.system.precision import FP32_PRECISIONS, device_tolerance, set_fp32_precision

if TYPE_CHECKING:
    import pytorch_lightning as pl

# Lightning, Hydra and what imports them (freqtag.data.datamodule, .training, bench/train_step.py, bench/loader.py) take
# seconds to import: they are imported by the stages that use them, so that with --cpu the background
# stages start before this process has imported them.

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
MIXED_RTOL = 2e-2  # 16-mixed / bf16-mixed batch loss against the CPU's float32 loss (relative)
INIT_SEED = 1234
STAGES = ("env", "synth", "train_step", "loader", "short_run", "grid", "ddp", "prepare", "predict")


class CheckFailed(AssertionError):
    """An assertion of the check did not hold; the message says what and by how much."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---------------------------------------------------------------------- sizes


BlockSpec = tuple[str, str, int, str]  # model, features, input length, precision


@dataclass(frozen=True)
class Sizes:
    """Everything that makes the check big (GPU) or tiny (--cpu)."""
    tracks: dict[str, int]  # synthetic tracks per feature kind (at least 300: every tag in every split)
    tiny_frames: int | None  # the tiny dataset's tracks cut to this many frames (None: whole tracks)
    tiny_runs: bool  # stages 5 and 6 on the tiny dataset too (else on the synthetic one); stage 7 always
    batch: int
    blocks: tuple[BlockSpec, ...]  # stage 3's training blocks
    variants: tuple[tuple[BlockSpec, tuple[str, ...]], ...]  # stage 3's blocks with other settings (overrides)
    warmup: int
    steps: int
    loader_workers: tuple[int, ...]
    loader_batch: int
    loader_length: int
    loader_seconds: float  # timed epochs per pipeline until this much time has passed
    run_model: str
    run_length: int
    run_batch: int
    run_epochs: int
    run_train_batches: int | None  # trainer.limit_train_batches of stage 5 (None: every batch)
    run_stop: int  # run 1 stops after this (0-based) epoch, inside the SWA epochs
    swa_fraction: float
    grid_length: int
    grid_jobs_per_gpu: int  # the grid's 2 jobs one after the other (1) or at once on the one GPU (2)
    grid_backend: str  # joblib's: loky (worker processes, as configured) or threading (in the launching process)
    ddp_model: str
    ddp_length: int
    audio_files: int
    audio_seconds: float
    prepare_workers: tuple[int, int]  # (device run, cpu run)
    predict_files: int
    timeout_s: float  # per background chain / DDP group


def blocks(models: Sequence[str], shapes: Sequence[tuple[str, int]], precisions: Sequence[str]) -> tuple[BlockSpec, ...]:
    """Every (model, features, length, precision), shape by shape."""
    return tuple((m, f, n, p) for f, n in shapes for m in models for p in precisions)


GPU = Sizes(
    tracks={"mel96": 1000, "mel128": 1000}, tiny_frames=None, tiny_runs=False, batch=32,
    blocks=blocks(("convs", "freq_dep"), (("mel96", 128), ("mel128", 224)), ("16-mixed", "bf16-mixed")),
    variants=((("freq_dep", "mel128", 224, "16-mixed"), ("optim.fused=false",)),),
    warmup=5, steps=20, loader_workers=(0, 4, 8), loader_batch=32, loader_length=224, loader_seconds=2.0,
    run_model="freq_dep", run_length=64, run_batch=32, run_epochs=5, run_train_batches=None, run_stop=2, swa_fraction=0.6,
    grid_length=64, grid_jobs_per_gpu=2, grid_backend="loky", ddp_model="convs", ddp_length=128,
    audio_files=48, audio_seconds=40.0, prepare_workers=(8, 8), predict_files=16, timeout_s=600.0,
)  # fmt: skip
CPU = Sizes(
    tracks={"mel96": 300, "mel128": 300}, tiny_frames=32, tiny_runs=True, batch=2,
    # one shape; bf16 on a CPU without bf16 instructions is emulated, 10x slower than float32: one block checks it
    blocks=blocks(("convs", "freq_dep"), (("mel96", 32),), ("32-true",)) + (("convs", "mel96", 32, "bf16-mixed"),),
    variants=((("convs", "mel96", 32, "32-true"), ("optim.fused=true",)),),
    warmup=1, steps=1, loader_workers=(0, 2), loader_batch=16, loader_length=32, loader_seconds=0.2,
    run_model="convs", run_length=32, run_batch=8, run_epochs=5, run_train_batches=2, run_stop=2, swa_fraction=0.6,
    # the grid's jobs in a thread of the launching process: a loky worker would spend ~10 s of CPU importing
    # (tests/train/test_ablation.py's slow test runs the loky workers with pretend GPUs)
    grid_length=32, grid_jobs_per_gpu=1, grid_backend="threading", ddp_model="convs", ddp_length=32,
    # prepare in this process both times: a worker process would spend seconds importing torch (so on the CPU
    # the two stores come from the same code: determinism; tests/prepare/test_prepare_audio.py compares the paths)
    audio_files=4, audio_seconds=4.0, prepare_workers=(0, 0), predict_files=4, timeout_s=240.0,
)  # fmt: skip


# ---------------------------------------------------------------------- state


@dataclass
class Stage:
    ok: bool = False
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Check:
    """What the stages share: settings, where things are, and what earlier stages found."""
    cpu: bool
    sizes: Sizes
    device: torch.device
    mode: str  # fp32 precision: ieee or tf32
    work: Path
    stages: dict[str, Stage] = field(default_factory=dict)
    ready: Callable[[], None] | None = None  # called once the mel96 data is made (--cpu: starts the background)
    best_samples_per_s: dict[tuple[str, int], float] = field(default_factory=dict)  # stage 3's, per shape

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def synthetic(self, features: str) -> Path:
        """The folder `freqtag synth` writes, where conf/data/synthetic.yaml looks for it."""
        return self.data_dir / "synthetic" / f"{features}-n{self.sizes.tracks[features]}-s0"

    def tiny(self) -> Path:
        """The tiny mel96 dataset (:func:`tiny_copy`) of stage 7, and of stages 5-6 with --cpu."""
        return self.data_dir / "tiny" / "mel96"

    @property
    def run_dir(self) -> Path:
        """Stage 5's run (and stage 9's checkpoint)."""
        return self.work / "run"

    @property
    def audio_dir(self) -> Path:
        """Stage 8's audio (and stage 9's)."""
        return self.work / "audio"

    def audio(self) -> list[Path]:
        """The audio files stage 8 writes, relative to :attr:`audio_dir`: FLAC and WAV at three rates."""
        return [Path(f"{i % 10:02d}/{i}.{'wav' if i % 2 else 'flac'}") for i in range(self.sizes.audio_files)]

    def run_data(self) -> Path:
        """The mel96 dataset of stages 5 and 6."""
        return self.tiny() if self.sizes.tiny_runs else self.synthetic("mel96")

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of the check's own processes: no W&B, temp files (GPU lock files) in the work dir."""
        tmp = self.work / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
        threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if self.cpu else {}
        return {**os.environ, "WANDB_MODE": "disabled", "TMPDIR": str(tmp), "PYTHONPATH": path, **threads, **extra}


def run_stage(c: Check, name: str, fn: Callable[["Check", dict[str, Any]], None], started: float | None = None) -> Stage:
    """Run one stage; figures it wrote before failing are kept. ``started``: when its background work began."""
    stage = c.stages.setdefault(name, Stage())
    t0 = time.perf_counter() if started is None else started
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        fn(c, stage.figures)
        stage.ok = True
    except Exception as e:  # noqa: BLE001 - every failure is recorded; the other stages still run
        stage.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    stage.seconds = round(time.perf_counter() - t0, 2)
    print(f"[gpu_check] {name}: {'ok' if stage.ok else 'FAILED'} in {stage.seconds:.1f} s", flush=True)
    return stage


def needs(c: Check, *names: str) -> None:
    """Stop when a stage this one builds on failed (one that did not run, under --only, is taken as done)."""
    failed = [n for n in names if n in c.stages and not c.stages[n].ok]
    expect(not failed, f"needs stage {', '.join(failed)}, which failed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finite(x: float) -> bool:
    return math.isfinite(x)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's Python-level stdout/stderr into ``path`` (the CLIs' tables and progress lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def tail(path: Path, n: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:]


# ---------------------------------------------------------------------- background processes


@dataclass
class Step:
    name: str
    argv: list[str]
    after: Callable[[], None] | None = None  # checks to run when the command exited 0; raising stops the chain


class Chain:
    """Commands run one after the other in the background, each in its own session (its children die with it).

    ``pump()`` (called by :class:`Background`'s thread) starts the next command
    when one has finished; the first failure ends the chain.
    """
    def __init__(self, name: str, steps: list[Step], c: Check, env: dict[str, str]) -> None:
        self.name, self.steps, self.env, self.cwd = name, steps, env, c.work
        self.logs = c.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.deadline = self.started + c.sizes.timeout_s
        self.seconds: dict[str, float] = {}
        self.error: str | None = None
        self.proc: subprocess.Popen | None = None
        self.index, self.t0 = -1, self.started
        self._next()

    def log(self, step: Step) -> Path:
        return self.logs / f"{self.name}-{step.name}.log"

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.steps):
            self.proc = None
            return
        step = self.steps[self.index]
        with open(self.log(step), "w") as out:
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen(step.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def done(self) -> bool:
        return self.proc is None

    def pump(self) -> None:
        if self.proc is None:
            return
        step = self.steps[self.index]
        if time.perf_counter() > self.deadline:
            self._fail(f"{step.name} still running after {time.perf_counter() - self.started:.0f} s: killed")
            return
        rc = self.proc.poll()
        if rc is None:
            return
        self.seconds[step.name] = round(time.perf_counter() - self.t0, 2)
        if rc != 0:
            self._fail(f"`{' '.join(step.argv[1:4])} ...` ({step.name}) exited {rc}: ...{tail(self.log(step))}")
            return
        try:
            if step.after is not None:
                step.after()
        except Exception as e:  # noqa: BLE001 - recorded as the stage's error
            self._fail(f"after {step.name}: {type(e).__name__}: {e}")
            return
        self._next()

    def _fail(self, error: str) -> None:
        self.error = error  # before the chain reads as done
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class Background:
    """The running chains, advanced by one thread while the main thread does other stages."""
    def __init__(self) -> None:
        self.chains: list[Chain] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="gpu_check-background", daemon=True)

    def add(self, chain: Chain) -> None:
        self.chains.append(chain)
        if not self.thread.is_alive():
            self.thread.start()

    def _pump(self) -> None:
        while not self.stop.wait(0.1):
            for chain in list(self.chains):
                chain.pump()

    def wait(self, chain: Chain) -> None:
        while not chain.done:
            time.sleep(0.05)
        if chain.error:
            raise CheckFailed(f"{chain.name}: {chain.error}")

    def close(self) -> None:
        """Stop pumping and kill whatever still runs (a failure elsewhere, or an interruption)."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        for chain in self.chains:
            chain.kill()


# ---------------------------------------------------------------------- 1. env


def stage_env(c: Check, fig: dict[str, Any]) -> None:
    """What the figures were taken on; on a GPU run, that there is a GPU with bf16."""
    fig.update(machine())
    fig["pytorch_lightning"] = version("pytorch-lightning")
    fig["cores"] = os.cpu_count()
    fig["cuda_available"] = torch.cuda.is_available()
    fig["cuda_version"] = torch.version.cuda
    fig["cudnn_version"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    fig["fp32_precision"] = c.mode
    with contextlib.suppress(OSError, ValueError):
        fig["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if c.cpu:
        fig["device"] = "cpu"
        return
    expect(torch.cuda.is_available(), "no CUDA device is visible: run with --cpu on a machine without a GPU")
    props = torch.cuda.get_device_properties(c.device)
    fig["device"] = props.name
    fig["gpu_count"] = torch.cuda.device_count()
    fig["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    fig["compute_capability"] = f"{props.major}.{props.minor}"
    fig["bf16_supported"] = torch.cuda.is_bf16_supported()
    expect(fig["bf16_supported"], f"{props.name} has no bfloat16: bf16-mixed cannot be checked")


# ---------------------------------------------------------------------- 2. synth


def stage_synth(c: Check, fig: dict[str, Any]) -> None:
    """`freqtag synth` for both feature kinds (in this process: a new one would spend seconds importing).

    mel96 and the tiny copy of it come first: with --cpu the background stages start on them (``c.ready``)
    while mel128 is made.
    """
    for features, tracks in c.sizes.tracks.items():
        out = c.synthetic(features)
        log = c.work / "logs" / f"synth-{features}.log"
        rc, seconds = cli(["synth", "--out", str(out), "--tracks", str(tracks), "--seed", "0", "--features", features], log)
        fig[f"{features}_seconds"] = round(seconds, 2)
        expect(rc == 0, f"freqtag synth --features {features} exited {rc}: ...{tail(log)}")
        store = FeatureStore(out / f"{features}.h5")
        expect(len(store) == tracks and store.spec.name == features,
               f"{store.path}: {len(store)} tracks of {store.spec.name}, expected {tracks} of {features}")
        fig[f"{features}_tracks"] = len(store)
        fig[f"{features}_mib"] = round(store.path.stat().st_size / 2**20, 1)
        if features == "mel96":
            fig["tiny_tracks"] = tiny_copy(out, c.tiny(), c.sizes.tiny_frames, math.lcm(c.sizes.run_batch, c.sizes.batch))
            if c.ready is not None:
                c.ready()


def covering(labels: np.ndarray, multiple: int = 1) -> list[int]:
    """Rows (in file order) that give every tag a positive (greedy, tracks with the most tags first),
    then the next rows until their number is a multiple of ``multiple``."""
    hot = labels.astype(bool)
    keep, covered = [], np.zeros(hot.shape[1], bool)
    for i in np.argsort(-hot.sum(1), kind="stable"):
        if (hot[i] & ~covered).any():
            keep.append(int(i))
            covered |= hot[i]
    rest = [i for i in range(len(hot)) if i not in keep]
    while len(keep) % multiple and rest:
        keep.append(rest.pop(0))
    return sorted(keep)


def tiny_copy(src: Path, dst: Path, frames: int | None, batch: int) -> int:
    """A tiny copy of the mel96 dataset ``src``: per split only tracks that cover every tag, cut to ``frames``.

    Every tag keeps a positive (and negatives) in every split, so training, the weighted loss and the
    final scores are all defined; whole-track evaluation and the SWA BatchNorm pass, which dominate a
    tiny run (and any scoring on the CPU), then cost a few dozen forward passes. The train tracks are a
    multiple of ``batch``: a last batch of one crop would stop BatchNorm in train mode.
    """
    store = FeatureStore(src / "mel96.h5")
    tags = jamendo.read_tags(src / jamendo.TAGS_FILE)
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "split-0").mkdir(parents=True)
    shutil.copy(src / jamendo.TAGS_FILE, dst / jamendo.TAGS_FILE)
    kept: dict[str, list[str]] = {}
    for name in jamendo.SPLITS:
        split = jamendo.read_split(jamendo.split_file(src / "split-0", name), tags, name=name)
        rows = covering(split.labels, batch if name == "train" else 1)
        kept[name] = [split.track_ids[i] for i in rows]
        jamendo.write_split(jamendo.split_file(dst / "split-0", name), kept[name], [split.paths[i] for i in rows],
                            split.durations[rows], split.labels[rows], tags, [split.artist_ids[i] for i in rows])
    ids = [t for name in jamendo.SPLITS for t in kept[name]]
    writer = StoreWriter(dst / "mel96.h5", store.spec, ids)
    writer.add([(t, store.track(t)[:frames].astype(np.float32)) for t in ids])  # [:None]: whole
    writer.finish(kept["train"], "train")
    return len(ids)


# ---------------------------------------------------------------------- 3. train_step


def no_dropout(net: torch.nn.Module) -> torch.nn.Module:
    """Dropout off (its masks come from per-device generators), BatchNorm still on batch statistics."""
    for m in net.modules():
        if isinstance(getattr(m, "p", None), float):  # nn.Dropout*, FreqDepConv's band dropout
            m.p = 0.0
    return net


def batch_losses(cfg: Any, dm: Any, x: torch.Tensor, y: torch.Tensor, c: Check, precisions: list[str]) -> dict[str, Any]:
    """One batch's loss with the same weights: CPU float32 against the device (float32, and each mixed precision)."""
    from freqtag.train.driver import build_loss, build_net

    torch.manual_seed(INIT_SEED)
    cpu_net = no_dropout(build_net(cfg.model)).train()
    dev_net = copy.deepcopy(cpu_net).to(c.device)
    loss = build_loss(cfg.loss, dm)
    dev_loss = copy.deepcopy(loss).to(c.device)
    with torch.no_grad():
        ref = float(loss(cpu_net(x).squeeze(-1), y))
        xd, yd = x.to(c.device), y.to(c.device)
        fp32 = float(dev_loss(dev_net(xd).squeeze(-1).float(), yd))
        out: dict[str, Any] = {"cpu_fp32": ref, "device_fp32": fp32, "fp32_abs_diff": abs(fp32 - ref),
                               "fp32_tolerance": device_tolerance(c.mode), "mixed_rtol": MIXED_RTOL}
        expect(finite(ref) and out["fp32_abs_diff"] <= out["fp32_tolerance"],
               f"batch loss on {c.device} {fp32!r} vs CPU {ref!r}: |diff| {out['fp32_abs_diff']:.2e} > "
               f"{out['fp32_tolerance']:g} (fp32_precision={c.mode})")
        for precision in (p for p in precisions if p.endswith("-mixed")):
            dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
            with torch.autocast(c.device.type, dtype=dtype):
                mixed = float(dev_loss(dev_net(xd).squeeze(-1).float(), yd))
            rel = abs(mixed - ref) / abs(ref)
            out[precision] = {"loss": mixed, "rel_diff": rel}
            expect(rel <= MIXED_RTOL, f"{precision} batch loss {mixed!r} vs CPU float32 {ref!r}: relative "
                                      f"difference {rel:.2e} > {MIXED_RTOL:g}")
    return out


class StepProbe:
    """bench/train_step.py's step timer, synchronised with the GPU, plus each step's loss and GradScaler scale.

    A Lightning callback made on demand (``StepProbe()``), so that Lightning is imported only when needed.
    """

    def __new__(cls):  # type: ignore[no-untyped-def]
        import train_step as bench_train_step  # bench/train_step.py

        class _Probe(bench_train_step.StepTimer):
            def __init__(self) -> None:
                super().__init__()
                self.losses: list[float] = []
                self.scales: list[float] = []

            def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                super().on_train_start(trainer, pl_module)
                if trainer.scaler is not None:
                    self.scales.append(float(trainer.scaler.get_scale()))

            def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                   batch_idx: int) -> None:
                sync(pl_module.device)  # a step ends when its GPU work has
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss))
                if trainer.scaler is not None:
                    self.scales.append(float(trainer.scaler.get_scale()))

        return _Probe()


def fit_block(cfg: Any, dm: Any, precision: str, c: Check) -> dict[str, Any]:
    """A real ``Trainer.fit`` for warmup + steps steps from fresh weights: its samples/s, memory, scaler, losses."""
    import train_step as bench_train_step
    from hydra.utils import instantiate

    from freqtag.train.driver import build_loss, build_net
    from freqtag.train.module import TaggingModule

    t0 = time.perf_counter()
    torch.manual_seed(INIT_SEED)
    module = TaggingModule.from_config(cfg, build_net(cfg.model), build_loss(cfg.loss, dm))
    probe = StepProbe()
    trainer = instantiate(
        cfg.trainer, precision=precision, callbacks=[probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        max_steps=c.sizes.warmup + c.sizes.steps,
    )  # fmt: skip
    setup = time.perf_counter() - t0
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(c.device)
    trainer.fit(module, datamodule=dm)
    block = bench_train_step.Block()
    block.add(probe.ends, probe.sizes, c.sizes.warmup, setup, 0)
    s = block.summary()
    scales = probe.scales
    skipped = sum(b < a for a, b in zip(scales, scales[1:])) if scales else None  # a skipped step halves the scale
    out = {"samples_per_s": s["samples_per_s"], "step_ms_median": s["step_ms_median"], "steps": len(probe.ends),
           "setup_s": round(setup, 2), "first_step_s": round(probe.ends[0] - probe.start, 2), "loss_first": probe.losses[0], "loss_last": probe.losses[-1],
           "peak_memory_mib": round(torch.cuda.max_memory_allocated(c.device) / 2**20, 1) if c.device.type == "cuda"
           else None,
           "scaler_skipped_steps": skipped, "scaler_final_scale": scales[-1] if scales else None}  # fmt: skip
    expect(all(finite(v) for v in probe.losses), f"non-finite training loss: {probe.losses}")
    expect(skipped is None or skipped < len(probe.ends),
           f"the GradScaler skipped all {len(probe.ends)} steps (scales {scales}): nothing was trained")
    return out


def stage_train_step(c: Check, fig: dict[str, Any]) -> None:
    """Stage 3: the Lightning stack's training throughput, and the batch loss on the device against the CPU."""
    import train_step as bench_train_step
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    needs(c, "synth")
    bench_train_step.quiet()
    fig["blocks"], fig["losses"], fig["store_on_device_mib"] = [], [], {}
    for features, length in dict.fromkeys((f, n) for _, f, n, _ in c.sizes.blocks):
        args = SimpleNamespace(batch_size=c.sizes.batch, tracks=c.sizes.tracks[features], data_dir=c.data_dir)
        base = bench_train_step.config(features, length, "freq_dep", args, c.work / "train_step")
        spec = FeatureSpec.from_dict(OmegaConf.to_container(base.features, resolve=True))  # type: ignore[arg-type]
        dm = instantiate(base.data, features=spec, _recursive_=False)
        dm.check()
        batch = dm.on_device(next(iter(dm.train_dataloader())), torch.device("cpu"))  # before the store goes to the GPU
        x, y = batch["x"], batch["y"].float()
        for model in dict.fromkeys(m for m, f, n, _ in c.sizes.blocks if (f, n) == (features, length)):
            precisions = [p for m, f, n, p in c.sizes.blocks if (m, f, n) == (model, features, length)]
            def block_config(extra: tuple[str, ...] = ()) -> Any:
                cfg = bench_train_step.config(features, length, model, args, c.work / "train_step", extra)
                with open_dict(cfg):
                    cfg.trainer.accelerator = "cpu" if c.cpu else "gpu"
                    if cfg.model.get("n_tags") is None:  # the tag list decides, as training.run does
                        cfg.model.n_tags = len(dm.tags)
                return cfg

            cfg = block_config()
            shape = {"model": model, "features": features, "input_length": length, "batch": c.sizes.batch}
            fig["losses"].append({**shape, **batch_losses(cfg, dm, x, y, c, precisions)})
            for precision in precisions:
                fig["blocks"].append({**shape, "precision": precision, **fit_block(cfg, dm, precision, c)})
                b = fig["blocks"][-1]
                print(f"  {model:8} {features}x{length:<4} {precision:10} {b['samples_per_s']:9.1f} samples/s"
                      f"  peak {b['peak_memory_mib']} MiB  skipped {b['scaler_skipped_steps']}", flush=True)
            for (m, f, n, precision), extra in c.sizes.variants:
                if (m, f, n) != (model, features, length):
                    continue
                default = next(b for b in fig["blocks"] if b["precision"] == precision and
                               (b["model"], b["features"], b["input_length"]) == (m, f, n))
                v = {**shape, "precision": precision, "settings": " ".join(extra),
                     **fit_block(block_config(extra), dm, precision, c)}
                v["speedup_vs_default"] = round(v["samples_per_s"] / default["samples_per_s"], 3)
                fig.setdefault("variants", []).append(v)
                print(f"  {model:8} {features}x{length:<4} {precision:10} {v['samples_per_s']:9.1f} samples/s"
                      f"  x{v['speedup_vs_default']:.2f} with {v['settings']} (first step {v['first_step_s']} s)",
                      flush=True)
        fig["store_on_device_mib"][features] = round(dm.in_memory_bytes() / 2**20, 1)  # in the peak memory figures
        dm.release()
        best = max(b["samples_per_s"] for b in fig["blocks"] if (b["features"], b["input_length"]) == (features, length))
        c.best_samples_per_s[(features, length)] = best
    fig["best_samples_per_s"] = max(c.best_samples_per_s.values())


# ---------------------------------------------------------------------- 4. loader


def stage_loader(c: Check, fig: dict[str, Any]) -> None:
    """Stage 4: crops/s of each training pipeline, batches normalised on the device, against the GPU's appetite.

    The appetite: the best samples/s of stage 3 at the same shape (mel128 x the loader's length), else its best.
    """
    import loader as bench_loader  # bench/loader.py

    from freqtag.data.datamodule import JamendoDataModule

    needs(c, "synth")
    folder = c.synthetic("mel128")
    gpu = c.best_samples_per_s.get(("mel128", c.sizes.loader_length)) or max(c.best_samples_per_s.values(), default=None)
    spec = FeatureSpec.load("mel128")
    store = folder / "mel128.h5"

    def pipeline(in_memory: bool, workers: int) -> Callable[[], tuple[Any, Callable[[Any], Any]]]:
        def make() -> tuple[Any, Callable[[Any], Any]]:
            dm = JamendoDataModule(store=str(store), splits_dir=str(folder / "split-0"),
                                   tags_file=str(folder / jamendo.TAGS_FILE), features=spec,
                                   input_length=c.sizes.loader_length, batch_size=c.sizes.loader_batch,
                                   num_workers=workers, in_memory=in_memory, seed=42)
            dm.setup("fit")

            def convert(b: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
                b = dm.on_device(b, c.device)  # as Lightning's batch hooks do in training
                sync(c.device)
                return b["x"], b["y"]

            return dm.train_dataloader(), convert
        return make

    pipes = [bench_loader.Pipeline("in-memory", pipeline(True, 0), [store], 0)]
    pipes += [bench_loader.Pipeline(f"store/{w} workers", pipeline(False, w), [store], w) for w in c.sizes.loader_workers]
    fig["pipelines"] = []
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    for p in pipes:
        p.fresh()
        bench_loader.run_epoch(p, 0, limit=3)  # untimed: workers started, in-memory store loaded onto the device
        crops, seconds, epoch, kept = 0, 0.0, 1, []
        while seconds < c.sizes.loader_seconds or epoch == 1:
            figures, got = bench_loader.run_epoch(p, epoch, keep=1 if epoch == 1 else 0)
            kept += got
            crops += figures["crops"]
            seconds += figures["seconds"]
            epoch += 1
        p.drop()
        row: dict[str, Any] = {"pipeline": p.name, "workers": p.workers, "epochs": epoch - 1, "crops": crops,
                               "crops_per_s": round(crops / seconds, 1)}
        if gpu:
            row["ratio_to_gpu"] = round(row["crops_per_s"] / gpu, 3)
        first = first or kept[0]
        row["max_abs_diff_vs_in_memory"] = float((kept[0][0] - first[0]).abs().max())
        fig["pipelines"].append(row)
        print(f"  {p.name:16} {row['crops_per_s']:10.1f} crops/s  x{row.get('ratio_to_gpu')} of the best train samples/s",
              flush=True)
        expect(row["max_abs_diff_vs_in_memory"] <= 1e-5 and torch.equal(kept[0][1].cpu(), first[1].cpu()),
               f"{p.name}: epoch 1's first batch differs from the in-memory one's (max |diff| "
               f"{row['max_abs_diff_vs_in_memory']:.2e})")
    fig["best_crops_per_s"] = max(r["crops_per_s"] for r in fig["pipelines"])
    if gpu:
        fig["gpu_samples_per_s"] = gpu
        fig["best_ratio_to_gpu"] = round(fig["best_crops_per_s"] / gpu, 3)


# ---------------------------------------------------------------------- 5. short run (background)


class StopAfterEpoch:
    """Ends ``fit`` cleanly after epoch ``epoch`` (0-based): a run cut short whose last.ckpt a resume continues.

    Built by Hydra in the check's ``train.py`` processes (``+callbacks.stop._target_=gpu_check.StopAfterEpoch``),
    as a Lightning callback; unlike a kill, the run still finishes (SWA of the epochs so far, final.ckpt) and
    exits 0.
    """

    def __new__(cls, epoch: int):  # type: ignore[no-untyped-def]
        import pytorch_lightning as pl

        class _Stop(pl.Callback):
            def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                if trainer.current_epoch >= int(epoch):
                    trainer.should_stop = True

        return _Stop()


def train_args(c: Check, *extra: str) -> list[str]:
    """`python train.py experiment=demo` on the check's mel96 data, on the check's device."""
    data = c.run_data()
    return [
        sys.executable, str(REPO / "train.py"), "experiment=demo", "logger=csv", "data.synthetic=null",
        f"data.store={data / 'mel96.h5'}", f"data.splits_dir={data / 'split-0'}",
        f"data.tags_file={data / 'moodtheme_split.txt'}", f"trainer.accelerator={'cpu' if c.cpu else 'gpu'}",
        f"fp32_precision={c.mode}", f"paths.data_dir={c.data_dir}", *extra,
    ]  # fmt: skip


def swa_state(last: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    swa = next(v for k, v in ckpt["callbacks"].items() if k.startswith("SWA"))
    return ckpt, swa


def check_final(run: Path, fig: dict[str, Any], prefix: str) -> None:
    """final.ckpt loads with weights_only=True and has every key; metrics.json holds finite scores."""
    from freqtag.runs import FINAL_KEYS

    final = torch.load(run / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    missing = [k for k in FINAL_KEYS if k not in final]
    expect(not missing, f"{run}/checkpoints/final.ckpt lacks {missing}")
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("validation", "test"):
        for key in ("roc_auc", "pr_auc"):
            value = float(metrics[split][key])
            expect(finite(value) and 0 <= value <= 1, f"{run}/metrics.json: {split} {key} = {value}")
            fig[f"{prefix}{split}_{key}"] = round(value, 4)


def start_short_run(c: Check, fig: dict[str, Any]) -> Chain:
    """Stage 5 in the background: run 1 stops after epoch ``run_stop`` (inside SWA); run 2 resumes it to the end."""
    s = c.sizes
    run = c.run_dir
    shutil.rmtree(run, ignore_errors=True)  # a reused --work: nothing of an earlier check may pass for this one's
    data = c.run_data()
    first_swa = s.run_epochs - max(1, math.ceil(s.swa_fraction * s.run_epochs - 1e-9))  # the recipe's last epochs
    expect(first_swa <= s.run_stop < s.run_epochs - 1, f"run_stop {s.run_stop} is not inside the SWA epochs")
    train = jamendo.read_split(jamendo.split_file(data / "split-0", "train"), jamendo.read_tags(data / jamendo.TAGS_FILE))
    steps_per_epoch = math.ceil(len(train) / s.run_batch)  # one process: a last, smaller batch counts
    common = [f"model={s.run_model}", f"data.input_length={s.run_length}", f"data.batch_size={s.run_batch}",
              f"trainer.max_epochs={s.run_epochs}", f"callbacks.swa.fraction={s.swa_fraction}", f"hydra.run.dir={run}"]
    if s.run_train_batches:
        steps_per_epoch = min(steps_per_epoch, s.run_train_batches)
        common += [f"trainer.limit_train_batches={s.run_train_batches}", "trainer.limit_val_batches=1"]
    last = run / "checkpoints" / "last.ckpt"
    fig.update(model=s.run_model, epochs=s.run_epochs, stopped_after_epoch=s.run_stop, first_swa_epoch=first_swa)

    def after_first() -> None:
        ckpt, swa = swa_state(last)
        fig["run1_last_epoch"], fig["run1_swa_averaged"] = ckpt["epoch"], swa["n_averaged"]
        expect(ckpt["epoch"] == s.run_stop and swa["n_averaged"] == s.run_stop - first_swa + 1,
               f"run 1's last.ckpt: epoch {ckpt['epoch']}, {swa['n_averaged']} SWA epochs; expected {s.run_stop} "
               f"and {s.run_stop - first_swa + 1}")
        check_final(run, fig, "run1_")

    def after_resume() -> None:
        ckpt, swa = swa_state(last)
        fig.update(run2_last_epoch=ckpt["epoch"], run2_swa_averaged=swa["n_averaged"], run2_global_step=ckpt["global_step"])
        expect(ckpt["epoch"] == s.run_epochs - 1 and swa["n_averaged"] == s.run_epochs - first_swa,
               f"resumed last.ckpt: epoch {ckpt['epoch']}, {swa['n_averaged']} SWA epochs; expected "
               f"{s.run_epochs - 1} and {s.run_epochs - first_swa}")
        expect(ckpt["global_step"] == s.run_epochs * steps_per_epoch,
               f"resumed run: {ckpt['global_step']} steps in all, expected {s.run_epochs} x {steps_per_epoch}")
        scaler = ckpt.get("MixedPrecision")  # Lightning keeps the GradScaler's state under its plugin's name
        fig["grad_scaler_scale"] = float(scaler["scale"]) if scaler else None
        expect(c.cpu or bool(scaler), "a GPU run at precision auto (16-mixed) saved no GradScaler state in last.ckpt")
        check_final(run, fig, "")

    stop = ["+callbacks.stop._target_=gpu_check.StopAfterEpoch", f"+callbacks.stop.epoch={s.run_stop}"]
    steps = [Step("run1", train_args(c, *common, *stop), after_first),
             Step("resume", train_args(c, *common, f"ckpt_path={last}"), after_resume)]
    return Chain("short_run", steps, c, c.env())


# ---------------------------------------------------------------------- 6. grid (background)


def visible_gpus(c: Check) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` entries the grid may pin jobs to: one pretend GPU "0" with --cpu."""
    if c.cpu:
        return ["0"]

    return freqtag.train.gpu_pool.visible_gpus()


def start_grid(c: Check, fig: dict[str, Any]) -> Chain:
    """Stage 6 in the background: a 2-job multirun through hydra/launcher=joblib_gpu (``jobs_per_gpu`` jobs at once).

    --cpu: the launcher needs a GPU, so it is given a pretend one (``CUDA_VISIBLE_DEVICES=0``, as
    tests/train/test_ablation.py does with "3,5") while the jobs train on the CPU, one after the other in a thread
    of the launching process: the pool's size, its lock file and the per-job pinning run as on a GPU machine.
    """
    s = c.sizes
    sweep = c.work / "grid"
    shutil.rmtree(sweep, ignore_errors=True)
    gpus = visible_gpus(c)
    env = c.env(CUDA_VISIBLE_DEVICES=",".join(gpus)) if c.cpu else c.env()
    argv = train_args(c, "-m", "model=convs", f"data.input_length={s.grid_length}", f"data.batch_size={s.run_batch}",
                      "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                      "loss=bce,weighted", "logger.name=gpu${oc.env:CUDA_VISIBLE_DEVICES}", "hydra/launcher=joblib_gpu",
                      f"jobs_per_gpu={s.grid_jobs_per_gpu}", f"hydra.launcher.backend={s.grid_backend}",
                      f"hydra.sweep.dir={sweep}")
    argv.insert(2, argv.pop(argv.index("-m")))  # train.py -m ...

    def after() -> None:
        fig.update(visible_gpus=gpus, jobs_per_gpu=s.grid_jobs_per_gpu, backend=s.grid_backend)
        for job in (0, 1):
            run = sweep / str(job)
            pinned = [p.name[3:] for p in run.iterdir() if p.name.startswith("gpu")] if run.is_dir() else []
            expect(len(pinned) == 1 and pinned[0] in gpus, f"grid job {job}: pinned to {pinned}, expected one of {gpus}")
            fig[f"job{job}_gpu"] = pinned[0]
            metrics = json.loads((run / "metrics.json").read_text())
            fig[f"job{job}_seconds"] = metrics["seconds"]
            fig[f"job{job}_test_roc_auc"] = round(float(metrics["test"]["roc_auc"]), 4)
            expect(finite(fig[f"job{job}_test_roc_auc"]), f"grid job {job}: test ROC-AUC {fig[f'job{job}_test_roc_auc']}")

    return Chain("grid", [Step("multirun", argv, after)], c, env)


# ---------------------------------------------------------------------- 7. DDP


def record_collectives() -> list[tuple[str, list[str]]]:
    """Wrap torch.distributed's collectives so that each call records the device types of its tensors."""
    seen: list[tuple[str, list[str]]] = []

    def tensors(values: Sequence[Any]) -> Iterator[torch.Tensor]:
        for v in values:
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from tensors(v)

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter"):
        fn = getattr(dist, name)

        def wrapped(*args: Any, _fn: Callable[..., Any] = fn, _name: str = name, **kwargs: Any) -> Any:
            seen.append((_name, sorted({t.device.type for t in tensors([*args, *kwargs.values()])})))
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapped)
    return seen


def job_dm(job: dict[str, Any]) -> Any:
    """The DataModule of stage 7's data (store mode, no workers), set up."""
    from freqtag.data.datamodule import JamendoDataModule

    data = Path(job["data"])
    dm = JamendoDataModule(store=str(data / "mel96.h5"), splits_dir=str(data / "split-0"),
                           tags_file=str(data / "moodtheme_split.txt"), features=FeatureSpec.load("mel96"),
                           input_length=job["length"], batch_size=job["batch"], num_workers=0, seed=42)
    dm.setup()
    return dm


def swa_scores(job: dict[str, Any], rank: int = 0, world: int = 1) -> dict[str, Any]:
    """freqtag's end of a run on ``job``'s data: SWA finalize (BatchNorm pass, broadcast) and whole-track scores.

    With ``world`` > 1 (inside a process group) the DataModule sees a stand-in trainer with this rank, as
    Lightning's would be, so ``evaluate_tracks`` scores this rank's share and sums over the ranks.
    """
    from freqtag.train.driver import finalize
    from freqtag.train.evaluation import evaluate_tracks
    from freqtag.train.module import TaggingModule
    from freqtag.train.swa import SWA

    device = torch.device(job["device"])
    set_fp32_precision(job["mode"])
    dm = job_dm(job)
    if world > 1:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=SimpleNamespace(root_device=device))
    net = FreqTagNet(dm.spec.n_mels, job["length"], n_tags=len(dm.tags), filters=job["model"])
    net.load_state_dict(torch.load(job["weights"], weights_only=True))
    module = TaggingModule(net.to(device), torch.nn.BCEWithLogitsLoss(), seed=42)
    swa = SWA()
    swa.on_train_epoch_end(SimpleNamespace(current_epoch=4, max_epochs=5), module)  # type: ignore[arg-type]
    finalize(module, dm, swa, device, max_epochs=5)
    probs = {split: evaluate_tracks(module.net, dm, split, device) for split in ("validation", "test")}
    return {"probs": probs, "state": {k: v.detach().cpu() for k, v in module.net.state_dict().items()}, "net": module.net}


def ddp_rank(rank: int, world: int, job: dict[str, Any]) -> None:
    """One rank of stage 7 (a torch.multiprocessing process): gloo, the collectives recorded, results to a file."""
    if job["device"] == "cpu":
        torch.set_num_threads(1)  # two ranks on the cores; and no OpenMP pool used across the fork
    dist.init_process_group("gloo", init_method=f"file://{job['init']}", rank=rank, world_size=world)
    try:
        seen = record_collectives()
        out = swa_scores(job, rank, world)
        torch.save({"probs": out["probs"], "state": out["state"], "collectives": seen}, Path(job["out"]) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def stage_ddp(c: Check, fig: dict[str, Any]) -> None:
    """Stage 7: 2 ranks on the one device against one process, and the device against the CPU."""
    from freqtag.train.evaluation import evaluate_tracks

    needs(c, "synth")
    s = c.sizes
    folder = c.work / "ddp"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(INIT_SEED)
    net = FreqTagNet(FeatureSpec.load("mel96").n_mels, s.ddp_length, filters=s.ddp_model)
    torch.save(net.state_dict(), folder / "init.pt")
    job = {"device": str(c.device), "mode": c.mode, "data": str(c.tiny()), "length": s.ddp_length, "batch": s.batch,
           "model": s.ddp_model, "weights": str(folder / "init.pt"), "init": str(folder / "store"), "out": str(folder)}
    # fork is cheap (no imports) but unsafe once CUDA is initialised: spawn on the GPU
    method = "fork" if c.cpu else "spawn"
    t0 = time.perf_counter()
    ctx = mp.start_processes(ddp_rank, args=(2, job), nprocs=2, join=False, start_method=method)
    deadline = time.perf_counter() + s.timeout_s
    while not ctx.join(timeout=0.2):
        if time.perf_counter() > deadline:
            for p in ctx.processes:
                p.kill()
            raise CheckFailed(f"the 2 DDP ranks did not finish in {s.timeout_s:.0f} s")
    fig["ranks_seconds"] = round(time.perf_counter() - t0, 2)
    fig["start_method"] = method
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single = swa_scores(job)
    for split in ("validation", "test"):
        diff = max(float(np.abs(r["probs"][split] - single["probs"][split]).max()) for r in ranks)
        fig[f"{split}_ddp_vs_single_max_abs"] = diff
        expect(diff <= 1e-5, f"{split}: 2 ranks' whole-track probabilities differ from one process's by {diff:.2e} > 1e-5")
    worst = max(float(((ranks[r]["state"][k].double() - v.double()).abs() / v.double().abs().clamp(min=1)).max())
                for r in (0, 1) for k, v in single["state"].items())
    fig["swa_state_ranks_vs_single_max_rel"] = worst
    expect(all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in single["state"]),
           "after finalize's broadcast the two ranks hold different weights")
    expect(worst <= 1e-5, f"the ranks' finalized weights differ from one process's by {worst:.2e} (relative)")
    calls = ranks[0]["collectives"] + ranks[1]["collectives"]
    fig["collectives"] = {name: sum(n == name for n, _ in calls) for name in sorted({n for n, _ in calls})}
    fig["collective_devices"] = sorted({d for _, ds in calls for d in ds})
    expect({"all_reduce", "broadcast"} <= set(fig["collectives"]), f"collectives seen: {fig['collectives']}")
    expect(fig["collective_devices"] == [c.device.type],
           f"collectives got tensors on {fig['collective_devices']}, expected only {c.device.type}")
    if c.device.type == "cpu":
        return  # the device is the CPU: nothing more to compare
    tol = device_tolerance("ieee")  # whole-track evaluation always runs in IEEE float32 (freqtag.system.precision)
    net = single["net"].cpu()  # the same finalized weights, scored on the CPU
    for split in ("validation", "test"):
        cpu = evaluate_tracks(net, job_dm(job), split, torch.device("cpu"))
        diff = float(np.abs(cpu - single["probs"][split]).max())
        fig[f"{split}_device_vs_cpu_max_abs"] = diff
        expect(diff <= tol, f"{split}: whole-track probabilities on {c.device} differ from the CPU's by {diff:.2e} "
                            f"> {tol:g}")


# ---------------------------------------------------------------------- 8. prepare


def music(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A chord (whole-Hz partials, so one computed second tiles seamlessly) with a slow tremolo and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(rate, dtype=np.float32) / rate
    f0 = 110.0 * (1 + seed % 5)
    x = np.tile(sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3, 5)), math.ceil(seconds))[: int(seconds * rate)]
    tremolo = 0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * np.arange(x.size, dtype=np.float32) / rate)
    return (0.2 * x * tremolo + 0.02 * rng.standard_normal(x.size, dtype=np.float32)).astype(np.float32)


def write_audio(c: Check) -> float:
    """Stage 8's audio (:meth:`Check.audio`, resampled by the recipe), and split TSVs for it; its seconds."""
    folder = c.audio_dir
    shutil.rmtree(folder, ignore_errors=True)
    paths = c.audio()
    for i, path in enumerate(paths):
        rate = (44100, 22050, 48000)[i % 3]
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(folder / path, music(c.sizes.audio_seconds, rate, i), rate)
    splits = folder / "splits"
    splits.mkdir()
    (splits / jamendo.TAGS_FILE).write_text("\n".join(jamendo.MOODTHEME_TAGS) + "\n")
    n = len(paths)
    parts = np.array_split(np.arange(n), [max(1, n // 2), max(2, 3 * n // 4)])  # train, validation, test
    for name, rows in zip(jamendo.SPLITS, parts):
        labels = np.zeros((len(rows), len(jamendo.MOODTHEME_TAGS)), np.uint8)
        labels[np.arange(len(rows)), rows % len(jamendo.MOODTHEME_TAGS)] = 1
        jamendo.write_split(jamendo.split_file(splits, name), [f"track_{9000001 + r:07d}" for r in rows],
                            [str(paths[r]) for r in rows], [c.sizes.audio_seconds] * len(rows), labels,
                            jamendo.MOODTHEME_TAGS)
    return n * c.sizes.audio_seconds


def cli(argv: list[str], log: Path) -> tuple[int, float]:
    """A `freqtag` command in this process (no start-up cost): exit status and seconds."""
    t0 = time.perf_counter()
    with output_to(log):
        try:
            rc = freqtag.cli.main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 2
    return rc, time.perf_counter() - t0


def stage_prepare(c: Check, fig: dict[str, Any]) -> None:
    """Stage 8: the log-mel transform on the device against the CPU path: speed and equal stores."""
    shutil.rmtree(c.work / "prepare", ignore_errors=True)  # prepare leaves a complete store as it is
    audio_s = write_audio(c)
    fig["audio_files"], fig["audio_seconds"] = c.sizes.audio_files, audio_s
    runs = {"device": (str(c.device), c.sizes.prepare_workers[0]), "cpu": ("cpu", c.sizes.prepare_workers[1])}
    stores = {}
    for name, (device, workers) in runs.items():
        common = ["--features", "mel128", "--workers", str(workers), "--device", device, "--no-progress"]
        log = c.work / "logs" / f"prepare-{name}.log"
        # untimed first: the files of one folder, so that neither run pays the fork server's or the device's start
        warm = c.work / "prepare" / f"warm-{name}.h5"
        cli(["prepare", *common, "--audio-dir", str(c.audio_dir / "00"), "--out", str(warm)], log)
        out = c.work / "prepare" / name / "mel128.h5"
        rc, seconds = cli(["prepare", *common, "--audio-dir", str(c.audio_dir), "--splits", str(c.audio_dir / "splits"),
                           "--out", str(out)], log)
        fig[name] = {"device": device, "workers": workers, "seconds": round(seconds, 2),
                     "x_realtime": round(audio_s / seconds, 1)}
        expect(rc == 0, f"freqtag prepare --device {device} exited {rc}: ...{tail(log)}")
        stores[name] = FeatureStore(out)
    a, b = stores["device"], stores["cpu"]
    expect(a.track_ids == b.track_ids and np.array_equal(a.lengths, b.lengths), "the two stores hold different tracks")
    worst_steps, worst = 0.0, 0.0
    for t in a.track_ids:
        x, y = a.track(t).astype(np.float32), b.track(t).astype(np.float32)
        step = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(np.float16)).astype(np.float32)
        diff = np.abs(x - y)
        worst = max(worst, float(diff.max()))
        worst_steps = max(worst_steps, float((diff / step).max()))
    fig["max_abs_diff_db"], fig["max_diff_float16_steps"] = worst, worst_steps
    fig["mean_diff"], fig["std_diff"] = abs(a.mean - b.mean), abs(a.std - b.std)
    expect(worst_steps <= 1.0, f"the stores differ by up to {worst_steps:.2f} float16 steps ({worst:.3g} dB) > 1")


# ---------------------------------------------------------------------- 9. predict


def predict_takes(*args: str) -> bool:
    """Whether `freqtag predict` takes these options (its options change between versions)."""
    parser = freqtag.cli.build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _, unknown = parser.parse_known_args(["predict", "--ckpt", "x", *args])
    except SystemExit:  # an invalid value
        return False
    return not unknown


def stage_predict(c: Check, fig: dict[str, Any]) -> None:
    """Stage 9: `freqtag predict` with stage 5's run on the device and on the CPU: speed and equal probabilities."""
    files = [str(c.audio_dir / p) for p in c.audio()[: c.sizes.predict_files]]
    expect((c.run_dir / "checkpoints" / "final.ckpt").is_file(), "stage 5 left no final.ckpt")
    expect(all(Path(f).is_file() for f in files), "stage 8 wrote no audio")
    # predict scores in IEEE float32 unless it has (and is given) --fp32-precision
    flag = ["--fp32-precision", c.mode] if predict_takes("--fp32-precision", c.mode) else []
    tol = device_tolerance(c.mode if flag else "ieee")
    if c.cpu and predict_takes("--workers", "0"):
        flag += ["--workers", "0"]  # decoding in this process: a pool of workers would spend seconds starting
    fig["options"] = flag
    probs = {}
    for device in dict.fromkeys((str(c.device), "cpu")):
        out = c.work / "predict" / f"{device}.json"
        log = c.work / "logs" / f"predict-{device}.log"
        common = ["predict", "--ckpt", str(c.run_dir), "--device", device, *flag, "--format", "json", "--no-progress"]
        cli([*common, *files[:2], "--out", str(out)], log)  # untimed: the model loaded once, the workers started
        rc, seconds = cli([*common, *files, "--out", str(out)], log)
        expect(rc == 0, f"freqtag predict --device {device} exited {rc}: ...{tail(log)}")
        records = json.loads(out.read_text())
        probs[device] = {r["path"]: np.array(list(r["tags"].values())) for r in records}
        fig[device] = {"seconds": round(seconds, 2), "tracks_per_s": round(len(files) / seconds, 2)}
        expect(len(records) == len(files), f"predict --device {device}: {len(records)} records for {len(files)} files")
    dev, cpu = probs[str(c.device)], probs["cpu"]
    fig["tracks"] = len(files)
    fig["max_abs_diff"] = max(float(np.abs(dev[p] - cpu[p]).max()) for p in cpu)
    fig["tolerance"] = tol
    expect(fig["max_abs_diff"] <= tol,
           f"probabilities on {c.device} differ from the CPU's by {fig['max_abs_diff']:.2e} > {tol:g}")


# ---------------------------------------------------------------------- report


def summary(name: str, f: dict[str, Any]) -> str:
    """The stage's headline figures in one short line for the table."""
    if name == "env":
        return f"{f.get('device')}, torch {f.get('torch')}, CUDA {f.get('cuda_version')}, {f.get('cores')} cores"
    if name == "synth":
        return ", ".join(f"{k[:-8]} {v:.1f} s" for k, v in f.items() if k.endswith("_seconds"))
    if name == "train_step" and f.get("blocks"):
        best = max(f["blocks"], key=lambda b: b["samples_per_s"])
        mem = max(b["peak_memory_mib"] or 0 for b in f["blocks"])
        skipped = sum(b["scaler_skipped_steps"] or 0 for b in f["blocks"])
        worst = max(x["fp32_abs_diff"] for x in f["losses"]) if f.get("losses") else None
        return (f"best {best['samples_per_s']:.0f} samples/s ({best['model']} {best['features']} x {best['input_length']}, "
                f"{best['precision']}), peak {mem:.0f} MiB, {skipped} skipped steps, float32 loss vs CPU {worst:.1e}")
    if name == "loader" and f.get("pipelines"):
        ratio = f"; best x{f['best_ratio_to_gpu']} the GPU's samples/s" if f.get("best_ratio_to_gpu") else ""
        return ", ".join(f"{p['pipeline']} {p['crops_per_s']:.0f}/s" for p in f["pipelines"]) + ratio
    if name == "short_run":
        return (f"{f.get('run1_swa_averaged')} + {(f.get('run2_swa_averaged') or 0) - (f.get('run1_swa_averaged') or 0)} "
                f"SWA epochs across the resume, test ROC-AUC {f.get('test_roc_auc')}, "
                f"GradScaler scale {f.get('grad_scaler_scale')}")
    if name == "grid":
        return f"2 jobs, {f.get('jobs_per_gpu')} per GPU, on GPU {f.get('job0_gpu')} and {f.get('job1_gpu')}"
    if name == "ddp":
        gpu = f.get("test_device_vs_cpu_max_abs")
        return (f"2 ranks vs 1 process {f.get('test_ddp_vs_single_max_abs', float('nan')):.1e}"
                + (f", GPU vs CPU {gpu:.1e}" if gpu is not None else "") + f", collectives on {f.get('collective_devices')}")
    if name == "prepare" and "cpu" in f:
        return (f"--device {f['device']['device']} {f['device']['x_realtime']}x, --device cpu {f['cpu']['x_realtime']}x "
                f"real time, max {f.get('max_diff_float16_steps', float('nan')):.2f} float16 steps")
    if name == "predict" and "max_abs_diff" in f:
        return ", ".join(f"{k} {v['tracks_per_s']} tracks/s" for k, v in f.items() if isinstance(v, dict)) + \
            f", max |diff| {f['max_abs_diff']:.1e}"
    return ""


def print_table(c: Check, total: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu_check ({'cpu' if c.cpu else c.device}, fp32 {c.mode}): {total:.0f} s", title_justify="left")
    for col, justify in (("stage", "left"), ("ok", "center"), ("s", "right"), ("figures", "left"), ("error", "left")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for name, s in c.stages.items():
        table.add_row(name, "[green]ok[/green]" if s.ok else "[red]FAIL[/red]", f"{s.seconds:.1f}", summary(name, s.figures),
                      (s.error or "")[:300])
    Console(width=max(120, Console().width)).print(table)


def jsonable(value: Any) -> Any:
    """Figures as JSON: numpy scalars to Python, non-finite floats to strings (JSON has none)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


BACKGROUND_STAGES = (("short_run", start_short_run), ("grid", start_grid))


StageFn = Callable[[Check, dict[str, Any]], None]


def begin(c: Check, bg: Background, name: str, start: Callable[[Check, dict[str, Any]], Chain]) -> tuple[StageFn, float]:
    """Start a background stage now; returns the stage function that waits for it (or reports a failed start)
    and the time it started."""
    t0 = time.perf_counter()
    chain: Chain | None = None
    error = ""
    try:
        expect((c.run_data() / "mel96.h5").is_file() and (c.tiny() / "mel96.h5").is_file(), "stage 2 made no mel96 data")
        chain = start(c, c.stages.setdefault(name, Stage()).figures)
        bg.add(chain)
    except Exception as e:  # noqa: BLE001 - reported when the stage is finished
        error = f"{type(e).__name__}: {e}"

    def finish(c: Check, fig: dict[str, Any]) -> None:
        expect(chain is not None, f"not started: {error}")
        assert chain is not None
        try:
            bg.wait(chain)
        finally:
            fig["commands_seconds"] = chain.seconds

    return finish, t0


def run_all(c: Check, bg: Background, only: set[str] | None) -> None:
    """The stages in order; 5 and 6 run in the background until 7 is done.

    They start after stage 4, so that nothing else uses the GPU while 3 and 4 measure it; with --cpu
    as soon as their data is made (in stage 2), on the core the main process (one thread) leaves idle.
    """
    def want(name: str) -> bool:
        return only is None or name in only

    started: dict[str, tuple[StageFn, float]] = {}

    def start_background() -> None:
        if not started:
            started.update({n: begin(c, bg, n, start) for n, start in BACKGROUND_STAGES if want(n)})

    c.ready = start_background if c.cpu else None
    for name, fn in (("env", stage_env), ("synth", stage_synth), ("train_step", stage_train_step), ("loader", stage_loader)):
        if want(name):
            run_stage(c, name, fn)
    start_background()  # if not yet started: after stage 4 (or without stage 2)
    if want("ddp"):
        run_stage(c, "ddp", stage_ddp)
    for name, (finish, t0) in started.items():
        run_stage(c, name, finish, started=t0)
    for name, fn in (("prepare", stage_prepare), ("predict", stage_predict)):
        if want(name):
            run_stage(c, name, fn)


def cpu_seconds() -> dict[str, float]:
    """CPU time of this process and of its finished children: what the check cost the machine's cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"self": round(own.ru_utime + own.ru_stime, 1), "children": round(children.ru_utime + children.ru_stime, 1)}


def write_result(c: Check, out: Path, total: float, only: set[str] | None) -> tuple[Path, bool]:
    c.stages = {n: c.stages[n] for n in STAGES if n in c.stages}
    ok = all(s.ok for s in c.stages.values()) and (only is not None or len(c.stages) == len(STAGES))
    result = {"check": "gpu_check", "mode": "cpu" if c.cpu else "gpu", "ok": ok, "seconds": round(total, 1),
              "fp32_precision": c.mode, "mixed_rtol": MIXED_RTOL, "sizes": asdict(c.sizes),
              "background": [n for n, _ in BACKGROUND_STAGES], "only": sorted(only) if only else None,
              "cpu_seconds": cpu_seconds(),
              "stages": {n: asdict(s) for n, s in c.stages.items()}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gpu_check_cpu.json" if c.cpu else "gpu_check.json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    os.replace(tmp, path)
    return path, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes, every stage on the CPU (no GPU needed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                        help="folder of gpu_check.json (--cpu: gpu_check_cpu.json); default bench/results")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder, kept (default: a new temporary one, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    parser.add_argument("--fp32-precision", default="ieee", choices=FP32_PRECISIONS,
                        help="float32 on the GPU (freqtag.system.precision); sets the GPU-vs-CPU tolerance")
    parser.add_argument("--only", type=lambda v: set(v.split(",")), default=None, metavar="STAGE,...",
                        help="run only these stages (what they need from others must be in --work already)")
    parser.add_argument("--compile", action="store_true",
                        help="stage 3 also times compile=true (reduce-overhead on a GPU): the compilation takes minutes")
    args = parser.parse_args(argv)
    if args.only and not args.only <= set(STAGES):
        parser.error(f"--only {','.join(sorted(args.only - set(STAGES)))}: stages are {', '.join(STAGES)}")


    keep_freed_memory()  # as train.py and predict do
    set_fp32_precision(args.fp32_precision)
    if args.cpu:  # the stages' processes overlap on few cores, and tiny ops gain nothing from more threads
        torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="freqtag-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = CPU if args.cpu else GPU
    if args.compile:
        spec = sizes.variants[0][0]
        mode = "default" if args.cpu else "reduce-overhead"
        sizes = replace(sizes, variants=(*sizes.variants, (spec, ("compile=true", f"compile_mode={mode}"))))
    c = Check(cpu=args.cpu, sizes=sizes, device=torch.device("cpu" if args.cpu else "cuda"),
              mode=args.fp32_precision, work=work.resolve())
    started = time.perf_counter()
    bg = Background()
    try:
        run_all(c, bg, args.only)
    finally:
        bg.close()
        total = time.perf_counter() - started
        path, ok = write_result(c, args.out, total, args.only)
        keep = args.work is not None or args.keep_work
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(c, total)
    print(f"wrote {path}" + (f"; scratch in {work}" if keep else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
