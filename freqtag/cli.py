"""The `freqtag` command: every subcommand registered in :data:`COMMANDS`, run under one error policy.

A subcommand is its ``help`` line, a function adding its options (and its
description) to its parser, and a runner ``run(args) -> exit code``; the
runners live next to what they run and import their heavy modules when run,
so ``freqtag --help`` stays instant (no torch). Exit codes and error lines are
:mod:`freqtag.system.exits`'s: errors a user can cause are one line on stderr
(exit 1), never a traceback; usage errors exit 2; Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from freqtag.data.download import cli as download
from freqtag.prepare import cli as prepare
from freqtag.scoring import ensemble, submission
from freqtag.system.exits import FAILED, error, run_command, usage
from freqtag.tag import embed, export, predict
from freqtag.tag.serve import command as serve

__all__ = ["main", "build_parser", "COMMANDS", "Command", "print_store_info"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its line in ``freqtag --help``, the function adding its options, its runner."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]



def print_store_info(path: str | Path) -> None:
    """Tracks, hours, frames, statistics and the feature spec of a store, as a table."""
    from rich.console import Console
    from rich.table import Table

    from freqtag.data.store import FeatureStore, store_summary

    info = store_summary(FeatureStore(path))
    table = Table(title=f"feature store {info['path']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("tracks", f"{info['tracks']:,}")
    table.add_row("hours", f"{info['hours']:,.3f}")
    table.add_row("frames", f"{info['frames']:,}")
    table.add_row("mean", f"{info['mean']:.4f}")
    table.add_row("std", f"{info['std']:.4f}")
    table.add_row("statistics from", info["stats"])
    for key, value in info["spec"].items():
        table.add_row(f"spec.{key}", str(value))
    Console(soft_wrap=False).print(table)


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="the store, e.g. data/mel96.h5")
    p.add_argument("--track", help="a track id to export (with --npy)")
    p.add_argument("--npy", type=Path, help="write that track's features here as float32 (bands, frames)")


def run_info(args: argparse.Namespace) -> int:
    if (args.track is None) != (args.npy is None):
        return usage("--track and --npy go together: freqtag info STORE --track ID --npy OUT.npy")
    if args.track is None:
        print_store_info(args.store)
        return 0
    import numpy as np

    from freqtag.data.store import FeatureStore

    store = FeatureStore(args.store)
    if args.track not in store:
        error(f"track {args.track!r} is not in {args.store} ({len(store)} tracks, e.g. {', '.join(store.track_ids[:3])})")
        return FAILED
    x = store.track(args.track).astype(np.float32).T
    args.npy.parent.mkdir(parents=True, exist_ok=True)
    with open(args.npy, "wb") as f:  # an open file keeps the name exactly as given
        np.save(f, x)
    print(f"wrote {args.npy}: track {args.track}, float32 {x.shape} (bands, frames)")
    return 0


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--tracks", type=int, default=None, help="number of tracks (default: synthesize's own)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: synthesize's own)")
    p.add_argument("--features", choices=("mel96", "mel128"), default="mel96", help="feature kind (default: mel96)")


def run_synth(args: argparse.Namespace) -> int:
    from freqtag.data.synthetic import synthesize

    options = {k: v for k, v in (("tracks", args.tracks), ("seed", args.seed)) if v is not None}
    synthesize(args.out, features=args.features, **options)
    print_store_info(Path(args.out) / f"{args.features}.h5")
    return 0


def add_summary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=freq_dep features=mel128 data.input_length=224")


def run_summary(args: argparse.Namespace) -> int:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from rich.console import Console
    from rich.table import Table

    from freqtag.model import layer_table

    with initialize_config_module("freqtag.conf", version_base="1.3"):
        cfg = compose("train", overrides=list(args.overrides))
    if cfg.model.get("n_tags") is None:  # training takes it from the tag list; here the task's list, if at hand
        from omegaconf import open_dict

        from freqtag.data.jamendo import MOODTHEME_TAGS, task_tags

        task = cfg.data.get("task", "moodtheme")
        try:
            n_tags = len(task_tags(cfg.data.splits_dir, task, cfg.data.get("tags_file"))[0])
        except Exception:  # noqa: BLE001 - no metadata at hand (or paths that resolve only inside a Hydra run)
            if task != "moodtheme":
                return usage(f"model.n_tags=null: the {task} task's tags come from its TSVs, not found under "
                             f"data.splits_dir; pass model.n_tags=N")
            n_tags = len(MOODTHEME_TAGS)
        with open_dict(cfg):
            cfg.model.n_tags = n_tags
    net = instantiate(cfg.model)
    rows = layer_table(net)
    table = Table(title=f"{cfg.model.filters}, {cfg.features.name}, input {cfg.features.n_mels} × {cfg.data.input_length}")
    for col, justify in (("Layer", "left"), ("Input", "right"), ("Kernel / stride", "right"),
                         ("Channels", "right"), ("Dropout", "right"), ("Parameters", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["layer"], r["input"], r["kernel"], "" if r["channels"] is None else str(r["channels"]),
                      "" if r["dropout"] is None else f"{r['dropout']:g}", f"{r['params']:,}")
    total = sum(p.numel() for p in net.parameters() if p.requires_grad)
    table.add_row("total", "", "", "", "", f"{total:,}", style="bold")
    Console().print(table)
    return 0


# The one place subcommands are registered, in `freqtag --help`'s order. The modules named here import only the
# standard library and numpy when loaded: their runners import the rest.
COMMANDS: dict[str, Command] = {
    "prepare": Command("build a feature store from audio files or from MTG-Jamendo's .npy spectrograms",
                       prepare.add_prepare_arguments, prepare.run_prepare),
    "info": Command("describe a feature store, or export one track", add_info_arguments, run_info),
    "synth": Command("write a small synthetic dataset (split TSVs + store) for the demo",
                     add_synth_arguments, run_synth),
    "summary": Command("print the paper's Table 1 for a model, computed from the instantiated network",
                       add_summary_arguments, run_summary),
    "ensemble": Command("average the predictions of runs: the paper's Table 2, per-tag scores, a MediaEval submission",
                        ensemble.add_ensemble_arguments, ensemble.run_ensemble),
    "evaluate": Command("score a predictions file as MediaEval does (results.tsv lines)",
                        submission.add_evaluate_arguments, submission.run_evaluate),
    "predict": Command("tag audio files with a trained checkpoint (or an ensemble)",
                       predict.add_predict_arguments, predict.run_predict),
    "export": Command("export a checkpoint as TorchScript or ONNX (raw log-mel in, window probabilities out)",
                      export.add_export_arguments, export.run_export),
    "embed": Command("write track embeddings (a layer's activations, mean over windows) of audio files to an .npz",
                     embed.add_embed_arguments, embed.run_embed),
    "download": Command("download MTG-Jamendo from MTG's mirrors: parallel, resumable, checked against MTG's sha256 "
                        "lists", download.add_download_arguments, download.run_download),
    "serve": Command("a web page and HTTP API to tag audio files in the browser",
                     serve.add_serve_arguments, serve.run_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freqtag", description="Frequency-dependent CNN music tagger.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = subparsers.add_parser(name, help=command.help)
        command.arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from freqtag.system.quiet import quiet_third_party

    quiet_third_party()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from freqtag.data.jamendo import JamendoFormatError
    from freqtag.data.store import StoreError
    from freqtag.prepare.command import PrepareError

    return run_command(
        lambda: args.run(args),
        failures=(JamendoFormatError, StoreError, PrepareError, OSError, ValueError),
        usage_errors=(HydraException, OmegaConfBaseException),
        usage_note="; see `python train.py --help` for the config groups",
    )


if __name__ == "__main__":
    sys.exit(main())
