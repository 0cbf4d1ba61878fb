"""Models over many files, as ``predict``, ``embed`` and ``serve`` share it: one file, workers, the network in them.

Three ways to get a file through the network, with the same result bit for bit:

- ``--workers 0`` (or a single file): this process decodes the file in blocks
  and streams each recipe's frames into the models' :class:`WindowStream`
  (memory bounded for any length, :func:`tag_file`), the network on torch's
  threads;
- ``--workers N`` with the network on a CPU: N processes each run that whole
  pipeline, network included, on one torch thread for the next file
  (:func:`tag_job`), and hand back only its window outputs; this process
  collects them in input order. Each worker holds a copy of the models and
  streams its file as ``--workers 0`` does: memory is bounded per worker (one
  forward pass's activations, ``--batch-size``), N times that in all, so the
  default N is lowered to what RAM holds (:func:`network_worker_bytes`). A
  worker's start costs about 0.6 CPU s (the models, then the first file's
  fresh pages), a small share of a folder's run;
- ``--workers N`` with the network on a GPU: N processes decode and compute
  the features of the next files while this process runs the network, in
  input order. A worker hands over the whole float32 (frames, bands) array of
  each recipe: 26 MB for 10 minutes of mel128; at most two files per worker
  are in flight.

Workers are ``freqtag prepare``'s crash-isolating pool
(:func:`freqtag.prepare.pool.run_jobs`): a decoder that kills its process is
reported for that file and the others go on.

Why the network goes to the workers on a CPU: it is most of a file's work
there (freq_dep mel128 x 224, a two-minute file: decoding + features 0.35 s,
the network 0.87 s on one thread, 0.53 s on two), so workers that only made
features would leave one network at a time to run; N one-thread pipelines run
N networks at once. Measured on the quiet 2-core machine (``bench/predict.py
--workers-only``, bench/results/predict_workers_quiet.json): 1.31x over
``--workers 0`` for freq_dep and 1.25x for convs, 91-94% of the bound the
stage times set (``--workers 0`` already runs its network on both cores).
Where the network is on a GPU, the features are the work, and the GPU wants
one process.

The outputs are identical: the features come from the same single-threaded
code, the network sees the same chunks of frames, and its arithmetic does not
depend on the thread count (:class:`freqtag.wholetrack.OneDNNConvolutions`).
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from freqtag.audio.decode import AudioError
from freqtag.system.faults import fault_point
from freqtag.tag.formats import FileResult

__all__ = ["tag_file", "tag_files", "decode_features", "DecodedFile", "tag_job", "network_in_workers",
           "network_worker_bytes", "OOM_FIX"]

OOM_FIX = "lower --batch-size (windows per forward pass), or use --device cpu"
#: Peak memory of one file through the network at the default chunk of mel128 (16,384 + 448 frames a pass):
#: bench/predict.py measured +0.9 to +1.6 GiB over the loaded model for 5 to 60-minute files, decoding included.
PASS_PEAK_MEL128 = 2 << 30


# ------------------------------------------------------------------ one file


def _distinct_specs(models: Sequence[Any]) -> list[Any]:
    specs: list[Any] = []
    for m in models:  # one feature stream per distinct recipe, shared by the models that use it
        if m.spec not in specs:
            specs.append(m.spec)
    return specs


def _result(path: Path, duration_s: float, passes: int, streams: Sequence[Any]) -> FileResult:
    windows = [s.finish() for s in streams]
    probs = np.mean([w.mean(axis=0) for w in windows], axis=0).astype(np.float32)
    return FileResult(path=path, duration_s=duration_s, probs=probs, windows=windows, passes=passes)


def tag_file(path: Path, models: Sequence[Any], chunk_windows: int | None = None, layer: str | None = None,
             **stream_options: Any) -> FileResult:
    """One file through every model, decoded once in blocks in this process (memory bounded).

    ``layer`` None gives window probabilities, else that layer's window activations (:data:`freqtag.tag.models.LAYERS`).
    """
    from freqtag.audio.stream import stream_features

    specs = _distinct_specs(models)
    streams = [m.stream(chunk_windows, layer) for m in models]

    def sink_for(spec):  # type: ignore[no-untyped-def]
        targets = [s for s, m in zip(streams, models) if m.spec == spec]

        def sink(frames: np.ndarray) -> None:
            for s in targets:
                s.push(frames)

        return sink

    info = stream_features(path, specs, [sink_for(s) for s in specs], **stream_options)
    return _result(path, info.duration_s, info.passes, streams)


@dataclass(frozen=True)
class DecodedFile:
    """What a feature worker hands back: each recipe's whole (frames, bands) float32 array."""

    duration_s: float
    passes: int
    frames: tuple[np.ndarray, ...]


def decode_features(job: Any, specs: tuple[Any, ...]) -> DecodedFile:
    """A worker's job: the file's features for every recipe, by the same blocks as :func:`tag_file`."""
    from freqtag.audio.stream import stream_features
    from freqtag.prepare.pool import SkipTrack

    fault_point(f"tagrun.decode:{Path(job.source).name}")  # tests make the worker die here, as a decoder crash would
    pieces: list[list[np.ndarray]] = [[] for _ in specs]
    try:
        info = stream_features(job.source, specs, [p.append for p in pieces])
    except AudioError as e:
        raise SkipTrack(e.reason) from None
    frames = tuple(np.concatenate(p) if p else np.zeros((0, s.n_mels), np.float32) for p, s in zip(pieces, specs))
    return DecodedFile(info.duration_s, info.passes, frames)


#: The models of a network worker process (set once per worker by :func:`_start_network_worker`).
_WORKER_MODELS: list[Any] = []
#: What the network workers' fork server imports once (the same list for both kinds of workers: it is fixed
#: when the server starts).
_PRELOAD = ("freqtag.audio.decode", "freqtag.audio.stream", "freqtag.tag.runner", "freqtag.tag.models", "freqtag.model")


def _start_network_worker(models: str, low_memory: bool) -> None:
    """A network worker's set-up: the models (pickled by this process into the file ``models``), one torch
    thread, the allocator.

    Through a file rather than the pool's pipe: with the 71 MB of freq_dep mel128 in the pipe (64 kB at a
    time), starting two workers took 1.5 s on the loaded 2-core machine (1-min load 5.4), from a file 0.7 s
    (load 6.0; 0.1 s without models).
    """
    import torch

    from freqtag.audio.decode import quiet_decoder_messages
    from freqtag.system.allocator import keep_freed_memory

    quiet_decoder_messages()
    if not low_memory:  # as in the main process (load_for_run): chunk after chunk reuses the same memory
        keep_freed_memory()
    torch.set_num_threads(1)
    _WORKER_MODELS[:] = pickle.loads(Path(models).read_bytes())  # noqa: S301 - written by the parent process


def tag_job(job: Any, chunk_windows: int | None, layer: str | None) -> FileResult:
    """A network worker's job: :func:`tag_file` on the job's file with the worker's models."""
    from freqtag.prepare.pool import SkipTrack
    from freqtag.system.memory import OutOfMemory, out_of_memory

    fault_point(f"tagrun.decode:{Path(job.source).name}")  # tests make the worker die here, as a decoder crash would
    try:
        with out_of_memory("tagging on cpu", OOM_FIX):
            return tag_file(Path(job.source), _WORKER_MODELS, chunk_windows, layer)
    except AudioError as e:
        raise SkipTrack(e.reason) from None
    except OutOfMemory as e:
        raise SkipTrack(str(e)) from None


def network_worker_bytes(models: Sequence[Any], chunk_windows: int | None = None) -> int:
    """Estimated peak memory of one network worker: :data:`PASS_PEAK_MEL128` scaled by the bands x frames of
    the largest forward pass (the activations), plus the models' weights."""
    from freqtag.wholetrack import CHUNK_FRAMES, WindowStream

    def pass_size(m: Any) -> int:
        s = WindowStream(m, chunk_windows)
        return int(m.spec.n_mels * (s.chunk + 2 * s.context) * m.input_length)

    scale = max(pass_size(m) for m in models) / (128 * (CHUNK_FRAMES + 2 * 224))
    weights = sum(p.numel() * p.element_size() for m in models for p in m.net.parameters())
    return int(PASS_PEAK_MEL128 * scale) + int(weights)


def network_in_workers(models: Sequence[Any]) -> bool:
    """Whether workers run the network too: on a CPU, where its result does not depend on the thread count."""
    from freqtag.wholetrack import thread_invariant

    return all(thread_invariant(m.device) for m in models)


def tag_files(files: Sequence[Path], models: Sequence[Any], chunk_windows: int | None = None,  # 64 lines: its three designs side by side
              layer: str | None = None, workers: int = 0, low_memory: bool = False,
              network_workers: bool | None = None) -> Iterator[tuple[Path, FileResult | str]]:
    """Each file (in input order) with its result, or the reason it failed; the others go on.

    ``network_workers`` None: the network runs in the workers where
    :func:`network_in_workers` says so (True/False force it: benchmarks).
    """
    from freqtag.system.memory import OutOfMemory, out_of_memory, release_device_memory

    device = models[0].device

    def guarded(path: Path, work: Callable[[], FileResult]) -> FileResult | str:
        try:
            with out_of_memory(f"tagging on {device}", OOM_FIX):
                return work()
        except AudioError as e:
            return e.reason
        except OutOfMemory as e:
            release_device_memory()
            return str(e)

    if workers < 1 or len(files) < 2:
        for f in files:
            yield f, guarded(f, lambda: tag_file(f, models, chunk_windows, layer))
        return

    from freqtag.audio import decode as audio
    from freqtag.prepare.pool import Job, run_jobs

    jobs = [Job(str(i), str(f)) for i, f in enumerate(files)]
    n = min(workers, len(files))
    if network_in_workers(models) if network_workers is None else network_workers:
        with tempfile.TemporaryDirectory(prefix="freqtag-models-") as tmp:
            shipped = Path(tmp) / "models.pickle"
            shipped.write_bytes(pickle.dumps(list(models)))
            start = functools.partial(_start_network_worker, str(shipped), low_memory)
            done = run_jobs(functools.partial(tag_job, chunk_windows=chunk_windows, layer=layer), jobs, n_mels=0,
                            workers=n, chunk_size=1, initializer=start, preload=_PRELOAD, raw=True)
            for r in done:
                f = files[int(r.track_id)]
                if r.features is None:
                    yield f, r.reason or "unknown failure"
                else:
                    yield f, dataclasses.replace(r.features, path=f)  # type: ignore[type-var]
        return

    specs = tuple(_distinct_specs(models))

    def network(path: Path, d: DecodedFile) -> FileResult:
        streams = [m.stream(chunk_windows, layer) for m in models]
        for s, m in zip(streams, models):
            s.push(d.frames[specs.index(m.spec)])
        return _result(path, d.duration_s, d.passes, streams)

    results = run_jobs(functools.partial(decode_features, specs=specs), jobs, n_mels=0, workers=n, chunk_size=1,
                       initializer=audio.quiet_decoder_messages, preload=_PRELOAD, raw=True)
    for r in results:
        f = files[int(r.track_id)]
        if r.features is None:
            yield f, r.reason or "unknown failure"
        else:
            decoded: DecodedFile = r.features  # type: ignore[assignment]
            yield f, guarded(f, lambda: network(f, decoded))
