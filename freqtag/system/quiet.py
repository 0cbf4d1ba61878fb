"""A terminal that shows what helps: no advertising, no other projects' deprecation notices, every real warning.

Lightning prints a "Tip" advertising its cloud products on every run, and
torch 2.11 flags Lightning's own use of a deprecated pytree class on every
step's first batch; neither tells a freqtag user anything they can act on.
Warnings raised by freqtag itself, and every other category (a data loader
bottleneck, a logging interval longer than the epoch), still show.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_third_party", "NoTips"]

# where Lightning's rank_zero_info creates its records (a logger's filters see only its own records)
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                     "lightning_utilities.core.rank_zero")


class NoTips(logging.Filter):
    """Drops Lightning's promotional "💡 Tip: ..." lines, and its TPU line on machines that have none."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage()).lstrip()
        return not (message.startswith("💡 Tip") or message.startswith("TPU available: False"))


def quiet_third_party() -> None:
    """Install the filters (idempotent): call at the start of `train.py` and of the `freqtag` command."""
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"^(?!freqtag\b)")
    for name in LIGHTNING_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, NoTips) for f in log.filters):
            log.addFilter(NoTips())
