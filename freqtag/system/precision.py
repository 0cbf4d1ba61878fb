"""Float32 arithmetic on the GPU, chosen explicitly: IEEE or TF32, and one precision for evaluation.

torch 2.11 runs cuDNN convolutions in TF32 by default (10-bit mantissa) while
matmuls stay IEEE, so a network on a GPU disagrees with the CPU by ~1e-3
unless this is set. ``fp32_precision`` (train config, ``predict
--fp32-precision``) sets both: ``ieee`` (the default) agrees with the CPU to
1e-5; ``tf32`` is faster for float32 training and agrees to ~2e-3. Under
16-mixed/bf16-mixed training the convolutions run in half precision anyway.

Only the new per-backend API is used for cuDNN, and ``set_float32_matmul_precision``
for matmuls: mixing torch's legacy and new TF32 switches makes its getters raise
(Lightning calls ``get_float32_matmul_precision`` when it sets up a GPU).

Whole-track evaluation (training's final scores, ``predict``, ``embed``) always
runs in float32 with IEEE arithmetic, whatever the training precision, so a
GPU-trained run's ``predictions/*.npz`` and ``thresholds.tsv`` agree with
``predict`` to 1e-5.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["FP32_PRECISIONS", "set_fp32_precision", "fp32_precision", "device_tolerance", "evaluation_precision"]

FP32_PRECISIONS = ("ieee", "tf32")

# absolute tolerance on probabilities (and a batch's loss) when a device is compared with the CPU
_TOLERANCE = {"ieee": 1e-5, "tf32": 2e-3}
_MATMUL = {"ieee": "highest", "tf32": "high"}


def _check(mode: str) -> str:
    if mode not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision={mode!r}: valid values are {', '.join(FP32_PRECISIONS)}")
    return mode


def set_fp32_precision(mode: str) -> None:
    """cuDNN convolutions and matmuls in float32: ``ieee`` (exact) or ``tf32`` (tensor cores)."""
    _check(mode)
    torch.backends.cudnn.conv.fp32_precision = mode
    torch.set_float32_matmul_precision(_MATMUL[mode])


def fp32_precision() -> str:
    """The mode in force: ``tf32`` if either convolutions or matmuls use TF32, else ``ieee``."""
    conv = torch.backends.cudnn.conv.fp32_precision
    return "tf32" if conv == "tf32" or torch.get_float32_matmul_precision() != "highest" else "ieee"


def device_tolerance(mode: str) -> float:
    """Absolute tolerance for comparing a GPU's float32 outputs with the CPU's under ``mode``."""
    return _TOLERANCE[_check(mode)]


@contextmanager
def evaluation_precision(device: torch.device | str) -> Iterator[None]:
    """Float32, IEEE, no autocast: the one precision of every whole-track evaluation.

    Restores the caller's settings afterwards, so evaluating inside a
    mixed-precision training process changes nothing for the training.
    """
    device_type = torch.device(device).type
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision()
    set_fp32_precision("ieee")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.set_float32_matmul_precision(matmul)
