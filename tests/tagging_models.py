"""Two tiny trained checkpoints (mel96 and mel128) for the tagging tests, trained once per test session.

Composed from the real configs and shrunk by helpers.compose_tiny, as every tiny run; both
test modules call :func:`trained_runs`, which trains into the session's base
temporary folder the first time and reuses the runs after that.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock
from helpers import compose_tiny

from freqtag.train.driver import run


def train_tiny(out: Path, features: str) -> Path:
    """A finished run directory (final.ckpt, thresholds.tsv, predictions) of a tiny model on synthetic data."""
    run_dir = out / f"run-{features}"
    run(compose_tiny(run_dir, "+trainer.limit_train_batches=4", "model=convs", f"features={features}",
                     data_dir=out / f"data-{features}"))  # fmt: skip
    return run_dir


def trained_runs(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """{"mel96": run dir, "mel128": run dir}, trained on first use in this session.

    Under pytest-xdist every worker has its own base temporary folder; the
    models go into the folder the workers share, trained once under a file
    lock, so the second worker waits for the first instead of training again.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    base = base / "tagging-models"
    base.mkdir(parents=True, exist_ok=True)
    runs = {}
    with FileLock(base / "train.lock"):
        for features in ("mel96", "mel128"):
            done = base / f"run-{features}" / "checkpoints" / "final.ckpt"
            runs[features] = done.parent.parent if done.is_file() else train_tiny(base, features)
    return runs
