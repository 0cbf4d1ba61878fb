"""Bad settings stop `python train.py` at once with one line naming the setting and what is valid."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

from freqtag.train.overrides import ConfigError, check_devices, check_overrides, group_options


@pytest.mark.parametrize(
    ("override", "code", "says"),
    [
        ("model=nope", 2, "model=nope: unknown model; valid values are convs, freq_dep"),
        ("loss=bce,nope", 2, "loss=nope: unknown loss; valid values are bce, focal, weighted"),
        ("features=mel64", 2, "valid values are mel128, mel96"),
        ("data.input_length=100", 1, "data.input_length=100: must be a positive multiple of 32"),
        ("data.input_length=0", 1, "data.input_length=0: must be a positive multiple of 32"),
        (f"trainer.devices={(os.cpu_count() or 1) + 1}", 2, "valid values are 1.."),
    ],
)
def test_train_refuses_in_one_line(override, code, says, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "experiment=demo", override,
                          f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == code, res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr  # one line, no traceback
    assert says in res.stderr
    assert not (tmp_path / "data").exists()  # refused before any work (the demo data is not even made)


def test_group_options_are_the_yaml_files():
    options = group_options()
    assert options["model"] == ["convs", "freq_dep"] and options["features"] == ["mel128", "mel96"]
    assert "hydra" not in options


def test_sweeps_and_other_keys_pass():
    check_overrides(["-m", "model=convs,freq_dep", "loss=choice(bce,focal)", "data.input_length=128", "+x=1"])
    with pytest.raises(ConfigError, match="experiment=pape: unknown experiment"):
        check_overrides(["experiment=pape"])


@pytest.mark.parametrize("devices", [1, "1", -1, "auto", None, [0]])
def test_devices_within_the_machine(devices):
    check_devices({"accelerator": "cpu", "devices": devices})


@pytest.mark.parametrize(("devices", "says"), [(0, "at least 1"), ([0, 4096], "4096"), ("two", "expected a count")])
def test_devices_refused(devices, says):
    with pytest.raises(ConfigError, match=says):
        check_devices({"accelerator": "cpu", "devices": devices})
