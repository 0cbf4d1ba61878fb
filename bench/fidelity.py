#!/usr/bin/env python
"""Training fidelity (issue #19): freqtag's Lightning training against a plain PyTorch loop.

The plain loop is written from the paper's recipe (conf/experiment/paper.yaml) the way the
authors' plain-PyTorch code does it: one ``torch.manual_seed``/``np.random.seed``
at the start, then every random draw from the continuing global streams
(dropout masks from torch's default generator, the mixup coefficient from
numpy, the mixup permutation and the DataLoader shuffle from torch, crop starts
from numpy), ``zero_grad -> forward -> backward -> clip_grad_norm_ -> step``,
``scheduler.step()`` after each epoch, ``AveragedModel`` over the last 20% of
the epochs and ``update_bn`` over one more epoch of crops. Both sides use the
same network code (``freqtag.model``), the same loss (``freqtag.train.losses``), the
same data (one store, one filtered split) and ONE evaluation
(``freqtag.train.evaluation.evaluate_tracks`` + ``freqtag.metrics.tagging_scores``).

Each ingredient of the plain loop can be swapped for freqtag's, one at a time:

  --dropout ours   reseed the dropout generator every step, as TaggingModule.on_train_batch_start
  --mixup ours     lam from np.random.default_rng([seed, step, 2]), the permutation from a torch generator seeded
                   by that stream's next draw, as TaggingModule.mixup_draw
  --crops ours     freqtag.data.datamodule.CropSampler (order and starts from (seed, epoch))
  --gather ours    JamendoDataModule.gather + freqtag.data.normalise.normalise (in-memory crops)
  --val-pass       the per-epoch centre-crop validation pass Lightning runs (eval mode)
  --swa ours       freqtag.train.swa.SWA + the BatchNorm pass of freqtag.train.driver.finalize
  --all-ours       all of the above: must reproduce freqtag.train.driver.run bit for bit

Subcommands:

  prepare  make the synthetic data and the split without tracks shorter than L
  masks    statistics of the dropout masks: per-step reseeding vs one continuing stream
  mkl-lag1 neighbour correlation inside emulated MKL (Intel CPU) masks, every step, as z-scores
  rngstats the mixup draws and crop starts: freqtag's (seed, step)/(seed, epoch) streams vs continuing ones
  one      one training run (--side ours|theirs), JSON to --out
  sweep    many runs, at most --jobs processes at once (each with 1 thread), then the table
  table    aggregate the runs of a sweep into bench/results/fidelity_<tag>.json / .md

Every process runs with torch.set_num_threads(1) (and OMP_NUM_THREADS=1). The data go
under $FIDELITY_DATA (default /tmp/freqtag_fidelity), with the run folders of freqtag's
side; per-run JSON under bench/results/fidelity_runs_<tag>/. To measure one fixed
freqtag while the working tree changes, run with PYTHONPATH pointing at an export of a
commit whose freqtag/ holds conf/ (the README's Fidelity section, Rerun, shows how).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA_ROOT = Path(os.environ.get("FIDELITY_DATA", "/tmp/freqtag_fidelity"))
INGREDIENTS = ("dropout", "mixup", "crops", "gather", "swa")


# ---------------------------------------------------------------------------- data
def data_paths(tracks: int, length: int) -> dict[str, Path]:
    base = DATA_ROOT / "synthetic" / f"mel96-n{tracks}-s0"
    return {
        "data_dir": DATA_ROOT,
        "base": base,
        "store": base / "mel96.h5",
        "splits": base / f"split-0-min{length}",
        "tags": base / "moodtheme_split.txt",
    }


def prepare(tracks: int, length: int) -> dict[str, Path]:
    """`freqtag synth --tracks N --seed 0 --features mel96`, then the split TSVs without tracks < L frames."""
    from freqtag.data.store import FeatureStore
    from freqtag.data.synthetic import synthesize

    p = data_paths(tracks, length)
    synthesize(p["base"], tracks=tracks, seed=0, features="mel96")
    if (p["splits"] / "done").exists():
        return p
    store = FeatureStore(p["store"])
    p["splits"].mkdir(parents=True, exist_ok=True)
    dropped = {}
    for tsv in sorted((p["base"] / "split-0").glob("*.tsv")):
        lines = tsv.read_text().splitlines(keepends=True)
        keep = [lines[0]] + [ln for ln in lines[1:] if store.length(ln.split("\t")[0]) >= length]
        dropped[tsv.name] = len(lines) - len(keep)
        (p["splits"] / tsv.name).write_text("".join(keep))
    (p["splits"] / "done").write_text(json.dumps(dropped) + "\n")
    print(f"split without tracks < {length} frames: {p['splits']} (dropped {dropped})")
    return p


def compose_cfg(seed: int, tracks: int, epochs: int, out: Path, length: int = 64, extra: tuple[str, ...] = ()):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    p = data_paths(tracks, length)
    with initialize_config_module("freqtag.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=demo", f"data.synthetic.tracks={tracks}", f"data.input_length={length}",
            f"trainer.max_epochs={epochs}", f"seed={seed}", "logger=csv", *extra,
        ])
    with open_dict(cfg):
        cfg.paths.data_dir = str(p["data_dir"])
        cfg.paths.output_dir = str(out)
        cfg.data.store = str(p["store"])
        cfg.data.splits_dir = str(p["splits"])
        cfg.data.tags_file = str(p["tags"])
        cfg.data.synthetic = None
        cfg.trainer.enable_progress_bar = False
    return cfg


def scores(net, dm, split: str) -> dict[str, float]:
    import torch

    from freqtag.metrics import tagging_scores
    from freqtag.train.evaluation import evaluate_tracks

    probs = evaluate_tracks(net, dm, split, torch.device("cpu"))
    return tagging_scores(probs, dm.splits[split].split.labels)


# ---------------------------------------------------------------------------- ours: freqtag.train.driver.run
def run_ours(seed: int, tracks: int, epochs: int, out: Path) -> dict:
    import torch
    from hydra.utils import instantiate

    from freqtag.features import FeatureSpec
    from freqtag.train.driver import build_net, run

    cfg = compose_cfg(seed, tracks, epochs, out)
    t0 = time.time()
    metrics = run(cfg)
    seconds = time.time() - t0
    # the last (non-SWA) weights: last.ckpt, scored with the same evaluation
    spec = FeatureSpec.from_dict(dict(cfg.features))
    dm = instantiate(cfg.data, features=spec, _recursive_=False)
    dm.check()
    net = build_net(cfg.model)
    sd = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    net.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("net.")})
    last = scores(net, dm, "test")
    losses = []
    csv = out / "csv" / "metrics.csv"
    if csv.exists():
        import csv as _csv

        with open(csv) as f:
            losses = [float(r["train/loss"]) for r in _csv.DictReader(f) if r.get("train/loss")]
    return {"val": metrics["validation"], "test": metrics["test"], "last_test": last, "train_loss": losses,
            "seconds": round(seconds, 1)}


# ---------------------------------------------------------------------------- theirs: the plain loop
def ours_mixup(seed: int, step: int, alpha: float, n: int):
    """freqtag's mixup draws at (seed, step) (TaggingModule.mixup_draw, on the CPU): lam, then the permutation."""
    import torch

    rng = np.random.default_rng([seed, step, 2])
    lam = float(rng.beta(alpha, alpha))
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    return lam, torch.randperm(n, generator=generator)


class Opts(argparse.Namespace):
    dropout = "theirs"
    mixup = "theirs"
    crops = "theirs"
    gather = "theirs"
    swa = "theirs"
    val_pass = False


def run_plain(seed: int, tracks: int, epochs: int, o: Opts) -> dict:
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from torch.optim.swa_utils import AveragedModel, update_bn

    from freqtag.data.normalise import normalise
    from freqtag.data.samplers import CropSampler
    from freqtag.features import FeatureSpec
    from freqtag.train.driver import build_loss, build_net, check_scorable, set_n_tags
    from freqtag.train.losses import mixup_loss
    from freqtag.train.module import seed_dropout
    from freqtag.train.swa import SWA, recompute_batchnorm

    cpu = torch.device("cpu")
    cfg = compose_cfg(seed, tracks, epochs, Path("/nonexistent"))
    # the authors: one seed for every stream, at the start (seed_everything = torch, numpy, random)
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = instantiate(cfg.data, features=FeatureSpec.from_dict(dict(cfg.features)), _recursive_=False)
    dm.check()
    check_scorable(dm)
    set_n_tags(cfg, dm)  # model.n_tags: null takes the tag list's length, as freqtag.train.driver.run does
    net = build_net(cfg.model)  # same draws as freqtag: the same initial weights
    loss_fn = build_loss(cfg.loss, dm)
    hp = cfg.optim
    opt = torch.optim.SGD(net.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                          weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    alpha = float(cfg.mixup_alpha)
    L, B = dm.input_length, dm.batch_size
    train = dm.splits["train"]
    lengths = dm.reader.lengths[train.rows]
    labels = torch.from_numpy(np.ascontiguousarray(train.split.labels))
    frames = dm.reader.frames  # time-major float16 memmap
    offsets = dm.reader.offsets
    mean, std = dm.mean, dm.std
    swa_ours = SWA(0.2)
    first_swa = swa_ours.first_epoch(epochs)
    swa_theirs = AveragedModel(net) if o.swa == "theirs" else None

    # ---- crops: (items, starts) per batch
    index_loader = torch.utils.data.DataLoader(np.arange(len(lengths)), batch_size=B, shuffle=True)

    def epoch_crops(epoch: int):
        if o.crops == "ours":
            sampler = CropSampler(lengths, L, B, dm.seed + 0, shuffle=True)  # seed + SPLITS.index("train")
            sampler.set_epoch(epoch)
            for batch in sampler:
                pairs = np.array(batch, dtype=np.int64)
                yield pairs[:, 0], pairs[:, 1]
        else:  # DataLoader(shuffle=True) over the tracks; each item's start from numpy's global stream
            for items in index_loader:
                items = items.numpy()
                starts = np.array([np.random.randint(0, max(int(lengths[i]) - L, 0) + 1) for i in items])
                yield items, starts

    def crops_x(items: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        rows = train.rows[items]
        if o.gather == "ours":
            valid = np.minimum(dm.reader.lengths[rows] - starts, L)
            return normalise(dm.gather(torch.from_numpy(rows), torch.from_numpy(starts)), mean, std, valid)
        x = np.stack([frames[offsets[r] + s: offsets[r] + s + L] for r, s in zip(rows, starts)])  # (B, L, bands)
        x = (x.astype(np.float32) - np.float32(mean)) / np.float32(std)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))

    def mix(x: torch.Tensor, step: int):
        if o.mixup == "ours":
            lam, perm = ours_mixup(seed, step, alpha, len(x))
        else:
            lam = float(np.random.beta(alpha, alpha))
            perm = torch.randperm(len(x))
        return lam * x + (1.0 - lam) * x[perm], perm, lam

    step = 0
    epoch_loss = []
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        tot, n = 0.0, 0
        for items, starts in epoch_crops(epoch):
            if o.dropout == "ours":
                seed_dropout((seed * 1_000_003 + step) * 64 + 0, cpu)
            x = crops_x(items, starts)
            y = labels[items].float()
            xm, perm, lam = mix(x, step)
            logits = net(xm).squeeze(-1)
            loss = mixup_loss(loss_fn, logits, y, y[perm], lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25)
            opt.step()
            tot += float(loss) * len(y)
            n += len(y)
            step += 1
        epoch_loss.append(tot / n)
        if o.val_pass:  # what Lightning does between the epoch's last step and the epoch end
            net.eval()
            with torch.no_grad():
                for batch in dm.val_dataloader():
                    net(dm.on_device(batch, cpu)["x"])
            net.train()
        if epoch >= first_swa:
            if swa_theirs is not None:
                swa_theirs.update_parameters(net)
            else:
                swa_ours.update(net)
        sched.step()
    seconds = time.time() - t0
    last = scores(net, dm, "test")
    if swa_theirs is not None:
        # update_bn: one more epoch of crops, no mixup, dropout from the continuing stream
        update_bn([crops_x(i, s) for i, s in epoch_crops(epochs)], swa_theirs)
        final = swa_theirs.module
    else:  # freqtag.train.driver.finalize
        swa_ours.apply(net)
        loader = iter(dm.crop_loader("train", shuffle=True, epoch=epochs, all_ranks=True))
        with torch.random.fork_rng(devices=[]):
            seed_dropout(seed * 1_000_003 + 999_983, cpu)
            recompute_batchnorm(net, (dm.on_device(b, cpu)["x"] for b in loader))
        final = net
    return {"val": scores(final, dm, "validation"), "test": scores(final, dm, "test"), "last_test": last,
            "train_loss": epoch_loss, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------------------- dropout mask statistics
def mask_shapes(batch: int, length: int) -> list[tuple[tuple[int, ...], float]]:
    """(shape, keep) of every dropout draw of one training step of freq_dep/mel96, in call order."""
    import torch
    from hydra import compose, initialize_config_module
    from torch import nn

    from freqtag.model import FreqDepConv
    from freqtag.train.driver import build_net

    with initialize_config_module("freqtag.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo"])
    net = build_net(cfg.model)
    shapes: list[tuple[tuple[int, ...], float]] = []

    def hook(m, args):
        x = args[0]
        if isinstance(m, FreqDepConv):
            shapes.append(((x.shape[0], m.c_in, m.n_bands), 1.0 - m.p))
        elif isinstance(m, nn.Dropout2d) and m.p > 0:
            shapes.append((tuple(x.shape[:2]) + (1,) * (x.dim() - 2), 1.0 - m.p))
        elif isinstance(m, nn.Dropout) and m.p > 0:
            shapes.append((tuple(x.shape), 1.0 - m.p))

    hooks = [m.register_forward_pre_hook(hook) for m in net.modules()
             if isinstance(m, (FreqDepConv, nn.Dropout, nn.Dropout2d))]
    net.train()
    x = torch.randn(batch, 96, length)
    # check: drawing these masks by hand consumes the generator exactly as the network's forward does
    torch.manual_seed(123)
    net(x)
    after_net = torch.default_generator.get_state()
    for h in hooks:
        h.remove()
    torch.manual_seed(123)
    for shape, keep in shapes:
        torch.empty(shape).bernoulli_(keep)
    same = bool((torch.default_generator.get_state() == after_net).all())
    return shapes, same


def mcg31_masks(seed32: int, n: int, keep: float, apow: np.ndarray) -> np.ndarray:
    """MKL's CPU bernoulli_ (Intel CPUs): VSL_BRNG_MCG31 seeded with one 32-bit draw, ICDF method."""
    m = 0x7FFFFFFF
    x0 = seed32 % m or 1
    x = (x0 * apow[:n]) % m
    return (x / m) < keep


def mask_stats(steps: int, seed: int, batch: int, length: int, out: Path | None) -> dict:
    import torch

    torch.set_num_threads(1)
    shapes, consistent = mask_shapes(batch, length)
    keeps = [k for _, k in shapes]
    sizes = [int(np.prod(s)) for s, _ in shapes]
    a = 1132489760
    m = 0x7FFFFFFF
    apow = np.empty(max(sizes) + 1, dtype=np.int64)
    v = 1
    for i in range(len(apow)):  # element i of a stream is x0 * a^(i+1) (the first output is after one step)
        v = (v * a) % m
        apow[i] = v

    def draw(regime: str, path: str) -> list[list[np.ndarray]]:
        g = torch.Generator().manual_seed(seed)
        steps_masks = []
        for step in range(steps):
            if regime == "per-step":
                g.manual_seed((seed * 1_000_003 + step) * 64)
            masks = []
            for (shape, keep) in shapes:
                if path == "torch":
                    masks.append(torch.empty(shape).bernoulli_(keep, generator=g).numpy().astype(bool).ravel())
                else:  # the MKL path: one 32-bit seed from the generator (random() = low 32 bits), then MCG31
                    s32 = int(torch.randint(0, 2**32, (), generator=g, dtype=torch.int64)) & 0xFFFFFFFF
                    masks.append(mcg31_masks(s32, int(np.prod(shape)), keep, apow))
            steps_masks.append(masks)
        return steps_masks

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.astype(np.float64), b.astype(np.float64)
        if a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    result = {"steps": steps, "seed": seed, "batch": batch, "input_length": length,
              "layers": [{"shape": list(s), "keep": k} for s, k in shapes],
              "hand_drawn_masks_consume_generator_like_the_network": consistent, "regimes": {}}
    for path in ("torch", "mkl-mcg31-emulated"):
        for regime in ("continuing", "per-step"):
            ms = draw(regime, "torch" if path == "torch" else "mkl")
            layers = []
            for li, ((shape, keep), n) in enumerate(zip(shapes, sizes)):
                seq = np.stack([st[li] for st in ms])  # (steps, n)
                rate = float(seq.mean())
                # step-to-step: correlation of the flattened masks of consecutive steps
                c_step = [corr(seq[t], seq[t + 1]) for t in range(steps - 1)]
                # sample-to-sample within a batch: mask of sample b vs b+1
                per = seq.reshape(steps, shape[0], -1)
                c_samp = [corr(per[t, b], per[t, b + 1]) for t in range(0, steps, max(1, steps // 50))
                          for b in range(shape[0] - 1)]
                # element autocorrelation at small lags within one mask (a stream's neighbours)
                c_lag1 = [corr(seq[t, :-1], seq[t, 1:]) for t in range(0, steps, max(1, steps // 50))]
                # duplicate masks: identical per-sample masks across the whole run
                rows = per.reshape(-1, per.shape[-1])
                packed = np.packbits(rows, axis=1)
                uniq = len({r.tobytes() for r in packed})
                layers.append({
                    "shape": list(shape), "keep": keep, "rate": rate,
                    "rate_z": (rate - keep) / math.sqrt(keep * (1 - keep) / seq.size),
                    "corr_step_mean": float(np.nanmean(c_step)), "corr_step_sd": float(np.nanstd(c_step)),
                    "corr_sample_mean": float(np.nanmean(c_samp)), "corr_sample_sd": float(np.nanstd(c_samp)),
                    "corr_lag1_mean": float(np.nanmean(c_lag1)),
                    "per_sample_masks": int(rows.shape[0]), "duplicate_per_sample_masks": int(rows.shape[0] - uniq),
                    "expected_sd_of_a_step_corr": 1 / math.sqrt(n),
                })
            # between layers of one step: first min(n) elements of layer i vs layer i+1
            c_layer = []
            for li in range(len(shapes) - 1):
                k = min(sizes[li], sizes[li + 1])
                c_layer.append(float(np.mean([corr(st[li][:k], st[li + 1][:k]) for st in ms])))
            # whole-step masks identical to another step's
            whole = len({b"".join(np.packbits(mm).tobytes() for mm in st) for st in ms})
            result["regimes"][f"{path}/{regime}"] = {
                "layers": layers, "corr_between_consecutive_layers": c_layer,
                "duplicate_whole_step_masks": steps - whole,
            }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_masks(r: dict) -> None:
    print(f"dropout masks, {r['steps']} steps, batch {r['batch']}, L={r['input_length']}; hand-drawn masks consume "
          f"the generator like the network: {r['hand_drawn_masks_consume_generator_like_the_network']}")
    for name, reg in r["regimes"].items():
        print(f"\n{name}: duplicate whole-step masks {reg['duplicate_whole_step_masks']}; corr between consecutive "
              f"layers {' '.join(f'{c:+.4f}' for c in reg['corr_between_consecutive_layers'])}")
        print(f"  {'shape':>16} {'keep':>4} {'rate':>7} {'z':>6} {'step corr':>10} {'sample corr':>11} "
              f"{'lag-1 corr':>10} {'dup':>4}")
        for l in reg["layers"]:
            print(f"  {str(tuple(l['shape'])):>16} {l['keep']:.1f} {l['rate']:.5f} {l['rate_z']:+6.2f} "
                  f"{l['corr_step_mean']:+10.5f} {l['corr_sample_mean']:+11.5f} {l['corr_lag1_mean']:+10.5f} "
                  f"{l['duplicate_per_sample_masks']:>4}")


def mkl_lag1(steps: int, seed: int) -> dict:
    """Neighbour (lag-1) correlation inside the emulated MKL (MCG31) masks over every step, per layer, as z-scores.

    Each mask's lag-1 correlation times sqrt(n) is ~N(0, 1); per layer they are summed over the steps and divided
    by sqrt(steps), and the layers combined the same way. Seeds from the generator as 32 or 31 bits.
    """
    import torch

    torch.set_num_threads(1)
    shapes, _ = mask_shapes(32, 64)
    sizes = [int(np.prod(s)) for s, _ in shapes]
    a, m = 1132489760, 0x7FFFFFFF
    apow = np.empty(max(sizes) + 1, dtype=np.int64)
    v = 1
    for i in range(len(apow)):
        v = (v * a) % m
        apow[i] = v
    out: dict = {"steps": steps, "seed": seed}
    for bits in (32, 31):
        for regime in ("continuing", "per-step"):
            g = torch.Generator().manual_seed(seed)
            zl = np.zeros(len(sizes))
            for step in range(steps):
                if regime == "per-step":
                    g.manual_seed((seed * 1_000_003 + step) * 64)
                for li, (shape, keep) in enumerate(shapes):
                    s32 = int(torch.randint(0, 2**bits, (), generator=g, dtype=torch.int64))
                    u = mcg31_masks(s32, sizes[li], keep, apow).astype(np.float64)
                    zl[li] += np.corrcoef(u[:-1], u[1:])[0, 1] * math.sqrt(sizes[li])
            z = zl / math.sqrt(steps)
            out[f"{bits}bit/{regime}"] = {"layer_z": [round(float(x), 3) for x in z],
                                          "combined_z": round(float(z.sum() / math.sqrt(len(z))), 3)}
            print(bits, regime, np.round(z, 2), "combined", out[f"{bits}bit/{regime}"]["combined_z"], flush=True)
    return out


def rng_stats(steps: int, seed: int, tracks: int, out: Path | None) -> dict:
    """Mixup draws and crop starts: freqtag's per-(seed, step) / per-(seed, epoch) streams vs continuing streams."""
    import torch
    from scipy import stats

    from freqtag.data.samplers import CropSampler

    torch.set_num_threads(1)
    alpha, B, L = 0.2, 32, 64
    res: dict = {"steps": steps, "seed": seed, "mixup": {}, "crops": {}}
    beta = stats.beta(alpha, alpha)
    lams = {}
    for regime in ("ours", "theirs"):
        np.random.seed(seed)
        torch.manual_seed(seed)
        lam, fixed, pos0 = [], [], []
        for step in range(steps):
            if regime == "ours":
                lam_ours, perm_ours = ours_mixup(seed, step, alpha, B)
                lam.append(lam_ours)
                perm = perm_ours.numpy()
            else:
                lam.append(float(np.random.beta(alpha, alpha)))
                perm = torch.randperm(B).numpy()
            fixed.append(int((perm == np.arange(B)).sum()))
            pos0.append(int(perm[0]))
        lam = np.array(lams.setdefault(regime, np.array(lam)))
        res["mixup"][regime] = {
            "lam_mean": float(lam.mean()), "lam_var": float(lam.var()), "lam_expected_var": float(beta.var()),
            "lam_ks_p_vs_beta": float(stats.kstest(lam, beta.cdf).pvalue),
            "lam_lag1_corr": float(np.corrcoef(lam[:-1], lam[1:])[0, 1]),
            "perm_fixed_points_mean": float(np.mean(fixed)), "perm_fixed_points_expected": 1.0,
            "perm_first_chisq_p": float(stats.chisquare(np.bincount(pos0, minlength=B)).pvalue),
        }
    res["mixup"]["ks_p_ours_vs_theirs"] = float(stats.ks_2samp(lams["ours"], lams["theirs"]).pvalue)
    # crops: relative start position start/room of every crop over the epochs, for tracks with room > 0
    p = data_paths(tracks, L)
    from freqtag.data.store import FeatureStore

    lengths = FeatureStore(p["store"]).lengths[:1200].astype(np.int64)
    room = np.maximum(lengths - L, 0)
    epochs = max(1, steps * B // len(lengths))
    rel = {}
    for regime in ("ours", "theirs"):
        np.random.seed(seed)
        r_all, prev, ep_corr = [], None, []
        for epoch in range(epochs):
            if regime == "ours":
                sm = CropSampler(lengths, L, B, seed, shuffle=True)
                sm.set_epoch(epoch)
                _, starts_in_order = sm.crops()
                order, _ = sm.crops()
                starts = np.empty_like(starts_in_order)
                starts[order] = starts_in_order
            else:
                starts = np.array([np.random.randint(0, r + 1) for r in room])
            ok = room > 0
            r = (starts[ok] + 0.5) / (room[ok] + 1)
            r_all.append(r)
            if prev is not None:
                ep_corr.append(float(np.corrcoef(prev, r)[0, 1]))
            prev = r
        r = np.concatenate(r_all)
        rel[regime] = r
        res["crops"][regime] = {"epochs": epochs, "rel_start_mean": float(r.mean()),
                                "rel_start_ks_p_vs_uniform": float(stats.kstest(r, "uniform").pvalue),
                                "epoch_to_epoch_corr_mean": float(np.mean(ep_corr)) if ep_corr else None}
    res["crops"]["ks_p_ours_vs_theirs"] = float(stats.ks_2samp(rel["ours"], rel["theirs"]).pvalue)
    if out is not None:
        out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------- sweep / table
def one(args) -> None:
    import torch

    torch.set_num_threads(1)
    prepare(args.tracks, 64)
    o = Opts()
    o.val_pass = False
    if args.side == "theirs":
        for k in INGREDIENTS:
            setattr(o, k, "ours" if (args.all_ours or getattr(args, k) == "ours") else "theirs")
        o.val_pass = bool(args.val_pass or args.all_ours)
        res = run_plain(args.seed, args.tracks, args.epochs, o)
    else:
        run_dir = DATA_ROOT / "runs" / Path(args.out).parent.name / Path(args.out).stem
        res = run_ours(args.seed, args.tracks, args.epochs, run_dir)
    import freqtag

    res.update(freqtag=freqtag.__file__, side=args.side, seed=args.seed, tracks=args.tracks, epochs=args.epochs,
               swaps=sorted(k for k in INGREDIENTS if getattr(o, k, "theirs") == "ours") if args.side == "theirs"
               else [], val_pass=bool(getattr(o, "val_pass", False)) if args.side == "theirs" else True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{args.side} seed {args.seed}: val PR {res['val']['pr_auc']:.4f} test PR {res['test']['pr_auc']:.4f} "
          f"test ROC {res['test']['roc_auc']:.4f} last test PR {res['last_test']['pr_auc']:.4f} ({res['seconds']} s)")


def variant_args(variant: str) -> list[str]:
    """'ours' | 'theirs' | 'theirs+dropout+mixup' | 'theirs+all' -> the `one` flags."""
    if variant == "ours":
        return ["--side", "ours"]
    parts = variant.split("+")
    flags = ["--side", "theirs"]
    for p in parts[1:]:
        flags += ["--all-ours"] if p == "all" else (["--val-pass"] if p == "val" else [f"--{p}", "ours"])
    return flags


def sweep(args) -> None:
    prepare(args.tracks, 64)
    runs_dir = RESULTS / f"fidelity_runs_{args.tag}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in parse_seeds(args.seeds):
        for variant in args.variants.split(","):
            out = runs_dir / f"{variant}_s{seed}.json"
            if not out.exists():
                jobs.append((variant, seed, out))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running: list[tuple[subprocess.Popen, str]] = []
    logs = DATA_ROOT / "logs" / args.tag
    logs.mkdir(parents=True, exist_ok=True)
    while jobs or running:
        while jobs and len(running) < args.jobs:
            variant, seed, out = jobs.pop(0)
            cmd = [sys.executable, __file__, "one", *variant_args(variant), "--seed", str(seed),
                   "--tracks", str(args.tracks), "--epochs", str(args.epochs), "--out", str(out)]
            log = open(logs / f"{variant}_s{seed}.log", "w")
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO),
                            f"{variant} s{seed}"))
            print(f"{time.strftime('%H:%M:%S')} start {variant} seed {seed}", flush=True)
        time.sleep(2)
        for p, name in list(running):
            if p.poll() is not None:
                running.remove((p, name))
                print(f"{time.strftime('%H:%M:%S')} done {name} rc={p.returncode}", flush=True)
    table(args)


def parse_seeds(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def table(args) -> None:
    runs_dir = RESULTS / f"fidelity_runs_{args.tag}"
    by: dict[str, dict[int, dict]] = {}
    for f in sorted(runs_dir.glob("*.json")):
        r = json.loads(f.read_text())
        variant = f.stem.rsplit("_s", 1)[0]
        by.setdefault(variant, {})[r["seed"]] = r
    keys = [("val PR", lambda r: r["val"]["pr_auc"]), ("test PR", lambda r: r["test"]["pr_auc"]),
            ("test ROC", lambda r: r["test"]["roc_auc"]), ("last test PR", lambda r: r["last_test"]["pr_auc"])]
    lines = [f"# Fidelity runs `{args.tag}`", ""]
    some = next(iter(next(iter(by.values())).values())) if by else {}
    lines.append(f"tracks {some.get('tracks')}, epochs {some.get('epochs')}, L=64, batch 32, freq_dep/mel96/weighted, "
                 f"CPU fp32, 1 thread per run")
    lines.append("")
    seeds = sorted({s for v in by.values() for s in v})
    header = "| seed | " + " | ".join(f"{v} {k}" for v in by for k, _ in keys) + " |"
    lines += [header, "|" + "---|" * (1 + len(by) * len(keys))]
    for s in seeds:
        cells = []
        for v in by:
            r = by[v].get(s)
            cells += [f"{fn(r):.4f}" if r else "" for _, fn in keys]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    summary: dict[str, dict] = {}
    lines += ["", "| variant | n | " + " | ".join(f"{k} mean ± se (sd)" for k, _ in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for v, runs in by.items():
        summary[v] = {"n": len(runs), "seeds": sorted(runs)}
        cells = []
        for k, fn in keys:
            x = np.array([fn(r) for r in runs.values()])
            sd = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
            summary[v][k] = {"mean": float(x.mean()), "sd": sd, "se": sd / math.sqrt(len(x)),
                             "values": {int(s): float(fn(r)) for s, r in runs.items()}}
            cells.append(f"{x.mean():.4f} ± {sd / math.sqrt(len(x)):.4f} ({sd:.4f})")
        lines.append(f"| {v} | {len(runs)} | " + " | ".join(cells) + " |")
    if "ours" in by:
        lines += ["", "Difference to `ours` (variant minus ours, Welch standard error, t; unpaired: a seed gives both "
                  "sides the same initial weights but different random streams after):", "",
                  "| variant | " + " | ".join(f"{k}: diff ± se (t)" for k, _ in keys) + " |", "|---|" + "---|" * len(keys)]
        for v in by:
            if v == "ours":
                continue
            cells = []
            summary[v]["vs_ours"] = {}
            for k, fn in keys:
                a = np.array([fn(r) for r in by[v].values()])
                b = np.array([fn(r) for r in by["ours"].values()])
                if len(a) < 2 or len(b) < 2:
                    cells.append("")
                    continue
                d = a.mean() - b.mean()
                se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
                summary[v]["vs_ours"][k] = {"diff": float(d), "se": float(se), "t": float(d / se) if se else None}
                cells.append(f"{d:+.4f} ± {se:.4f} ({d / se:+.2f})" if se else f"{d:+.4f}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"fidelity_{args.tag}.md").write_text(text)
    (RESULTS / f"fidelity_{args.tag}.json").write_text(json.dumps(
        {"tag": args.tag, "summary": summary,
         "runs": {v: {str(s): r for s, r in runs.items()} for v, runs in by.items()}}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--tracks", type=int, default=2000)
    p = sub.add_parser("masks")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "fidelity_masks.json"))
    p = sub.add_parser("mkl-lag1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default=str(RESULTS / "fidelity_mkl_lag1.json"))
    p = sub.add_parser("rngstats")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracks", type=int, default=2000)
    p.add_argument("--out", default=str(RESULTS / "fidelity_rngstats.json"))
    p = sub.add_parser("one")
    p.add_argument("--side", choices=("ours", "theirs"), required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--tracks", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=48)
    p.add_argument("--out", required=True)
    for k in INGREDIENTS:
        p.add_argument(f"--{k}", choices=("ours", "theirs"), default="theirs")
    p.add_argument("--val-pass", action="store_true")
    p.add_argument("--all-ours", action="store_true")
    for name in ("sweep", "table"):
        p = sub.add_parser(name)
        p.add_argument("--tag", required=True)
        if name == "sweep":
            p.add_argument("--seeds", default="0-4")
            p.add_argument("--variants", default="ours,theirs",
                           help="comma list: ours, theirs, theirs+dropout, theirs+mixup+crops, theirs+all, ...")
            p.add_argument("--tracks", type=int, default=2000)
            p.add_argument("--epochs", type=int, default=48)
            p.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "prepare":
        print(prepare(args.tracks, 64))
    elif args.cmd == "masks":
        print_masks(mask_stats(args.steps, args.seed, 32, 64, Path(args.out)))
    elif args.cmd == "mkl-lag1":
        res = [mkl_lag1(args.steps, sd) for sd in parse_seeds(args.seeds)]
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    elif args.cmd == "rngstats":
        rng_stats(args.steps, args.seed, args.tracks, Path(args.out))
    elif args.cmd == "one":
        one(args)
    elif args.cmd == "sweep":
        sweep(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
