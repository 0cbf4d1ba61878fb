"""Settings checked before any work: one line naming the setting and its valid values, not a traceback.

Hydra reports an unknown group option (``model=nope``) with its config search
path over a dozen lines; a setting our code refuses arrives wrapped in
Hydra's instantiation error. ``check_overrides`` looks at the command line
before Hydra composes anything, ``check_devices`` at the composed trainer.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Any, Sequence

__all__ = ["ConfigError", "check_overrides", "check_devices", "uses_gpu", "group_options", "WHERE"]

CONF = "freqtag.conf"
# override keys (prefixes) that say where or on what a run was executed, not what it is:
# left out of W&B run names and tags, and never rows of the ensemble table
WHERE = ("hydra.", "paths.", "ckpt_path", "logger", "trainer.accelerator", "trainer.devices", "data.num_workers",
         "eval_batch_frames", "async_checkpoint")


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and what would."""


def group_options() -> dict[str, list[str]]:
    """Config group -> its options, from the installed ``freqtag.conf`` package."""
    root = importlib.resources.files(CONF)
    groups: dict[str, list[str]] = {}
    for entry in root.iterdir():
        if entry.is_dir() and entry.name not in ("hydra", "__pycache__"):
            groups[entry.name] = sorted(f.name[:-5] for f in entry.iterdir() if f.name.endswith(".yaml"))
    return groups


def check_overrides(argv: Sequence[str]) -> None:
    """Refuse ``group=option`` overrides naming an option the group does not have (sweeps: each value)."""
    groups = group_options()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if group not in groups or "${" in value or value.strip() in ("", "null"):
            continue
        values = value.split(",")
        if any(v.startswith(("choice(", "range(", "glob(")) for v in values):
            continue  # Hydra's sweep functions: left to Hydra
        for v in values:
            if v.strip() not in groups[group]:
                raise ConfigError(f"{group}={v.strip()}: unknown {group}; valid values are {', '.join(groups[group])}")


def _count(devices: Any, available: int) -> int | None:
    """How many devices a ``trainer.devices`` value asks for; None when Lightning decides."""
    if devices in (None, "auto", -1, "-1"):
        return None
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if isinstance(devices, (list, tuple)):
        return max((int(d) for d in devices), default=-1) + 1  # an index list needs its highest index
    return int(devices)


def uses_gpu(accelerator: Any) -> bool:
    """Whether ``trainer.accelerator`` puts a run on CUDA GPUs (``auto``: when one is visible)."""
    import torch

    if not isinstance(accelerator, str):  # an Accelerator instance passed in code
        from lightning_fabric.accelerators import CUDAAccelerator

        return isinstance(accelerator, CUDAAccelerator)
    if accelerator == "auto":
        return torch.cuda.is_available()
    return accelerator in ("gpu", "cuda")


def check_devices(trainer_cfg: Any) -> None:
    """``trainer.devices`` against what this machine has (GPUs, or CPU cores for CPU processes)."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    gpu = uses_gpu(accelerator)
    available = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    try:
        wanted = _count(trainer_cfg.get("devices"), available)
    except (TypeError, ValueError):
        raise ConfigError(
            f"trainer.devices={trainer_cfg.get('devices')}: expected a count, a list of indices, -1 or auto"
        ) from None
    if wanted is not None and wanted < 1:
        raise ConfigError(f"trainer.devices={trainer_cfg.get('devices')}: must be at least 1 (or -1 / auto for all)")
    if gpu and available == 0:
        raise ConfigError(f"trainer.accelerator={accelerator} but no GPU is visible; use trainer.accelerator=cpu "
                          f"(or trainer=ddp_cpu for several CPU processes)")
    if wanted is not None and wanted > available:
        kind = "GPUs" if gpu else "CPU cores"
        raise ConfigError(f"trainer.devices={trainer_cfg.get('devices')} but this machine has {available} {kind}; "
                          f"valid values are 1..{available}, -1 or auto")
