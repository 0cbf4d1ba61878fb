"""logger=wandb offline: the run's records read back from its .wandb file (config, summary, name, group, exit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="wandb is not installed")

from helpers import FREQTAG, REPO, tiny_overrides

# the tiny run of test_training, 2 epochs, logged to W&B (same order: the run's name is checked)
SMALL = tiny_overrides("trainer.max_epochs=2", "logger=wandb")
BLOCK = 32768  # W&B's transaction log: LevelDB-style blocks of length-prefixed chunks after a 7-byte header


def records(path: Path) -> list:
    """Every record of an offline run file, decoded (no W&B server, no private API)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks, out = 7, [], []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            out.append(record)
            chunks = []
    return out


def offline_run(run_dir: Path) -> dict:
    """What a W&B run recorded: run fields, config keys, the final summary, artifacts, exit code."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict = {"summary": {}, "history": {}, "artifacts": [], "exit": None}
    key = lambda u: u.key or "/".join(u.nested_key)  # noqa: E731
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type, tags=list(r.run.tags),
                       config={u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "summary":
            out["summary"].update({key(u): json.loads(u.value_json) for u in r.summary.update})
        elif kind == "history":
            for u in r.history.item:
                out["history"].setdefault(key(u), []).append(json.loads(u.value_json))
        elif kind == "artifact":
            out["artifacts"].append((r.artifact.type, sorted(m.path for m in r.artifact.manifest.contents)))
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


def train(tmp: Path, *args: str, mode: str = "offline") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": mode, "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wandb-data")


@pytest.mark.slow
def test_offline_run_holds_config_summary_and_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    res = train(tmp_path, *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                "logger.log_final_checkpoint=true", "loss=bce")
    assert res.returncode == 0, res.stderr[-3000:]
    run = offline_run(run_dir)
    assert run["exit"] == 0 and run["job_type"] == "train" and run["group"] == ""
    # named after what the run is (where it lives, and how it is logged, left out)
    assert run["name"] == "experiment=demo,data.synthetic.tracks=300,data.input_length=32,data.batch_size=16," \
                          "trainer.max_epochs=2,trainer.limit_val_batches=2,loss=bce"
    assert "loss=bce" in run["tags"] and not any(t.startswith(("paths.", "hydra.")) for t in run["tags"])
    cfg = run["config"]  # the resolved config, every group
    assert cfg["model"]["filters"] == "freq_dep" and cfg["loss"]["_target_"].endswith("BCELoss")
    assert cfg["data"]["input_length"] == 32 and cfg["optim"]["lr"] == 0.5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split, prefix in (("validation", "val"), ("test", "test")):
        for key in ("pr_auc", "roc_auc", "pr_auc_micro", "roc_auc_micro"):
            assert run["summary"][f"{prefix}/{key}"] == pytest.approx(metrics[split][key], abs=1e-12)
    assert [len(run["history"][k]) for k in ("train/loss", "val/crop_loss", "lr-SGD")] == [2, 2, 2]  # per-epoch curves
    assert run["history"]["lr-SGD"] == [0.5, 0.25]  # the cosine schedule, per epoch
    assert ("model", ["final.ckpt", "thresholds.tsv"]) in run["artifacts"]


@pytest.mark.slow
def test_multirun_finishes_each_job_and_marks_the_failed_one(data_dir, tmp_path):
    """Two jobs in one process: each gets its own W&B run; the job whose loss went NaN ends failed."""
    sweep = tmp_path / "sweep"
    res = train(tmp_path, "-m", *SMALL, "trainer.max_epochs=1", f"paths.data_dir={data_dir}",
                f"hydra.sweep.dir={sweep}", "optim.lr=0.5,nan")
    assert res.returncode != 0 and "non-finite training loss" in res.stderr
    good, bad = offline_run(sweep / "0"), offline_run(sweep / "1")
    assert good["exit"] == 0 and bad["exit"] == 1
    assert good["group"] == bad["group"] == f"{sweep.parent.name}/{sweep.name}"
    assert good["name"].endswith("optim.lr=0.5") and bad["name"].endswith("optim.lr=nan")
    assert "test/roc_auc" in good["summary"] and "test/roc_auc" not in bad["summary"]


@pytest.mark.slow
def test_disabled_mode_trains_and_writes_no_run(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    res = train(tmp_path, *SMALL, "trainer.max_epochs=1", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                mode="disabled")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file()
    assert not list(run_dir.glob("wandb/offline-run-*"))


def test_ensemble_logs_its_table_to_the_group(tmp_path):
    """`freqtag ensemble --wandb`: a wandb.Table, the plot and the submission figures in the sweep's group."""
    from known_runs import BAD, GOOD, KNOWN_RUNS, T, make_run

    sweep = tmp_path / "multirun" / "2026-11-24" / "07-30-00"
    for i, ((model, loss), val) in enumerate(KNOWN_RUNS.items()):
        make_run(sweep / str(i), [f"model={model}", f"loss={loss}"], {"validation": val, "test": BAD if val is GOOD else GOOD},
                 {"validation": T, "test": T})
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    res = subprocess.run([FREQTAG, "ensemble", str(sweep), "--out", str(out), "--wandb"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run = offline_run(out)
    assert run["exit"] == 0 and run["job_type"] == "ensemble" and run["group"] == "2026-11-24/07-30-00"
    h = {k: v[0] for k, v in run["history"].items()}
    assert (h["ensemble/table/_type"], h["ensemble/table/nrows"], h["ensemble/table/ncols"]) == ("table-file", 5, 6)
    assert h["ensemble/plot/_type"] == "image-file"
    (files,) = out.glob("wandb/offline-run-*/files")
    logged = json.loads((files / h["ensemble/table/path"]).read_text())
    csv_rows = [line.split(",") for line in (out / "table.csv").read_text().splitlines()]
    assert logged["columns"] == csv_rows[0]
    assert [r[0] for r in logged["data"]] == [r[0] for r in csv_rows[1:]]
    assert np.allclose([r[2:] for r in logged["data"]], [[float(x) for x in r[2:]] for r in csv_rows[1:]])
    assert (files / h["ensemble/plot/path"]).stat().st_size == h["ensemble/plot/size"]
    results = dict(line.split("\t") for line in (out / "submission" / "results.tsv").read_text().splitlines())
    for k, v in results.items():
        assert run["summary"][f"submission/{k}"] == pytest.approx(float(v), abs=1e-6)


@pytest.mark.slow
def test_wandb_dir_is_honoured_and_the_terminal_shows_only_what_helps(data_dir, tmp_path):
    """WANDB_DIR places the run (save_dir no longer overrides it); no Lightning tip, no third-party deprecations."""
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb-here"
    wandb_dir.mkdir()
    env_dir = {"WANDB_DIR": str(wandb_dir)}
    res = subprocess.run([sys.executable, str(REPO / "train.py"), *SMALL, "trainer.max_epochs=1",
                          f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                         env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **env_dir},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert offline_run(wandb_dir)["exit"] == 0 and not list(run_dir.glob("wandb/offline-run-*"))
    out = res.stdout + res.stderr
    assert "GPU available" in out  # Lightning's useful lines stay
    for noise in ("💡 Tip", "TPU available: False", "is deprecated", "FutureWarning", "DeprecationWarning"):
        assert noise not in out, noise


def test_quiet_keeps_real_warnings():
    import warnings

    from freqtag.system.quiet import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party()
        warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="torch.utils._pytree")
        warnings.warn_explicit("our deprecation", DeprecationWarning, "y.py", 1, module="freqtag.data.datamodule")
        warnings.warn_explicit("slow loader", UserWarning, "z.py", 1, module="pytorch_lightning.trainer")
    assert sorted(str(w.message) for w in seen) == ["our deprecation", "slow loader"]
