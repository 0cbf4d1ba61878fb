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

__all__ = ["FeatureSpec", "available_features", "RESAMPLERS", "WINDOWS", "LEGACY_DEFAULTS", "DROPPED"]

# How a file is brought to the recipe's rate (freqtag.audio.resample.resample): "sinc" is torchaudio's band-limited
# resampler; "linear" is libsamplerate's SRC_LINEAR as Essentia's MonoLoader(resampleQuality=4) runs it,
# no anti-aliasing filter, so energy above the new Nyquist folds into the top bands as in MTG's files.
RESAMPLERS = ("sinc", "linear")
# The analysis window: "hann_periodic" is torch.hann_window's default (torchaudio's MelSpectrogram);
# "hann_symmetric" (zero at both ends) is Essentia's Windowing(type="hann"), MTG's script.
WINDOWS = ("hann_periodic", "hann_symmetric")
# Fields added after stores and checkpoints were first written. A spec saved without them was made by a
# freqtag that always resampled with sinc and used the periodic window, so that is what it reads as: an old
# mel128 spec still equals mel128, an old mel96 spec (sinc, periodic) does not equal today's mel96.
LEGACY_DEFAULTS: dict[str, Any] = {"resample": "sinc", "window": "hann_periodic"}
# Fields removed since: a spec saved with them (in a store or a final.ckpt) still reads, without them. "center"
# was never read: the transform always centres its frames (pads half a window at both ends).
DROPPED = ("center",)


@dataclass(frozen=True)
class FeatureSpec:
    """How a log-mel spectrogram is computed: every parameter, so equal specs give equal features."""

    name: str
    sample_rate: int
    resample: str
    n_fft: int
    win_length: int
    window: str
    hop_length: int
    f_min: float
    f_max: float
    n_mels: int
    mel_scale: str
    mel_norm: str | None
    power: float
    db_multiplier: float
    amin: float
    pad_mode: str
    trim_top_db: float | None
    drop_first_frame: bool

    def __post_init__(self) -> None:
        for key, allowed in (("resample", RESAMPLERS), ("window", WINDOWS)):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"feature spec '{self.name}': {key}={getattr(self, key)!r}; valid values: {', '.join(allowed)}"
                )

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def differences(self, other: "FeatureSpec") -> list[str]:
        """``key: ours != theirs`` for each field that differs: for messages about two recipes of the same name."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        """The spec of a recipe file, store or checkpoint: a field added since gets LEGACY_DEFAULTS, one dropped goes."""
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in data}, **data}
        data = {k: v for k, v in data.items() if k not in DROPPED}
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
