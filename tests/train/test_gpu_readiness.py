"""The GPU paths, proved on the CPU: meta tensors, pretend devices and a patched ``torch.cuda`` stand in for a GPU.

One test per defect the read of the CUDA paths found (issue #13): SWA
averages on the wrong device after a resume, ``precision: auto`` ignoring the
accelerator, mixed-precision evaluation, implicit TF32, the in-memory store
passing whole through host RAM and never measured against free memory, a
finished run's memory kept for the next grid job, and out-of-memory errors
that do not say what to change.
"""

from __future__ import annotations

import gc
import io
import json
import tracemalloc
import weakref
from contextlib import redirect_stderr
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tagging_models import trained_runs
from tiny_data import config, make_tiny
from torch import nn

from freqtag.data import store as store_module
from freqtag.data.datamodule import JamendoDataModule
from freqtag.data.store import FeatureStore
from freqtag.model import FreqTagNet
from freqtag.system import memory
from freqtag.system.memory import OutOfMemory, check_fits, out_of_memory
from freqtag.system.precision import device_tolerance, fp32_precision, set_fp32_precision
from freqtag.tag.models import load_model
from freqtag.train.driver import resolve_precision, run
from freqtag.train.evaluation import evaluate_tracks
from freqtag.train.main import user_error
from freqtag.train.swa import SWA

CUDA_OOM = "CUDA out of memory. Tried to allocate 35.20 GiB. GPU 0 has a total capacity of 139.81 GiB of which 2.00 GiB is free."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _ieee_after():
    yield
    set_fp32_precision("ieee")


# 1. SWA averages follow the parameters ------------------------------------------------------------
def test_swa_resumed_averages_move_to_the_parameters_device_and_dtype():
    """last.ckpt hands the averages back on the CPU; the parameters may live elsewhere (meta stands in for cuda)."""
    torch.manual_seed(0)
    swa = SWA(fraction=0.5)
    epoch_end = SimpleNamespace(current_epoch=9, max_epochs=10)
    swa.on_train_epoch_end(epoch_end, nn.Linear(4, 3))
    state = swa.state_dict()
    assert all(v.device.type == "cpu" for v in state["average"].values())

    resumed = SWA(fraction=0.5)
    resumed.load_state_dict(state)
    on_meta = nn.Linear(4, 3, device="meta")
    resumed.on_train_epoch_end(epoch_end, on_meta)  # crashed: meta parameters against CPU averages
    assert resumed.n_averaged == 2
    assert {v.device.type for v in resumed.average.values()} == {"meta"}

    wide = SWA(fraction=0.5)
    wide.load_state_dict(state)
    wide.on_train_epoch_end(epoch_end, nn.Linear(4, 3).double())
    assert {v.dtype for v in wide.average.values()} == {torch.float64}
    half = SWA(fraction=0.5)
    half.on_train_epoch_end(epoch_end, nn.Linear(4, 3).to(torch.bfloat16))
    assert {v.dtype for v in half.average.values()} == {torch.float32}  # never averaged in bf16


def test_swa_average_is_unchanged_on_one_device():
    """The device handling changes no number: the running mean of three epochs' weights, exactly."""
    net = nn.Linear(5, 2)
    swa = SWA(fraction=1.0)
    seen = []
    for epoch in range(3):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        seen.append(net.weight.detach().clone())
        swa.on_train_epoch_end(SimpleNamespace(current_epoch=epoch, max_epochs=3), net)
    torch.testing.assert_close(swa.average["weight"], torch.stack(seen).mean(0), rtol=0, atol=1e-6)


# 2. precision: auto follows the accelerator used --------------------------------------------------------
@pytest.mark.parametrize(("accelerator", "want"), [("cpu", "32-true"), ("gpu", "16-mixed"), ("cuda", "16-mixed"),
                                                   ("auto", "16-mixed")])
def test_auto_precision_follows_the_accelerator_when_a_gpu_is_visible(monkeypatch, accelerator, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", accelerator) == want
    assert resolve_precision("bf16-mixed", accelerator) == "bf16-mixed"  # an explicit choice is kept


def test_auto_precision_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "auto") == "32-true"


# 3. one evaluation precision: float32, IEEE, no autocast -----------------------------------------------
def test_whole_track_evaluation_ignores_an_outer_autocast_and_tf32(tiny, monkeypatch):
    """Training's evaluation runs inside a mixed-precision process: it must still be float32 IEEE."""
    from freqtag.train import evaluation as training

    dm = JamendoDataModule(str(tiny.store), str(tiny.splits), str(tiny.tags), features=tiny_spec(tiny),
                           input_length=32, batch_size=8)
    dm.check()
    torch.manual_seed(0)
    net = FreqTagNet(n_mels=96, input_length=32, n_tags=len(dm.tags), filters="convs")
    plain = evaluate_tracks(net, dm, "test", torch.device("cpu"))

    seen = []
    inner = training.track_probabilities

    def probe(n, x):
        seen.append((torch.is_autocast_enabled("cpu"), fp32_precision()))
        return inner(n, x)

    monkeypatch.setattr(training, "track_probabilities", probe)
    set_fp32_precision("tf32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = evaluate_tracks(net, dm, "test", torch.device("cpu"))
    assert seen and set(seen) == {(False, "ieee")}
    assert fp32_precision() == "tf32"  # the caller's setting is back afterwards
    np.testing.assert_allclose(under, plain, rtol=0, atol=1e-7)


def test_predict_scores_in_float32_under_an_outer_autocast(tmp_path_factory):
    """``predict`` and training's evaluation share the precision: bf16 autocast around it changes nothing."""
    run_dir = trained_runs(tmp_path_factory)["mel96"]
    model = load_model(run_dir, "cpu")
    x = torch.randn(2, 96, 4 * model.input_length)
    want = model.window_probabilities(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.window_probabilities(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# 4. TF32 chosen explicitly ---------------------------------------------------------------------------------
def test_fp32_precision_sets_cudnn_and_matmul_without_breaking_lightnings_check():
    set_fp32_precision("tf32")
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.get_float32_matmul_precision() == "high"  # Lightning reads this when it sets up a GPU
    set_fp32_precision("ieee")
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"  # torch's own default for convolutions is tf32
    assert torch.get_float32_matmul_precision() == "highest"
    assert fp32_precision() == "ieee"
    assert device_tolerance("ieee") == 1e-5 < device_tolerance("tf32")
    with pytest.raises(ValueError, match="fp32_precision='fast': valid values are ieee, tf32"):
        set_fp32_precision("fast")


def test_training_applies_fp32_precision_and_refuses_a_bad_one(tiny, tmp_path):
    from freqtag.train.overrides import ConfigError

    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's default
    with pytest.raises(ConfigError, match="fp32_precision='fast'"):
        run(config(tiny, tmp_path / "bad", "fp32_precision=fast"))
    run(config(tiny, tmp_path / "run", "trainer.max_epochs=1", "callbacks.swa.fraction=1.0"))
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"  # the config's default, set before training


# 5. the in-memory store: straight to its device, measured first -------------------------------------------------
def test_in_memory_store_loads_block_by_block(tiny, monkeypatch):
    """The host holds one block at a time: numpy's traced peak stays near one block, not the whole store."""
    store = FeatureStore(tiny.store)
    monkeypatch.setattr(store_module, "_LOAD_FRAMES", 256)
    whole = store.n_frames * store.n_mels * 2
    block = 256 * store.n_mels * 2
    assert whole > 8 * block
    tracemalloc.start()
    try:
        frames = store.load_band_major(pad=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * block, (peak, block, whole)
    assert frames.shape == (store.n_mels, store.n_frames + 32) and frames.dtype == torch.float16
    np.testing.assert_array_equal(frames[:, : store.n_frames].numpy(), np.asarray(store.frames).T)
    assert not frames[:, store.n_frames :].any()
    on_meta = store.load_band_major(pad=32, device="meta")  # allocated on the device itself (meta: no memory)
    assert on_meta.device.type == "meta" and on_meta.shape == frames.shape


def test_in_memory_store_that_does_not_fit_stops_before_training(tiny, tmp_path, monkeypatch):
    cfg = config(tiny, tmp_path / "run", "data.in_memory=true")
    monkeypatch.setattr(memory, "_host_available", lambda: 1000)
    with pytest.raises(OutOfMemory) as e:
        run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and str(tiny.store) in msg and "host RAM" in msg and "data.in_memory=false" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
    assert user_error(e.value) is e.value  # train.py prints it as one line, exit 1


def test_gpu_free_memory_counts_torchs_cache(monkeypatch):
    """On a GPU, free = the driver's free + what torch caches unused; the check names needed vs free and the fix."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    gpu = torch.device("cuda", 0)
    assert memory.free_bytes(gpu) == 22 * gib
    check_fits(21 * gib, gpu, "the store", "set data.in_memory=false")
    with pytest.raises(OutOfMemory, match=r"the store needs 35.0 GiB of GPU memory on cuda:0 but 22.0 GiB is free: "
                                          r"set data.in_memory=false"):
        check_fits(35 * gib, gpu, "the store", "set data.in_memory=false")


# 6. a finished run gives its memory back ---------------------------------------------------------------------------
def test_run_frees_its_in_memory_store_without_waiting_for_the_garbage_collector(tiny, tmp_path, monkeypatch):
    """A joblib worker runs the next grid job in the same process: the last job's store must be gone at once."""
    held: list[weakref.ref] = []
    gather = JamendoDataModule.gather

    def spy(self, rows, starts):
        out = gather(self, rows, starts)
        if not held:
            held.append(weakref.ref(self._frames))
        return out

    monkeypatch.setattr(JamendoDataModule, "gather", spy)
    cfg = config(tiny, tmp_path / "run", "data.in_memory=true", "trainer.max_epochs=1", "callbacks.swa.fraction=1.0")
    gc.collect()
    gc.disable()  # the trainer <-> datamodule cycle would otherwise be broken only by a collection
    try:
        run(cfg)
        assert held and held[0]() is None, "the in-memory store outlived its run"
    finally:
        gc.enable()


def test_release_gives_cached_gpu_memory_back(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    memory.release_device_memory()
    assert calls == ["empty_cache"]


# 7. out of memory: one line naming what and the setting ------------------------------------------------------------
def test_out_of_memory_in_a_training_step_is_one_line(tiny, tmp_path, monkeypatch):
    from freqtag.train.module import TaggingModule

    def boom(self, batch, batch_idx):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(TaggingModule, "training_step", boom)
    with pytest.raises(OutOfMemory) as e:
        run(config(tiny, tmp_path / "run"))
    msg = str(e.value)
    assert "\n" not in msg and "training convs" in msg and "batch 8" in msg and "data.batch_size" in msg
    assert "Tried to allocate 35.20 GiB" in msg and "total capacity" not in msg


def test_out_of_memory_loading_the_store_names_in_memory(tiny, tmp_path, monkeypatch):
    def boom(self, pad=0, device="cpu"):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(FeatureStore, "load_band_major", boom)
    with pytest.raises(OutOfMemory) as e:
        run(config(tiny, tmp_path / "run", "data.in_memory=true"))
    assert "data.in_memory=true: the store" in str(e.value) and "data.in_memory=false" in str(e.value)


def test_out_of_memory_in_predict_skips_the_file_and_says_what_to_change(tmp_path_factory, tmp_path, monkeypatch):
    import soundfile as sf

    from freqtag.tag.models import TaggerModel
    from freqtag.tag.predict import main

    run_dir = trained_runs(tmp_path_factory)["mel96"]
    rate = 22050
    t = np.arange(3 * rate) / rate
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    real = TaggerModel.window_probabilities
    hits = []

    def flaky(self, x):
        hits.append(1)
        if len(hits) == 1:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(self, x)

    monkeypatch.setattr(TaggerModel, "window_probabilities", flaky)
    err = io.StringIO()
    out = tmp_path / "tags.json"
    with redirect_stderr(err):
        code = main(["--ckpt", str(run_dir), str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "--device", "cpu",
                     "--format", "json", "--out", str(out), "--no-progress", "--workers", "0"])  # the patch is in this process
    assert code == 1
    assert "a.wav: out of memory: tagging on cpu did not fit" in err.getvalue()
    assert "--batch-size" in err.getvalue()
    records = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    assert "out of memory" in records["a.wav"]["error"] and "tags" not in records["a.wav"]
    assert len(records["b.wav"]["tags"]) > 0  # the rest was tagged


def test_out_of_memory_context_leaves_other_errors_alone():
    with pytest.raises(ValueError):
        with out_of_memory("x", "y"):
            raise ValueError("not memory")


def tiny_spec(tiny):
    from freqtag.features import FeatureSpec

    return FeatureSpec.load(tiny.store.stem)
