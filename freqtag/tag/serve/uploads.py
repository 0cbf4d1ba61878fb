"""Uploaded audio for ``freqtag serve``: streamed into a private folder, size-limited, one file per request.

The request body is parsed as it arrives (python-multipart's streaming
parser), so an upload never sits whole in memory nor in the system's shared
temporary folder: the file part goes straight to ``UploadFolder``, a folder
of mode 0700 that only this user can read, under a name of our making. The
limit is checked on ``Content-Length`` before reading and on the bytes as they
come, so a lying or chunked client is stopped too. The caller deletes the
file after tagging (:meth:`UploadFolder.remove`); the folder goes at shutdown.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO

__all__ = ["UploadError", "UploadFolder", "Upload", "receive_upload", "MULTIPART_SLACK"]

#: Bytes allowed in a request beyond the file itself (multipart boundaries and headers).
MULTIPART_SLACK = 64 * 1024
#: Past the limit, this much more of the body is read and discarded so the client can read the refusal.
DRAIN_BYTES = 64 * 1024 * 1024
FIELD_HINT = "send the audio as a multipart/form-data file field, e.g. curl -F file=@song.mp3 http://HOST:PORT/api/tag"


class UploadError(Exception):
    """A request whose upload cannot be used; ``status`` is the HTTP code, ``str()`` the one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """The saved file (``path``, ours) and the name the client gave it (``name``, for the record)."""

    path: Path
    name: str


class UploadFolder:
    """A private folder (mode 0700) for uploads in flight; :meth:`close` removes it and whatever is left."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="freqtag-serve-", dir=parent))
        os.chmod(self.path, 0o700)  # mkdtemp already does; said here because it is the point
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def new_file(self, client_name: str) -> tuple[Path, BinaryIO]:
        """A fresh file (mode 0600) whose name keeps the client's extension: decoding goes by it."""
        with self._lock:
            n = next(self._ids)
        path = self.path / f"{n:06d}-{safe_name(client_name)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, os.fdopen(fd, "wb")

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def safe_name(client_name: str) -> str:
    """The client's base name reduced to ``[A-Za-z0-9._-]`` (at most 80 characters), its extension kept."""
    base = client_name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:80] or "upload"
    ext = re.sub(r"[^A-Za-z0-9]+", "", ext)[:10]
    return f"{stem}.{ext.lower()}" if ext else stem


def display_name(client_name: str) -> str:
    """What the record's ``path`` says: the base name the client sent (never a path of this machine)."""
    return client_name.replace("\\", "/").rsplit("/", 1)[-1] or "upload"


def too_large(limit_bytes: int) -> UploadError:
    mb = limit_bytes / 2**20
    return UploadError(
        413,
        f"the upload is larger than this server's limit of {mb:g} MiB (--max-upload-mb {mb:g}); "
        f"send a smaller file, or restart freqtag serve with a higher --max-upload-mb",
    )


class _PartReader:
    """python-multipart callbacks: the first part with a filename goes to a file; other parts are dropped."""

    def __init__(self, folder: UploadFolder, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.file: BinaryIO | None = None
        self.writing = False
        self.upload: Upload | None = None
        self.written = 0
        self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "header_field", self.header_field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "header_value", self.header_value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
            "on_end": lambda: setattr(self, "ended", True),
        }

    def _part_begin(self) -> None:
        self.headers = {}

    def _header_end(self) -> None:
        self.headers[self.header_field.strip().lower()] = self.header_value.strip()
        self.header_field = self.header_value = b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        filename = params.get(b"filename")
        if not filename or self.upload is not None:  # a form's empty file field sends filename=""
            return
        name = filename.decode("utf-8", errors="replace")
        path, self.file = self.folder.new_file(name)
        self.upload = Upload(path, display_name(name))
        self.writing = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self.writing or self.file is None:
            return
        self.written += end - start
        if self.written > self.limit:
            raise too_large(self.limit)
        self.file.write(data[start:end])

    def _part_end(self) -> None:
        if self.writing and self.file is not None:
            self.file.close()
        self.writing = False

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.upload is not None:
            self.folder.remove(self.upload.path)


async def _drain(chunks: AsyncIterator[bytes], budget: int) -> None:
    """Read and drop what the client is still sending (up to ``budget`` bytes), so it gets to read our answer."""
    async for chunk in chunks:
        budget -= len(chunk)
        if budget <= 0:
            return


async def receive_upload(headers: Any, chunks: AsyncIterator[bytes], folder: UploadFolder, limit: int) -> Upload:
    """The request's audio file saved in ``folder``; :class:`UploadError` (4xx) when it cannot be had."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(headers.get("content-type"))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, f"not a multipart/form-data upload: {FIELD_HINT}")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
        await _drain(chunks, DRAIN_BYTES)
        raise too_large(limit)
    reader = _PartReader(folder, limit)
    parser = MultipartParser(params[b"boundary"], reader.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit + MULTIPART_SLACK:
                raise too_large(limit)
            parser.write(chunk)
    except UploadError:
        reader.discard()
        await _drain(chunks, DRAIN_BYTES)
        raise
    except FormParserError as e:
        reader.discard()
        raise UploadError(400, f"malformed multipart body ({e}): {FIELD_HINT}") from None
    except BaseException:  # the client went away, or the server is stopping: nothing of it stays on disk
        reader.discard()
        raise
    if reader.upload is None:
        reader.discard()
        raise UploadError(400, f"no file in the upload: {FIELD_HINT}")
    if not reader.ended or reader.writing:
        reader.discard()
        raise UploadError(400, "the upload ended before its last multipart boundary (an interrupted transfer?); send it again")
    return reader.upload
