"""`freqtag export`: a checkpoint as a self-contained TorchScript or ONNX model plus a sidecar JSON.

The exported model takes **raw** log-mel features, exactly as the checkpoint's
recipe computes them (``freqtag.audio.whole.features_from_file`` gives (frames,
bands): transpose to (bands, frames)), shaped (batch, bands, frames) float32,
and returns per-window probabilities (batch, windows, tags)
(:class:`freqtag.tag.models.RawMelTagger`): the train-split
normalisation ``(x - mean) / std`` and the sigmoid are inside, so a user needs
only the recipe. A window is ``input_length`` frames; the track's
probabilities are the mean over the windows, as training's evaluation
computes them. Inputs shorter than one window are padded inside the model (as
the network does in training) for TorchScript; the ONNX graph is exported for
``frames >= input_length`` (the sidecar's ``min_frames``): pad shorter input
with the sidecar's ``mean`` (zero after normalisation) to ``min_frames``.

``--format hub`` writes a folder to upload as a Hugging Face model instead
(:mod:`freqtag.tag.modelcard`).

The sidecar ``FILE.json`` holds the feature recipe, the tag list (output
order), input_length, mean/std and the input/output layout; the ONNX file
also carries it as metadata (``freqtag``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from freqtag.system.atomic import atomic_path, atomic_write_text
from freqtag.system.exits import usage
from freqtag.tag.sidecar import sidecar

__all__ = ["export_checkpoint", "add_export_arguments", "run_export", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("torchscript", "onnx", "hub")
ONNX_OPSET = 18


@contextmanager
def _consistent_cudnn_flags() -> Iterator[None]:
    """Give cuDNN's conv the rnn's TF32 setting during the ONNX export, then restore it.

    torch.export reads the legacy ``cudnn.allow_tf32``, which raises when the
    conv and rnn settings differ, as they do in a process that has trained
    (training sets the conv's ``fp32_precision`` only). The export runs on the
    CPU: the setting changes nothing in the graph.
    """
    import torch

    conv = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = conv


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path) -> tuple[Path, Path]:
    """Write the exported model to ``out`` and its sidecar to ``out + .json``; returns both paths."""
    import torch

    from freqtag.tag.models import RawMelTagger, load_model

    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"--format {fmt}: export_checkpoint writes torchscript or onnx (hub: freqtag.tag.modelcard)")
    out = Path(out)
    model = load_model(ckpt, "cpu")
    wrapper = RawMelTagger(model.net, model.mean, model.std, model.input_length).eval()
    L, bands = model.input_length, model.spec.n_mels
    example = torch.randn(2, bands, 3 * L + 17) * model.std + model.mean
    meta = sidecar(model, fmt, out)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the short-input branch, handled by the wrapper
            traced = torch.jit.trace(model.net, (example - model.mean) / model.std, check_trace=False)
        wrapper.net = traced  # traced for any length >= input_length; the scripted wrapper pads shorter input
        scripted = torch.jit.script(wrapper)
        extra = {"freqtag.json": json.dumps(meta)}
        with atomic_path(out) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files=extra)
    else:
        import onnx

        frames = torch.export.Dim("frames", min=L)
        batch = torch.export.Dim("batch", min=1)
        with torch.no_grad(), warnings.catch_warnings(), _consistent_cudnn_flags():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=["mel"], output_names=["probabilities"],
                dynamic_shapes={"mel": {0: batch, 2: frames}}, opset_version=ONNX_OPSET, verbose=False,
            )
        proto = program.model_proto
        entry = proto.metadata_props.add()
        entry.key, entry.value = "freqtag", json.dumps(meta)
        with atomic_path(out) as tmp:
            onnx.save_model(proto, str(tmp))
    side = out.with_name(out.name + ".json")
    atomic_write_text(side, json.dumps(meta, indent=2) + "\n")
    return out, side


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export a trained checkpoint. The model takes RAW log-mel features (batch, bands, frames) of the "
        "checkpoint's recipe (normalisation is inside) and returns per-window probabilities (batch, windows, tags). "
        "The recipe, tag list and statistics go to OUT.json (and, for ONNX, the model's metadata)."
    )
    p.add_argument("--ckpt", required=True,
                   help="a run directory, its checkpoints/final.ckpt, an https:// URL or hf://ORG/REPO")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="torchscript or onnx: a model file; hub: a folder to upload as a Hugging Face model "
                   "(checkpoint, thresholds, metrics, model card)")
    p.add_argument("--out", type=Path, required=True,
                   help="the file to write (model.pt, model.onnx), or the folder for --format hub")


def run_export(args: argparse.Namespace) -> int:
    from freqtag.tag.models import CheckpointError

    try:
        if args.format == "hub":
            from freqtag.tag.modelcard import write_hub_folder

            files = write_hub_folder(args.ckpt, args.out)
            print(f"wrote {args.out}: {', '.join(f.name for f in files)}; upload it with "
                  f"`huggingface-cli upload ORG/REPO {args.out}`")
            return 0
        out, side = export_checkpoint(args.ckpt, args.format, args.out)
    except (CheckpointError, ValueError) as e:
        return usage(str(e), "export")
    print(f"wrote {out} ({args.format}) and {side}")
    return 0
