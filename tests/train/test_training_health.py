"""Training health: a NaN loss stops the run in one line and keeps the last good checkpoint; half precision.

The paper's learning rate of 0.5 is high; in float16 a forward pass can
overflow. On a GPU the default precision (``16-mixed``) runs through
Lightning's ``MixedPrecision`` plugin, which holds a ``torch.amp.GradScaler``:
steps whose gradients overflow are skipped and the loss scale lowered. On a
CPU ``bf16-mixed`` has float32's exponent range, so nothing overflows; a
short run at lr 0.5 is shown here to train to finite scores.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from tiny_data import DtypeProbe, Tiny, config, make_tiny
from tiny_data import run as run_command

from freqtag.train import main as training
from freqtag.train.driver import TrainingDiverged, resolve_precision, run
from freqtag.train.main import user_error


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_nan_learning_rate_stops_at_the_first_nan_loss_in_one_line(tiny: Tiny, tmp_path: Path) -> None:
    """lr=nan: step 0 is finite, its update makes every weight NaN, step 1's loss is NaN."""
    res = run_command(tiny.train_args(tmp_path / "run", "optim.lr=nan"), cwd=tmp_path)
    assert res.returncode == 1
    line = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and line.startswith("train.py: error: non-finite training loss at epoch 0, "
                                                             "step 1"), res.stderr[-3000:]  # fmt: skip
    assert "no checkpoint was written yet" in line and "Lower optim.lr (now nan)" in line
    assert not (tmp_path / "run" / "checkpoints" / "final.ckpt").exists()


def test_nan_in_the_second_epoch_keeps_the_first_epochs_checkpoint(tiny: Tiny, tmp_path: Path) -> None:
    """Weights poisoned at step 4 (epoch 1, 3 steps an epoch): stop there; last.ckpt is epoch 0's, finite, resumable."""
    out = tmp_path / "run"
    cfg = config(tiny, out, "trainer.max_epochs=3", "+callbacks.poison._target_=tiny_data.PoisonWeights",
                 "+callbacks.poison.at_step=4")  # fmt: skip
    with pytest.raises(TrainingDiverged) as info:
        run(cfg)
    last = out / "checkpoints" / "last.ckpt"
    message = str(user_error(info.value))
    assert message.startswith("non-finite training loss at epoch 1, step 4; the last good checkpoint, ")
    assert f"{last} (end of epoch 0), is kept: resume with ckpt_path={last}" in message and "\n" not in message
    ckpt = torch.load(last, weights_only=False, map_location="cpu")
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (out / "checkpoints" / "final.ckpt").exists()

    resumed = config(tiny, out, "trainer.max_epochs=3", f"+ckpt_path={last}")  # the same run, without the fault
    metrics = run(resumed)
    assert np.isfinite([v for m in metrics.values() for v in m.values()]).all()


def test_bf16_mixed_on_cpu_at_lr_half_trains_to_finite_scores(tiny: Tiny, tmp_path: Path) -> None:
    DtypeProbe.seen.clear()
    cfg = config(tiny, tmp_path / "run", "trainer.precision=bf16-mixed", "optim.lr=0.5", "trainer.max_epochs=3",
                 "+callbacks.probe._target_=tiny_data.DtypeProbe")  # fmt: skip
    metrics = run(cfg)
    # the 9 training steps (3 epochs of 3) ran in bfloat16; then the BatchNorm pass (float32, outside Lightning)
    assert DtypeProbe.seen[:9] == [torch.bfloat16] * 9 and set(DtypeProbe.seen[9:]) == {torch.float32}
    assert np.isfinite([v for m in metrics.values() for v in m.values()]).all()
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and np.isfinite(losses).all()
    final = torch.load(tmp_path / "run" / "checkpoints" / "final.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())


def test_16_mixed_on_gpu_uses_a_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision=auto is 16-mixed on a GPU, and Lightning's plugin for it scales the loss (GradScaler)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto") == "16-mixed"
    monkeypatch.undo()
    assert resolve_precision("auto") == ("16-mixed" if torch.cuda.is_available() else "32-true")
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        plugin = MixedPrecision("16-mixed", "cuda")  # what Trainer(precision="16-mixed") builds on a GPU
    assert isinstance(plugin.scaler, torch.amp.GradScaler)
    assert MixedPrecision("bf16-mixed", "cpu").scaler is None  # bf16 needs none: float32's exponent range


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_training_diverged_is_a_user_error() -> None:
    wrapped = RuntimeError("what Hydra raises")
    wrapped.__cause__ = TrainingDiverged("non-finite training loss")
    assert isinstance(user_error(wrapped), TrainingDiverged) and TrainingDiverged in training.USER_ERRORS
