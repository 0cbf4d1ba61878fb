"""One file over HTTP(S), streamed to a partial file and hashed as it arrives, resumed with Range requests.

Memory stays flat whatever the file's size (one read buffer); after an
interruption, in this run (a dropped connection, a timeout) or a later one
(a kill), the bytes already on disk are kept and only the rest is asked for.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from freqtag.system.faults import disk_full, fault_point

__all__ = ["FetchOptions", "FetchError", "MirrorDown", "Stopped", "Meter", "fetch", "BACKOFF_ENV"]

BACKOFF_ENV = "FREQTAG_DOWNLOAD_BACKOFF"  # seconds before the first retry (doubling after); the tests shorten it
_PERMANENT = {400, 401, 403, 404, 405, 410}  # asking again cannot help


@dataclass
class FetchOptions:
    timeout: float = 30.0  # seconds without a byte before a try is given up
    retries: int = 5  # further tries after a failed one, resuming each time
    backoff: float = field(default_factory=lambda: float(os.environ.get(BACKOFF_ENV, "1.0")))
    chunk: int = 1 << 20


class FetchError(Exception):
    """This file could not be had from the mirror; the message says why and what to do."""


class MirrorDown(FetchError):
    """The mirror does not answer at all: every other file would fail the same way, so the run stops."""


class Stopped(Exception):
    """Another shard hit a fatal error (full disk, mirror down) or the user pressed Ctrl-C."""


class Meter(Protocol):
    """Where the bytes are counted (the progress bar)."""

    def advance(self, n: int, received: bool = True) -> None: ...

    def expect(self, size: int) -> None: ...


class _Partial:
    """The partial file and the sha256 of the bytes in it, kept in step."""

    def __init__(self, path: Path, meter: Meter) -> None:
        self.path, self.meter = path, meter
        self.hash = hashlib.sha256()
        self.size = 0
        if path.is_file():  # a kill left it: hash what is there, once
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    self.hash.update(block)
                    self.size += len(block)
            meter.advance(self.size, received=False)

    def restart(self) -> None:
        """The server cannot continue from here: start the file again."""
        self.meter.advance(-self.size, received=False)
        self.hash, self.size = hashlib.sha256(), 0
        with open(self.path, "wb"):
            pass


def fetch(url: str, part: Path, opts: FetchOptions, meter: Meter, stop: threading.Event) -> tuple[str, bool]:
    """Complete ``part`` from ``url``; returns (sha256 of the whole file, whether earlier bytes were kept)."""
    partial = _Partial(part, meter)
    resumed = partial.size > 0
    failures = 0
    while True:
        if stop.is_set():
            raise Stopped
        try:
            _get(url, partial, opts, stop)
            return partial.hash.hexdigest(), resumed
        except HTTPError as e:
            e.close()
            if e.code in _PERMANENT:
                raise FetchError(f"HTTP {e.code} {e.reason} from {url}: the mirror lacks this file; check --mirror "
                                 "(files must sit at BASE/DATASET/TYPE/FILE)") from None  # fmt: skip
            why = f"HTTP {e.code} {e.reason}"
        except (URLError, OSError, http.client.HTTPException) as e:
            if disk_full(e):
                raise
            why = _reason(e)
            if isinstance(e, URLError) and not isinstance(e, HTTPError):
                if failures >= opts.retries:  # never reached the server
                    raise MirrorDown(f"no answer from {url} ({why}, {failures + 1} tries): check the network, "
                                     "or choose another --mirror") from None  # fmt: skip
        failures += 1
        if failures > opts.retries:
            raise FetchError(f"{why} from {url} after {failures} tries: the mirror is failing; re-run later "
                             "(the bytes so far are kept) or choose another --mirror")  # fmt: skip
        resumed = resumed or partial.size > 0
        if stop.wait(opts.backoff * 2 ** (failures - 1)):
            raise Stopped


def _reason(e: BaseException) -> str:
    if isinstance(e, URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _get(url: str, partial: _Partial, opts: FetchOptions, stop: threading.Event) -> None:
    """One request for the bytes after ``partial.size``; raises on any shortfall."""
    headers = {"User-Agent": "freqtag-download"}
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=opts.timeout)
    except HTTPError as e:
        if e.code != 416 or not partial.size:
            raise
        total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        if total.isdigit() and int(total) == partial.size:
            return  # the file was already whole
        partial.restart()
        raise http.client.HTTPException("the mirror refused to resume; starting the file again") from None
    except URLError:
        raise
    except OSError as e:  # connected, but no answer (a timeout, a closed connection): the mirror, not this file
        raise URLError(e) from None
    with resp:
        if partial.size and (resp.status != 206 or not _starts_at(resp, partial.size)):
            partial.restart()  # the server sent the whole file: take it from the start
        length = resp.headers.get("Content-Length")
        end = partial.size + int(length) if length and length.isdigit() else None
        if end is not None:
            partial.meter.expect(end)
        _stream(resp, partial, opts, stop)
    if end is not None and partial.size < end:
        raise ConnectionResetError(f"the connection closed {end - partial.size:,} bytes before the end")


def _starts_at(resp: http.client.HTTPResponse, offset: int) -> bool:
    content_range = resp.headers.get("Content-Range", "")
    return content_range.startswith(f"bytes {offset}-")


def _stream(resp: http.client.HTTPResponse, partial: _Partial, opts: FetchOptions, stop: threading.Event) -> None:
    """Append the body to the partial file, hashing it on the way; returns at the end of the body."""
    with open(partial.path, "r+b" if partial.path.exists() else "wb") as f:
        f.seek(partial.size)
        f.truncate()
        while block := resp.read1(opts.chunk):
            if stop.is_set():
                raise Stopped
            f.write(block)
            partial.hash.update(block)
            partial.size += len(block)
            partial.meter.advance(len(block))
            fault_point("download.chunk")
