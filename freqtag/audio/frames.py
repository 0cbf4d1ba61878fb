"""How many frames a recipe gives for a signal of some length."""

from __future__ import annotations

from freqtag.features import FeatureSpec

__all__ = ["frame_count"]


def frame_count(n_samples: int, spec: FeatureSpec) -> int:
    """Frames the recipe gives for ``n_samples`` samples at its rate (centred frames)."""
    if n_samples <= 0:
        return 0
    return max(0, 1 + n_samples // spec.hop_length - int(spec.drop_first_frame))
