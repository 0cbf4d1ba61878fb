"""``python -m freqtag.data.download ARGS``: ``freqtag download ARGS`` without first loading freqtag's other commands.

The ``freqtag`` command imports torch and Hydra before running any subcommand;
a download needs neither, so scripts (and the tests that kill it mid-run)
start it in a fraction of the time this way.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from freqtag.data.download.cli import _error, add_download_parser, run_download


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_download_parser(argparse.ArgumentParser().add_subparsers())
    parser.prog = "python -m freqtag.data.download"
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_download(args)
    except (OSError, ValueError) as e:  # as `freqtag download` reports them
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        _error("interrupted; re-run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
