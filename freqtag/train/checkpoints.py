"""last.ckpt: written atomically (in the background with ``async_checkpoint``), and checked before a resume."""

from __future__ import annotations

import io
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from freqtag.data.datamodule import JamendoDataModule
from freqtag.features import FeatureSpec
from freqtag.system.atomic import atomic_save, atomic_save_bytes
from freqtag.train.overrides import ConfigError

__all__ = ["AtomicCheckpointIO", "ResumeError", "check_resume", "run_info", "check_async_checkpoint"]


class ResumeError(ValueError):
    """``ckpt_path`` names a checkpoint this run cannot continue (missing, damaged, other tags, features or
    ``trainer.max_epochs``)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (last.ckpt) written through ``atomic_save``, carrying what the run was trained on.

    ``run_info`` (tags, feature recipe, input length, max_epochs) is stored under
    the ``freqtag`` key, so a resume with other tags, features or max_epochs is refused
    before training (:func:`check_resume`) instead of loading silently.

    ``async_checkpoint``: the step loop does not wait for the disk. The
    checkpoint is serialised by ``torch.save`` into host memory on the calling
    thread (a snapshot: the bytes a synchronous save would write, taken before
    the next step changes a weight), and a background thread writes them
    atomically (temporary name, fsync, rename). One write at a time: the next
    save, a load or a removal waits for the one in flight, and so does the end
    of fit (``teardown``) or a failure. A failed write (disk full: the same
    one-line :class:`DiskFullError`) is raised by the next of these; when the
    run is already failing for another reason it is only warned about.
    Lightning's own ``AsyncCheckpointIO`` is not used: it clones tensors on
    their device (GPU memory, not host), shares non-tensor state with the
    trainer, queues any number of snapshots, and re-raises from ``teardown``
    over the run's own error.
    """

    def __init__(self, run_info: dict[str, Any] | None = None, async_checkpoint: bool = False) -> None:
        super().__init__()
        self.run_info = run_info
        self.async_checkpoint = bool(async_checkpoint)
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if self.run_info is not None:
            checkpoint = {**checkpoint, "freqtag": self.run_info}
        if not self.async_checkpoint:
            atomic_save(checkpoint, path)
            return
        self.wait()
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self._writer = threading.Thread(target=self._write, args=(buffer, Path(path)), name=f"freqtag {Path(path).name}")
        self._writer.start()

    def _write(self, buffer: io.BytesIO, path: Path) -> None:
        """The background thread: the serialised checkpoint onto disk; an error is kept for :meth:`wait`."""
        try:
            atomic_save_bytes(buffer.getbuffer(), path)
        except BaseException as e:  # noqa: BLE001 - raised on the training thread by wait()
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight (if any) is on disk under its name; raise its error (``raise_error``)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None and raise_error:
            error, self._error = self._error, None
            raise error

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: str | Path) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """End of fit (or a failure): the last write finishes first; its error is raised unless one already is."""
        failing = sys.exc_info()[1] is not None
        self.wait(raise_error=not failing)
        if failing and self._error is not None:
            error, self._error = self._error, None
            warnings.warn(f"writing a checkpoint in the background failed as well: {error}", stacklevel=2)
        super().teardown()


def run_info(dm: JamendoDataModule, max_epochs: int | None = None) -> dict[str, Any]:
    """What a resume must agree with, stored in last.ckpt under ``freqtag``."""
    info: dict[str, Any] = {"tags": list(dm.tags), "features": dm.spec.to_dict(), "input_length": dm.input_length}
    if max_epochs is not None:
        info["max_epochs"] = int(max_epochs)
    return info


def check_resume(ckpt_path: str | Path, dm: JamendoDataModule, max_epochs: int | None = None) -> None:
    """Refuse, before any training, a ``ckpt_path`` that is missing, unreadable, or made with other tags/features
    or (``max_epochs`` given) another ``trainer.max_epochs``, on which the cosine schedule and the SWA start depend."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ResumeError(f"ckpt_path={path}: no such file; resume from <run>/checkpoints/last.ckpt of the killed run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ResumeError(
            f"ckpt_path={path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"it is damaged or not a Lightning checkpoint: resume from another one or start again without ckpt_path"
        ) from None
    info = ckpt.get("freqtag") if isinstance(ckpt, dict) else None
    if info is None:
        return  # written before checkpoints carried it: Lightning's own checks apply
    if list(info["tags"]) != list(dm.tags):
        theirs, ours = list(info["tags"]), list(dm.tags)
        diff = next((f"tag {i + 1} is {a} there, {b} here" for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                    f"{len(theirs)} tags there, {len(ours)} here")
        raise ResumeError(
            f"ckpt_path={path} was trained on another tag list than {dm.tags_source} ({diff}): resume with the "
            f"run's own data.tags_file, or start a new run without ckpt_path"
        )
    if FeatureSpec.from_dict(info["features"]) != dm.spec:
        raise ResumeError(
            f"ckpt_path={path} was trained on '{info['features']['name']}' features, this run uses "
            f"{dm.spec.name} ({dm.store_path}) with another recipe: resume with features={info['features']['name']} "
            f"and its store, or start a new run without ckpt_path"
        )
    theirs = info.get("max_epochs")
    if max_epochs is not None and theirs is not None and int(theirs) != int(max_epochs):
        raise ResumeError(
            f"ckpt_path={path} was trained with trainer.max_epochs={theirs}, this run has trainer.max_epochs="
            f"{max_epochs}: the cosine learning-rate schedule and the SWA start depend on it; resume with "
            f"trainer.max_epochs={theirs}, or start a new run without ckpt_path"
        )


def check_async_checkpoint(value: Any) -> bool:
    """``async_checkpoint`` as a bool (a string such as "no" would be truthy), or one :class:`ConfigError` line."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"async_checkpoint={value!r}: must be true (last.ckpt written in a background thread) or false "
            f"(written before the next training step)"
        )
    return value
