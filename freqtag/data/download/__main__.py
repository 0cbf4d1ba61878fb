"""``python -m freqtag.data.download ARGS``: ``freqtag download ARGS`` without first loading freqtag's other commands.

The ``freqtag`` command imports torch and Hydra before running any subcommand;
a download needs neither, so scripts (and the tests that kill it mid-run)
start it in a fraction of the time this way. Its errors and exit codes are
``freqtag download``'s (:func:`freqtag.system.exits.run_command`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from freqtag.data.download.cli import add_download_arguments, run_download
from freqtag.system.exits import run_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freqtag.data.download")
    add_download_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: run_download(args), failures=(OSError, ValueError))  # as `freqtag download` reports them


if __name__ == "__main__":
    sys.exit(main())
