"""Cheaper epoch ends (#14.5): whole-track evaluation batched across tracks, last.ckpt written in the background.

Batched evaluation must give each track what scoring it alone gives (padding
never reaches its windows; float rounding only, bit for bit for a track alone
in its pass), with every track scored once under DDP-style shares. The
background checkpoint must write the bytes a synchronous save writes, from a
snapshot taken before training goes on, one write at a time, atomically, and
fail with the same one-line error.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import config, make_tiny
from tiny_data import run as run_cmd

from freqtag.data.datamodule import JamendoDataModule
from freqtag.model import FreqTagNet
from freqtag.system import faults
from freqtag.system.faults import FAULT_ENV, DiskFullError
from freqtag.system.memory import OutOfMemory
from freqtag.train import checkpoints, evaluation
from freqtag.train.checkpoints import AtomicCheckpointIO
from freqtag.train.driver import run
from freqtag.train.evaluation import TrackBatchSampler, evaluate_tracks
from freqtag.train.main import user_error
from freqtag.train.module import track_probabilities
from freqtag.train.overrides import ConfigError
from freqtag.wholetrack import TIME_MIXING, batch_track_probabilities

INPUT_LENGTH = 64  # tiny tracks are 40-89 frames: some shorter than one window, most not a multiple of 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def net(filters: str, n_tags: int = 56, n_mels: int = 96, input_length: int = INPUT_LENGTH) -> FreqTagNet:
    """A random network whose BatchNorm statistics are not the identity (so padding would show)."""
    torch.manual_seed(3)
    model = FreqTagNet(n_mels, input_length, n_tags, filters)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


# ------------------------------------------------------------------ batched whole-track evaluation


@pytest.fixture(scope="module")
def dm(tiny):
    from freqtag.features import FeatureSpec

    d = JamendoDataModule(str(tiny.store), str(tiny.splits), str(tiny.tags), features=FeatureSpec.load("mel96"),
                          input_length=INPUT_LENGTH, batch_size=8)  # fmt: skip
    d.check()
    return d


@pytest.fixture(scope="module")
def alone(dm) -> np.ndarray:
    """The reference: test tracks scored one per forward pass by net("convs")."""
    return evaluate_tracks(net("convs"), dm, "test", torch.device("cpu"))


def test_batched_evaluation_equals_one_track_per_pass(dm, alone):
    lengths = dm.reader.lengths[dm.splits["test"].rows]
    assert lengths.min() < INPUT_LENGTH < lengths.max() and (lengths % 32).any()
    model = net("convs")
    for frames in (200, 65536):  # pairs and triples of similar length; the whole split in one pass
        got = evaluate_tracks(model, dm, "test", torch.device("cpu"), eval_batch_frames=frames)
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-6)  # measured: <= 1.2e-7 (float rounding)
    # no two tracks fit in a pass: the one-track passes themselves, bit for bit
    np.testing.assert_array_equal(evaluate_tracks(model, dm, "test", torch.device("cpu"), INPUT_LENGTH), alone)


def test_batches_follow_length_and_budget_and_cover_each_rank_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=37)
    for world in (1, 2, 3):
        shares = [TrackBatchSampler(lengths, 64, 1000, rank, world) for rank in range(world)]
        for rank, s in enumerate(shares):
            items = [i for b in s for i in b]
            assert sorted(items) == list(range(rank, 37, world))  # this rank's share, as TrackSampler's, once each
            sizes = [max(int(lengths[i]), 64) for i in items]
            assert sizes == sorted(sizes, reverse=True)  # similar lengths together, longest first
            for b in s:
                longest = max(max(int(lengths[i]), 64) for i in b)
                assert longest * len(b) <= 1000 or len(b) == 1  # a track longer than the budget goes alone
                assert min(max(int(lengths[i]), 64) for i in b) >= 0.75 * longest  # padding under a quarter
    assert len(TrackBatchSampler(np.full(37, 100), 64, 10**9)) == 1 and len(TrackBatchSampler(lengths, 64, 1)) == 37
    assert len(TrackBatchSampler(lengths, 64, 10**9)) < 10  # scattered lengths: a few passes, not 37


def test_padding_never_reaches_a_tracks_windows():
    """NaN in the padding (input frames past a track's end) leaves every track's probabilities finite and equal."""
    model = net("freq_dep", n_tags=10, n_mels=32)  # the frequency-dependent layers (the split tests use convs)
    lengths = [10, 63, 64, 65, 97, 130]
    tracks = [torch.randn(1, 32, t) for t in lengths]
    with torch.no_grad():
        alone = torch.cat([track_probabilities(model, x) for x in tracks])
        batch = torch.full((len(lengths), 32, max(lengths)), float("nan"))
        for i, x in enumerate(tracks):
            batch[i, :, : x.shape[-1]] = x[0]
        got = batch_track_probabilities(model, batch, lengths)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-6)
        # the control: zero padding without the masks does reach the last windows of the shorter tracks
        unmasked = torch.sigmoid(model(torch.nan_to_num(batch, nan=0.0)))
        leaked = [(unmasked[i, :, : model.n_windows(t)].mean(-1) - alone[i]).abs().max() for i, t in enumerate(lengths)]
        assert max(leaked) > 1e-3
        # one track alone: the very same arithmetic as the one-track pass
        assert torch.equal(batch_track_probabilities(model, tracks[-1], [lengths[-1]]), alone[-1:])
    assert TIME_MIXING == ("conv1", "conv2", "conv3", "maxpool", "filter1", "filter2", "filter3", "filter4")


def test_one_track_and_ranks_sharing_the_tracks(dm, alone, monkeypatch):
    """Every track scored exactly once over 2 pretend ranks; the summed rows are the one-track passes."""
    model = net("convs")
    parts: dict[int, list[torch.Tensor]] = {}
    rank = 0

    def all_reduce(t: torch.Tensor) -> None:  # records this rank's rows; stands in for the other rank's sum
        parts.setdefault(rank, []).append(t.clone())
        if t.dtype == torch.int32:
            t.fill_(1)

    monkeypatch.setattr(evaluation, "distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    for rank in (0, 1):
        monkeypatch.setattr(dm, "_rank", lambda r=rank: (r, 2))
        evaluate_tracks(model, dm, "test", torch.device("cpu"), eval_batch_frames=65536)
    probs = parts[0][0] + parts[1][0]
    seen = parts[0][1] + parts[1][1]
    assert seen.tolist() == [1] * len(alone)
    assert (parts[0][0][1::2] == 0).all() and (parts[1][0][0::2] == 0).all()  # rank r: items r, r+2, ...
    np.testing.assert_allclose(probs.numpy(), alone, rtol=0, atol=1e-6)
    # one track: the batch is that track alone
    one = TrackBatchSampler(np.array([77]), INPUT_LENGTH, 65536)
    assert list(one) == [[0]]


def test_out_of_memory_in_a_batched_evaluation_names_the_setting(dm, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity of 1")

    monkeypatch.setattr(evaluation, "batch_track_probabilities", boom)
    with pytest.raises(OutOfMemory) as e:
        evaluate_tracks(net("convs"), dm, "test", torch.device("cpu"), eval_batch_frames=65536)
    msg = str(e.value)
    assert "\n" not in msg and "whole-track evaluation of test tracks" in msg and "eval_batch_frames (now 65536" in msg
    assert "Tried to allocate 9.00 GiB" in msg and "total capacity" not in msg


def test_a_network_that_cannot_be_masked_is_scored_one_track_per_pass(dm, alone):
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = net("convs")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    other = Other()
    np.testing.assert_array_equal(evaluate_tracks(other, dm, "test", torch.device("cpu"), eval_batch_frames=65536),
                                  alone)


@pytest.mark.parametrize("setting", ["eval_batch_frames=-1", "eval_batch_frames=lots", "async_checkpoint=sometimes"])
def test_bad_settings_are_one_line(tiny, tmp_path, setting):
    with pytest.raises(ConfigError) as e:
        run(config(tiny, tmp_path / "run", setting))
    msg = str(e.value)
    key = setting.split("=")[0]
    assert msg.startswith(f"{key}=") and "\n" not in msg and "must be" in msg and user_error(e.value) is e.value


# ------------------------------------------------------------------ last.ckpt in the background


def lightning_like(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=g)
    return {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.6",
        "state_dict": {"net.w": w, "net.b": torch.randn(64, generator=g), "net.n": torch.tensor(7)},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.randn(64, 32, generator=g)}},
                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"SWA": {"n_averaged": 2, "average": [w * 0.5]}},
    }  # fmt: skip


def test_background_write_is_the_synchronous_file(tmp_path):
    ckpt = lightning_like()
    AtomicCheckpointIO({"tags": ["a"]}).save_checkpoint(ckpt, tmp_path / "sync.ckpt")
    io = AtomicCheckpointIO({"tags": ["a"]}, async_checkpoint=True)
    io.save_checkpoint(ckpt, tmp_path / "async.ckpt")
    io.teardown()
    assert (tmp_path / "async.ckpt").read_bytes() == (tmp_path / "sync.ckpt").read_bytes()
    a = torch.load(tmp_path / "async.ckpt", weights_only=False)
    assert a["freqtag"] == {"tags": ["a"]} and a["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["async.ckpt", "sync.ckpt"]  # no temporary left


def test_snapshot_taken_before_training_goes_on_and_one_write_at_a_time(tmp_path, monkeypatch):
    release = threading.Event()
    order: list[str] = []
    real = checkpoints.atomic_save_bytes

    def slow_disk(data, path):  # the disk holds the first write until the test says so
        order.append(f"start {Path(path).name}")
        if Path(path).name == "first.ckpt":
            assert release.wait(30)
        real(data, path)
        order.append(f"done {Path(path).name}")

    monkeypatch.setattr(checkpoints, "atomic_save_bytes", slow_disk)
    io = AtomicCheckpointIO(async_checkpoint=True)
    ckpt = lightning_like()
    before = ckpt["state_dict"]["net.w"].clone()
    io.save_checkpoint(ckpt, tmp_path / "first.ckpt")  # returns while the write waits
    with torch.no_grad():  # the next training steps change the weights in place
        ckpt["state_dict"]["net.w"].add_(1.0)
        ckpt["optimizer_states"][0]["state"][0]["momentum_buffer"].zero_()
    second = threading.Thread(target=io.save_checkpoint, args=(lightning_like(1), tmp_path / "second.ckpt"))
    second.start()
    second.join(0.5)
    assert second.is_alive() and order == ["start first.ckpt"]  # the next save waits for the one in flight
    assert not (tmp_path / "first.ckpt").exists()  # nothing under the final name before it is whole
    release.set()
    second.join(30)
    io.teardown()
    assert order == ["start first.ckpt", "done first.ckpt", "start second.ckpt", "done second.ckpt"]
    first = torch.load(tmp_path / "first.ckpt", weights_only=False)
    assert torch.equal(first["state_dict"]["net.w"], before)
    assert first["optimizer_states"][0]["state"][0]["momentum_buffer"].abs().sum() > 0


def test_a_failed_background_write_is_the_same_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO(async_checkpoint=True)
    io.save_checkpoint(lightning_like(0), path)
    io.wait()
    before = path.read_bytes()
    monkeypatch.setenv(FAULT_ENV, "checkpoint.written:last.ckpt@1=enospc")
    monkeypatch.setattr(faults, "_hits", {})
    io.save_checkpoint(lightning_like(1), path)  # fails in the background ...
    with pytest.raises(DiskFullError) as e:
        io.save_checkpoint(lightning_like(2), path)  # ... and stops the run at the next save
    msg = str(e.value)
    assert msg.startswith(f"disk full while writing {path}") and "the previous last.ckpt is intact" in msg
    assert "\n" not in msg and user_error(e.value) is e.value
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # at the end of fit: raised by teardown; while the run fails for another reason: only warned about
    monkeypatch.setattr(faults, "_hits", {})
    io.save_checkpoint(lightning_like(3), path)
    with pytest.raises(DiskFullError):
        io.teardown()
    monkeypatch.setattr(faults, "_hits", {})
    io.save_checkpoint(lightning_like(4), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            raise FloatingPointError("non-finite training loss")
        except FloatingPointError:
            io.teardown()
    assert any("disk full while writing" in str(w.message) for w in caught)
    assert path.read_bytes() == before


@pytest.mark.slow
def test_training_writes_the_same_last_ckpt_in_the_background(tiny, tmp_path):
    """A whole run: last.ckpt written in the background equals the synchronous one; the same final results."""
    results = {}
    for mode in ("true", "false"):
        out = tmp_path / mode
        results[mode] = run(config(tiny, out, f"async_checkpoint={mode}"))
    a = torch.load(tmp_path / "true" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(tmp_path / "false" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert sorted(a) == sorted(b) and sorted(a["state_dict"]) == sorted(b["state_dict"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert (a["epoch"], a["global_step"], a["loops"]) == (b["epoch"], b["global_step"], b["loops"])
    assert results["true"] == results["false"]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["true", "false"])
def test_killed_during_a_checkpoint_write_resumes_like_an_uninterrupted_run(tiny, tmp_path, mode):
    """SIGKILL in the middle of the second last.ckpt write (background or not): the first is intact, and the run
    resumed from it ends as one never interrupted (the same predictions)."""
    run_dir = tmp_path / "run"
    args = tiny.train_args(run_dir, "trainer.max_epochs=3", f"async_checkpoint={mode}")
    killed = run_cmd(args, env={**os.environ, FAULT_ENV: "checkpoint.written:last.ckpt@2"}, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")["epoch"] == 0
    assert len(list(ckpts.glob(".last.ckpt.*.tmp"))) == 1
    resumed = run_cmd([*args, f"ckpt_path={ckpts / 'last.ckpt'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = run_cmd(tiny.train_args(tmp_path / "whole", "trainer.max_epochs=3", "async_checkpoint=false"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert not list(ckpts.glob("*.tmp"))
    for split in ("validation", "test"):
        np.testing.assert_array_equal(np.load(run_dir / "predictions" / f"{split}.npz")["probs"],
                                      np.load(tmp_path / "whole" / "predictions" / f"{split}.npz")["probs"])


# resume: the schedule's length ---------------------------------------------------------------------------------------
def test_a_resume_with_another_max_epochs_is_refused_before_training(tiny, tmp_path):
    """The cosine schedule and the SWA start are laid out over trainer.max_epochs: a resume must keep it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    from freqtag.features import FeatureSpec
    from freqtag.train.checkpoints import ResumeError, check_resume, run_info

    cfg = config(tiny, tmp_path / "run", "trainer.max_epochs=3")
    spec = FeatureSpec.from_dict(OmegaConf.to_container(cfg.features, resolve=True))
    d = instantiate(cfg.data, features=spec, _recursive_=False)
    d.check()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"epoch": 0, "freqtag": run_info(d, 2)}, ckpt)
    check_resume(ckpt, d, 2)  # the same max_epochs: accepted
    check_resume(ckpt, d)  # not asked: accepted
    d.release()
    with open_dict(cfg):
        cfg.ckpt_path = str(ckpt)
    with pytest.raises(ResumeError) as e:
        run(cfg)
    line = str(e.value)
    assert "trainer.max_epochs=2" in line and "trainer.max_epochs=3" in line and "\n" not in line
    assert "resume with trainer.max_epochs=2" in line and user_error(e.value) is e.value
    assert not (tmp_path / "run" / "checkpoints").exists()
