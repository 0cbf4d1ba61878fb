"""How freqtag's commands end: exit codes and one-line error messages, the same for every subcommand.

0 done, 1 something failed (said in one line, never a traceback), 2 a usage
error, 130 interrupted. ``freqtag`` and ``python -m freqtag.data.download``
both run their subcommand through :func:`run_command`. Standard library only:
``freqtag --help`` imports it.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["OK", "FAILED", "USAGE", "INTERRUPTED", "error", "usage", "run_command"]

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130

def error(message: str, command: str = "") -> None:
    """``freqtag[ COMMAND]: error: MESSAGE``, one line on stderr."""
    print(f"freqtag{' ' + command if command else ''}: error: {message}", file=sys.stderr)


def usage(message: str, command: str = "") -> int:
    """A usage error: :func:`error`'s line, then :data:`USAGE` to return."""
    error(message, command)
    return USAGE


def run_command(
    run: Callable[[], int],
    failures: tuple[type[BaseException], ...],
    usage_errors: tuple[type[BaseException], ...] = (),
    usage_note: str = "",
) -> int:
    """``run()``'s exit code; a failure it raises ends as one line and 1, a usage error (its first line plus
    ``usage_note``) as 2, Ctrl-C as 130 with how to resume."""
    try:
        return int(run())
    except usage_errors as e:
        error(f"{e}".splitlines()[0] + usage_note)
        return USAGE
    except failures as e:
        error(str(e))
        return FAILED
    except KeyboardInterrupt:
        error("interrupted; re-run the same command to resume")
        return INTERRUPTED
