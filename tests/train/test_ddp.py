"""DDP on CPU (gloo, 2 processes): one run directory, every track scored once, resume from last.ckpt."""

from __future__ import annotations

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

from freqtag.data.datamodule import JamendoDataModule
from freqtag.features import FeatureSpec
from freqtag.train.driver import build_net
from freqtag.train.evaluation import evaluate_tracks

SMALL = tiny_overrides("trainer.max_epochs=3", "trainer=ddp_cpu", "trainer.devices=2")  # the single-process run, on 2 CPU processes


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", *extra]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    res = subprocess.run(train_args(tmp / "data", tmp / "run"), cwd=tmp, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run"


def test_ddp_scores_every_track_once_like_one_process(ddp_run):
    run_dir = ddp_run
    # one run directory: Hydra made no other folder, rank 1 wrote no .hydra of its own
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["data", "run"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    final = torch.load(run_dir / "checkpoints/final.ckpt", weights_only=True)
    net = build_net(final["model"])
    net.load_state_dict(final["state_dict"])
    splits = next((run_dir.parent / "data").rglob("split-0"))
    dm = JamendoDataModule(store=str(next((run_dir.parent / "data").rglob("mel96.h5"))), splits_dir=str(splits),
                           tags_file=str(splits.parent / "moodtheme_split.txt"),
                           features=FeatureSpec.from_dict(final["features"]), input_length=final["input_length"])
    dm.setup()
    for split in ("validation", "test"):
        written = np.load(run_dir / "predictions" / f"{split}.npz")
        ids = [line.split("\t")[0] for line in (splits / f"autotagging_moodtheme-{split}.tsv").read_text().splitlines()[1:]]
        assert list(written["track_ids"]) == ids and len(set(ids)) == len(ids)  # each track once, TSV order
        single = evaluate_tracks(net, dm, split, torch.device("cpu"))  # one process, the same final.ckpt
        np.testing.assert_allclose(written["probs"], single, atol=1e-5)
        assert (written["probs"] > 0).all()  # no row left empty


@pytest.mark.slow
def test_ddp_resume_after_kill(ddp_run, tmp_path):
    """Both ranks killed (SIGKILL to the process group) after an epoch; the resumed run ends as the uninterrupted."""
    data_dir = ddp_run.parent / "data"
    out = tmp_path / "killed"
    args = train_args(data_dir, out)
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the DDP run never wrote last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] < 3 and not (out / "checkpoints" / "final.ckpt").exists()
    res = subprocess.run([*args, f"ckpt_path={last}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for split in ("validation", "test"):
        a = np.load(ddp_run / "predictions" / f"{split}.npz")["probs"]
        b = np.load(out / "predictions" / f"{split}.npz")["probs"]
        np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.slow
def test_multirun_refuses_script_launched_ranks(ddp_run, tmp_path):
    res = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", *SMALL, f"paths.data_dir={ddp_run.parent / 'data'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", "loss=bce,weighted"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0
    assert "trainer.devices=2 in a multirun" in res.stderr and "hydra/launcher" in res.stderr
