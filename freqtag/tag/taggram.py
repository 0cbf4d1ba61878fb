"""Pictures of one tagged file: a taggram (tag activation over time) and a bar chart of the track's probabilities.

The taggram's columns are the model's windows (``input_length`` frames each,
e.g. 5.2 s for mel128 x 224). An ensemble's models may have windows of
different lengths (mel96 and mel128 frames differ): their activations are put
on the grid of the model with the shortest windows (each grid column takes,
from every model, the window that contains its centre) and averaged there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from freqtag.system.atomic import atomic_path

__all__ = ["ensemble_taggram", "plot_file"]


def ensemble_taggram(windows: Sequence[np.ndarray], window_s: Sequence[float]) -> tuple[np.ndarray, float]:
    """(columns, n_tags) activations on the finest model's window grid, and that grid's step in seconds."""
    finest = int(np.argmin(window_s))
    step = float(window_s[finest])
    n = windows[finest].shape[0]
    centres = (np.arange(n) + 0.5) * step
    acts = [w[np.minimum((centres / s).astype(np.int64), w.shape[0] - 1)] for w, s in zip(windows, window_s)]
    return np.mean(acts, axis=0), step


def _save(fig: Any, path: Path) -> None:
    """savefig to a temporary name, then rename: a reader never sees half a PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_file(result: Any, models: Sequence[Any], tags: Sequence[str], thresholds: np.ndarray,
              stem: Path, top: int = 5) -> list[Path]:
    """Write ``STEM.taggram.png`` and ``STEM.bars.png``; returns their paths.

    Taggram: all tags as rows, most probable first, the top ``top`` labelled
    in bold; time in seconds along x. Bars: the averaged probability of every
    tag, the decision threshold of each as a tick, decided tags coloured.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(result.probs)
    order = np.argsort(-probs, kind="stable")
    acts, step = ensemble_taggram(result.windows, [m.window_s for m in models])
    name = Path(result.path).name
    label = " + ".join(sorted({m.spec.name for m in models})) + (f", ensemble of {len(models)}" if len(models) > 1 else "")

    out = []
    fig, ax = plt.subplots(figsize=(max(6.0, min(18.0, 4 + 0.12 * acts.shape[0])), 9.5))
    im = ax.imshow(acts[:, order].T, aspect="auto", origin="upper", cmap="magma", vmin=0.0, vmax=max(1e-6, float(acts.max())),
                   extent=(0.0, acts.shape[0] * step, len(tags) - 0.5, -0.5), interpolation="nearest")
    ax.set_yticks(range(len(tags)))
    ax.set_yticklabels([tags[i] for i in order], fontsize=6)
    for k, t in enumerate(ax.get_yticklabels()):
        if k < top:
            t.set_fontweight("bold")
            t.set_fontsize(8)
    ax.set_xlabel(f"time (s), one column per window of {step:.2f} s")
    ax.set_title(f"{name}: taggram ({label})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="probability")
    path = stem.with_name(stem.name + ".taggram.png")
    _save(fig, path)
    plt.close(fig)
    out.append(path)

    fig, ax = plt.subplots(figsize=(7.5, 10))
    decided = probs >= thresholds
    y = np.arange(len(tags))
    ax.barh(y, probs[order], color=["tab:orange" if decided[i] else "tab:blue" for i in order])
    ax.scatter(np.asarray(thresholds)[order], y, marker="|", color="black", s=40, label="decision threshold")
    ax.set_yticks(y)
    ax.set_yticklabels([tags[i] for i in order], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (mean over windows" + (" and models)" if len(models) > 1 else ")"))
    ax.set_title(f"{name}: tag probabilities (orange: decided)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    path = stem.with_name(stem.name + ".bars.png")
    _save(fig, path)
    plt.close(fig)
    out.append(path)
    return out
