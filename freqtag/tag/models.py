"""Trained checkpoints ready to tag: loading, thresholds, ensembles.

Everything tagging needs of a checkpoint beyond the network: its feature recipe,
tags, normalisation statistics and thresholds. Whole-track scoring in bounded
memory is :mod:`freqtag.wholetrack` (training's evaluation shares it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from freqtag import runs
from freqtag.data.normalise import normalise
from freqtag.features import FeatureSpec
from freqtag.model import FreqTagNet
from freqtag.system.precision import evaluation_precision
from freqtag.wholetrack import OneDNNConvolutions, WindowStream, thread_invariant

__all__ = [
    "TaggerModel",
    "RawMelTagger",
    "CheckpointError",
    "resolve_checkpoint",
    "load_model",
    "load_models",
    "ensemble_thresholds",
    "resolve_device",
    "LAYERS",
]

#: Layers whose per-window activations ``freqtag embed`` gives: name -> the network's module whose output it is.
#: ``collapse`` is the 512-d output of the average pool over each window's collapsed frames; ``fc`` the 1024-d
#: (ReLU) layer before the output layer. Both are per window, with the logits' receptive field.
LAYERS = {"fc": "fc", "collapse": "avgpool"}


def cpu_inference_layout(net: nn.Module) -> nn.Module:
    """The 4-d convolution weights in channels-last layout (same values), so their activations stay channels-last.

    Measured on one thread (CPU time of a 5,600-frame forward pass, medians of
    5-6 interleaved passes on the loaded machine, two runs): freq_dep mel128 x
    224 1.20-1.22 -> 1.02-1.05 s, convs mel96 x 128 0.93-1.05 -> 0.68-0.70 s;
    mostly the max pool, 240 -> 27 ms (channels-first max pooling is not
    vectorised), and no reorders around oneDNN. The logits move by ~1e-7.
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return net


class CheckpointError(ValueError):
    """A checkpoint (or run directory) that cannot be used for tagging; names the path and the fix."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses cuda where there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CheckpointError(f"--device {device}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its ``checkpoints/final.ckpt``; a file is itself."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "checkpoints" / "final.ckpt", p / "final.ckpt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{p} is a folder without checkpoints/final.ckpt: pass a finished run directory "
            f"(training writes final.ckpt at its end) or a .ckpt file"
        )
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist: pass a run directory or its checkpoints/final.ckpt")
    return p


def read_thresholds(path: Path, tags: Sequence[str]) -> np.ndarray:
    """A checkpoint's thresholds.tsv as float64 (n_tags,) in tag-list order."""
    try:
        return runs.read_thresholds(path, tags, exact=False)
    except runs.RunFileError as e:
        raise CheckpointError(str(e)) from None


@dataclass
class TaggerModel:
    """One checkpoint ready to tag: the network in eval mode plus everything its input needs."""

    path: Path
    net: FreqTagNet
    spec: FeatureSpec
    tags: list[str]
    input_length: int
    mean: float
    std: float
    device: torch.device
    thresholds_file: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the reference given: a path, an https:// URL or hf://ORG/REPO
    data: dict[str, Any] | None = None  # final.ckpt's "data" (dataset, task, ...); None in older checkpoints

    @property
    def synthetic(self) -> bool:
        """Trained on freqtag's generated demo data: its tags say nothing about real music."""
        return bool(self.data) and self.data.get("dataset") == "synthetic"  # type: ignore[union-attr]

    def sha256(self) -> str:
        """The checkpoint file's digest (computed on first use): the model's identity in embeddings."""
        if "sha256" not in self.info:
            from freqtag.tag.sources import file_sha256

            self.info["sha256"] = file_sha256(self.path)
        return str(self.info["sha256"])

    @property
    def window_s(self) -> float:
        return self.input_length / self.spec.frames_per_second

    def normalise(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(T, bands) raw features -> (1, bands, T) float32 ``(x - mean) / std`` on the device, as training's crops."""
        return normalise(torch.as_tensor(frames).T[None], self.mean, self.std, device=self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network in evaluation precision; on a CPU with the same bits for any thread count."""
        with evaluation_precision(self.device):
            if thread_invariant(x.device):
                with OneDNNConvolutions():
                    return self.net(x)
            return self.net(x)

    @torch.inference_mode()
    def window_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, bands, T) normalised -> (B, W, n_tags) float32: sigmoid of each window's logits.

        In IEEE float32 without autocast, as training's whole-track evaluation.
        On a CPU the sigmoid runs on one thread: torch splits a large
        element-wise op across threads, and where a split falls decides which
        elements take the vectorised path.
        """
        logits = self._forward(x).float()
        if logits.device.type != "cpu":
            return torch.sigmoid(logits).transpose(1, 2)
        from freqtag.audio.threads import one_torch_thread

        with one_torch_thread():
            return torch.sigmoid(logits).transpose(1, 2)

    @torch.inference_mode()
    def window_activations(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """(B, bands, T) normalised -> (B, W, D) float32: a layer's per-window activations (:data:`LAYERS`)."""
        module = getattr(self.net, LAYERS[layer])
        got: list[torch.Tensor] = []
        hook = module.register_forward_hook(lambda _m, _i, out: got.append(out))
        try:
            self._forward(x)
        finally:
            hook.remove()
        return got[0].float().transpose(1, 2)

    def stream(self, chunk_windows: int | None = None, layer: str | None = None) -> WindowStream:
        """Window probabilities (``layer`` None) or a layer's window activations, chunk by chunk."""
        return WindowStream(self, chunk_windows, layer)


class RawMelTagger(nn.Module):
    """Raw (B, bands, T) log-mel -> (B, W, n_tags) window probabilities: normalisation, network, sigmoid.

    What ``freqtag export`` writes: a user then needs only the feature recipe,
    not the training statistics.
    """

    def __init__(self, net: nn.Module, mean: float, std: float, input_length: int) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float32))
        self.input_length = int(input_length)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = (mel - self.mean) / self.std  # graph ops, not data's in-place ``normalise``: this is what gets exported
        t = x.shape[2]
        if t < self.input_length:
            x = F.pad(x, [0, self.input_length - t])
        return torch.sigmoid(self.net(x)).transpose(1, 2)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> TaggerModel:
    """Load ``final.ckpt`` (a run directory, a file, an https:// URL or hf://ORG/REPO) for tagging.

    Refuses anything that is not one, saying why. Loaded with
    ``weights_only=True``: tensors and plain data, never code.
    """
    from hydra.utils import instantiate

    from freqtag.tag.sources import SourceError, fetch

    try:
        fetched = fetch(path)
    except SourceError as e:
        raise CheckpointError(str(e)) from None
    ckpt = resolve_checkpoint(fetched.path)
    try:
        data = runs.read_final(ckpt)
    except runs.RunFileError as e:
        raise CheckpointError(str(e)) from None
    spec = FeatureSpec.from_dict(dict(data["features"]))
    try:
        net = instantiate(dict(data["model"]))
        net.load_state_dict(data["state_dict"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ckpt}: the model in it cannot be rebuilt ({type(e).__name__}: {e})") from None
    dev = torch.device(device)
    net.eval().to(dev)
    if dev.type == "cpu":
        cpu_inference_layout(net)
    thresholds = fetched.thresholds or runs.thresholds_path(ckpt)
    info = {"model": dict(data["model"]), "freqtag_version": data.get("freqtag_version")}
    if fetched.sha256:
        info["sha256"] = fetched.sha256
    return TaggerModel(
        path=ckpt,
        net=net,
        spec=spec,
        tags=list(data["tags"]),
        input_length=int(data["input_length"]),
        mean=float(data["mean"]),
        std=float(data["std"]),
        device=dev,
        thresholds_file=thresholds if thresholds.is_file() else None,
        info=info,
        source=fetched.source,
        data=dict(data["data"]) if isinstance(data.get("data"), dict) else None,
    )


def load_models(paths: Sequence[str | Path], device: torch.device | str = "cpu") -> list[TaggerModel]:
    """Several checkpoints forming an ensemble: they must share the tag list (in order)."""
    models = [load_model(p, device) for p in paths]
    for m in models[1:]:
        if m.tags != models[0].tags:
            raise CheckpointError(
                f"{m.path} has a different tag list from {models[0].path}: an ensemble averages "
                f"probabilities tag by tag, so its checkpoints must be trained on the same tags"
            )
    return models


def ensemble_thresholds(models: Sequence[TaggerModel], fixed: float | None = None) -> tuple[np.ndarray, str]:
    """Per-tag decision thresholds for ``--threshold`` (``fixed``: a probability; None: auto) and where they come from.

    A fixed probability applies to every tag. One model: its ``thresholds.tsv`` (chosen on validation by training).
    Several: the thresholds that maximise F1 for the *ensemble's* validation
    probabilities, the mean of the runs' ``predictions/validation.npz`` (each
    model's own thresholds fit its own score scale, not the average's);
    without those files, the mean of the models' thresholds, and the source
    says so.
    """
    if fixed is not None:
        return np.full(len(models[0].tags), fixed), f"threshold {fixed:g}"
    if len(models) == 1:
        m = models[0]
        if m.thresholds_file is None:
            raise CheckpointError(
                f"--threshold auto: no thresholds.tsv beside {m.path} (training writes it there); "
                f"pass --threshold 0.5 (or another probability) instead"
            )
        return read_thresholds(m.thresholds_file, m.tags), str(m.thresholds_file)
    from freqtag.metrics import best_f1_thresholds

    preds = []
    for m in models:
        run = runs.run_dir_of(m.path)
        f = runs.predictions_path(run, "validation") if run else None
        if f is None or not f.is_file():
            preds = []
            break
        try:
            preds.append(runs.read_predictions(f))
        except runs.RunFileError as e:
            raise CheckpointError(str(e)) from None
    if preds and all(list(p.track_ids) == list(preds[0].track_ids) and list(p.tags) == models[0].tags for p in preds):
        probs = np.mean([p.probs for p in preds], axis=0)
        return best_f1_thresholds(probs, preds[0].targets), "fitted on the ensemble's validation predictions"
    missing = [m.path for m in models if m.thresholds_file is None]
    if missing:
        raise CheckpointError(
            f"--threshold auto: no thresholds.tsv beside {missing[0]} and no shared validation predictions "
            f"to fit the ensemble's own; pass --threshold 0.5 (or another probability) instead"
        )
    warnings.warn("the runs' validation predictions do not cover the same tracks: using the mean of their thresholds")
    mean = np.mean([read_thresholds(m.thresholds_file, m.tags) for m in models], axis=0)  # type: ignore[arg-type]
    return mean, "mean of the models' thresholds.tsv"

