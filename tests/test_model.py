"""The network: parameter counts, the frequency-dependent conv's arithmetic and
dropout, output shapes, Table 1 and gradient flow (small and fast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from freqtag.model import ConvBlock, FreqDepConv, FreqTagNet, layer_table


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def band_loop(x: torch.Tensor, layer: FreqDepConv, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-BN output of ``layer`` computed the slow, obvious way: one band at a time.

    ``mask`` (B, C_in, U) multiplies band u's 3-row slice only.
    """
    s = layer.stride
    xp = F.pad(x, (0, 0, 1, 1))
    rows = []
    for u in range(layer.n_bands):
        band = xp[:, :, u * s:u * s + 3, :]
        if mask is not None:
            band = band * mask[:, :, u, None, None]
        rows.append(F.conv2d(band, layer.weight[u], layer.bias[u], stride=(1, s), padding=(0, 1)))
    return torch.cat(rows, dim=2)


def bn_relu(y: torch.Tensor, bn: torch.nn.BatchNorm2d, training: bool) -> torch.Tensor:
    return F.relu(F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(),
                               bn.weight, bn.bias, training, 0.0, bn.eps))


def randomise(layer: FreqDepConv, seed: int) -> None:
    """Random weights and BN affine/statistics, so nothing is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        layer.bn.weight.copy_(torch.rand(layer.bn.weight.shape, generator=g) + 0.5)
        layer.bn.bias.copy_(torch.randn(layer.bn.bias.shape, generator=g))
        layer.bn.running_mean.copy_(torch.randn(layer.bn.running_mean.shape, generator=g))
        layer.bn.running_var.copy_(torch.rand(layer.bn.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize(
    ("filters", "n_mels", "expected"),
    [("convs", 96, 3_156_856), ("convs", 128, 3_287_928),
     ("freq_dep", 96, 13_484_664), ("freq_dep", 128, 17_746_808)],
)
def test_parameter_counts(filters: str, n_mels: int, expected: int) -> None:
    for length in (128, 224):
        assert n_trainable(FreqTagNet(n_mels, length, filters=filters)) == expected


@pytest.mark.parametrize("impl", ["bands", "bmm"])
@pytest.mark.parametrize(("n_freq", "stride"), [(7, 1), (8, 1), (7, 2), (8, 2), (1, 2)])
def test_freq_dep_conv_matches_band_loop(impl: str, n_freq: int, stride: int) -> None:
    torch.manual_seed(0)
    layer = FreqDepConv(5, 6, n_freq, stride=stride, dropout=0.2, impl=impl)
    randomise(layer, seed=n_freq + 10 * stride)
    layer.eval()
    x = torch.randn(3, 5, n_freq, 11)
    with torch.no_grad():
        got = layer(x)
        want = bn_relu(band_loop(x, layer), layer.bn, training=False)
    assert layer.n_bands == (n_freq - 1) // stride + 1
    assert got.shape == (3, 6, layer.n_bands, (11 - 1) // stride + 1)
    assert (got - want).abs().max().item() < 1e-5


def test_freq_dep_conv_is_a_conv2d_when_bands_share_weights() -> None:
    """With one kernel copied into every band it must equal a strided 3x3 Conv2d."""
    torch.manual_seed(1)
    layer = FreqDepConv(4, 3, 9, stride=2).eval()
    conv = torch.nn.Conv2d(4, 3, 3, stride=2, padding=1)
    with torch.no_grad():
        layer.weight.copy_(conv.weight.expand_as(layer.weight))
        layer.bias.copy_(conv.bias.expand_as(layer.bias))
        x = torch.randn(2, 4, 9, 10)
        want = F.relu(layer.bn(conv(x)))
        assert (layer(x) - want).abs().max().item() < 1e-5


def test_freq_dep_init_matches_reference_grouped_conv() -> None:
    """Reference: kaiming_normal_(fan_out) on the grouped weight (U*C_out, C_in, 3, 3)."""
    torch.manual_seed(2)
    layer = FreqDepConv(64, 128, 32, stride=2)  # U = 16
    expected_std = (2.0 / (16 * 128 * 9)) ** 0.5
    assert layer.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert layer.bias.abs().max().item() <= 1.0 / (64 * 9) ** 0.5


@pytest.mark.parametrize("impl", ["bands", "bmm"])
@pytest.mark.parametrize("stride", [1, 2])
def test_freq_dep_dropout_drops_channel_band_slices(impl: str, stride: int) -> None:
    """In training the layer uses band_mask(): one draw per (sample, channel, band),
    applied to that band's 3-row slice only (overlapping rows are not tied)."""
    layer = FreqDepConv(6, 4, 9, stride=stride, dropout=0.5, impl=impl)
    randomise(layer, seed=3)
    layer.train()
    x = torch.randn(4, 6, 9, 12)
    torch.manual_seed(123)
    mask = layer.band_mask(4, x.device, x.dtype)
    torch.manual_seed(123)
    got = layer(x)
    want = bn_relu(band_loop(x, layer, mask), layer.bn, training=True)
    assert (got - want).abs().max().item() < 1e-5

    # The mask itself: one value per (sample, channel, band), 0 or 1/(1-p).
    torch.manual_seed(0)
    big = layer.band_mask(64, x.device, x.dtype)
    assert big.shape == (64, 6, layer.n_bands)
    assert set(big.unique().tolist()) == {0.0, 2.0}
    assert abs((big == 0).float().mean().item() - 0.5) < 0.05
    # A mask that differs from the previous one changes the output: it is used.
    torch.manual_seed(124)
    assert not torch.allclose(layer(x), got)


@pytest.mark.parametrize("impl", ["bands", "bmm"])
def test_freq_dep_dropout_is_per_band_not_per_row(impl: str) -> None:
    """Input row f (stride 1) feeds bands f-1, f, f+1. Its gradient vanishes only
    when the channel is dropped in all three bands, not in one or two."""
    layer = FreqDepConv(3, 2, 6, stride=1, dropout=0.5, impl=impl)
    randomise(layer, seed=4)
    keep = torch.ones(2, 3, layer.n_bands)
    keep[0, 1, 1:4] = 0.0  # sample 0, channel 1: bands 1-3 -> row 2 fully dropped
    keep[1, 2, 2] = 0.0  # sample 1, channel 2: band 2 only -> no row fully dropped
    layer.band_mask = lambda b, device, dtype: keep.to(device, dtype) * 2.0  # type: ignore[method-assign]
    layer.train()
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    out = layer(x)
    want = bn_relu(band_loop(x, layer, keep * 2.0), layer.bn, training=True)
    assert (out - want).abs().max().item() < 1e-5
    out.square().sum().backward()
    zero_rows = (x.grad.abs().sum(dim=3) == 0).nonzero().tolist()  # (b, c, f) fully zero
    assert zero_rows == [[0, 1, 2]]


def test_output_shapes_and_windows() -> None:
    torch.manual_seed(0)
    model = FreqTagNet(96, 128, n_tags=56, filters="freq_dep").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 96, 128)).shape == (2, 56, 1)  # a crop: one window
        assert model(torch.randn(1, 96, 5 * 128)).shape == (1, 56, 5)  # a track: 5 windows
        assert model(torch.randn(1, 96, 5 * 128 + 40)).shape == (1, 56, 5)  # tail dropped
        short = torch.randn(1, 96, 50)
        out = model(short)
        assert out.shape == (1, 56, 1)  # shorter than a crop: padded to one window
        padded = F.pad(short, (0, 128 - 50))
        assert torch.allclose(out, model(padded))
    for t in (50, 128, 5 * 128, 5 * 128 + 40, 1000):
        assert model.n_windows(t) == model(torch.zeros(1, 96, t)).shape[2]


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="filters"):
        FreqTagNet(96, 128, filters="resnet")
    with pytest.raises(ValueError, match="features.n_mels"):
        FreqTagNet(100, 128)
    with pytest.raises(ValueError, match="data.input_length"):
        FreqTagNet(96, 100)
    with pytest.raises(ValueError, match="data.input_length"):
        FreqTagNet(96, 0)


# Table 1 of the paper for 128 x 224 as the network is built (the authors' code): the
# paper prints 128 channels for filter1 and swaps filter2's and filter3's strides; built,
# filter1 has 256 channels, filter2 has stride 2 and filter3 stride 1 (so filter3 and
# filter4 see 8 x 14), and the average pool's stride equals its kernel (7; the paper
# prints 1, which gives the same single window on a 7-step input).
TABLE1 = [
    ("conv1", "128 × 224", "3 × 3 / 2", 64, 0.0),
    ("conv2", "64 × 112", "3 × 3 / 1", 64, 0.0),
    ("conv3", "64 × 112", "3 × 3 / 1", 128, 0.0),
    ("maxpool", "64 × 112", "3 × 3 / 2", None, None),
    ("filter1", "32 × 56", "3 × 3 / 2", 256, 0.2),
    ("filter2", "16 × 28", "3 × 3 / 2", 256, 0.2),
    ("filter3", "8 × 14", "3 × 3 / 1", 256, 0.2),
    ("filter4", "8 × 14", "3 × 3 / 2", 256, 0.2),
    ("collapse", "4 × 7", "4 × 1 / 1", 512, 0.2),
    ("avgpool", "1 × 7", "1 × 7 / 7", None, None),
    ("fc", "1 × 1", "1 × 1", 1024, 0.5),
    ("output", "1 × 1", "1 × 1", 56, 0.5),
]


@pytest.mark.parametrize("filters", ["convs", "freq_dep"])
def test_layer_table_matches_paper(filters: str) -> None:
    model = FreqTagNet(128, 224, filters=filters)
    model.train()
    rows = layer_table(model)
    assert model.training  # restored
    got = [(r["layer"], r["input"], r["kernel"], r["channels"], r["dropout"]) for r in rows]
    assert got == TABLE1
    assert sum(r["params"] for r in rows) == n_trainable(model)
    by_layer = {r["layer"]: r["params"] for r in rows}
    assert by_layer["maxpool"] == by_layer["avgpool"] == 0
    if filters == "freq_dep":  # 16, 8, 8 and 4 bands of 3x3 kernels + bias, + BN
        assert [by_layer[f"filter{i}"] for i in range(1, 5)] == [
            16 * (128 * 256 * 9 + 256) + 512, 8 * (256 * 256 * 9 + 256) + 512,
            8 * (256 * 256 * 9 + 256) + 512, 4 * (256 * 256 * 9 + 256) + 512]


@pytest.mark.parametrize("filters", ["convs", "freq_dep"])
def test_gradients_flow_everywhere(filters: str) -> None:
    torch.manual_seed(0)
    model = FreqTagNet(64, 64, n_tags=7, filters=filters).train()
    x = torch.randn(4, 64, 64)
    loss = F.binary_cross_entropy_with_logits(model(x), torch.randint(0, 2, (4, 7, 1)).float())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_conv_block_init_and_shape() -> None:
    torch.manual_seed(0)
    block = ConvBlock(64, 128, stride=2)
    assert block.conv.weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert block(torch.randn(2, 64, 9, 10)).shape == (2, 128, 5, 5)
