"""The ablation grid config and the launchers: 24 jobs of the paper recipe, one GPU per joblib worker, SLURM."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import REPO, tiny_overrides
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from freqtag.train.gpu_pool import GPUPoolError, claim_gpu, gpu_count, lock_dir, pinned_gpu

GRID = {
    "model": ["convs", "freq_dep"],
    "features": ["mel96", "mel128"],
    "data.input_length": ["128", "224"],
    "loss": ["bce", "weighted", "focal"],
}


def hydra_config(*overrides: str) -> DictConfig:
    with initialize_config_module("freqtag.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def sweep_jobs(cfg: DictConfig, command_line: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper makes from the config's params and the command line."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params + command_line)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_ablation_sweeps_the_24_runs_of_table2():
    cfg = hydra_config("experiment=ablation")
    jobs = sweep_jobs(cfg, ["experiment=ablation"])
    assert len(jobs) == 24
    want = [
        [f"{k}={v}" for k, v in zip(GRID, combo)] + ["experiment=ablation"]
        for combo in itertools.product(*GRID.values())
    ]
    assert jobs == want  # exactly the swept values, in the sweeper's order, plus the command line


def test_command_line_value_narrows_the_grid():
    cfg = hydra_config("experiment=ablation")
    jobs = sweep_jobs(cfg, ["experiment=ablation", "loss=weighted"])
    assert len(jobs) == 8
    assert all(j[3] == "loss=weighted" for j in jobs)


@pytest.mark.parametrize("combo", [("convs", "mel96", "128", "bce"), ("freq_dep", "mel128", "224", "focal")])
def test_every_job_is_the_paper_recipe(combo):
    overrides = [f"{k}={v}" for k, v in zip(GRID, combo)]
    cfg = hydra_config("experiment=ablation", *overrides)
    paper = hydra_config("experiment=paper", *overrides)
    for key in ("seed", "mixup_alpha", "optim", "data", "trainer", "callbacks", "model", "loss", "features"):
        raw = (OmegaConf.to_container(c[key], resolve=False) if OmegaConf.is_config(c[key]) else c[key] for c in (cfg, paper))
        assert next(raw) == next(raw), key
    assert cfg.model.filters == combo[0] and cfg.features.name == combo[1] and cfg.data.input_length == int(combo[2])
    assert cfg.optim == {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5, "momentum": 0.9, "nesterov": True, "weight_decay": 2.0e-5, "fused": "auto", "foreach": "auto"}
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.callbacks.swa.fraction, cfg.seed) == (32, 200, 0.2, 42)
    data = OmegaConf.to_container(cfg.data, resolve=False)
    assert data["_target_"] == "freqtag.data.datamodule.JamendoDataModule" and "/mtg-jamendo/" in data["splits_dir"]


def test_joblib_gpu_launcher_config():
    cfg = hydra_config("experiment=ablation", "hydra/launcher=joblib_gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.backend == "loky" and launcher.prefer == "processes"
    # resolved per process: n_jobs in the launching process, the GPU in each worker
    assert OmegaConf.to_yaml(launcher).count("${freqtag.gpu_slots:${jobs_per_gpu}}") == 1
    env = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=False)
    assert env == {"CUDA_VISIBLE_DEVICES": "${freqtag.gpu:${hydra:sweep.dir}}"}
    assert cfg.trainer.devices == 1  # the job sees one GPU
    assert cfg.jobs_per_gpu == 1


def test_jobs_per_gpu_sets_the_launchers_workers(monkeypatch):
    """n_jobs resolves to GPUs x jobs_per_gpu from the root config (two pretend GPUs here), and tells the workers."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("FREQTAG_JOBS_PER_GPU", raising=False)
    assert hydra_config("experiment=ablation", "hydra/launcher=joblib_gpu").hydra.launcher.n_jobs == 2
    cfg = hydra_config("experiment=ablation", "hydra/launcher=joblib_gpu", "jobs_per_gpu=3")
    assert cfg.hydra.launcher.n_jobs == 6
    assert os.environ["FREQTAG_JOBS_PER_GPU"] == "3"  # what ${freqtag.gpu:POOL} reads in the workers
    with pytest.raises(Exception, match="jobs_per_gpu=0"):
        _ = hydra_config("experiment=ablation", "hydra/launcher=joblib_gpu", "jobs_per_gpu=0").hydra.launcher.n_jobs


def test_slots_fill_the_gpus_evenly_and_never_exceed_jobs_per_gpu(tmp_path):
    """Four workers with two jobs per GPU on pretend GPUs 5 and 7: one job on each GPU before a second on any."""
    pool = tmp_path / "sweep"
    workers = []
    try:
        got = []
        for _ in range(4):
            workers.append(start_claimer(pool, "5,7", per_gpu=2))
            got.append(workers[-1].stdout.readline().strip())
        assert got[:2] == ["5", "7"] and sorted(got) == ["5", "5", "7", "7"]
        with pytest.raises(GPUPoolError, match="all 4 GPUs .* GPUs x jobs_per_gpu"):
            claim_gpu(pool, 4, wait_s=0.3)
    finally:
        for w in workers:
            w.stdin.close()
            w.wait(timeout=10)
            w.stdout.close()
            w.stderr.close()


def test_slurm_launcher_config():
    cfg = hydra_config("experiment=ablation", "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.partition == "gpu" and launcher.timeout_min >= 24 * 60
    assert launcher.array_parallelism >= 24


# ------------------------------------------------------------- the GPU pool (on CPU)

CLAIMER = (
    "import sys; from freqtag.train.gpu_pool import pinned_gpu\n"
    "print(pinned_gpu(sys.argv[1], sys.argv[2]), flush=True)\n"
    "sys.stdin.read()\n"  # hold the GPU until the test closes our stdin
)


@pytest.fixture(autouse=True)
def local_locks(tmp_path, monkeypatch) -> None:
    """Lock files under the test's own folder (the pool keeps them in the temp folder)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR


def start_claimer(pool: Path, visible: str, per_gpu: int = 1) -> subprocess.Popen[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(pool), str(per_gpu)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def test_concurrent_workers_get_distinct_gpus_and_a_dead_worker_frees_its_own(tmp_path):
    pool = tmp_path / "sweep"
    workers = [start_claimer(pool, "5,7,9") for _ in range(3)]
    try:
        got = [w.stdout.readline().strip() for w in workers]
        assert sorted(got) == ["5", "7", "9"]  # one GPU each, mapped through CUDA_VISIBLE_DEVICES
        assert sorted(p.name for p in lock_dir(pool).iterdir()) == ["gpu0.lock", "gpu1.lock", "gpu2.lock"]
        # a fourth concurrent worker finds every GPU taken and says so (after its wait)
        with pytest.raises(GPUPoolError, match="all 3 GPUs .* held by other jobs.*n_jobs"):
            claim_gpu(pool, 3, wait_s=0.3)
        # the worker holding "7" ends (however it ends, the kernel drops its lock): the next one gets "7"
        freed = workers[got.index("7")]
        freed.kill()
        freed.wait()
        late = start_claimer(pool, "5,7,9")
        workers.append(late)
        assert late.stdout.readline().strip() == "7"
    finally:
        for w in workers:
            if w.poll() is None:
                w.stdin.close()
                w.wait(timeout=10)
            w.stdout.close()
            w.stderr.close()


def test_a_worker_keeps_its_gpu_from_job_to_job(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    first = pinned_gpu(tmp_path / "sweep")
    # during a job Hydra sets CUDA_VISIBLE_DEVICES to the pinned GPU, and restores it after
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", first)
    assert pinned_gpu(tmp_path / "sweep") == first
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert pinned_gpu(tmp_path / "sweep") == first == "2"
    assert claim_gpu(tmp_path / "sweep", 2) == 0


def test_resolvers_in_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    import freqtag.conf  # noqa: F401  (the configs package registers the resolvers)

    cfg = OmegaConf.create({"n": "${freqtag.gpu_count:}", "gpu": f"${{freqtag.gpu:{tmp_path / 'other'}}}"})
    assert cfg.n == 2 and cfg.gpu == "4"


def test_no_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(GPUPoolError, match="no CUDA device is visible.*leave out hydra/launcher=joblib_gpu"):
        gpu_count()


@pytest.mark.slow
def test_joblib_gpu_grid_runs_two_jobs_on_one_gpu(tmp_path):
    """jobs_per_gpu=2 on one pretend GPU "3": two workers share it, every job pinned to it."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(REPO / "train.py"), "-m", *tiny_overrides(
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "model=convs",
            "loss=bce,weighted,focal", "logger.name=gpu${oc.env:CUDA_VISIBLE_DEVICES}"), f"paths.data_dir={tmp_path / 'data'}",
            "hydra/launcher=joblib_gpu", "jobs_per_gpu=2", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3", "WANDB_MODE": "disabled"}
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for job in range(3):
        assert [p.name for p in (sweep / str(job)).iterdir() if p.name.startswith("gpu")] == ["gpu3"]
        assert (sweep / str(job) / "metrics.json").is_file()
    assert sorted(p.name for p in lock_dir(sweep).iterdir()) in (["gpu0.lock"], ["gpu0.lock", "gpu1.lock"])


@pytest.mark.slow
def test_joblib_gpu_grid_pins_every_job_to_one_gpu(tmp_path):
    """A real multirun through the joblib_gpu launcher on CPU, with two pretend GPUs "3" and "5".

    Each job names its CSV log folder after the CUDA_VISIBLE_DEVICES it saw, so the
    run directories show which GPU every job was pinned to.
    """
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(REPO / "train.py"), "-m", *tiny_overrides(
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "model=convs",
            "loss=bce,weighted,focal", "logger.name=gpu${oc.env:CUDA_VISIBLE_DEVICES}"), f"paths.data_dir={tmp_path / 'data'}",
            "hydra/launcher=joblib_gpu", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5", "WANDB_MODE": "disabled"}
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    pinned = {}
    for job in range(3):
        folders = [p.name for p in (sweep / str(job)).iterdir() if p.name.startswith("gpu")]
        assert len(folders) == 1 and folders[0] in ("gpu3", "gpu5"), folders  # one GPU, never both
        assert (sweep / str(job) / "predictions" / "test.npz").is_file()
        pinned[job] = folders[0]
    # one lock file per worker that ran jobs (two, unless one worker took them all): one GPU each
    locks = sorted(p.name for p in lock_dir(sweep).iterdir())
    assert locks in (["gpu0.lock"], ["gpu0.lock", "gpu1.lock"]) and len(set(pinned.values())) == len(locks)
