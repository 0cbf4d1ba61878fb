"""bench/gpu_check.sh --cpu: every stage of the GPU check runs on the CPU, passes, and writes finite figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import REPO

STAGES = ["env", "synth", "train_step", "loader", "short_run", "grid", "ddp", "prepare", "predict"]


def numbers(value: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """Every number in the figures, with its path (booleans are flags, not figures)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, float(value)


@pytest.mark.slow
def test_gpu_check_on_the_cpu(tmp_path: Path) -> None:
    """The wrapper with this interpreter: every stage present and passed, every figure finite and >= 0."""
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    out = tmp_path / "gpu_check_cpu.json"  # never bench/results/: the check writes where --out says
    assert out.is_file(), (res.returncode, res.stdout[-3000:], res.stderr[-3000:])
    result = json.loads(out.read_text())
    failed = {n: s["error"] for n, s in result["stages"].items() if not s["ok"]}
    assert res.returncode == 0 and not failed, (failed, res.stdout[-3000:], res.stderr[-3000:])
    assert result["ok"] and result["mode"] == "cpu"
    assert list(result["stages"]) == STAGES
    for name, stage in result["stages"].items():
        assert stage["ok"] and stage["error"] is None and stage["seconds"] >= 0, name
        assert stage["figures"], name
        for where, x in numbers(stage["figures"], name):
            assert math.isfinite(x) and x >= 0, (where, x)
    f = {name: stage["figures"] for name, stage in result["stages"].items()}
    assert all(b["samples_per_s"] > 0 and b["loss_first"] > 0 for b in f["train_step"]["blocks"])
    assert {b["precision"] for b in f["train_step"]["blocks"]} == {"32-true", "bf16-mixed"}
    assert all(p["crops_per_s"] > 0 and p["max_abs_diff_vs_in_memory"] <= 1e-5 for p in f["loader"]["pipelines"])
    assert f["short_run"]["run2_swa_averaged"] > f["short_run"]["run1_swa_averaged"] >= 1
    assert 0 < f["short_run"]["test_roc_auc"] <= 1
    assert f["grid"]["job0_gpu"] == f["grid"]["job1_gpu"] == "0"  # the one (pretend) GPU took both jobs
    assert f["ddp"]["collective_devices"] == ["cpu"] and f["ddp"]["test_ddp_vs_single_max_abs"] <= 1e-5
    assert f["prepare"]["device"]["x_realtime"] > 0 and f["prepare"]["cpu"]["x_realtime"] > 0
    assert f["prepare"]["max_diff_float16_steps"] <= 1
    assert f["predict"]["cpu"]["tracks_per_s"] > 0 and f["predict"]["max_abs_diff"] <= f["predict"]["tolerance"]
