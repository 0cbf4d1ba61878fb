"""What the tests share: where things are, the tiny run every training test shrinks, and the `freqtag` command.

``tiny_overrides`` / ``compose_tiny`` are the one place that says how a test
run is shrunk (the ``tiny_config`` fixture of conftest.py hands the latter to
tests); ``freqtag`` is the one way tests run the command, in this process or
as the installed console script.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # the real MTG-Jamendo metadata and clips, read in place, never copied
CLIPS = SHARED / "audio"
FREQTAG = str(Path(sys.executable).parent / "freqtag")  # the console script `pip install` made

#: The demo recipe shrunk to seconds: 300 synthetic tracks, 32-frame crops, one epoch, CSV logs.
TINY_RUN = (
    "experiment=demo",
    "data.synthetic.tracks=300",
    "data.input_length=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "logger=csv",
)


def tiny_overrides(*overrides: str, base: tuple[str, ...] = TINY_RUN) -> list[str]:
    """``base`` with each of ``overrides`` replacing the entry of the same key in place, the others appended.

    In place, so that a run's name (built from its overrides in order) is the
    same whichever test shrinks it.
    """
    out = list(base)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in out]
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in keys:
            out[keys.index(key)] = o
        else:
            out.append(o)
            keys.append(key)
    return out


def compose_tiny(out: Path, *overrides: str, data_dir: Path | None = None) -> DictConfig:
    """The composed config of the tiny run writing to ``out`` (data generated in ``data_dir``, default beside it)."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    with initialize_config_module("freqtag.conf", version_base="1.3"):
        cfg = compose("train", overrides=tiny_overrides(*overrides))
    with open_dict(cfg):
        cfg.paths.data_dir = str(data_dir or Path(out).parent / "data")
        cfg.paths.output_dir = str(out)
    return cfg


def freqtag(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300,
            in_process: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`freqtag ARGS`: the installed console script in a subprocess, or ``freqtag.cli.main`` in this process
    (``in_process``: torch is imported once for all tests; stdout and stderr captured alike)."""
    argv = [str(a) for a in args]
    if not in_process:
        return subprocess.run([FREQTAG, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    from freqtag.cli import main

    out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or old)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse usage errors
                code = int(e.code or 0)
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(["freqtag", *argv], code, out.getvalue(), err.getvalue())


def store_contents(path: Path) -> dict:
    """Everything a feature store holds, for equality checks."""
    import h5py

    with h5py.File(path, "r") as f:
        return {
            "ids": [s.decode() for s in f["tracks/id"][()]],
            "offset": f["tracks/offset"][()].tolist(),
            "length": f["tracks/length"][()].tolist(),
            "features": f["features"][()],
            "attrs": {k: f.attrs[k] for k in f.attrs},
        }


def assert_same_store(a: Path, b: Path) -> None:
    """Two feature stores hold the same tracks, frames (bit for bit) and attributes."""
    import numpy as np

    x, y = store_contents(a), store_contents(b)
    assert x["ids"] == y["ids"] and x["offset"] == y["offset"] and x["length"] == y["length"]
    np.testing.assert_array_equal(x["features"], y["features"])
    assert x["attrs"] == y["attrs"]


def kill_when_parts(proc: subprocess.Popen, partial: Path, timeout: float, parts: int = 2) -> None:
    """SIGKILL a running `freqtag prepare` once ``parts`` parts of its store exist in ``partial`` (a kill mid-run)."""
    try:
        deadline = time.monotonic() + timeout
        while len(list(partial.glob("part-*.npz"))) < parts:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no part appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
