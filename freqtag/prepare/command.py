"""`freqtag prepare`: turn per-track spectrogram files, or audio files, into one feature store.

Three separate pieces, so that a source only adds a job list and a loader:

1. list the jobs: one :class:`~freqtag.prepare.pool.Job` per track, in the
   canonical store order (train, validation, test, each in file order) --
   :mod:`freqtag.prepare.jobs`;
2. run a loader over the jobs in worker processes, turning every failure into
   a per-track skip reason instead of an aborted run, and optionally a
   batched ``transform`` of the loaded chunks in this process (the log-mel
   transform on a device) -- :func:`freqtag.prepare.pool.run_jobs`;
3. write the results into a resumable :class:`~freqtag.data.store_writer.StoreWriter`
   and list every skipped track in ``STORE.report.tsv`` --
   :func:`freqtag.prepare.assemble.build_store`.

:func:`prepare_npy` wires them up for MTG-Jamendo's distributed ``.npy`` mels,
:func:`prepare_audio` for audio files: decoded, resampled and trimmed in the
workers by :func:`freqtag.audio.whole.waveform`; transformed by
:class:`freqtag.audio.logmel.LogMel` in each worker (CPU), or here in batches
(``--device cuda``, or no workers).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from freqtag.features import FeatureSpec
from freqtag.prepare.assemble import build_store
from freqtag.prepare.jobs import (
    audio_jobs,
    load_audio,
    load_audio_features,
    load_npy,
    npy_jobs,
    preflight_audio,
    preflight_npy,
    read_split_dir,
)
from freqtag.prepare.pool import CHUNK_SIZE, PrepareError
from freqtag.prepare.report import PrepareReport

__all__ = ["prepare_npy", "prepare_audio", "PrepareError", "DEFAULT_MIN_FRAMES"]

# Decoded waveforms are big (a 10-minute track at 44.1 kHz is 106 MB): fewer per chunk.
AUDIO_CHUNK_SIZE = 2
# The shortest input window of the paper: a track that cannot fill one is skipped.
DEFAULT_MIN_FRAMES = 128
LOADERS = "freqtag.prepare.jobs"  # what the workers run: their fork server imports it once


def prepare_npy(
    npy_dir: str | Path,
    splits_dir: str | Path,
    out: str | Path,
    features: str = "mel96",
    workers: int = 1,
    tags_file: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 64,
    task: str = "moodtheme",
) -> PrepareReport:
    """Import MTG-Jamendo's distributed ``XX/ID.npy`` spectrograms into the store ``out``.

    Every track of the ``task``'s three split TSVs in ``splits_dir`` is imported; bad
    files are skipped and listed in ``STORE.report.tsv``. Mean/std come from
    the train split. Re-running resumes an interrupted run; a finished store
    is left untouched.
    """
    spec = FeatureSpec.load(features)
    npy_dir = Path(npy_dir)
    splits = read_split_dir(splits_dir, tags_file, task)
    jobs = npy_jobs(npy_dir, splits)
    out = Path(out)
    if not out.exists():
        if not npy_dir.is_dir():
            raise FileNotFoundError(
                f"npy folder {npy_dir} does not exist: --npy-dir must be the folder holding MTG's "
                f"00/ .. 99/ subfolders of ID.npy files"
            )
        preflight_npy(jobs, spec.n_mels, npy_dir, features)
    return build_store(
        jobs,
        functools.partial(load_npy, n_mels=spec.n_mels),
        out,
        spec,
        stats_ids=splits["train"].track_ids,
        stats_split="train",
        workers=workers,
        batch_size=batch_size,
        progress=progress,
        preload=(LOADERS,),
    )


def prepare_audio(  # over 60 lines: a long docstring and the argument checks; the wiring itself is short
    audio_dir: str | Path,
    out: str | Path,
    features: str,
    splits_dir: str | Path | None = None,
    workers: int = 1,
    device: str = "cpu",
    min_frames: int = DEFAULT_MIN_FRAMES,
    tags_file: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 64,
    task: str = "moodtheme",
) -> PrepareReport:
    """Compute ``features`` (mel128 or mel96) from audio files into the store ``out``.

    The tracks are those of the split TSVs in ``splits_dir`` (PATH relative to
    ``audio_dir``; mean/std from the train split), or without it every file
    under ``audio_dir`` (ids are relative paths; mean/std from all tracks).
    ``workers`` processes decode, resample and trim (0: this process does).
    The log-mel transform runs on ``device``: with ``cuda`` (or no workers)
    in this process, batched over the waveforms the workers hand over; with
    ``cpu`` and workers, in each worker on its own files, since handing a
    waveform between processes costs more than transforming it. Files that
    give no features (see :func:`freqtag.audio.whole.waveform`), including tracks
    shorter than ``min_frames`` frames, are skipped and listed in
    ``STORE.report.tsv``. Re-running resumes an interrupted run; a finished
    store is left untouched.
    """
    from freqtag.audio import decode as audio

    spec = FeatureSpec.load(features)
    if min_frames < 1:
        raise ValueError(f"--min-frames {min_frames}: must be at least 1")
    if workers < 0:
        raise ValueError(f"--workers {workers}: must be 0 (decode in this process) or more")
    audio_dir = Path(audio_dir)
    out = Path(out)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist: --audio-dir must be a folder of audio files")
    in_workers = workers >= 1 and str(device) == "cpu"
    # Each CPU worker transforms its own files: handing a waveform between
    # processes costs more CPU than the transform (bench/prepare.py), and the
    # features are 16x smaller. Same arithmetic either way, so the same store.
    transform = None
    if not in_workers:
        from freqtag.audio.logmel import LogMel  # torch: only this process's transform needs it here

        transform = LogMel(spec, device)  # checks the device before any work
    if splits_dir is not None:
        splits = read_split_dir(splits_dir, tags_file, task)
        jobs = audio_jobs(audio_dir, splits, out)
        stats_ids: Sequence[str] = splits["train"].track_ids
        stats_split = "train"
        if not out.exists():
            preflight_audio(jobs, audio_dir)
    else:
        jobs = audio_jobs(audio_dir, None, out)
        stats_ids = [j.track_id for j in jobs]
        stats_split = "all"
        if not jobs:
            raise PrepareError(f"no files under {audio_dir}: --audio-dir must be a folder of audio files")
    loader = load_audio_features if in_workers else load_audio
    return build_store(
        jobs,
        functools.partial(loader, spec=spec, min_frames=min_frames),
        out,
        spec,
        stats_ids=stats_ids,
        stats_split=stats_split,
        workers=workers,
        batch_size=batch_size,
        progress=progress,
        transform=transform,
        initializer=audio.quiet_decoder_messages,
        chunk_size=CHUNK_SIZE if in_workers else AUDIO_CHUNK_SIZE,
        preload=(LOADERS, "freqtag.audio.whole", *(("freqtag.audio.logmel",) if in_workers else ())),
    )
