"""Shared fixtures: the real MTG-Jamendo metadata (read in place, never copied) and the tiny run's config."""

from pathlib import Path
from typing import Callable

import pytest
from helpers import SHARED, compose_tiny
from omegaconf import DictConfig

SHARED_DATA = SHARED / "mtg-jamendo"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with moodtheme_split.txt and split-0/; tests that need it skip without it."""
    if not (SHARED_DATA / "split-0").is_dir() or not (SHARED_DATA / "moodtheme_split.txt").is_file():
        pytest.skip(f"MTG-Jamendo metadata not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., DictConfig]:
    """``tiny_config(out, *overrides, data_dir=None)``: the composed config of the tiny run (helpers.TINY_RUN)."""
    return compose_tiny
