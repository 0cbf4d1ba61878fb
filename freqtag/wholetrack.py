"""Whole-track scoring in bounded memory: the same window probabilities as one pass over the whole track.

Shared by training's evaluation (several tracks per pass) and tagging (one
track in chunks), so it sits below both and imports only the network.

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
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from freqtag.model import ConvBlock, FreqDepConv, FreqTagNet

__all__ = [
    "WindowModel",
    "WindowStream",
    "OneDNNConvolutions",
    "thread_invariant",
    "RECEPTIVE_FRAMES",
    "CHUNK_FRAMES",
    "TIME_MIXING",
    "batch_track_probabilities",
    "masked_layers",
]

#: Frames beyond a window's edge that its logits depend on (3x3 convs, strides 2,1,1,pool 2,2,2,1,2: 51 before).
RECEPTIVE_FRAMES = 51
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


class WindowModel(Protocol):
    """What :class:`WindowStream` runs: a loaded checkpoint (:class:`freqtag.tag.models.TaggerModel`)."""

    input_length: int
    net: FreqTagNet  # its n_windows: how many windows the whole-track pass gives

    def normalise(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    def window_probabilities(self, x: torch.Tensor) -> torch.Tensor: ...

    def window_activations(self, x: torch.Tensor, layer: str) -> torch.Tensor: ...


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

    def __init__(self, model: WindowModel, chunk_windows: int | None = None, layer: str | None = None) -> None:
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
        total = self.model.net.n_windows(self.frames)
        if self.next_window < total:
            self._run(total, end=None)
        return np.concatenate(self.out)[:total]
