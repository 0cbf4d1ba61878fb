"""The command line's checkpoints and audio inputs: which argument is which, and which files they name.

Shared by ``predict`` and ``embed``: ``--ckpt A B song.mp3`` gives argparse's
``--ckpt`` all three, so the first argument that is not a checkpoint starts
the inputs; folders and globs become files, and inputs that name nothing are
reported with their reason instead of stopping the run.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path
from typing import Sequence

from freqtag.audio.decode import AUDIO_EXTENSIONS, UNSUPPORTED_EXTENSIONS
from freqtag.tag.sources import is_remote

__all__ = ["looks_like_checkpoint", "split_checkpoints", "expand_inputs"]


def looks_like_checkpoint(value: str) -> bool:
    """A checkpoint file name, a finished run directory, an https:// URL or an hf:// reference."""
    if is_remote(value):
        return True
    p = Path(value)
    if p.suffix.lower() in (".ckpt", ".pt", ".pth"):
        return True
    return p.is_dir() and ((p / "checkpoints" / "final.ckpt").is_file() or (p / "final.ckpt").is_file())


def split_checkpoints(args: argparse.Namespace) -> None:
    """``--ckpt A B song.mp3``: argparse gives all three to --ckpt; the first non-checkpoint starts the inputs."""
    for i, value in enumerate(args.ckpt):
        if i > 0 and not looks_like_checkpoint(value):
            args.inputs = list(args.ckpt[i:]) + list(args.inputs)
            args.ckpt = list(args.ckpt[:i])
            return


def _is_audio_name(p: Path) -> bool:
    return p.suffix.lower() in AUDIO_EXTENSIONS + UNSUPPORTED_EXTENSIONS


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to tag (sorted within each input, each once) and inputs that name nothing (with the reason).

    A folder gives every file under it whose name is audio (including formats
    soundfile cannot read, so that they are reported, not silently passed
    over); a glob gives its matches; a file is taken as named.
    """
    files: list[Path] = []
    failed: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _is_audio_name(q))
            if not found:
                failed.append((raw, "folder holds no audio file (.mp3 .ogg .opus .flac .wav .aiff ...)"))
            for q in found:
                add(q)
        elif p.exists():
            add(p)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(raw), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                failed.append((raw, "no file matches this pattern"))
            for m in matches:
                add(m)
        else:
            failed.append((raw, "missing file"))
    return files, failed
