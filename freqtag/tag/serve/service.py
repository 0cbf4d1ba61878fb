"""The models behind ``freqtag serve``: loaded once, tagging one upload at a time per pool thread.

Tagging is ``predict``'s own code (:func:`freqtag.tag.runner.tag_files` with the
file decoded in this process, then :func:`freqtag.tag.formats.render` as
JSON), so an upload gets exactly the record ``freqtag predict --format json``
gives for the same file under the same name. It runs in a thread pool of
``jobs`` threads: the network releases the GIL, the event loop stays free to
serve the page, and the pool bounds the memory that files in flight take.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from freqtag.tag.formats import Report, render
from freqtag.tag.serve.uploads import Upload

__all__ = ["TaggingService", "SYNTHETIC_WARNING", "log"]

SYNTHETIC_WARNING = "trained on freqtag's synthetic demo data: its tags say nothing about real music"


def _trained_on(data: dict[str, Any] | None) -> str:
    """One line for people: the dataset, task, split and size of what a model was trained on."""
    if not data:
        return "unknown (the checkpoint predates freqtag's record of its training data)"
    dataset = {"synthetic": "freqtag's synthetic demo data", "mtg-jamendo": "MTG-Jamendo"}.get(
        str(data.get("dataset")), str(data.get("dataset", "unknown data")))
    details = [f"{data['task']} task" if data.get("task") else "",
               f"split {data['split']}" if data.get("split") is not None else "",
               f"{data['train_tracks']:,} training tracks" if isinstance(data.get("train_tracks"), int) else ""]
    details = [d for d in details if d]
    return dataset + (f" ({', '.join(details)})" if details else "")


class TaggingService:
    """Models, thresholds and the output settings of one server; :meth:`tag` is called from pool threads."""

    def __init__(self, models: Sequence[Any], thresholds: np.ndarray, threshold_source: str, top: int = 5,
                 batch_size: int | None = None, jobs: int = 2, max_upload_bytes: int = 100 * 2**20) -> None:
        from freqtag.data.jamendo import short_tag

        self.models = list(models)
        tags = [short_tag(t) for t in self.models[0].tags]
        self.report = Report(tags=tags, top=min(top, len(tags)), thresholds=np.asarray(thresholds),
                             threshold_source=threshold_source, models=self.models, with_windows=False)
        self.batch_size = batch_size
        self.jobs = jobs
        self.max_upload_bytes = max_upload_bytes
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="freqtag-tag")

    def describe(self) -> dict[str, Any]:
        """``GET /api/model``: what the page shows above the results, and what a program needs to read them."""
        from freqtag import __version__

        models = [
            {
                "checkpoint": m.source or str(m.path),
                "features": m.spec.name,
                "window_s": m.window_s,
                "input_length": m.input_length,
                "network": (m.info.get("model") or {}).get("filters"),
                "trained_on": _trained_on(m.data),
                "data": m.data,
                "synthetic": m.synthetic,
            }
            for m in self.models
        ]
        tasks = sorted({str(m.data.get("task")) for m in self.models if m.data and m.data.get("task")})
        synthetic = any(m.synthetic for m in self.models)
        return {
            "freqtag_version": __version__,
            "models": models,
            "ensemble": len(models) > 1,
            "features": " + ".join(sorted({m.spec.name for m in self.models})),
            "task": " + ".join(tasks) or "unknown",
            "n_tags": len(self.report.tags),
            "tags": self.report.tags,
            "thresholds": [float(t) for t in self.report.thresholds],
            "threshold_source": self.report.threshold_source,
            "top": self.report.top,
            "synthetic": synthetic,
            "warning": f"{'A model of this ensemble was' if len(models) > 1 else 'This model was'} {SYNTHETIC_WARNING}"
            if synthetic else None,
            "max_upload_bytes": self.max_upload_bytes,
            "max_upload_mb": self.max_upload_bytes / 2**20,
        }

    def tag(self, upload: Upload, windows: bool = False, taggram: bool = False) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one saved upload: predict's record, or ``{"path", "error"}``."""
        from freqtag.tag.runner import OOM_FIX, tag_files

        start = time.perf_counter()
        try:
            ((_, result),) = list(tag_files([upload.path], self.models, self.batch_size, None, 0))
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down; the log has the traceback
            traceback.print_exc()
            return 500, {"path": upload.name, "error": f"internal error while tagging ({type(e).__name__}: {e})"}
        if isinstance(result, str):
            log(f"refused {upload.name}: {result}")
            return (503 if OOM_FIX in result else 422), {"path": upload.name, "error": result}
        result.path = Path(upload.name)
        (record,) = json.loads(render([result], [], replace(self.report, with_windows=windows), "json"))
        if taggram:
            record["taggram"] = self._taggram(result.windows)
        log(f"tagged {upload.name} ({result.duration_s:.1f} s of audio) in {time.perf_counter() - start:.1f} s")
        return 200, record

    def _taggram(self, windows: Sequence[np.ndarray]) -> dict[str, Any]:
        """The page's picture: ``predict --plot``'s taggram grid (an ensemble on its finest window grid)."""
        from freqtag.tag.taggram import ensemble_taggram

        acts, step = ensemble_taggram(windows, [m.window_s for m in self.models])
        return {"step_s": step, "activations": acts.astype(float).round(4).tolist()}  # [column][tag]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def log(line: str) -> None:
    print(f"freqtag serve: {line}", file=sys.stderr, flush=True)
