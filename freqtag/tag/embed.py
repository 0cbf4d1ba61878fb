"""`freqtag embed`: a trained network's activations as track embeddings, for search, clustering or a new head.

Per track, the mean over its windows of one layer's per-window activations
(``--layer fc``: the 1024-d ReLU layer before the output, default;
``--layer collapse``: the 512-d average over each window after the collapse
layer), computed as ``predict`` computes probabilities (same inputs, workers,
chunking, errors and exit codes: :mod:`freqtag.tag.runner`). Both layers see
exactly the logits' receptive field, so the chunked pass gives the whole-track
activations (a forward hook on the whole track, tested).

The ``.npz`` (written atomically; every array plain, ``np.load`` needs no
pickle):

- ``paths`` (N,), ``duration_s`` (N,), ``embeddings`` (N, D) float32;
- with ``--windows``: ``window_embeddings`` (sum W, D), ``window_start_s``
  (sum W,) and ``window_offsets`` (N+1,): track i is rows
  ``offsets[i]:offsets[i+1]``;
- the model's identity: ``checkpoint`` (path or URL as given), ``sha256`` (of
  the checkpoint file), ``layer``, ``features`` (recipe name),
  ``features_json`` (the whole recipe), ``n_tags``, ``window_s``, and
  ``dataset`` (from the checkpoint: ``synthetic``, ``mtg-jamendo`` or
  ``unknown``);
- ``failed_paths``, ``failed_reasons``: the inputs that gave no embedding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from freqtag.system.atomic import atomic_path
from freqtag.system.exits import usage
from freqtag.tag.commands import add_run_arguments, load_for_run, report_failed, run_files
from freqtag.tag.formats import FileResult
from freqtag.tag.inputs import expand_inputs

__all__ = ["add_embed_arguments", "run_embed", "embeddings_npz", "WIDTHS"]

#: The layers of :data:`freqtag.tag.models.LAYERS` and their widths (named here: ``freqtag --help`` imports no torch).
WIDTHS = {"fc": 1024, "collapse": 512}


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Embed audio files with a trained checkpoint: per file, the mean over its windows of a layer's activations "
        "(fc: 1024-d, default; collapse: 512-d), with per-window ones on request. Exit status: 0 all files "
        "embedded, 1 some failed (reported, the others embedded), 2 usage error."
    )
    add_run_arguments(p, ensemble=False)
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (atomically)")
    p.add_argument("--layer", choices=tuple(WIDTHS), default="fc",
                   help="fc: the 1024-d layer before the output (default); collapse: the 512-d one after the "
                   "average pool")
    p.add_argument("--windows", action="store_true", help="also store each window's embedding and start time")


def embeddings_npz(results: Sequence[FileResult], failed: Sequence[tuple[str, str]], model: Any, layer: str,
                   windows: bool) -> dict[str, np.ndarray]:
    """The arrays of the output file (see the module's docstring)."""
    width = WIDTHS[layer]
    out: dict[str, np.ndarray] = {
        "paths": np.array([str(r.path) for r in results], dtype=str),
        "duration_s": np.array([r.duration_s for r in results], dtype=np.float64),
        "embeddings": (np.stack([r.windows[0].mean(axis=0) for r in results]).astype(np.float32)
                       if results else np.zeros((0, width), np.float32)),
        "layer": np.array(layer),
        "checkpoint": np.array(model.source or str(model.path)),
        "sha256": np.array(model.sha256()),
        "features": np.array(model.spec.name),
        "features_json": np.array(json.dumps(model.spec.to_dict(), sort_keys=True)),
        "n_tags": np.array(len(model.tags)),
        "window_s": np.array(model.window_s),
        "dataset": np.array((model.data or {}).get("dataset", "unknown")),
        "failed_paths": np.array([p for p, _ in failed], dtype=str),
        "failed_reasons": np.array([r for _, r in failed], dtype=str),
    }
    if windows:
        counts = [len(r.windows[0]) for r in results]
        out["window_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out["window_embeddings"] = (np.concatenate([r.windows[0] for r in results]).astype(np.float32)
                                    if results else np.zeros((0, width), np.float32))
        out["window_start_s"] = np.concatenate([np.arange(n) * model.window_s for n in counts]
                                               if counts else [np.zeros(0)]).astype(np.float64)
    return out


def run_embed(args: argparse.Namespace) -> int:
    """Embed every input; 0 when all were embedded, 1 when some failed, 2 for a usage error."""
    if args.out.suffix.lower() != ".npz":
        return usage(f"--out {args.out}: name an .npz file (e.g. embeddings.npz)", "embed")
    models = load_for_run(args, "embed")
    if isinstance(models, int):
        return models
    if len(models) != 1:  # pragma: no cover - argparse takes one --ckpt; split_checkpoints never adds one
        return usage("give one checkpoint", "embed")
    files, failed = expand_inputs(args.inputs)
    results: list[FileResult] = []
    run_files(args, models, files, failed, results.append, "embed", layer=args.layer)
    arrays = embeddings_npz(results, failed, models[0], args.layer, args.windows)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:  # an open file: np.savez keeps the name as given
            np.savez(f, **arrays)
    print(f"wrote {args.out}: {len(results)} files, {args.layer} embeddings of {arrays['embeddings'].shape[1]} "
          f"values{' with windows' if args.windows else ''}", file=sys.stderr)
    return report_failed("embed", len(results), failed, "embedded")
