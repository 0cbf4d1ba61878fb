"""How many frames a recipe gives for a signal, and the refusal of a signal too short for it."""

from __future__ import annotations

from pathlib import Path

from freqtag.audio.decode import AudioError
from freqtag.features import FeatureSpec

__all__ = ["frame_count", "check_length"]


def frame_count(n_samples: int, spec: FeatureSpec) -> int:
    """Frames the recipe gives for ``n_samples`` samples at its rate (centred frames)."""
    if n_samples <= 0:
        return 0
    return max(0, 1 + n_samples // spec.hop_length - int(spec.drop_first_frame))


def check_length(path: str | Path, spec: FeatureSpec, n_samples: int, min_frames: int = 1) -> None:
    """Refuse a signal of ``n_samples`` (after the recipe's trim) that gives fewer than ``min_frames`` frames.

    Reflect padding (``mel128``) also needs more than n_fft/2 samples.
    """
    frames = frame_count(n_samples, spec)
    needed = max(1, min_frames)
    trimmed = " after trimming" if spec.trim_top_db is not None else ""
    if frames < needed:
        window = " of one input window (--min-frames)" if needed > 1 else ""
        raise AudioError(
            path,
            f"too short: {n_samples / spec.sample_rate:.2f} s{trimmed} gives {frames} frames of {spec.name}, "
            f"fewer than the {needed}{window}",
        )
    if spec.pad_mode == "reflect" and n_samples <= spec.n_fft // 2:  # reflect padding needs more than half a frame
        half = spec.n_fft // 2
        raise AudioError(path, f"too short: {n_samples} samples{trimmed}, {spec.name} needs more than {half}")
