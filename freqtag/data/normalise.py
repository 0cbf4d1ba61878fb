"""The normalisation ``(x - mean) / std`` of a store's features, as the network sees them.

Training, evaluation and tagging all call :func:`normalise`, so a model sees
the same float32 values whichever path fed it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["normalise"]


def normalise(
    x: torch.Tensor | np.ndarray,
    mean: float,
    std: float,
    valid: torch.Tensor | np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, bands, T) float16/float32 features -> float32 ``(x - mean) / std`` on ``device`` (default: ``x``'s).

    ``valid`` (B,): frames at or past ``valid[b]`` of track b are set to 0 (a
    crop or padded batch shorter than its window). The input is already
    band-major: the transposition is done where it is cheap (in the loader's
    workers, or once when the in-memory frames are loaded), so this is one
    converting copy and two in-place passes. Frames past ``valid`` are zeroed
    by one mask over the batch, built on the output's device: no host decision
    per crop, so no copy of ``valid`` to the host (a sync per step on a GPU)
    and one kernel whatever the number of short crops.
    """
    x = torch.as_tensor(x)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device if device is None else device)
    out.copy_(x)
    out.sub_(mean).div_(std)
    if valid is not None:
        valid = torch.as_tensor(valid, device=out.device)
        past = torch.arange(x.shape[-1], device=out.device) >= valid[:, None]
        out.masked_fill_(past[:, None, :], 0.0)
    return out
