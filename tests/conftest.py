"""Shared test fixtures: where the real MTG-Jamendo metadata lives (never copied into the repo)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data" / "mtg-jamendo"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with moodtheme_split.txt and split-0/; tests that need it skip without it."""
    if not (SHARED_DATA / "split-0").is_dir() or not (SHARED_DATA / "moodtheme_split.txt").is_file():
        pytest.skip(f"MTG-Jamendo metadata not found at {SHARED_DATA}")
    return SHARED_DATA
