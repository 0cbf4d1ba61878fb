"""The normalisation ``(x - mean) / std`` of the store's features, as the network sees them."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["normalised"]


def normalised(x16: torch.Tensor, valid: torch.Tensor | np.ndarray | None, mean: float, std: float) -> torch.Tensor:
    """(B, bands, L) float16 crops -> (B, bands, L) float32 ``(x - mean) / std``, frames past ``valid`` set to 0.

    The input is already band-major: the transposition is done where it is
    cheap (in the loader's workers, or once when the in-memory frames are
    loaded), so this is one converting copy and two in-place passes. Frames
    past ``valid`` are zeroed by one mask over the batch, built on the crops'
    device: no host decision per crop, so no copy of ``valid`` to the host
    (a sync per step on a GPU) and one kernel whatever the number of short crops.
    """
    out = torch.empty(x16.shape, dtype=torch.float32, device=x16.device)
    out.copy_(x16)
    out.sub_(mean).div_(std)
    if valid is not None:
        if isinstance(valid, np.ndarray):
            valid = torch.as_tensor(valid, device=x16.device)
        past = torch.arange(x16.shape[-1], device=x16.device) >= valid[:, None]
        out.masked_fill_(past[:, None, :], 0.0)
    return out
