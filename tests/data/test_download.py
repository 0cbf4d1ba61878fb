"""`freqtag download` against a real HTTP server on 127.0.0.1: resume, retries, corrupt data, unpacking, re-runs.

Each test generates small tar shards in MTG's naming (``{dataset}_{type}-NN.tar``
holding ``NN/ID.npy``), a fake clone of MTG's repository with their checksum
lists, and serves the shards from an ``http.server`` in a thread that honours
Range requests and can fail on demand (404/500, a dropped connection, bytes
trickled slowly, a body that is not the listed file). Every request is logged,
so the tests see what was fetched and from which byte. Nothing leaves the
machine. The command runs in this process through ``python -m freqtag.data.download``'s
``main`` (the same runner, without the rest of the CLI's torch and Hydra imports);
the kills run it as a subprocess, once as the real ``freqtag download``.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from freqtag.data.download import read_checksums
from freqtag.data.download.__main__ import main
from freqtag.data.download.fetch import BACKOFF_ENV
from freqtag.data.download.run import LOCK_NAME
from freqtag.data.download.state import STATE_NAME
from freqtag.system import faults

DATASET, TYPE = "autotagging_moodtheme", "melspecs"
from helpers import FREQTAG, SHARED

SHARED_LISTS = SHARED / "mtg-jamendo" / "download"


# ----------------------------------------------------------------------- the mirror


@dataclass
class Mirror:
    """What the server serves and how it misbehaves; ``log`` holds (path, Range header) of every GET."""

    files: dict[str, bytes] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)  # path -> forced HTTP status
    drop: dict[str, int] = field(default_factory=dict)  # path -> close after this many body bytes (once)
    trickle: dict[str, float] = field(default_factory=dict)  # path -> seconds per 2 kB
    log: list[tuple[str, str | None]] = field(default_factory=list)
    base: str = ""

    def gets(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.log if path.endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        m: Mirror = self.server.mirror  # type: ignore[attr-defined]
        m.log.append((self.path, self.headers.get("Range")))
        if self.path in m.status:
            self.send_error(m.status[self.path])
            return
        data = m.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(asked.group(1)) if asked else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.path in m.drop:
            body = body[: m.drop.pop(self.path)]
        delay = m.trickle.get(self.path, 0.0)
        step = 2048 if delay else len(body) or 1
        try:
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                if delay:
                    self.wfile.flush()
                    time.sleep(delay)
        except OSError:
            pass  # the client went away (a test killed it)


@pytest.fixture
def mirror() -> Mirror:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    m = Mirror(base=f"http://127.0.0.1:{server.server_address[1]}/mirror")
    server.mirror = m  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield m
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------- the dataset


@dataclass
class Shards:
    repo: Path  # the fake clone of MTG's repository
    tars: dict[str, bytes]  # name -> tar bytes
    tracks: dict[str, bytes]  # NN/ID.npy -> bytes (as listed)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar(members: dict[str, bytes], folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(folder)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)  # MTG's tars start with their folder
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_shards(root: Path, mirror: Mirror, n: int = 3, per: int = 4, size: int = 24_000,
                tamper: str | None = None) -> Shards:  # fmt: skip
    """``n`` shards of ``per`` random tracks, their lists in ``root/mtg/data/download``, served by ``mirror``.

    ``tamper``: a track whose bytes in its tar differ from the listed ones (the tar's own checksum matches).
    """
    rng = random.Random(0)
    tars: dict[str, bytes] = {}
    tracks: dict[str, bytes] = {}
    for s in range(n):
        folder = f"{s:02d}"
        members = {f"{folder}/{1000 * (k + 1) + s}.npy": rng.randbytes(size + 100 * k) for k in range(per)}
        tracks.update(members)
        if tamper in members:
            members = {**members, tamper: members[tamper][:-1] + b"!"}
        tars[f"{DATASET}_{TYPE}-{s:02d}.tar"] = make_tar(members, folder)
    lists = root / "mtg" / "data" / "download"
    lists.mkdir(parents=True)
    (lists / f"{DATASET}_{TYPE}_sha256_tars.txt").write_text("".join(f"{sha(d)} {k}\n" for k, d in tars.items()))
    (lists / f"{DATASET}_{TYPE}_sha256_tracks.txt").write_text("".join(f"{sha(d)} {k}\n" for k, d in tracks.items()))
    mirror.files.update({f"/mirror/{DATASET}/{TYPE}/{k}": d for k, d in tars.items()})
    return Shards(root / "mtg", tars, tracks)


def args(shards: Shards, mirror: Mirror, out: Path, *extra: str) -> list[str]:
    return ["download", "--dataset", DATASET, "--type", TYPE, "--out", str(out), "--mtg-repo", str(shards.repo),
            "--mirror", mirror.base, "--no-progress", "--timeout", "2", "--retries", "2", *extra]  # fmt: skip


def url(name: str) -> str:
    return f"/mirror/{DATASET}/{TYPE}/{name}"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKOFF_ENV, "0.01")
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    monkeypatch.setattr(faults, "_hits", {})


def download(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``freqtag download ARGV[1:]`` in this process (its runner without the rest of the CLI: no torch import)."""
    assert argv[0] == "download"
    code = main(argv[1:])
    out, err = capsys.readouterr()
    return code, out, err


def assert_tracks(out: Path, shards: Shards, names: list[str] | None = None) -> None:
    for name in names if names is not None else list(shards.tracks):
        assert (out / name).read_bytes() == shards.tracks[name], name


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".part", ".tmp")))


# -------------------------------------------------------------------------- tests


def test_real_checksum_lists_parse() -> None:
    if not SHARED_LISTS.is_dir():
        pytest.skip(f"MTG's checksum lists not found at {SHARED_LISTS}")
    for data_type, ext in (("melspecs", ".npy"), ("audio", ".mp3"), ("audio-low", ".low.mp3")):
        tars = read_checksums(SHARED_LISTS / f"{DATASET}_{data_type}_sha256_tars.txt")
        tracks = read_checksums(SHARED_LISTS / f"{DATASET}_{data_type}_sha256_tracks.txt")
        assert sorted(tars) == [f"{DATASET}_{data_type}-{i:02d}.tar" for i in range(100)]
        assert len(tracks) == 18_486 and all(re.fullmatch(rf"\d\d/\d+{re.escape(ext)}", t) for t in tracks)
    assert len(read_checksums(SHARED_LISTS / "raw_30s_melspecs_sha256_tars.txt")) == 100


def test_download_unpack_then_rerun_skips_verified_work(tmp_path: Path, mirror: Mirror,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror), tmp_path / "melspecs"
    code, stdout, err = download(args(shards, mirror, out, "--unpack", "--jobs", "2"), capsys)
    assert code == 0, err
    assert_tracks(out, shards)
    assert all((out / name).read_bytes() == data for name, data in shards.tars.items())
    assert "tracks: 12 of the 12 in MTG's list are present and verified" in stdout
    assert leftovers(out) == [] and len(mirror.log) == 3

    mirror.log.clear()  # again: nothing fetched, nothing hashed anew
    code, stdout, err = download(args(shards, mirror, out, "--unpack"), capsys)
    assert code == 0 and mirror.log == [] and stdout.count("verified earlier") == 3, err

    changed, gone = sorted(shards.tracks)[0], sorted(shards.tracks)[5]
    (out / changed).write_bytes(b"x" * len(shards.tracks[changed]))  # same size, other bytes
    (out / gone).unlink()
    code, stdout, err = download(args(shards, mirror, out, "--unpack"), capsys)
    assert code == 0 and mirror.log == [], err  # restored from the tars on disk
    assert_tracks(out, shards)

    (out / STATE_NAME).unlink()  # the record lost: everything hashed again, still nothing fetched
    code, stdout, err = download(args(shards, mirror, out, "--unpack"), capsys)
    assert code == 0 and mirror.log == [] and "12 of the 12" in stdout, err


def test_remove_deletes_tars_and_a_rerun_fetches_only_what_is_missing(tmp_path: Path, mirror: Mirror,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror), tmp_path / "melspecs"
    code, stdout, err = download(args(shards, mirror, out, "--unpack", "--remove"), capsys)
    assert code == 0, err
    assert_tracks(out, shards)
    assert not list(out.glob("*.tar")) and stdout.count("tar removed") == 3
    mirror.log.clear()
    assert download(args(shards, mirror, out, "--unpack", "--remove"), capsys)[0] == 0 and mirror.log == []
    (out / "01/1001.npy").unlink()  # a track of shard 01 lost: that shard alone comes again
    code, stdout, err = download(args(shards, mirror, out, "--unpack", "--remove"), capsys)
    assert code == 0 and [p for p, _ in mirror.log] == [url(f"{DATASET}_{TYPE}-01.tar")], err
    assert_tracks(out, shards) and not list(out.glob("*.tar"))


def test_shards_selects_a_part(tmp_path: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]) -> None:
    shards, out = make_shards(tmp_path, mirror, n=4), tmp_path / "melspecs"
    code, stdout, err = download(args(shards, mirror, out, "--shards", "0,2-3", "--unpack"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{DATASET}_{TYPE}-{i:02d}.tar" for i in (0, 2, 3)]
    assert "tracks: 12 of the 16 in MTG's list" in stdout and not (out / "01").exists()


def test_killed_mid_shard_resumes_with_a_range_request(tmp_path: Path, mirror: Mirror,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror, n=2, size=60_000), tmp_path / "melspecs"
    first = f"{DATASET}_{TYPE}-00.tar"
    mirror.trickle = {url(name): 0.02 for name in shards.tars}  # 2 kB every 20 ms
    env = {**os.environ, BACKOFF_ENV: "0.01"}
    proc = subprocess.Popen([FREQTAG, *args(shards, mirror, out, "--jobs", "1")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    part, deadline = out / f"{first}.part", time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size >= 40_000):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()  # type: ignore[union-attr]
    kept = part.stat().st_size
    assert 0 < kept < len(shards.tars[first]) and not (out / first).exists()

    mirror.trickle, mirror.log[:] = {}, []
    code, stdout, err = download(args(shards, mirror, out), capsys)
    assert code == 0, err
    ranges = mirror.gets(first)
    assert ranges == [f"bytes={kept}-"]  # on from the bytes kept
    assert re.search(rf"{first}\W+resumed", stdout)
    assert all((out / name).read_bytes() == data for name, data in shards.tars.items()) and leftovers(out) == []


def test_killed_before_a_rename_then_mid_unpack_resumes_cleanly(tmp_path: Path, mirror: Mirror,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """SIGKILL with a whole shard verified but not renamed, then with a track written but not renamed.

    Started as ``python -m freqtag.data.download`` (the same runner without the rest of the CLI's imports), to keep it quick.
    """
    shards, out = make_shards(tmp_path, mirror, n=2), tmp_path / "melspecs"
    first = f"{DATASET}_{TYPE}-00.tar"
    for point in ("download.verified", "download.track@3"):
        env = {**os.environ, BACKOFF_ENV: "0.01", faults.FAULT_ENV: point}
        mirror.log.clear()
        argv = [sys.executable, "-m", "freqtag.data.download", *args(shards, mirror, out, "--unpack", "--jobs", "1")[1:]]
        killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        if point == "download.verified":
            assert (out / f"{first}.part").stat().st_size == len(shards.tars[first]) and not (out / first).exists()
    assert mirror.gets(first) == [f"bytes={len(shards.tars[first])}-"]  # asked only whether anything was left
    assert len(list(out.glob("0?/.*.tmp"))) == 1  # the track cut off before its rename
    code, stdout, err = download(args(shards, mirror, out, "--unpack"), capsys)
    assert code == 0 and "tracks: 8 of the 8" in stdout, err
    assert_tracks(out, shards) and leftovers(out) == []


def test_dropped_connection_is_resumed_in_the_same_run(tmp_path: Path, mirror: Mirror,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror, n=2), tmp_path / "melspecs"
    name = f"{DATASET}_{TYPE}-01.tar"
    mirror.drop[url(name)] = 30_000
    code, stdout, err = download(args(shards, mirror, out), capsys)
    assert code == 0, err
    assert mirror.gets(name) == [None, "bytes=30000-"] and re.search(rf"{name}\W+resumed", stdout)
    assert (out / name).read_bytes() == shards.tars[name]


def test_corrupt_shard_is_fetched_twice_then_reported(tmp_path: Path, mirror: Mirror,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror, n=2), tmp_path / "melspecs"
    bad = f"{DATASET}_{TYPE}-00.tar"
    mirror.files[url(bad)] = b"\0" + shards.tars[bad][1:]
    code, stdout, err = download(args(shards, mirror, out, "--unpack"), capsys)
    assert code == 1
    assert len(mirror.gets(bad)) == 2 and re.search(rf"{bad}: sha256 \w+\.\.\. twice", err), err
    assert not (out / bad).exists() and leftovers(out) == []
    assert (out / f"{DATASET}_{TYPE}-01.tar").exists() and "tracks: 4 of the 8" in stdout  # the other shard is done


@pytest.mark.parametrize("status, gets", [(404, 1), (500, 3)])
def test_http_errors_are_reported_per_shard(tmp_path: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str],
                                            status: int, gets: int) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror, n=2), tmp_path / "melspecs"
    bad = f"{DATASET}_{TYPE}-01.tar"
    mirror.status[url(bad)] = status
    code, stdout, err = download(args(shards, mirror, out), capsys)
    assert code == 1 and len(mirror.gets(bad)) == gets  # a 404 is not asked again; a 500 is, --retries 2 times
    line = next(line for line in err.splitlines() if line.strip().startswith(bad))
    assert f"HTTP {status}" in line and "--mirror" in line and "Traceback" not in err
    assert (out / f"{DATASET}_{TYPE}-00.tar").exists()


def test_a_mirror_that_does_not_answer_is_one_line(tmp_path: Path, mirror: Mirror,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards = make_shards(tmp_path, mirror, n=2)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    argv = args(shards, mirror, tmp_path / "a")
    argv[argv.index("--mirror") + 1] = f"http://127.0.0.1:{port}/x"
    code, _, err = download(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and "no answer from http://127.0.0.1" in err and "3 tries" in err, err

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        argv = args(shards, mirror, tmp_path / "b", "--timeout", "0.2", "--retries", "1")
        argv[argv.index("--mirror") + 1] = f"http://127.0.0.1:{silent.getsockname()[1]}/x"
        started = time.monotonic()
        code, _, err = download(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and "timed out, 2 tries" in err and time.monotonic() - started < 10, err


def test_tampered_track_is_reported_and_not_written(tmp_path: Path, mirror: Mirror,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = "01/2001.npy"
    shards, out = make_shards(tmp_path, mirror, tamper=bad), tmp_path / "melspecs"
    code, stdout, err = download(args(shards, mirror, out, "--unpack", "--remove"), capsys)
    assert code == 1 and re.search(rf"{bad}: sha256 \w+\.\.\. in the tar", err), err
    assert not (out / bad).exists() and leftovers(out) == []
    assert_tracks(out, shards, [t for t in shards.tracks if t != bad])
    assert "tracks: 11 of the 12" in stdout and "1 track failed (listed below); tar kept" in stdout, stdout
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{DATASET}_{TYPE}-01.tar"]


def test_full_disk_is_one_line_and_the_rerun_resumes(tmp_path: Path, mirror: Mirror,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror, n=2, size=200_000), tmp_path / "melspecs"
    for point, where in (("download.chunk@2=enospc", ".tar.part"), ("download.track@2=enospc", ".npy")):
        monkeypatch.setenv(faults.FAULT_ENV, point)
        monkeypatch.setattr(faults, "_hits", {})
        code, _, err = download(args(shards, mirror, out, "--unpack", "--jobs", "1"), capsys)
        assert code == 1 and err.count("\n") == 1, err
        assert re.match(rf"freqtag: error: disk full while writing {out}/\S+{re.escape(where)} ", err), err
        assert "free some space and re-run" in err and "the same command resumes" in err
    monkeypatch.delenv(faults.FAULT_ENV)
    mirror.log.clear()
    code, stdout, err = download(args(shards, mirror, out, "--unpack"), capsys)
    assert code == 0 and "tracks: 8 of the 8" in stdout, err
    assert_tracks(out, shards) and leftovers(out) == []
    assert all(rng is None or rng.startswith("bytes=") for _, rng in mirror.log)


def test_bad_input_is_one_line_naming_the_fix(tmp_path: Path, mirror: Mirror,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    shards, out = make_shards(tmp_path, mirror), tmp_path / "melspecs"
    (tmp_path / "empty-clone").mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        (["--mtg-repo", str(tmp_path / "empty-clone")], "data/download/autotagging_moodtheme_melspecs_sha256_tars.txt not found"),
        (["--out", str(blocker / "melspecs")], f"--out {blocker / 'melspecs'} is not writable"),
        (["--shards", "3-1"], "--shards '3-1': expected shard numbers and ranges, e.g. 0-3,7"),
        (["--shards", "0,9"], "--shards 0,9: no shard 9 in the list; it has shards 0-2"),
        (["--remove"], "--remove deletes each tar once unpacked and verified: add --unpack"),
        (["--mirror", "ftp.example.org"], "--mirror 'ftp.example.org': use mtg-fast or mtg, or a base URL"),
    ]  # fmt: skip
    for extra, message in cases:
        code, _, err = download(args(shards, mirror, out, *extra), capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (extra, err)
    out.mkdir(exist_ok=True)
    with open(out / LOCK_NAME, "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = download(args(shards, mirror, out), capsys)
    assert code == 2 and f"--out {out}: another freqtag download is writing there" in err, err
    assert mirror.log == []
