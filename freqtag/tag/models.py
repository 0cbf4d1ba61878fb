"""Trained checkpoints ready to tag: loading, thresholds, and whole-track scoring in bounded memory.

The network is fully convolutional in time: a track of T frames gives one
logit vector per non-overlapping window of ``input_length`` (L) frames, and
training's evaluation averages ``sigmoid`` over the windows of the whole track
(:func:`freqtag.train.module.track_probabilities`). Running an hour of audio through
it at once would need tens of GB of activations, so :class:`WindowStream`
runs it on chunks of ``chunk_windows`` windows and gives the same window
probabilities as the whole-track pass:

- a chunk starts on a window boundary (so every stride of the network lines
  up with the whole-track pass) and carries ``context`` whole windows of the
  neighbouring frames on each side (at least ``RECEPTIVE_FRAMES``, the
  network's reach beyond a window: 51 frames before it, 19 after);
- only the chunk's own windows are kept; the context windows are recomputed
  as the neighbours' own windows;
- the first chunk starts at the track's start and the last ends at the
  track's end, so the network's own zero padding there is the same as in the
  whole-track pass; a track shorter than L is padded to L inside the network,
  as in training.

A track of at most ``chunk_windows + context`` windows is one chunk: exactly
training's evaluation (one track per forward pass).

Training's evaluation can also score several whole tracks in one forward pass
(:func:`batch_track_probabilities`): shorter tracks are zero padded to the
longest, and after every layer that mixes neighbouring frames the frames past a
track's own end are zeroed again, which is what that layer's zero padding
gives the track scored alone; its windows are then the same.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from freqtag import runs
from freqtag.features import FeatureSpec
from freqtag.model import ConvBlock, FreqDepConv, FreqTagNet
from freqtag.system.precision import evaluation_precision

__all__ = [
    "TaggerModel",
    "RawMelTagger",
    "WindowStream",
    "CheckpointError",
    "resolve_checkpoint",
    "load_model",
    "load_models",
    "ensemble_thresholds",
    "resolve_device",
    "RECEPTIVE_FRAMES",
    "CHUNK_FRAMES",
    "LAYERS",
    "TIME_MIXING",
    "batch_track_probabilities",
    "masked_layers",
]

#: Frames beyond a window's edge that its logits depend on (3x3 convs, strides 2,1,1,pool 2,2,2,1,2: 51 before).
RECEPTIVE_FRAMES = 51
#: Layers whose per-window activations ``freqtag embed`` gives: name -> the network's module whose output it is.
#: ``collapse`` is the 512-d output of the average pool over each window's collapsed frames; ``fc`` the 1024-d
#: (ReLU) layer before the output layer. Both are per window, with the logits' receptive field.
LAYERS = {"fc": "fc", "collapse": "avgpool"}
#: Default frames per forward pass (the core windows of a chunk): 6.3 min of mel128, 5.8 min of mel96.
CHUNK_FRAMES = 16384
#: FreqTagNet's layers that mix neighbouring frames, in forward order. Each ends in a ReLU (maxpool takes
#: ReLU outputs), so a zero past a track's end stands for the layer's own zero (or, for max, -inf) padding.
TIME_MIXING = ("conv1", "conv2", "conv3", "maxpool", "filter1", "filter2", "filter3", "filter4")


def thread_invariant(device: torch.device | str) -> bool:
    """Whether the network gives the same bits on ``device`` whatever the number of torch threads.

    True on a CPU with oneDNN (:class:`OneDNNConvolutions`); what lets
    ``predict --workers`` run the network in one-thread workers.
    """
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()


def _ints(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


class OneDNNConvolutions(TorchFunctionMode):
    """Every float32 CPU convolution inside the block through oneDNN: the same bits for any thread count.

    torch picks a convolution's algorithm by shape *and thread count*: with
    one thread a 1x1 convolution goes to im2col + MKL's GEMM, with more to
    oneDNN; small inputs (a short chunk's late layers, the 1x1 head) go to
    MKL's GEMM, which splits its sums across threads. So 1 and 2 threads gave
    different logits (up to 2e-7 measured: always in the head, in the trunk
    for some lengths). oneDNN's forward convolutions never split a sum across
    threads: routed there, the network gave identical bits with 1, 2, 3 and 4
    threads on 36 (length, batch) cases of freq_dep mel128 and convs mel96,
    channels-last or not, at the same speed (CPU time within noise of
    torch's own choice; the head is 0.2% of the time).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.conv2d or func is torch.conv1d:
            a = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args), **kwargs)
            x, w, padding = a["input"], a["weight"], a.get("padding", 0)
            n = w.dim() - 2
            if padding == "valid":
                padding = 0
            if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == n + 2 and not isinstance(padding, str):
                return torch.mkldnn_convolution(x, w, a.get("bias"), _ints(padding, n), _ints(a.get("stride", 1), n),
                                                _ints(a.get("dilation", 1), n), int(a.get("groups", 1)))
        return func(*args, **kwargs)


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
    net: nn.Module
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

    def n_windows(self, frames: int) -> int:
        """Windows the whole-track pass gives for ``frames`` frames (at least one)."""
        return -(-max(frames, self.input_length) // 32) // (self.input_length // 32)

    def normalise(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(T, bands) raw features -> (1, bands, T) float32 ``(x - mean) / std`` on the device (as the DataModule)."""
        x = torch.as_tensor(frames)
        out = torch.empty((1, x.shape[1], x.shape[0]), dtype=torch.float32, device=self.device)
        out.copy_(x.T[None])
        return out.sub_(self.mean).div_(self.std)

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

    def stream(self, chunk_windows: int | None = None, layer: str | None = None) -> "WindowStream":
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
        x = (mel - self.mean) / self.std
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


def ensemble_thresholds(models: Sequence[TaggerModel]) -> tuple[np.ndarray, str]:
    """Per-tag decision thresholds for ``--threshold auto`` and where they come from.

    One model: its ``thresholds.tsv`` (chosen on validation by training).
    Several: the thresholds that maximise F1 for the *ensemble's* validation
    probabilities, the mean of the runs' ``predictions/validation.npz`` (each
    model's own thresholds fit its own score scale, not the average's);
    without those files, the mean of the models' thresholds, and the source
    says so.
    """
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


def _time_geometry(module: nn.Module) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of ``module`` along time, or None for a layer this module does not know."""
    if isinstance(module, ConvBlock) and isinstance(module.conv.padding, tuple):
        c = module.conv
        return int(c.kernel_size[1]), int(c.stride[1]), int(c.padding[1])
    if isinstance(module, FreqDepConv):
        return 3, int(module.stride), 1
    if isinstance(module, nn.MaxPool2d) and not module.ceil_mode and module.dilation in (1, (1, 1)):
        k, s, p = (v if isinstance(v, int) else v[-1] for v in (module.kernel_size, module.stride, module.padding))
        return int(k), int(s), int(p)
    return None


def masked_layers(net: nn.Module) -> list[tuple[nn.Module, tuple[int, int, int]]] | None:
    """The layers :func:`batch_track_probabilities` masks, with their time geometry; None when ``net`` is not a
    :class:`~freqtag.model.FreqTagNet` it can mask (then tracks are scored one per pass)."""
    net = getattr(net, "_orig_mod", net)  # a torch.compile wrapper: mask the eager module inside
    if not isinstance(net, FreqTagNet):
        return None
    layers = []
    for name in TIME_MIXING:
        module = getattr(net, name)
        geometry = _time_geometry(module)
        if geometry is None:
            return None
        layers.append((module, geometry))
    return layers


def batch_track_probabilities(net: nn.Module, x: torch.Tensor, frames: Sequence[int]) -> torch.Tensor:
    """(B, bands, T) normalised tracks, track b in its first ``frames[b]`` frames -> (B, n_tags) probabilities.

    Each row equals scoring that track alone (sigmoid per window, mean over its
    windows; :func:`freqtag.train.module.track_probabilities`): the frames past a
    track's end, and every masked layer's outputs past the track's own output
    length, are set to zero, so nothing beyond the end (padding or another
    track's length) reaches its windows; windows past its last are dropped.
    ``net`` must be a FreqTagNet (:func:`masked_layers`) in eval mode.
    """
    layers = masked_layers(net)
    if layers is None:
        raise TypeError(f"batch_track_probabilities needs a FreqTagNet, got {type(net).__name__}")
    inner = getattr(net, "_orig_mod", net)
    L = int(inner.input_length)
    valid = [max(int(t), L) for t in frames]  # the network pads a track shorter than a window to one window
    if len(valid) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} tracks in the batch but {len(valid)} lengths")
    ends = []  # per masked layer: each track's output length when it is scored alone
    lengths = valid
    for _module, (k, s, p) in layers:
        lengths = [(v + 2 * p - k) // s + 1 for v in lengths]
        ends.append(lengths)

    def zero_past(row: list[int]) -> Any:
        def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
            for b, end in enumerate(row):  # only the padding is written: its cost follows the padding's size
                if end < out.shape[-1]:
                    out[b, ..., end:] = 0.0

        return hook

    hooks = [module.register_forward_hook(zero_past(row)) for (module, _), row in zip(layers, ends)]
    try:
        if min(frames) < x.shape[-1]:
            x = x.clone()  # the caller's batch stays as it was
            for b, t in enumerate(frames):
                x[b, :, int(t) :] = 0.0
        windows = torch.sigmoid(net(x).float())  # (B, n_tags, W of the longest)
    finally:
        for h in hooks:
            h.remove()
    counts = [inner.n_windows(int(t)) for t in frames]
    if all(c == windows.shape[-1] for c in counts):
        return windows.mean(dim=-1)
    return torch.stack([windows[b, :, :c].mean(dim=-1) for b, c in enumerate(counts)])


class WindowStream:
    """Frames in (any pieces, in order), window probabilities out: the whole-track result in bounded memory."""

    def __init__(self, model: TaggerModel, chunk_windows: int | None = None, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer
        L = model.input_length
        self.chunk = max(1, int(chunk_windows) if chunk_windows else CHUNK_FRAMES // L)
        self.context = max(1, math.ceil(RECEPTIVE_FRAMES / L))  # whole windows of context per side
        self.pieces: list[np.ndarray] = []
        self.buffered = 0
        self.offset = 0  # frame index of the first buffered frame (a multiple of L)
        self.next_window = 0  # first window not yet computed
        self.frames = 0
        self.out: list[np.ndarray] = []
        self.forward_passes = 0

    def push(self, frames: np.ndarray) -> None:
        if frames.shape[0] == 0:
            return
        self.pieces.append(np.asarray(frames, dtype=np.float32))
        self.buffered += frames.shape[0]
        self.frames += frames.shape[0]
        L = self.model.input_length
        while self.offset + self.buffered >= (self.next_window + self.chunk + self.context) * L:
            self._run(self.next_window + self.chunk, end=(self.next_window + self.chunk + self.context) * L)

    def _buffer(self) -> np.ndarray:
        if len(self.pieces) > 1:
            self.pieces = [np.concatenate(self.pieces)]
        return self.pieces[0]

    def _run(self, stop_window: int, end: int | None) -> None:
        """Compute windows [next_window, stop_window) from buffered frames [start, end)."""
        L = self.model.input_length
        buf = self._buffer()
        start = max(0, (self.next_window - self.context) * L)
        stop = buf.shape[0] + self.offset if end is None else end
        x = self.model.normalise(buf[start - self.offset : stop - self.offset])
        if self.layer is None:
            probs = self.model.window_probabilities(x)[0].cpu().numpy()
        else:
            probs = self.model.window_activations(x, self.layer)[0].cpu().numpy()
        self.forward_passes += 1
        first = self.next_window - start // L
        self.out.append(probs[first : first + stop_window - self.next_window])
        self.next_window = stop_window
        keep = max(0, (self.next_window - self.context) * L)
        self.pieces = [buf[keep - self.offset :]]
        self.buffered = self.pieces[0].shape[0]
        self.offset = keep

    def finish(self) -> np.ndarray:
        """(W, n_tags) float32 window probabilities (or (W, D) activations); W as the whole-track pass gives."""
        if self.frames == 0:
            raise ValueError("no frames were given")
        total = self.model.n_windows(self.frames)
        if self.next_window < total:
            self._run(total, end=None)
        return np.concatenate(self.out)[:total]


def track_windows(model: TaggerModel, frames: np.ndarray, chunk_windows: int | None = None) -> np.ndarray:
    """(T, bands) raw features -> (W, n_tags) window probabilities; their mean is the track's probabilities."""
    s = model.stream(chunk_windows)
    s.push(frames)
    return s.finish()
