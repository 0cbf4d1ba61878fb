"""`python train.py ...`: check the overrides, compose with Hydra, run; a user's error is one line, no traceback."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from freqtag.data.datamodule import DataError
from freqtag.data.jamendo import JamendoFormatError
from freqtag.data.store import StoreError
from freqtag.system.faults import DiskFullError
from freqtag.system.memory import OutOfMemory
from freqtag.system.quiet import quiet_third_party
from freqtag.train.checkpoints import ResumeError
from freqtag.train.driver import TrainingDiverged, run
from freqtag.train.loggers import finish_wandb
from freqtag.train.overrides import ConfigError, check_overrides

__all__ = ["main", "user_error", "USER_ERRORS"]

# errors a user can cause and fix: one line on stderr, no traceback (config: exit 2, data: exit 1)
USER_ERRORS = (ConfigError, DataError, StoreError, JamendoFormatError, ResumeError, TrainingDiverged, DiskFullError,
               OutOfMemory)


def user_error(e: BaseException) -> BaseException | None:
    """The user error behind ``e`` (Hydra wraps what a ``_target_`` raises), or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, USER_ERRORS):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def _fail(e: BaseException) -> None:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)


@hydra.main(config_path="pkg://freqtag.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except BaseException as e:
        finish_wandb(failed=True)
        if (known := user_error(e)) is not None:
            _fail(known)
        raise
    finish_wandb(failed=False)


def main() -> None:
    """`python train.py ...`: the overrides are checked first, then Hydra composes and runs."""
    quiet_third_party()
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        _fail(e)
    _hydra_main()
