"""freqtag export: TorchScript and ONNX (run with onnxruntime) give the PyTorch model's window probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from tagging_models import trained_runs

from freqtag.audio.whole import features_from_file
from freqtag.model import FreqTagNet
from freqtag.tag.export import export_checkpoint
from freqtag.tag.models import load_model
from freqtag.tag.predict import tag_file


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return trained_runs(tmp_path_factory)


def reference(model, mel: torch.Tensor) -> np.ndarray:
    """The PyTorch model on raw features: normalise as the DataModule does, sigmoid per window."""
    return model.window_probabilities((mel - model.mean) / model.std).numpy()


def raw_input(model, batch: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.spec.n_mels, frames, generator=g) * model.std + model.mean


def check_sidecar(side: Path, model, fmt: str) -> dict:
    meta = json.loads(side.read_text())
    assert meta["format"] == fmt and meta["tags"] == model.tags and meta["features"] == model.spec.to_dict()
    assert (meta["mean"], meta["std"], meta["input_length"]) == (model.mean, model.std, model.input_length)
    assert meta["input"]["kind"].startswith("raw log-mel")
    return meta


@pytest.mark.parametrize("features", ["mel96", "mel128"])
def test_torchscript_equals_pytorch(runs, tmp_path, features):
    model = load_model(runs[features])
    out, side = export_checkpoint(runs[features], "torchscript", tmp_path / "m.pt")
    check_sidecar(side, model, "torchscript")
    ts = torch.jit.load(str(out))
    for frames in (5, model.input_length, 3 * model.input_length + 7, 701):  # shorter than a window: padded
        mel = raw_input(model, 2, frames, frames)
        got = ts(mel).detach().numpy()
        want = reference(model, mel)
        assert got.shape == want.shape == (2, model.net.n_windows(frames), 56)
        np.testing.assert_allclose(got, want, atol=1e-5)
    extra = {"freqtag.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["freqtag.json"])["tags"] == model.tags


@pytest.mark.parametrize("features", ["mel96", "mel128"])
def test_onnx_equals_pytorch(runs, tmp_path, features):
    model = load_model(runs[features])
    out, side = export_checkpoint(runs[features], "onnx", tmp_path / "m.onnx")
    meta = check_sidecar(side, model, "onnx")
    assert meta["input"]["min_frames"] == model.input_length
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert json.loads({p.key: p.value for p in proto.metadata_props}["freqtag"]) == meta
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, frames in ((1, model.input_length), (3, 2 * model.input_length + 9), (2, 701)):
        mel = raw_input(model, batch, frames, frames)
        (got,) = session.run(None, {"mel": mel.numpy()})
        want = reference(model, mel)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_exported_model_tags_audio_like_predict(runs, tmp_path):
    """Recipe features of a file -> the exported model -> mean over windows = predict's probabilities."""
    wav = tmp_path / "x.wav"
    t = np.arange(12 * 22050) / 22050
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 330 * t) * np.sin(2 * np.pi * 0.5 * t)).astype(np.float32), 22050)
    model = load_model(runs["mel128"])
    out, _ = export_checkpoint(runs["mel128"], "torchscript", tmp_path / "m.pt")
    mel = torch.from_numpy(features_from_file(wav, model.spec).T.copy())[None]
    got = torch.jit.load(str(out))(mel)[0].mean(dim=0).detach().numpy()
    np.testing.assert_allclose(got, tag_file(wav, [model]).probs, atol=1e-5)


@pytest.mark.slow
def test_freq_dep_model_exports(tmp_path):
    """The frequency-dependent layers (one conv per band) export too; untrained weights suffice here."""
    from freqtag.features import FeatureSpec

    torch.manual_seed(0)
    net = FreqTagNet(96, 64, filters="freq_dep").eval()
    ckpt = tmp_path / "final.ckpt"
    torch.save({"state_dict": net.state_dict(), "features": FeatureSpec.load("mel96").to_dict(), "tags": [f"t{i}" for i in range(56)],
                "model": {"_target_": "freqtag.model.FreqTagNet", "n_mels": 96, "input_length": 64, "n_tags": 56,
                          "filters": "freq_dep"}, "input_length": 64, "mean": -20.0, "std": 15.0}, ckpt)
    model = load_model(ckpt)
    mel = raw_input(model, 2, 300, 0)
    want = reference(model, mel)
    ts, _ = export_checkpoint(ckpt, "torchscript", tmp_path / "m.pt")
    np.testing.assert_allclose(torch.jit.load(str(ts))(mel).detach().numpy(), want, atol=1e-5)
    ox, _ = export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx")
    (got,) = ort.InferenceSession(str(ox), providers=["CPUExecutionProvider"]).run(None, {"mel": mel.numpy()})
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_command_line(runs, tmp_path):
    freqtag = str(Path(sys.executable).parent / "freqtag")
    res = subprocess.run([freqtag, "export", "--ckpt", str(runs["mel96"]), "--format", "torchscript",
                          "--out", str(tmp_path / "a" / "m.pt")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "a" / "m.pt").is_file() and (tmp_path / "a" / "m.pt.json").is_file()
    assert not list((tmp_path / "a").glob(".*"))
    res = subprocess.run([freqtag, "export", "--ckpt", str(tmp_path / "nope"), "--format", "onnx",
                          "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr
