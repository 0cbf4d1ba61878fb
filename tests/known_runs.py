"""Hand-built run directories whose ensemble table is known: what `freqtag ensemble` reads, and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from freqtag.data.jamendo import MOODTHEME_TAGS
from freqtag.runs import SPLITS, predictions_path, write_predictions

T = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=np.uint8)  # 4 tracks x 2 tags, 2 positives per tag
# distinct, exactly representable scores: GOOD ranks every positive first (PR-AUC = ROC-AUC = 1); BAD = 1 - GOOD
# ranks every positive last (ROC-AUC 0, PR-AUC (1/3 + 2/4) / 2 = 5/12); (GOOD + BAD) / 2 = 0.5 exactly (chance)
GOOD = np.array([[0.875, 0.25], [0.75, 0.875], [0.25, 0.75], [0.125, 0.125]], dtype=np.float32)
BAD = 1 - GOOD
# (model, loss) -> validation scores; test swaps GOOD and BAD
KNOWN_RUNS = {("convs", "bce"): GOOD, ("convs", "weighted"): GOOD, ("freq_dep", "bce"): BAD, ("freq_dep", "weighted"): GOOD}

__all__ = ["SPLITS", "T", "GOOD", "BAD", "KNOWN_RUNS", "make_run"]


def make_run(folder: Path, overrides: list[str], probs: dict[str, np.ndarray], targets: dict[str, np.ndarray],
             tags: list[str] | None = None, track_ids: dict[str, list[str]] | None = None) -> Path:  # fmt: skip
    """A run directory in the training layout, holding only what the ensemble reads."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    for split in SPLITS:
        n, c = targets[split].shape
        ids = track_ids[split] if track_ids else [f"track_{split}_{i:04d}" for i in range(n)]
        write_predictions(predictions_path(folder, split), ids, tags or list(MOODTHEME_TAGS[:c]), probs[split], targets[split])
    return folder
