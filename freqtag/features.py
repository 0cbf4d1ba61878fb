"""Feature recipes: the frozen spec that says how a spectrogram was made.

A spec travels with every store (as an HDF5 attribute) and every checkpoint,
so a model always knows what input it needs. The recipes themselves live in
``conf/features/*.yaml`` (installed as ``freqtag.conf``): one source of truth
for Hydra and for the command line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

__all__ = ["FeatureSpec", "available_features"]


@dataclass(frozen=True)
class FeatureSpec:
    """How a log-mel spectrogram is computed (see REFERENCE.md, Features)."""

    name: str
    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    f_min: float
    f_max: float
    n_mels: int
    mel_scale: str
    mel_norm: str | None
    power: float
    db_multiplier: float
    amin: float
    center: bool
    pad_mode: str
    trim_top_db: float | None
    drop_first_frame: bool

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        missing = fields - set(data)
        if unknown or missing:
            raise ValueError(
                f"feature spec: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                f"a spec has exactly {sorted(fields)}"
            )
        return cls(**{k: data[k] for k in fields})

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, name: str) -> "FeatureSpec":
        """The recipe ``conf/features/<name>.yaml``."""
        choices = available_features()
        if name not in choices:
            raise ValueError(f"unknown features '{name}'; valid values: {', '.join(choices)}")
        text = resources.files("freqtag.conf").joinpath("features", f"{name}.yaml").read_text()
        return cls.from_dict(yaml.safe_load(text))


def available_features() -> list[str]:
    folder = resources.files("freqtag.conf").joinpath("features")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
