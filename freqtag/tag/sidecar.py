"""The JSON written beside an exported model (``freqtag export``, the Hub folder): what a user needs besides the file.

Its own module because both exports write it: the TorchScript/ONNX export
and the Hub folder of :mod:`freqtag.tag.modelcard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["sidecar"]


def sidecar(model: Any, fmt: str, file: Path) -> dict[str, Any]:
    """Everything a user of the exported file needs besides the file itself."""
    from freqtag import __version__

    return {
        "format": fmt,
        "file": file.name,
        "checkpoint": model.source or str(model.path),
        "input": {
            "name": "mel",
            "shape": ["batch", model.spec.n_mels, "frames"],
            "dtype": "float32",
            "kind": "raw log-mel features of the recipe in 'features' (NOT normalised: the model normalises)",
            "min_frames": model.input_length if fmt == "onnx" else 1,
        },
        "output": {
            "name": "probabilities",
            "shape": ["batch", "windows", len(model.tags)],
            "kind": "sigmoid probability per window of input_length frames; average over windows for a track",
            "windows": "ceil(max(frames, input_length) / 32) // (input_length / 32)",
        },
        "features": model.spec.to_dict(),
        "tags": list(model.tags),
        "input_length": model.input_length,
        "window_s": model.window_s,
        "mean": model.mean,
        "std": model.std,
        "model": model.info.get("model"),
        "freqtag_version": __version__,
    }
