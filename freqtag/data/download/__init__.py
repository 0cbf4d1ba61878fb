"""`freqtag download`: MTG-Jamendo from MTG's mirrors, parallel, resumable, every byte checked.

MTG's own script fetches one shard at a time, cannot resume, and reads each
5 GB shard whole into memory to hash it. Here shards download in parallel,
each streamed to ``NAME.part`` and hashed as it arrives, resumed with HTTP
Range requests after any interruption, and renamed only when its sha256
matches MTG's list; unpacking streams each tar and checks every track as it
is written. A small record (:mod:`.state`) lets a re-run skip verified work.

- :mod:`.lists`: MTG's checksum lists, ``--shards``, the mirrors.
- :mod:`.fetch`: one file over HTTP, resumable, with retries.
- :mod:`.unpack`: one tar, streamed, each track verified.
- :mod:`.run`: the whole download on ``--jobs`` threads, with the progress bar.
- :mod:`.cli`: the subcommand.
"""

from freqtag.data.download.fetch import FetchError, FetchOptions, MirrorDown
from freqtag.data.download.lists import DATASETS, MIRRORS, TYPES, UsageError, read_checksums
from freqtag.data.download.run import DownloadPlan, DownloadReport, ShardOutcome, download

__all__ = ["DATASETS", "TYPES", "MIRRORS", "UsageError", "read_checksums", "FetchOptions", "FetchError", "MirrorDown",
           "DownloadPlan", "DownloadReport", "ShardOutcome", "download"]  # fmt: skip
