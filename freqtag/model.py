"""The tagging network: a convolutional stem, four filter layers, a collapse.

One network with two kinds of filter layers (``filters``):

- ``"convs"``: ordinary 3x3 convolution blocks (:class:`ConvBlock`);
- ``"freq_dep"``: frequency-dependent convolutions (:class:`FreqDepConv`), whose
  kernels are shared along time but not along frequency.

The layer sizes, initialisations and dropout placements follow the authors'
public code, where it differs from the paper's Table 1 too (filter1 has 256
channels, filter2 stride 2 and filter3 stride 1); :func:`layer_table`
recomputes Table 1 from an instantiated model so the two can be compared.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvBlock", "FreqDepConv", "FreqTagNet", "layer_table", "FILTERS"]

#: Valid values of ``FreqTagNet(filters=...)``.
FILTERS: tuple[str, ...] = ("convs", "freq_dep")

#: Layer names, in forward order; they are also the model's attribute names.
LAYERS: tuple[str, ...] = (
    "conv1", "conv2", "conv3", "maxpool",
    "filter1", "filter2", "filter3", "filter4",
    "collapse", "avgpool", "fc", "output",
)


class ConvBlock(nn.Module):
    """Dropout2d -> Conv2d (with bias) -> BatchNorm2d -> ReLU.

    The conv weights get Kaiming normal init (fan_out, relu) as in the reference;
    the bias keeps PyTorch's default init. ``kernel_size``/``padding`` default to
    the 3x3 "same" conv of the stem and filter layers; the collapse layer uses a
    (n_mels/32, 1) kernel without padding.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int = 1,
        dropout: float = 0.0,
        kernel_size: int | tuple[int, int] = 3,
        padding: int | tuple[int, int] = 1,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(self.dropout(x))))


class FreqDepConv(nn.Module):
    """Frequency-dependent 3x3 convolution -> shared BatchNorm2d -> ReLU.

    The input (B, C_in, F, T) is zero padded by one row on each side of the
    frequency axis and cut into ``U = (F - 1) // stride + 1`` overlapping bands of
    3 rows (band u = padded rows ``u*stride .. u*stride+2``). Each band has its
    own 3x3 kernel bank C_in -> C_out with bias, applied along time only (time
    stride ``stride``, time padding 1); band u gives output row u. So the output
    is (B, C_out, U, T') with T' = (T - 1) // stride + 1, like a strided 3x3 conv.

    Dropout (training only) zeroes whole (sample, channel, band) slices of the
    unfolded input and rescales by 1/(1-p): a row shared by two overlapping bands
    can be dropped in one band and kept in the other, as in the reference
    (Dropout2d on the unfolded tensor).

    Parameters: ``weight`` (U, C_out, C_in, 3, 3) and ``bias`` (U, C_out). This is
    the reference's grouped-conv weight (U*C_out, C_in, 3, 3) and bias (U*C_out,)
    viewed band-major, so weights convert with a plain ``reshape``. The init
    reproduces the reference exactly: there ``kaiming_normal_(fan_out, relu)``
    ran on the grouped weight, whose fan_out PyTorch computes as U*C_out*9, so
    std = sqrt(2 / (U*C_out*9)); the bias keeps PyTorch's conv default,
    uniform(+-1/sqrt(C_in*9)).

    Two formulations of the same arithmetic (``impl``):

    - ``"bands"``: one oneDNN/cuDNN conv per band on a contiguous band tensor.
      Fastest measured on CPU (bench/freqconv.py: 1.2-1.5x the reference's
      grouped conv): the per-band convs run near peak, and unbinding (rather
      than indexing) keeps backward from materialising one zero-filled gradient
      per band. Being U small ops, it suffers most when the CPU threads are
      oversubscribed (other busy processes): then set fewer torch threads.
    - ``"bmm"``: unfold along frequency and time (im2col) + one batched matmul
      with the band as batch dimension: a single large GEMM, which suits GPUs
      (and tensor cores under autocast) better than U small convs.
    - ``"auto"`` (default): ``"bands"`` on CPU, ``"bmm"`` on other devices.
    """

    IMPLS: tuple[str, ...] = ("auto", "bands", "bmm")

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n_freq: int,
        stride: int = 1,
        dropout: float = 0.0,
        impl: Literal["auto", "bands", "bmm"] = "auto",
    ) -> None:
        super().__init__()
        if n_freq < 1 or stride < 1:
            raise ValueError(f"n_freq and stride must be positive, got {n_freq} and {stride}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS}, got {impl!r}")
        self.c_in, self.c_out, self.n_freq, self.stride = c_in, c_out, n_freq, stride
        self.p = float(dropout)
        self.impl = impl
        self.n_bands = (n_freq - 1) // stride + 1
        self.weight = nn.Parameter(torch.empty(self.n_bands, c_out, c_in, 3, 3))
        self.bias = nn.Parameter(torch.empty(self.n_bands, c_out))
        self.bn = nn.BatchNorm2d(c_out)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: Kaiming normal over the grouped weight, default bias."""
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / (self.n_bands * self.c_out * 9)))
            bound = 1.0 / math.sqrt(self.c_in * 9)
            self.bias.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.c_in}, {self.c_out}, n_freq={self.n_freq}, bands={self.n_bands}, "
            f"stride={self.stride}, dropout={self.p}, impl={self.impl!r}"
        )

    def band_mask(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Dropout mask of shape (B, C_in, U): 0 or 1/(1-p) per (sample, channel, band).

        Drawn from the default generator, so ``torch.manual_seed`` reproduces it.
        """
        keep = 1.0 - self.p
        mask = torch.empty(batch, self.c_in, self.n_bands, device=device, dtype=dtype)
        return mask.bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.c_in or x.shape[2] != self.n_freq:
            raise ValueError(
                f"FreqDepConv expects (B, {self.c_in}, {self.n_freq}, T), got {tuple(x.shape)}"
            )
        mask = None
        if self.training and self.p > 0.0:
            mask = self.band_mask(x.shape[0], x.device, x.dtype)
        impl = self.impl
        if impl == "auto":
            impl = "bands" if x.device.type == "cpu" else "bmm"
        y = self._bands(x, mask) if impl == "bands" else self._bmm(x, mask)
        return F.relu(self.bn(y))

    def _bands(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """One conv per band over a contiguous (U, B, C_in, 3, T) band tensor."""
        s = self.stride
        xp = F.pad(x, (0, 0, 1, 1))
        # (B, C, U, T, 3) view -> (U, B, C, 3, T): each band a contiguous conv input.
        bands = xp.unfold(2, 3, s).permute(2, 0, 1, 4, 3).contiguous()
        if mask is not None:
            bands = bands * mask.permute(2, 0, 1)[..., None, None]
        outs = [
            F.conv2d(xb, wb, bb, stride=(1, s), padding=(0, 1))
            for xb, wb, bb in zip(bands.unbind(0), self.weight.unbind(0), self.bias.unbind(0))
        ]
        return torch.cat(outs, dim=2)  # U x (B, C_out, 1, T') -> (B, C_out, U, T')

    def _bmm(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """im2col along frequency and time, then one batched GEMM over bands."""
        s = self.stride
        b, c = x.shape[:2]
        u, o = self.n_bands, self.c_out
        xf = F.pad(x, (1, 1, 1, 1)).unfold(2, 3, s)  # (B, C, U, T+2, 3)
        if mask is not None:
            xf = xf * mask[..., None, None]
        cols = xf.unfold(3, 3, s)  # (B, C, U, T', 3 freq, 3 time)
        t_out = cols.shape[3]
        cols = cols.permute(2, 0, 3, 1, 4, 5).reshape(u, b * t_out, c * 9)
        w = self.weight.reshape(u, o, c * 9).transpose(1, 2)  # (U, C*9, C_out)
        y = torch.baddbmm(self.bias.unsqueeze(1), cols, w)  # (U, B*T', C_out)
        return y.view(u, b, t_out, o).permute(1, 3, 0, 2)  # (B, C_out, U, T')


class FreqTagNet(nn.Module):
    """The paper's network, fully convolutional in time.

    Input (B, n_mels, T) normalised mel spectrograms; output logits
    (B, n_tags, W), one logit vector per non-overlapping window of
    ``input_length`` frames: W = 1 for a crop of ``input_length`` frames and
    W = ceil(T/32) // (input_length/32) in general (see :meth:`n_windows`), so a
    trailing part shorter than a window is dropped, as in the reference's
    average pooling. Inputs shorter than ``input_length`` are zero padded on the
    right to ``input_length`` inside :meth:`forward` so that short tracks still
    get one prediction (zero is the mean of the normalised features).
    """

    def __init__(
        self,
        n_mels: int,
        input_length: int,
        n_tags: int = 56,
        filters: str = "freq_dep",
    ) -> None:
        super().__init__()
        if filters not in FILTERS:
            raise ValueError(
                f"model.filters must be one of {', '.join(map(repr, FILTERS))}; got {filters!r}"
            )
        if n_mels <= 0 or n_mels % 32:
            raise ValueError(
                f"features.n_mels must be a positive multiple of 32 (the network halves "
                f"the frequency axis five times), got {n_mels}"
            )
        if input_length <= 0 or input_length % 32:
            raise ValueError(
                f"data.input_length must be a positive multiple of 32 (the network halves "
                f"the time axis five times), got {input_length}"
            )
        if n_tags <= 0:
            raise ValueError(f"n_tags must be positive, got {n_tags}")
        self.n_mels, self.input_length, self.n_tags, self.filters = n_mels, input_length, n_tags, filters

        self.conv1 = ConvBlock(1, 64, stride=2)
        self.conv2 = ConvBlock(64, 64, stride=1)
        self.conv3 = ConvBlock(64, 128, stride=1)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # (c_in, c_out, stride, frequency height at the layer's input)
        specs = [(128, 256, 2, n_mels // 4), (256, 256, 2, n_mels // 8),
                 (256, 256, 1, n_mels // 16), (256, 256, 2, n_mels // 16)]
        for i, (c_in, c_out, stride, n_freq) in enumerate(specs, start=1):
            if filters == "convs":
                layer: nn.Module = ConvBlock(c_in, c_out, stride=stride, dropout=0.2)
            else:
                layer = FreqDepConv(c_in, c_out, n_freq, stride=stride, dropout=0.2)
            setattr(self, f"filter{i}", layer)
        self.collapse = ConvBlock(256, 512, dropout=0.2, kernel_size=(n_mels // 32, 1), padding=0)
        self.avgpool = nn.AvgPool1d(kernel_size=input_length // 32)
        self.fc = nn.Sequential(nn.Dropout(0.5), nn.Conv1d(512, 1024, 1), nn.ReLU())
        nn.init.kaiming_normal_(self.fc[1].weight, mode="fan_out", nonlinearity="relu")
        self.output = nn.Sequential(nn.Dropout(0.5), nn.Conv1d(1024, n_tags, 1))
        nn.init.xavier_normal_(self.output[1].weight)

    def n_windows(self, n_frames: int) -> int:
        """Number of logit vectors (W) that :meth:`forward` returns for T frames."""
        t = max(n_frames, self.input_length)
        return -(-t // 32) // (self.input_length // 32)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.n_mels:
            raise ValueError(f"expected input (B, {self.n_mels}, T), got {tuple(x.shape)}")
        if x.shape[2] < self.input_length:
            x = F.pad(x, (0, self.input_length - x.shape[2]))
        x = self.maxpool(self.conv3(self.conv2(self.conv1(x.unsqueeze(1)))))
        x = self.filter4(self.filter3(self.filter2(self.filter1(x))))
        x = self.avgpool(self.collapse(x).squeeze(2))  # (B, 512, W)
        return self.output(self.fc(x))


def _size(shape: torch.Size) -> str:
    """The F x T part of an activation's shape (F = 1 for (B, C, T) tensors)."""
    f = shape[-2] if len(shape) == 4 else 1
    return f"{f} × {shape[-1]}"


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _describe(module: nn.Module) -> tuple[str, int | None, float | None]:
    """(kernel / stride, out channels, dropout) of one layer, read from its modules."""
    if isinstance(module, ConvBlock):
        (kh, kw), (sh, _) = _pair(module.conv.kernel_size), _pair(module.conv.stride)
        return f"{kh} × {kw} / {sh}", module.conv.out_channels, module.dropout.p
    if isinstance(module, FreqDepConv):
        return f"3 × 3 / {module.stride}", module.c_out, module.p
    if isinstance(module, nn.MaxPool2d):
        (kh, kw), (sh, _) = _pair(module.kernel_size), _pair(module.stride)
        return f"{kh} × {kw} / {sh}", None, None
    if isinstance(module, nn.AvgPool1d):
        (k,), (s,) = module.kernel_size, module.stride
        return f"1 × {k} / {s}", None, None
    if isinstance(module, nn.Sequential):  # fc / output: dropout + 1x1 conv1d
        drop = next(m for m in module if isinstance(m, nn.Dropout))
        conv = next(m for m in module if isinstance(m, nn.Conv1d))
        return "1 × 1", conv.out_channels, drop.p
    raise TypeError(f"no description for {type(module).__name__}")


def layer_table(model: FreqTagNet) -> list[dict]:
    """The paper's Table 1, recomputed from ``model``.

    Runs a (1, n_mels, input_length) zero input in eval mode with forward hooks
    to record each layer's input size, so the table always describes the model
    as built (the paper's own table has the filter2/filter3 strides swapped and
    128 channels for filter1). Rows: ``layer``, ``input`` ("F × T"), ``kernel``
    ("kh × kw / stride"), ``channels``, ``dropout``, ``params`` (trainable).
    """
    sizes: dict[str, str] = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, args, _out, name=name: sizes.__setitem__(name, _size(args[0].shape))
        )
        for name in LAYERS
    ]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, model.n_mels, model.input_length, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rows = []
    for name in LAYERS:
        module = getattr(model, name)
        kernel, channels, dropout = _describe(module)
        rows.append({
            "layer": name,
            "input": sizes[name],
            "kernel": kernel,
            "channels": channels,
            "dropout": dropout,
            "params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        })
    return rows
