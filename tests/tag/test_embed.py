"""freqtag embed: a layer's activations per track equal a forward hook on the whole track, chunked or not.

On the shared real clips (../shared/data/audio, skipped when absent) with the
tiny models of tests/tagging_models.py (trained on synthetic data: the
warning is checked too).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLIPS as CLIPS_DIR
from tagging_models import trained_runs

from freqtag.audio.whole import features_from_file
from freqtag.cli import main as freqtag_main
from freqtag.tag.models import LAYERS, load_model
from freqtag.tag.predict import tag_file

CLIPS = [CLIPS_DIR / "vibe_ace.ogg", CLIPS_DIR / "house_lo.mp3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return trained_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def clips() -> list[Path]:
    missing = [c for c in CLIPS if not c.is_file()]
    if missing:
        pytest.skip(f"the shared clips are absent ({missing[0]})")
    return CLIPS


def hooked(model, path: Path, layer: str) -> np.ndarray:
    """The reference: whole-file features, the whole track in one forward pass, a hook on the layer: (W, D)."""
    got = []
    module = getattr(model.net, LAYERS[layer])
    handle = module.register_forward_hook(lambda _m, _i, out: got.append(out))
    try:
        with torch.no_grad():
            model.net(model.normalise(features_from_file(path, model.spec)))
    finally:
        handle.remove()
    return got[0][0].T.numpy()


def embed(capsys, *args: str) -> tuple[int, dict[str, np.ndarray], str]:
    code = freqtag_main(["embed", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err
    out = next((a for a in args if str(a).endswith(".npz")), None)
    arrays = dict(np.load(out)) if out is not None and Path(out).is_file() else {}
    return code, arrays, err


def test_fc_embeddings_equal_a_forward_hook(runs, clips, tmp_path, capsys):
    model = load_model(runs["mel96"])
    out = tmp_path / "emb.npz"
    code, z, err = embed(capsys, "--ckpt", runs["mel96"], *clips, "--out", out, "--windows", "--workers", "0")
    assert code == 0
    assert err.count("trained on freqtag's synthetic demo data") == 1
    assert list(z["paths"]) == [str(c) for c in clips] and z["embeddings"].shape == (2, 1024)
    assert z["embeddings"].dtype == np.float32
    ckpt = runs["mel96"] / "checkpoints" / "final.ckpt"
    assert str(z["checkpoint"]) == str(runs["mel96"]) and str(z["layer"]) == "fc"
    assert str(z["sha256"]) == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (str(z["features"]), int(z["n_tags"]), str(z["dataset"])) == ("mel96", 56, "synthetic")
    off = z["window_offsets"]
    for i, clip in enumerate(clips):
        ref = hooked(model, clip, "fc")
        win = z["window_embeddings"][off[i] : off[i + 1]]
        assert win.shape == ref.shape and ref.shape[0] > 5
        np.testing.assert_allclose(win, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(z["embeddings"][i], ref.mean(axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(z["window_start_s"][off[i] : off[i + 1]], np.arange(len(ref)) * model.window_s)
        small = tag_file(clip, [model], chunk_windows=2, layer="fc").windows[0]  # 2 windows a pass, context each side
        np.testing.assert_allclose(small, ref, rtol=1e-4, atol=1e-4)


def test_collapse_layer_workers_and_determinism(runs, clips, tmp_path, capsys):
    model = load_model(runs["mel128"])
    outs = []
    for name, workers in (("a", "0"), ("b", "0"), ("c", "2")):
        code, z, _ = embed(capsys, "--ckpt", runs["mel128"], *clips, "--out", tmp_path / f"{name}.npz",
                           "--layer", "collapse", "--workers", workers)
        assert code == 0 and z["embeddings"].shape == (2, 512) and "window_embeddings" not in z
        outs.append(z["embeddings"])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])  # bit for bit
    for i, clip in enumerate(clips):
        np.testing.assert_allclose(outs[0][i], hooked(model, clip, "collapse").mean(axis=0), rtol=1e-4, atol=1e-4)


def test_failed_inputs_and_usage(runs, clips, tmp_path, capsys):
    bad = tmp_path / "bad.ogg"
    bad.write_bytes(b"OggS" + bytes(3000))
    out = tmp_path / "e.npz"
    code, z, err = embed(capsys, "--ckpt", runs["mel96"], clips[1], bad, tmp_path / "gone.mp3", "--out", out)
    assert code == 1 and list(z["paths"]) == [str(clips[1])]
    assert list(z["failed_paths"]) == [str(tmp_path / "gone.mp3"), str(bad)]
    assert "corrupt or not audio" in z["failed_reasons"][1] and "1 files embedded, 2 failed" in err
    code, _, err = embed(capsys, "--ckpt", runs["mel96"], clips[1], "--out", tmp_path / "e.txt")
    assert code == 2 and "--out" in err and ".npz" in err
    code, _, err = embed(capsys, "--ckpt", runs["mel96"], clips[1], "--out", out, "--workers", "-1")
    assert code == 2 and "--workers -1" in err
