"""The `freqtag` command: one subcommand per job, each a parser and a runner.

A subcommand is two functions, ``add_<name>_parser(subparsers)`` and
``run_<name>(args) -> exit code``, registered in :data:`COMMANDS`. Runners
import their heavy modules lazily so that ``freqtag --help`` stays instant.
Errors a user can cause become one line on stderr (exit 1), never a traceback;
argparse's usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "COMMANDS", "print_store_info"]

Runner = Callable[[argparse.Namespace], int]
AddParser = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], argparse.ArgumentParser]


def _error(message: str) -> None:
    print(f"freqtag: error: {message}", file=sys.stderr)


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


# ------------------------------------------------------------------------- info


def add_info_parser(subparsers) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("info", help="describe a feature store, or export one track")
    p.add_argument("store", type=Path, help="the store, e.g. data/mel96.h5")
    p.add_argument("--track", help="a track id to export (with --npy)")
    p.add_argument("--npy", type=Path, help="write that track's features here as float32 (bands, frames)")
    return p


def run_info(args: argparse.Namespace) -> int:
    if (args.track is None) != (args.npy is None):
        _error("--track and --npy go together: freqtag info STORE --track ID --npy OUT.npy")
        return 2
    if args.track is None:
        print_store_info(args.store)
        return 0
    import numpy as np

    from freqtag.data.store import FeatureStore

    store = FeatureStore(args.store)
    if args.track not in store:
        _error(f"track {args.track!r} is not in {args.store} ({len(store)} tracks, e.g. {', '.join(store.track_ids[:3])})")
        return 1
    x = store.track(args.track).astype(np.float32).T
    args.npy.parent.mkdir(parents=True, exist_ok=True)
    with open(args.npy, "wb") as f:  # an open file keeps the name exactly as given
        np.save(f, x)
    print(f"wrote {args.npy}: track {args.track}, float32 {x.shape} (bands, frames)")
    return 0


# ------------------------------------------------------------------------ synth


def add_synth_parser(subparsers) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("synth", help="write a small synthetic dataset (split TSVs + store) for the demo")
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--tracks", type=int, default=None, help="number of tracks (default: synthesize's own)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: synthesize's own)")
    p.add_argument("--features", choices=("mel96", "mel128"), default="mel96", help="feature kind (default: mel96)")
    return p


def run_synth(args: argparse.Namespace) -> int:
    from freqtag.data.synthetic import synthesize

    options = {k: v for k, v in (("tracks", args.tracks), ("seed", args.seed)) if v is not None}
    synthesize(args.out, features=args.features, **options)
    print_store_info(Path(args.out) / f"{args.features}.h5")
    return 0


# ---------------------------------------------------------------------- summary


def add_summary_parser(subparsers) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser(
        "summary", help="print the paper's Table 1 for a model, computed from the instantiated network"
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=freq_dep features=mel128 data.input_length=224")
    return p


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
                _error(f"model.n_tags=null: the {task} task's tags come from its TSVs, not found under "
                       f"data.splits_dir; pass model.n_tags=N")
                return 2
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


# -------------------------------------------------------------- registrations

from freqtag.data.download.cli import add_download_parser, run_download  # noqa: E402  (stdlib only; rich when run)
from freqtag.prepare.cli import add_prepare_parser, run_prepare  # noqa: E402  (stdlib only; the work when run)
from freqtag.scoring.ensemble import add_ensemble_parser, run_ensemble  # noqa: E402  (numpy only: --help stays instant)
from freqtag.scoring.submission import add_evaluate_parser, run_evaluate  # noqa: E402
from freqtag.tag.embed import add_embed_parser, run_embed  # noqa: E402  (as predict: torch when run)
from freqtag.tag.export import add_export_parser, run_export  # noqa: E402
from freqtag.tag.predict import add_predict_parser, run_predict  # noqa: E402  (numpy/soundfile only; torch when run)
from freqtag.tag.serve.command import add_serve_parser, run_serve  # noqa: E402  (stdlib only; torch, starlette when run)

# name -> (add parser, run). Later subcommands (summary, predict, ensemble, ...)
# add one line here and their two functions above.
COMMANDS: dict[str, tuple[AddParser, Runner]] = {
    "prepare": (add_prepare_parser, run_prepare),
    "info": (add_info_parser, run_info),
    "synth": (add_synth_parser, run_synth),
    "summary": (add_summary_parser, run_summary),
    "ensemble": (add_ensemble_parser, run_ensemble),
    "evaluate": (add_evaluate_parser, run_evaluate),
    "predict": (add_predict_parser, run_predict),
    "export": (add_export_parser, run_export),
    "embed": (add_embed_parser, run_embed),
    "download": (add_download_parser, run_download),
    "serve": (add_serve_parser, run_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freqtag", description="Frequency-dependent CNN music tagger.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_parser, run) in COMMANDS.items():
        add_parser(subparsers).set_defaults(run=run)
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

    try:
        return int(args.run(args))
    except (HydraException, OmegaConfBaseException) as e:
        _error(f"{e}".splitlines()[0] + "; see `python train.py --help` for the config groups")
        return 2
    except (JamendoFormatError, StoreError, PrepareError, OSError, ValueError) as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        _error("interrupted; re-run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
