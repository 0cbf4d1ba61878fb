"""The runs of an ensemble: found under sweep folders, read (overrides and predictions), selected, checked.

A run is any directory holding ``predictions/{validation,test}.npz`` and
``.hydra/overrides.yaml`` (Hydra's record of the job's command-line
overrides), wherever it was trained; only those files are read. Runs are
ensembled only when they predict the same thing: the same track ids in the
same order, the same tag list and the same targets on both splits; otherwise
the ensemble refuses and says which runs differ and how.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freqtag.runs import SPLITS, Predictions, RunFileError, predictions_path, read_predictions

__all__ = ["EnsembleError", "Run", "UNSET", "SHOWN", "find_runs", "read_overrides", "load_run", "parse_selection",
           "select_runs", "check_same_data", "value_of", "display", "is_run"]

OVERRIDES = Path(".hydra") / "overrides.yaml"
UNSET = "(default)"  # the value of a key that a run did not override
SHOWN = 5  # differing runs named in a refusal


class EnsembleError(ValueError):
    """Runs that cannot be ensembled as asked (names the runs, what is wrong and the fix)."""


@dataclass(frozen=True)
class Run:
    path: Path
    overrides: dict[str, str]  # key -> value, in the order of overrides.yaml
    predictions: dict[str, Predictions] = field(repr=False)

    @property
    def name(self) -> str:
        return display(self.path)


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _natural(path: Path) -> list[object]:
    """Sort key: sweep job folders 0, 1, ..., 10 in numeric order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def is_run(folder: Path) -> bool:
    return (folder / OVERRIDES).is_file()


def _complete(folder: Path) -> bool:
    return all(predictions_path(folder, s).is_file() for s in SPLITS)


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(complete runs, unfinished runs) under ``paths``: each a run directory or a folder of them (a sweep)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise EnsembleError(f"{p} does not exist: give sweep directories (multirun/<date>/<time>) or run directories")
        if not p.is_dir():
            raise EnsembleError(f"{p} is not a directory: give sweep directories or run directories")
        here = [p] if is_run(p) else sorted((o.parent.parent for o in p.rglob(str(OVERRIDES))), key=_natural)
        if not here:
            raise EnsembleError(
                f"{p} holds no run: a run is a directory with {OVERRIDES} and predictions/"
            )
        found.extend(here)
    unique = list(dict.fromkeys(r.resolve() for r in found))
    return [r for r in unique if _complete(r)], [r for r in unique if not _complete(r)]


def read_overrides(run: Path) -> dict[str, str]:
    """The run's overrides as key -> value, parsed with Hydra's own override grammar."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    path = run / OVERRIDES
    try:
        lines = yaml.safe_load(path.read_text()) or []
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise ValueError("not a list of KEY=VALUE strings")
        parsed = OverridesParser.create().parse_overrides(lines)
    except (yaml.YAMLError, ValueError, HydraException) as e:
        raise EnsembleError(f"{path}: not a Hydra overrides list ({str(e).splitlines()[0]})") from None
    out: dict[str, str] = {}
    for o in parsed:
        key = o.key_or_group + (f"@{o.package}" if o.package else "")
        out[key] = "(deleted)" if o.is_delete() else o.get_value_element_as_str()
    return out


def _load_split(path: Path) -> Predictions:
    try:
        return read_predictions(path)
    except RunFileError as e:
        raise EnsembleError(str(e)) from None


def load_run(path: Path) -> Run:
    return Run(
        path=path,
        overrides=read_overrides(path),
        predictions={s: _load_split(predictions_path(path, s)) for s in SPLITS},
    )


def parse_selection(text: str) -> dict[str, set[str]]:
    """``"model=freq_dep,features=mel128"`` -> {model: {freq_dep}, features: {mel128}}; a repeated key means any of its values."""
    out: dict[str, set[str]] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise EnsembleError(f"selection {text!r}: {part!r} is not KEY=VALUE (e.g. model=freq_dep,features=mel128)")
        out.setdefault(key.strip(), set()).add(value.strip())
    if not out:
        raise EnsembleError(f"selection {text!r} is empty: give KEY=VALUE,... (e.g. model=freq_dep)")
    return out


def value_of(run: Run, key: str) -> str:
    return run.overrides.get(key, UNSET)


def select_runs(runs: Sequence[Run], selection: dict[str, set[str]], what: str = "--select") -> list[Run]:
    """The runs whose overrides match every KEY of ``selection`` with one of its values; refuses a selection matching none."""
    for key, values in selection.items():
        present = sorted({value_of(r, key) for r in runs})
        if all(v == UNSET for v in present):
            keys = sorted({k for r in runs for k in r.overrides})
            raise EnsembleError(f"{what}: no run overrides {key!r}; their override keys are: {', '.join(keys) or 'none'}")
        unknown = sorted(values - set(present))
        if unknown:
            raise EnsembleError(f"{what}: no run has {key}={'/'.join(unknown)}; the runs have {key}={', '.join(present)}")
    chosen = [r for r in runs if all(value_of(r, k) in v for k, v in selection.items())]
    if not chosen:
        wanted = ",".join(f"{k}={v}" for k, vs in selection.items() for v in sorted(vs))
        raise EnsembleError(f"{what} {wanted}: no run has all of these values together")
    return chosen


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"{a.shape[0]} vs {b.shape[0]} rows"
    rows = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))
    return f"{rows.size} rows differ, first row {rows[0]}"


def check_same_data(runs: Sequence[Run]) -> None:
    """Refuse runs whose track ids, tag lists or targets differ from the first run's, on either split."""
    ref = runs[0]
    problems: list[str] = []
    for run in runs[1:]:
        diffs = []
        for split in SPLITS:
            a, b = ref.predictions[split], run.predictions[split]
            for what, x, y in (("track ids", a.track_ids, b.track_ids), ("tag list", a.tags, b.tags),
                               ("targets", a.targets, b.targets)):  # fmt: skip
                if x.shape != y.shape or not np.array_equal(x, y):
                    diffs.append(f"{split} {what} ({_first_difference(y, x)})")
                    break  # the first difference of a split says enough
        if diffs:
            problems.append(f"{run.name} vs {ref.name}: {'; '.join(diffs)}")
    if problems:
        more = f"; and {len(problems) - SHOWN} more runs" if len(problems) > SHOWN else ""
        raise EnsembleError(
            f"cannot ensemble runs that predict different data: {' | '.join(problems[:SHOWN])}{more}. "
            f"Ensemble only runs made with the same split files and tag list (data.splits_dir, data.tags_file), "
            f"or leave the odd runs out"
        )
