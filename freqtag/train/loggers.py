"""Loggers: CSV by default; W&B with its run named, grouped and tagged from the Hydra job.

A W&B run is named after the job's overrides (``model=convs,loss=bce``),
tagged with them, grouped by the sweep (so a grid is one group), carries the
resolved config, and ends with the final metrics in its summary. Every job
finishes its own W&B run (failed when the job raised), so the jobs of one
multirun process never write into each other's runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from freqtag.train.overrides import WHERE

__all__ = ["build_logger", "job_overrides", "log_final", "finish_wandb", "log_ensemble", "run_group", "group_of"]

WANDB = "pytorch_lightning.loggers.WandbLogger"


def job_overrides() -> list[str]:
    """The job's own overrides (``model=convs``, ...), as Hydra recorded them; [] outside Hydra."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(WHERE)]


def sweep_group() -> str | None:
    """The sweep directory of a multirun (one W&B group per grid); None for a single run."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return group_of(hc.sweep.dir)


def group_of(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep directory: its last two path parts (``2026-11-24/07-30-00``)."""
    sweep = Path(sweep_dir)
    return f"{sweep.parent.name}/{sweep.name}" if sweep.parent.name else sweep.name


def run_group(run_dir: Path) -> str | None:
    """The W&B group a finished run was logged under, from its ``.hydra/hydra.yaml`` (None: not a multirun job)."""
    record = run_dir / ".hydra" / "hydra.yaml"
    if not record.is_file():
        return None
    if str(OmegaConf.load(record).hydra.get("mode")) != "MULTIRUN":
        return None
    return group_of(run_dir.resolve().parent)  # a job lives in <sweep dir>/<job number>


def log_ensemble(table_csv: Path, table_png: Path, results: dict[str, float], runs: list[str],
                 project: str, entity: str | None, group: str | None) -> str:
    """The ensemble table (a wandb.Table), its plot and the submission figures, as one W&B run of ``group``."""
    import csv

    import wandb

    with open(table_csv, newline="") as f:
        rows = list(csv.reader(f))
    run = wandb.init(project=project, entity=entity, group=group, job_type="ensemble", name="ensemble",
                     config={"runs": runs}, dir=str(table_csv.parent), reinit="finish_previous")
    try:
        table = wandb.Table(columns=rows[0], data=[[r[0], int(r[1]), *map(float, r[2:])] for r in rows[1:]])
        run.log({"ensemble/table": table, "ensemble/plot": wandb.Image(str(table_png))})
        run.summary.update({f"submission/{k}": v for k, v in results.items()})
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return run.id


def build_logger(cfg: DictConfig) -> Any:
    """The configured Lightning logger, or False for ``logger=null``.

    For W&B, unset ``name``, ``group`` and ``tags`` come from the job, and the
    whole resolved config goes to the run. ``log_final_checkpoint`` is ours
    (not a WandbLogger argument) and is taken out here.
    """
    if not cfg.get("logger"):
        return False
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    assert isinstance(logger_cfg, dict)
    logger_cfg.pop("log_final_checkpoint", None)
    if logger_cfg.get("_target_") == WANDB:
        overrides = job_overrides()
        logger_cfg["name"] = logger_cfg.get("name") or (",".join(overrides) or "default")
        logger_cfg["group"] = logger_cfg.get("group") or sweep_group()
        logger_cfg["tags"] = list(logger_cfg.get("tags") or [o[:64] for o in overrides])
        given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        if os.environ.get("WANDB_DIR") and not any(o.lstrip("+").startswith("logger.save_dir=") for o in given):
            logger_cfg["save_dir"] = os.environ["WANDB_DIR"]  # W&B's own variable, unless the command line says otherwise
        # built directly: instantiate() would try to build the `_target_`s inside the config itself
        kwargs = {k: v for k, v in logger_cfg.items() if k != "_target_"}
        return get_class(WANDB)(**kwargs, config=OmegaConf.to_container(cfg, resolve=True))
    return instantiate(logger_cfg)


def log_final(logger: Any, cfg: DictConfig, metrics: dict[str, float], final_ckpt: Path) -> None:
    """The final whole-track metrics into the W&B run summary (and the final checkpoint, if asked)."""
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    run = logger.experiment
    run.summary.update(metrics)
    if cfg.logger.get("log_final_checkpoint"):
        import wandb

        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"overrides": job_overrides()})
        artifact.add_file(str(final_ckpt), name="final.ckpt")
        thresholds = final_ckpt.with_name("thresholds.tsv")
        if thresholds.exists():
            artifact.add_file(str(thresholds), name="thresholds.tsv")
        run.log_artifact(artifact, aliases=["final"])


def finish_wandb(failed: bool) -> None:
    """End the W&B run of this job, if one is open (exit code 1 marks it failed)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
