"""Generated signals for the audio tests."""

from __future__ import annotations

import numpy as np


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.3, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.size)).astype(np.float32)
