"""Time freqtag's FreqDepConv against the reference's formulation.

The reference builds the frequency-dependent convolution from an unfold along
frequency (bands stacked as channels) and one grouped Conv2d with a group per
band. freqtag's FreqDepConv computes the same arithmetic as one conv per band
("bands", the CPU default) or as im2col + one batched matmul ("bmm", the default
on GPU). This script times forward + backward (training mode, input gradient
included, as inside the network) of the four filter layers of the freq_dep model
for mel128 crops of 224 frames and mel96 crops of 128 frames, batch 32, checks
that the formulations agree (eval mode, same weights), prints a table and writes
JSON.

    python bench/freqconv.py [--repeats N] [--batch B] [--threads N] [--out bench/results/freqconv.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freqtag.model import FreqDepConv
from machine import cpu_name  # bench/machine.py, beside this script

# (features, n_mels, input_length): the freq_dep layers' shapes follow from these.
CONFIGS = [("mel128", 128, 224), ("mel96", 96, 128)]
# filter layers of FreqTagNet: (c_in, c_out, stride, frequency height divisor)
FILTERS = [("filter1", 128, 256, 2, 4), ("filter2", 256, 256, 2, 8),
           ("filter3", 256, 256, 1, 16), ("filter4", 256, 256, 2, 16)]


class GroupedFreqDepConv(nn.Module):
    """The reference formulation: unfold along frequency + grouped Conv2d.

    The padded input is cut into U bands of 3 rows, stacked as U*C_in channels of
    height 3 (band-major); a Conv2d with U groups, kernel 3x3, no frequency
    padding and time stride s gives U*C_out channels of height 1, which are
    rearranged to (B, C_out, U, T'). Dropout2d on the stacked tensor drops
    (sample, channel, band) slices.
    """

    def __init__(self, c_in: int, c_out: int, n_freq: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.n_bands = (n_freq - 1) // stride + 1
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(c_in * self.n_bands, c_out * self.n_bands, 3,
                              stride=(1, stride), padding=(0, 1), groups=self.n_bands)
        self.bn = nn.BatchNorm2d(c_out)

    @classmethod
    def like(cls, ours: FreqDepConv) -> "GroupedFreqDepConv":
        """Same weights as ``ours`` (its weight is the grouped weight viewed band-major)."""
        ref = cls(ours.c_in, ours.c_out, ours.n_freq, ours.stride, ours.p)
        with torch.no_grad():
            ref.conv.weight.copy_(ours.weight.reshape_as(ref.conv.weight))
            ref.conv.bias.copy_(ours.bias.reshape(-1))
        ref.bn.load_state_dict(ours.bn.state_dict())
        return ref

    def forward(self, x: Tensor) -> Tensor:
        b, c, _, t = x.shape
        u = self.n_bands
        bands = F.pad(x, (0, 0, 1, 1)).unfold(2, 3, self.stride)  # (B, C, U, T, 3)
        bands = bands.permute(0, 2, 1, 4, 3).reshape(b, u * c, 3, t)
        y = self.conv(self.dropout(bands))  # (B, U*C_out, 1, T')
        y = y.reshape(b, u, self.c_out, -1).transpose(1, 2)
        return F.relu(self.bn(y))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(layer: nn.Module, x: Tensor, grad: Tensor) -> None:
    """One training forward + backward (parameters and input)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(grad)


def time_layers(layers: dict[str, nn.Module], x: Tensor, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median ms per forward+backward; the variants run in turn within each repeat
    so that load from other processes hits them alike."""
    device = x.device
    grad = None
    for layer in layers.values():
        layer.train()
        with torch.no_grad():
            grad = torch.randn_like(layer(x)) if grad is None else grad
    times: dict[str, list[float]] = {k: [] for k in layers}
    for i in range(warmup + repeats):
        for name, layer in layers.items():
            sync(device)
            start = time.perf_counter()
            step(layer, x, grad)
            sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def max_diff(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def run(device: torch.device, batch: int, repeats: int) -> list[dict]:
    rows = []
    for features, n_mels, length in CONFIGS:
        for name, c_in, c_out, stride, div in FILTERS:
            n_freq, n_time = n_mels // div, length // div
            torch.manual_seed(0)
            ours = FreqDepConv(c_in, c_out, n_freq, stride=stride, dropout=0.2, impl="auto").to(device)
            bmm = FreqDepConv(c_in, c_out, n_freq, stride=stride, dropout=0.2, impl="bmm").to(device)
            bmm.load_state_dict(ours.state_dict())
            ref = GroupedFreqDepConv.like(ours).to(device)
            x = torch.randn(batch, c_in, n_freq, n_time, device=device, requires_grad=True)
            # Compare before timing: training updates BN statistics differently
            # in each copy (their dropout masks differ).
            diff = max(max_diff(ours, ref, x), max_diff(bmm, ref, x))
            ms = time_layers({"ours": ours, "bmm": bmm, "ref": ref}, x, repeats)
            impl = "bands" if device.type == "cpu" else "bmm"
            rows.append({
                "device": device.type, "features": features, "input_length": length,
                "layer": name, "input": [batch, c_in, n_freq, n_time], "bands": ours.n_bands,
                "stride": stride, "ours_impl": impl,
                "ours_ms": round(ms["ours"], 2), "bmm_ms": round(ms["bmm"], 2), "ref_ms": round(ms["ref"], 2),
                "speedup": round(ms["ref"] / ms["ours"], 3),
                "max_abs_diff": diff,
            })
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'device':6} {'config':11} {'layer':8} {'input (B,C,F,T)':18} {'U':>3} "
          f"{'ours ms':>8} {'bmm ms':>8} {'ref ms':>8} {'speed-up':>8} {'max|diff|':>9}")


def format_row(r: dict) -> str:
    shape = ",".join(map(str, r["input"]))
    config = f"{r['features']}/{r['input_length']}"
    return (f"{r['device']:6} {config:11} {r['layer']:8} {shape:18} {r['bands']:>3} "
            f"{r['ours_ms']:8.1f} {r['bmm_ms']:8.1f} {r['ref_ms']:8.1f} {r['speedup']:7.2f}x {r['max_abs_diff']:9.1e}")


def totals(rows: list[dict]) -> list[dict]:
    """Sum over the four filter layers per device and config: one training step's share."""
    out = []
    keys = sorted({(r["device"], r["features"], r["input_length"]) for r in rows})
    for device, features, length in keys:
        sel = [r for r in rows if (r["device"], r["features"], r["input_length"]) == (device, features, length)]
        ours, bmm, ref = (sum(r[k] for r in sel) for k in ("ours_ms", "bmm_ms", "ref_ms"))
        out.append({"device": device, "features": features, "input_length": length,
                    "ours_ms": round(ours, 1), "bmm_ms": round(bmm, 1), "ref_ms": round(ref, 1),
                    "speedup": round(ref / ours, 3),
                    "max_abs_diff": max(r["max_abs_diff"] for r in sel)})
    return out




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed iterations per layer (median)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "freqconv.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {cpu_name()}, "
          f"load average {load_before[0]:.2f}")
    if load_before[0] > 0.5:
        print("note: other processes are running; OpenMP threads that wait for a descheduled peer make "
              "the per-band loop (many small ops) suffer most; --threads 1 measures the arithmetic")
    print("ours = FreqDepConv default impl (bands on CPU, bmm on GPU); ref = unfold + grouped Conv2d;")
    print(f"forward+backward, train mode, median of {args.repeats}; speed-up = ref / ours\n")
    print(HEADER)
    rows: list[dict] = []
    for device in devices:
        rows += run(device, args.batch, args.repeats)
    tot = totals(rows)
    print("\nfour filter layers together:")
    for t in tot:
        print(f"  {t['device']:5} {t['features']}/{t['input_length']}: ours {t['ours_ms']:.1f} ms, "
              f"bmm {t['bmm_ms']:.1f} ms, ref {t['ref_ms']:.1f} ms -> {t['speedup']:.2f}x "
              f"(max |diff| {t['max_abs_diff']:.1e})")

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "batch": args.batch, "repeats": args.repeats,
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "layers": rows, "totals": tot,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
