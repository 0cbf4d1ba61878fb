"""The run directory's files, each written and read here only: final.ckpt, thresholds.tsv, predictions/<split>.npz.

Training writes a run directory; the ensemble, the MediaEval submission,
``evaluate``, tagging, export and the Hub folder read it, so each format has
this one owner::

    checkpoints/final.ckpt           FINAL_KEYS: the SWA network and what tagging needs (weights_only: data, no code)
    checkpoints/thresholds.tsv       tag<TAB>threshold, tag-list order, full precision
    checkpoints/last.ckpt            Lightning's resumable checkpoint (train/checkpoints.py)
    predictions/{validation,test}.npz  track_ids (str N), tags (str C), probs (float32 N x C), targets (uint8 N x C)
    metrics.json

Readers raise :class:`RunFileError` naming the file and what was expected;
each command turns it into its own one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from freqtag.system.atomic import atomic_path, atomic_save, atomic_write_text

__all__ = [
    "SPLITS", "REQUIRED_KEYS", "FINAL_KEYS", "RunFileError", "Predictions",
    "final_path", "thresholds_path", "predictions_path", "run_dir_of",
    "write_final", "read_final", "write_predictions", "read_predictions",
    "format_thresholds", "write_thresholds", "read_thresholds",
]  # fmt: skip

SPLITS = ("validation", "test")
#: What tagging needs from final.ckpt; checkpoints written before ``data`` / ``freqtag_version`` existed load too.
REQUIRED_KEYS = ("state_dict", "model", "features", "tags", "input_length", "mean", "std")
#: Everything training writes into final.ckpt (``data``: what the model was trained on, see DataModule.dataset_info).
FINAL_KEYS = (*REQUIRED_KEYS, "data", "freqtag_version")
_NOT_FINAL = "pass a run directory or its checkpoints/final.ckpt (not last.ckpt)"


class RunFileError(ValueError):
    """A run-directory file that is missing or not in its format (names the file and what was expected)."""


@dataclass(frozen=True)
class Predictions:
    """One split's predictions file: rows in split-TSV order, columns in tag-list order."""

    track_ids: np.ndarray  # str (N,)
    tags: np.ndarray  # str (C,)
    probs: np.ndarray  # float32 (N, C)
    targets: np.ndarray  # uint8 (N, C)


def final_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "final.ckpt"


def thresholds_path(final_ckpt: str | Path) -> Path:
    """thresholds.tsv beside a final.ckpt."""
    return Path(final_ckpt).with_name("thresholds.tsv")


def predictions_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / "predictions" / f"{split}.npz"


def run_dir_of(final_ckpt: str | Path) -> Path | None:
    """The run directory holding ``checkpoints/final.ckpt``; None for a checkpoint kept elsewhere."""
    p = Path(final_ckpt)
    return p.parent.parent if p.parent.name == "checkpoints" else None


def write_final(path: str | Path, checkpoint: dict[str, Any]) -> None:
    missing = [k for k in FINAL_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"final checkpoint {path}: {missing} missing (FINAL_KEYS)")
    atomic_save(checkpoint, path)


def read_final(path: str | Path) -> dict[str, Any]:
    """A final.ckpt's contents, loaded with ``weights_only=True``: tensors and plain data, never code."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a final checkpoint"
        first = str(e).splitlines()[0] if str(e) else ""
        raise RunFileError(f"{path}: not a freqtag final checkpoint ({type(e).__name__}: {first}); {_NOT_FINAL}") from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise RunFileError(
            f"{path}: not a freqtag final checkpoint (needs {', '.join(REQUIRED_KEYS)}; has {have}); {_NOT_FINAL}"
        )
    return data


def write_predictions(
    path: str | Path, track_ids: Sequence[str], tags: Sequence[str], probs: np.ndarray, targets: np.ndarray
) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            track_ids=np.array(track_ids, dtype=str),
            tags=np.array(tags, dtype=str),
            probs=probs.astype(np.float32),
            targets=targets.astype(np.uint8),
        )


def read_predictions(path: str | Path) -> Predictions:
    """A predictions .npz, its four arrays checked against one another."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"predictions file {path} does not exist (a run's predictions/<split>.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            p = Predictions(track_ids=z["track_ids"], tags=z["tags"], probs=z["probs"], targets=z["targets"])
    except (OSError, ValueError, KeyError) as e:
        raise RunFileError(f"{path}: not a predictions file with track_ids, tags, probs, targets ({e})") from None
    n, c = len(p.track_ids), len(p.tags)
    if p.probs.shape != (n, c) or p.targets.shape != (n, c):
        raise RunFileError(f"{path}: probs {p.probs.shape} and targets {p.targets.shape} do not match {n} track ids x {c} tags")
    if not np.issubdtype(p.probs.dtype, np.floating):
        raise RunFileError(f"{path}: probs must be a float (tracks x tags) matrix, got {p.probs.dtype}")
    return p


def format_thresholds(tags: Sequence[str], thresholds: np.ndarray) -> str:
    """``tag<TAB>threshold`` lines at full precision.

    A threshold is one of the scores; rounded, it could rise above that score
    and ``probs >= threshold`` would no longer give the written decisions.
    """
    return "".join(f"{t}\t{float(th)!r}\n" for t, th in zip(tags, thresholds))


def write_thresholds(path: str | Path, tags: Sequence[str], thresholds: np.ndarray) -> None:
    atomic_write_text(path, format_thresholds(tags, thresholds))


def read_thresholds(path: str | Path, tags: Sequence[str] | None = None, *, exact: bool = True) -> np.ndarray:
    """Per-tag thresholds (float64) from a ``tag<TAB>threshold`` file, in ``tags`` order when given.

    ``exact``: the file must list exactly ``tags`` (a submission's thresholds);
    otherwise it only has to cover them (a checkpoint's thresholds.tsv).
    """
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"thresholds file {path} does not exist (a run's checkpoints/thresholds.tsv)")
    names: list[str] = []
    values: list[float] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        try:
            if len(cols) != 2:
                raise ValueError
            values.append(float(cols[1]))
        except ValueError:
            raise RunFileError(f"{path}:{lineno}: expected 'tag<TAB>threshold', got {line!r}") from None
        names.append(cols[0])
    if tags is None:
        return np.asarray(values, dtype=np.float64)
    by_name = dict(zip(names, values))
    missing = [t for t in tags if t not in by_name]
    if exact and sorted(names) != sorted(tags):
        extra = sorted(set(names) - set(tags))[:3]
        raise RunFileError(
            f"{path} lists {len(names)} tags that are not the {len(tags)} tags of the predictions "
            f"(missing e.g. {missing[:3]}, unknown e.g. {extra}): use the thresholds of the same tag list"
        )
    if missing:
        raise RunFileError(f"{path}: no threshold for {len(missing)} tags of the checkpoint (e.g. {missing[0]})")
    return np.asarray([by_name[t] for t in tags], dtype=np.float64)
