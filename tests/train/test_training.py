"""A whole run on generated data, composed from the real configs and shrunk: run directory, SWA, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_overrides
from omegaconf import DictConfig

from freqtag.data.datamodule import JamendoDataModule
from freqtag.features import FeatureSpec
from freqtag.metrics import tagging_scores
from freqtag.runs import FINAL_KEYS
from freqtag.train.driver import build_net, run
from freqtag.train.evaluation import evaluate_tracks

SMALL = tiny_overrides("trainer.max_epochs=3")  # the tiny run, 3 epochs


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config) -> tuple[Path, DictConfig, dict]:
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tmp / "run", "trainer.max_epochs=3")
    metrics = run(cfg)
    return tmp / "run", cfg, metrics


def test_run_directory(finished):
    run_dir, cfg, metrics = finished
    for name in ("checkpoints/last.ckpt", "checkpoints/final.ckpt", "checkpoints/thresholds.tsv",
                 "predictions/validation.npz", "predictions/test.npz", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp"))
    final = torch.load(run_dir / "checkpoints/final.ckpt", weights_only=True)
    assert set(FINAL_KEYS) <= set(final)
    assert final["features"]["name"] == "mel96" and len(final["tags"]) == 56 and final["input_length"] == 32
    written = json.loads((run_dir / "metrics.json").read_text())
    for split in ("validation", "test"):
        p = np.load(run_dir / "predictions" / f"{split}.npz")
        assert p["probs"].dtype == np.float32 and p["targets"].dtype == np.uint8
        assert p["probs"].shape == p["targets"].shape == (len(p["track_ids"]), 56)
        assert list(p["tags"]) == final["tags"]
        tsv = (run_dir.parent / "data").rglob(f"autotagging_moodtheme-{split}.tsv")
        ids = [line.split("\t")[0] for line in next(tsv).read_text().splitlines()[1:]]
        assert list(p["track_ids"]) == ids  # rows in split-TSV order
        scores = tagging_scores(p["probs"], p["targets"])
        assert written[split] == pytest.approx(scores, abs=1e-12) == metrics[split]


def test_final_checkpoint_reproduces_the_predictions(finished):
    """final.ckpt alone (weights, spec, stats) gives the written whole-track probabilities."""
    run_dir, cfg, _ = finished
    final = torch.load(run_dir / "checkpoints/final.ckpt", weights_only=True)
    net = build_net(final["model"])
    net.load_state_dict(final["state_dict"])
    dm = JamendoDataModule(store=cfg.data.store, splits_dir=cfg.data.splits_dir, tags_file=cfg.data.tags_file,
                           features=FeatureSpec.from_dict(final["features"]), input_length=final["input_length"])
    dm.setup()
    assert (dm.mean, dm.std) == (final["mean"], final["std"])
    probs = evaluate_tracks(net, dm, "test", torch.device("cpu"))
    np.testing.assert_allclose(probs, np.load(run_dir / "predictions/test.npz")["probs"], atol=1e-5)


def test_swa_final_weights_are_the_average(finished):
    """3 epochs, fraction 0.2 -> the last epoch alone is averaged: final weights = last.ckpt weights."""
    run_dir, _, _ = finished
    last = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    final = torch.load(run_dir / "checkpoints/final.ckpt", weights_only=True)["state_dict"]
    swa_state = next(v for k, v in last["callbacks"].items() if k.startswith("SWA"))
    assert swa_state["n_averaged"] == 1
    for k, v in final.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        torch.testing.assert_close(v, last["state_dict"][f"net.{k}"])
    # BatchNorm statistics were recomputed, not copied from the last training step
    bn = "conv1.bn.running_mean"
    if bn in final:
        assert not torch.allclose(final[bn], last["state_dict"][f"net.{bn}"])


@pytest.mark.slow
def test_same_seed_same_metrics(finished, tmp_path, tiny_config):
    run_dir, _, metrics = finished
    cfg = tiny_config(tmp_path / "run", "trainer.max_epochs=3", data_dir=run_dir.parent / "data")
    assert run(cfg) == metrics


@pytest.mark.slow
def test_worker_processes_and_the_store_give_the_same_metrics(finished, tmp_path, tiny_config):
    """The store read by 2 worker processes (crops through the shared-memory ring) = the in-memory run."""
    run_dir, cfg, metrics = finished
    assert cfg.data.in_memory and cfg.data.num_workers == 0
    cfg = tiny_config(tmp_path / "run", "trainer.max_epochs=3", "data.in_memory=false", "data.num_workers=2",
                      data_dir=run_dir.parent / "data")
    assert run(cfg) == metrics


def test_resume_after_kill_gives_the_same_predictions(finished, tmp_path):
    """A run killed with SIGKILL after its first epoch, resumed from last.ckpt, ends like the uninterrupted one."""
    run_dir, _, _ = finished
    data_dir = run_dir.parent / "data"
    out = tmp_path / "killed"
    args = [sys.executable, str(REPO / "train.py"), *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run never wrote last.ckpt"
    epoch = torch.load(last, weights_only=False)["epoch"]
    assert epoch < 3 and not (out / "checkpoints" / "final.ckpt").exists()
    subprocess.run([*args, f"ckpt_path={last}"], cwd=tmp_path, check=True, stdout=subprocess.DEVNULL)
    for split in ("validation", "test"):
        a = np.load(run_dir / "predictions" / f"{split}.npz")["probs"]
        b = np.load(out / "predictions" / f"{split}.npz")["probs"]
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_real_data_missing_stops_at_once(tmp_path):
    env = {**os.environ, "FREQTAG_DATA_DIR": str(tmp_path / "nothing")}
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "model=freq_dep", "loss=weighted",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "freqtag prepare --features mel128 --audio-dir" in res.stderr
    assert "experiment=demo" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("overrides", "total"),
    [(["model=freq_dep", "features=mel128"], "17,746,808"), (["model=convs", "features=mel96", "data.input_length=128"], "3,156,856")],
)
def test_summary_prints_table1_and_total(overrides, total):
    res = subprocess.run([str(Path(sys.executable).parent / "freqtag"), "summary", *overrides],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    assert res.returncode == 0, res.stderr
    assert total in res.stdout
    for layer in ("conv1", "maxpool", "filter4", "collapse", "avgpool", "output"):
        assert layer in res.stdout


def test_summary_unknown_model_is_one_line():
    res = subprocess.run([str(Path(sys.executable).parent / "freqtag"), "summary", "model=nope"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "model/nope" in res.stderr
