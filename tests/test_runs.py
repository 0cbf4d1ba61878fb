"""The run directory's formats (freqtag.runs): a final.ckpt written before the layout still tags as it did."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLIPS

from freqtag import runs
from freqtag.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "pre_layout_run"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """The run directory written by freqtag before its modules moved (see fixtures/pre_layout_run/make.py)."""
    run = tmp_path / "pre_layout_run"
    (run / "checkpoints").mkdir(parents=True)
    with gzip.open(FIXTURE / "checkpoints" / "final.ckpt.gz") as src, open(run / "checkpoints" / "final.ckpt", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(FIXTURE / "checkpoints" / "thresholds.tsv", run / "checkpoints")
    return run


def test_a_final_ckpt_from_before_the_layout_tags_as_it_did(old_run, tmp_path, capsys):
    clips = [CLIPS / "house_lo.mp3", CLIPS / "vibe_ace.ogg"]
    if not all(c.is_file() for c in clips):
        pytest.skip(f"the shared clips are not at {CLIPS}")
    expected = json.loads((FIXTURE / "expected.json").read_text())["probabilities"]
    out = tmp_path / "tags.json"
    code = main(["predict", "--ckpt", str(old_run), *map(str, clips), "--format", "json", "--workers", "0",
                 "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    got = {Path(r["path"]).name: r["tags"] for r in json.loads(out.read_text())}
    assert sorted(got) == sorted(expected)
    for name, tags in expected.items():
        assert list(got[name]) == list(tags)
        np.testing.assert_allclose([got[name][t] for t in tags], list(tags.values()), rtol=0, atol=1e-6)


def test_final_ckpt_keys_are_checked_on_both_sides(old_run, tmp_path):
    data = runs.read_final(runs.final_path(old_run))
    assert set(runs.REQUIRED_KEYS) <= set(data) and set(runs.FINAL_KEYS) <= set(data)
    with pytest.raises(ValueError, match=r"\['freqtag_version'\] missing"):
        runs.write_final(tmp_path / "x.ckpt", {k: v for k, v in data.items() if k != "freqtag_version"})
    assert not (tmp_path / "x.ckpt").exists()
    torch.save({"epoch": 3, "state_dict": {}}, tmp_path / "last.ckpt")  # a Lightning checkpoint, not a final one
    with pytest.raises(runs.RunFileError, match=r"last\.ckpt: not a freqtag final checkpoint .*not last\.ckpt"):
        runs.read_final(tmp_path / "last.ckpt")


def test_predictions_round_trip_and_refuse_a_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    probs, targets = rng.random((5, 3)), (rng.random((5, 3)) > 0.5)
    path = runs.predictions_path(tmp_path, "test")
    runs.write_predictions(path, ["1", "2", "3", "4", "5"], ["a", "b", "c"], probs, targets)
    p = runs.read_predictions(path)
    assert p.probs.dtype == np.float32 and p.targets.dtype == np.uint8 and list(p.tags) == ["a", "b", "c"]
    np.testing.assert_array_equal(p.probs, probs.astype(np.float32))
    np.testing.assert_array_equal(p.targets, targets)
    runs.write_predictions(path, ["1", "2"], ["a", "b", "c"], probs, targets)
    with pytest.raises(runs.RunFileError, match=r"test\.npz: probs \(5, 3\) .* do not match 2 track ids x 3 tags"):
        runs.read_predictions(path)


def test_thresholds_keep_full_precision_and_name_what_is_missing(tmp_path):
    path = tmp_path / "thresholds.tsv"
    values = np.array([0.1 + 1e-12, 0.7, 1 / 3])
    runs.write_thresholds(path, ["a", "b", "c"], values)
    np.testing.assert_array_equal(runs.read_thresholds(path, ["c", "a", "b"]), values[[2, 0, 1]])
    assert runs.read_thresholds(path, ["b"], exact=False).tolist() == [0.7]  # a checkpoint's file may cover more
    with pytest.raises(runs.RunFileError, match="lists 3 tags that are not the 1 tags"):
        runs.read_thresholds(path, ["b"])
    with pytest.raises(runs.RunFileError, match=r"no threshold for 1 tags of the checkpoint \(e\.g\. d\)"):
        runs.read_thresholds(path, ["a", "d"], exact=False)
    path.write_text("a\t0.5\nb 0.5\n")
    with pytest.raises(runs.RunFileError, match=r"thresholds\.tsv:2: expected 'tag<TAB>threshold'"):
        runs.read_thresholds(path)
