"""Where a checkpoint comes from: a local path, an ``https://`` URL, or a Hugging Face Hub reference.

``--ckpt`` of predict, embed and export takes any of them, so that a model
trained once can be shared and used anywhere:

- a path: a run directory (its ``checkpoints/final.ckpt``) or a checkpoint file;
- ``https://HOST/.../final.ckpt[#sha256=HEX]``: downloaded once into
  ``$FREQTAG_CACHE`` (default ``${XDG_CACHE_HOME:-~/.cache}/freqtag/checkpoints``),
  one folder per URL (the hash of the URL without its fragment), written under
  a temporary name and renamed, so a killed download never leaves a truncated
  checkpoint; later runs use the cached copy. ``thresholds.tsv`` beside it on
  the server is fetched too when it exists (for ``--threshold auto``);
- ``hf://ORG/REPO[/FILE][@REVISION][#sha256=HEX]``: through ``huggingface_hub``
  (its cache, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and
  ``HF_HUB_OFFLINE`` are read when the reference is resolved, not when the
  library was imported). FILE defaults to ``final.ckpt``; ``thresholds.tsv`` in
  the same folder of the repository is fetched when present.

With ``HF_HUB_OFFLINE=1`` nothing is downloaded (URLs included): the cached
copy is used, or the error says that there is none. A ``sha256`` is checked
against the file that will be loaded; a mismatch names both digests. The file
is then loaded with ``torch.load(weights_only=True)`` only
(:func:`freqtag.tag.models.load_model`): a checkpoint can hold tensors and plain
data, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fetched", "SourceError", "is_remote", "fetch", "file_sha256", "url_cache_dir", "parse_hf"]

REMOTE_PREFIXES = ("https://", "http://", "hf://")
DEFAULT_FILE = "final.ckpt"
THRESHOLDS = "thresholds.tsv"
TIMEOUT_S = 60.0
_SHA = re.compile(r"^[0-9a-f]{64}$")
HF_PIN = "huggingface_hub==2.4.0"


class SourceError(ValueError):
    """A checkpoint reference that cannot be resolved; one line naming the reference and the fix."""


@dataclass(frozen=True)
class Fetched:
    """A checkpoint on local disk, with where it came from."""

    source: str  # the reference as given (path, URL or hf://...)
    path: Path  # the local checkpoint file (or, for a path, what was given: a run folder or a file)
    thresholds: Path | None  # a downloaded thresholds.tsv; None for paths (found beside the file)
    sha256: str | None  # the digest checked, when one was given


def is_remote(ref: str | Path) -> bool:
    return isinstance(ref, str) and ref.startswith(REMOTE_PREFIXES)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's own reading of the variable


def _split_digest(ref: str) -> tuple[str, str | None]:
    """``REF#sha256=HEX`` -> (REF, hex); refuses any other fragment."""
    base, hash_, fragment = ref.partition("#")
    if not hash_:
        return ref, None
    key, _, value = fragment.partition("=")
    value = value.strip().lower()
    if key != "sha256" or not _SHA.match(value):
        raise SourceError(f"{ref}: the only fragment understood is #sha256= followed by 64 hex digits")
    return base, value


def _check_digest(ref: str, path: Path, expected: str | None) -> None:
    if expected is None:
        return
    got = file_sha256(path)
    if got != expected:
        raise SourceError(f"{ref}: sha256 mismatch: expected {expected}, the file has {got}; "
                          f"check the digest, or the file changed at its source")


def fetch(ref: str | Path) -> Fetched:
    """Resolve a checkpoint reference to a local file, downloading it (and its thresholds) when remote."""
    text = str(ref)
    if not is_remote(text):
        return Fetched(text, Path(text), None, None)
    base, digest = _split_digest(text)
    if base.startswith("hf://"):
        return _fetch_hf(text, base, digest)
    return _fetch_url(text, base, digest)


# ---------------------------------------------------------------------- URLs


def url_cache_dir() -> Path:
    """``$FREQTAG_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/freqtag/checkpoints``."""
    if os.environ.get("FREQTAG_CACHE"):
        return Path(os.environ["FREQTAG_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "freqtag" / "checkpoints"


def _download(url: str, dest: Path) -> str | None:
    """GET ``url`` into ``dest`` atomically; returns its sha256, or None for a 404 (the caller decides)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "freqtag"})
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                h.update(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except urllib.error.HTTPError as e:
        tmp.unlink(missing_ok=True)
        if e.code == 404:
            return None
        raise SourceError(f"{url}: HTTP {e.code} {e.reason}: check the address "
                          f"(and that the server lets you in)") from None
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise SourceError(f"{url}: cannot download ({reason}); check the address and the network, "
                          f"or use the cached copy with HF_HUB_OFFLINE=1") from None
    os.replace(tmp, dest)
    return h.hexdigest()


def _fetch_url(ref: str, url: str, digest: str | None) -> Fetched:
    folder = url_cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:32]
    ckpt = folder / DEFAULT_FILE
    meta_file = folder / "source.json"
    thresholds = folder / THRESHOLDS
    cached = ckpt.is_file() and meta_file.is_file()
    if cached and digest is not None and file_sha256(ckpt) != digest:
        cached = False  # another digest was asked for: the source may have changed since
    if not cached:
        if _offline():
            raise SourceError(f"{ref}: HF_HUB_OFFLINE is set and this URL is not in the cache ({folder}); "
                              f"run once without HF_HUB_OFFLINE to download it")
        tmp = folder / f".download.{os.getpid()}.ckpt"
        got = _download(url, tmp)
        if got is None:
            raise SourceError(f"{url}: HTTP 404 Not Found: check the address")
        if digest is not None and got != digest:
            tmp.unlink(missing_ok=True)
            raise SourceError(f"{ref}: sha256 mismatch: expected {digest}, downloaded {got}; "
                              f"check the digest, or the file changed at its source")
        sibling = urllib.parse.urljoin(url, THRESHOLDS)
        has_thresholds = _download(sibling, thresholds) is not None
        if not has_thresholds:
            thresholds.unlink(missing_ok=True)
        os.replace(tmp, ckpt)  # the checkpoint last: a folder with source.json is complete
        meta = {"url": url, "sha256": got, "thresholds": has_thresholds}
        tmp_meta = meta_file.with_name(f".source.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(meta) + "\n")
        os.replace(tmp_meta, meta_file)
    return Fetched(ref, ckpt, thresholds if thresholds.is_file() else None, digest)


# ----------------------------------------------------------------- the Hub


def parse_hf(ref: str) -> tuple[str, str, str | None]:
    """``hf://ORG/REPO[/FILE][@REVISION]`` -> (repo id, file, revision or None)."""
    body = ref[len("hf://"):]
    revision = None
    if "@" in body:
        body, _, revision = body.rpartition("@")
        if not revision:
            raise SourceError(f"{ref}: nothing after '@': give a branch, tag or commit, or leave '@' out")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise SourceError(f"{ref}: expected hf://ORG/REPO[/FILE][@REVISION], e.g. hf://someone/freqtag-mel96")
    return "/".join(parts[:2]), "/".join(parts[2:]) or DEFAULT_FILE, revision


def _hf_cache() -> str:
    """The cache folder huggingface_hub uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _fetch_hf(ref: str, base: str, digest: str | None) -> Fetched:
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise SourceError(f"{ref}: hf:// references need huggingface_hub: pip install {HF_PIN}") from None
    repo, file, revision = parse_hf(base)
    offline = _offline()
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")

    def get(name: str):  # type: ignore[no-untyped-def]
        return huggingface_hub.hf_hub_download(repo, name, revision=revision, cache_dir=_hf_cache(),
                                               endpoint=endpoint, local_files_only=offline)

    where = f"{repo}@{revision or 'main'} on {endpoint}"
    try:
        ckpt = Path(get(file))
    except errors.LocalEntryNotFoundError:
        if offline:
            raise SourceError(f"{ref}: HF_HUB_OFFLINE is set and {file} of {repo} is not in the cache "
                              f"({_hf_cache()}); run once without HF_HUB_OFFLINE to download it") from None
        raise SourceError(f"{ref}: cannot reach {endpoint} and {file} is not cached; check the network "
                          f"(or HF_ENDPOINT)") from None
    except errors.RepositoryNotFoundError:
        raise SourceError(f"{ref}: no repository {repo} on {endpoint} (or it is private: log in with "
                          f"`hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise SourceError(f"{ref}: {repo} has no revision {revision!r}: give a branch, tag or commit") from None
    except errors.EntryNotFoundError:
        raise SourceError(f"{ref}: {where} has no file {file} (404): check the name "
                          f"(hf://ORG/REPO/FILE; FILE defaults to {DEFAULT_FILE})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{ref}: download failed ({first}); check HF_ENDPOINT and the network") from None
    _check_digest(ref, ckpt, digest)
    folder = str(Path(file).parent)
    try:
        thresholds: Path | None = Path(get(THRESHOLDS if folder == "." else f"{folder}/{THRESHOLDS}"))
    except (errors.EntryNotFoundError, errors.LocalEntryNotFoundError):
        thresholds = None
    return Fetched(ref, ckpt, thresholds, digest)
