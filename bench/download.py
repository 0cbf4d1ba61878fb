"""`freqtag download` against a local mirror: throughput with 1 and N jobs, and memory while hashing a big shard.

What is measured:

- ``throughput``: ``--shards`` tar shards of ``--shard-mb`` MB each (tracks of random
  bytes, named and listed as MTG's are, in a fake clone of MTG's repository) are
  served by a Range-capable HTTP server in its own process on 127.0.0.1 (``sendfile``,
  so the server costs little CPU), and downloaded by
  :func:`freqtag.data.download.download` into an empty folder with each ``--jobs`` value:
  streamed to ``NAME.part``, hashed as it arrives, fsynced, renamed. MB/s is the total
  size over the wall time of the whole call (lists read, shards fetched and verified).
  With ``--unpack`` the same is timed with unpacking (every track written and verified).
  Loopback has no network latency, so this is the CPU and disk cost of the downloader:
  the ceiling it puts on a fast link, not a figure for MTG's mirrors.
- ``memory``: one sparse shard of ``--big-gb`` GB (zeros, made instantly with
  ``truncate``) downloaded by a fresh child process with one job; its peak RSS
  (VmHWM) is compared with the RSS it had after its imports, and the peak of
  Python allocations (tracemalloc) is recorded. For comparison a second child hashes
  the same file as MTG's script does (``hashlib.sha256(f.read())``: the file read
  whole into memory).

Scratch files go to ``--tmp`` (default /tmp/freqtag-bench-download) and are deleted
at the end. Figures and the machine go to ``bench/results/download.json``.

    python bench/download.py [--shards 8] [--shard-mb 64] [--jobs 1 4] [--unpack] [--big-gb 1]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATASET = "autotagging_moodtheme"
TRACK_MB = 4


# ------------------------------------------------------------------------ server


class RangeHandler(BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` from the folder ``server.root``, the body sent with sendfile."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.server.root / self.path.lstrip("/")  # type: ignore[attr-defined]
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        rng = self.headers.get("Range")
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        with open(path, "rb") as f:
            try:
                self.connection.sendfile(f, offset=start, count=size - start)
            except OSError:
                pass


def serve(root: Path, port_file: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.daemon_threads = True
    server.root = root  # type: ignore[attr-defined]
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


def start_server(root: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--port-file", str(port_file)])
    deadline = time.monotonic() + 30
    while not port_file.is_file() or not port_file.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the bench's HTTP server did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


# ------------------------------------------------------------------------ shards


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_lists(repo: Path, data_type: str, tars: dict[str, str], tracks: dict[str, str]) -> None:
    folder = repo / "data" / "download"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, sums in (("tars", tars), ("tracks", tracks)):
        (folder / f"{DATASET}_{data_type}_sha256_{kind}.txt").write_text("".join(f"{v} {k}\n" for k, v in sums.items()))


def make_shards(mirror: Path, repo: Path, n: int, shard_mb: int) -> int:
    """``n`` tars of ``shard_mb`` MB of random 4 MB tracks, MTG-named, with their lists; returns the bytes."""
    rng = random.Random(0)
    folder = mirror / DATASET / "melspecs"
    folder.mkdir(parents=True, exist_ok=True)
    tars, tracks = {}, {}
    for s in range(n):
        name = f"{DATASET}_melspecs-{s:02d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for k in range(max(1, shard_mb // TRACK_MB)):
                data = rng.randbytes(TRACK_MB * 1_000_000)
                track = f"{s:02d}/{k}.npy"
                tracks[track] = hashlib.sha256(data).hexdigest()
                info = tarfile.TarInfo(track)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        tars[name] = sha256_file(folder / name)
    write_lists(repo, "melspecs", tars, tracks)
    return sum((folder / name).stat().st_size for name in tars)


# ------------------------------------------------------------------- measurements


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM): unlike ru_maxrss, not inherited from the parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_download(base: str, repo: Path, out: Path, jobs: int, unpack: bool, data_type: str = "melspecs") -> float:
    from freqtag.data.download import DownloadPlan, download

    shutil.rmtree(out, ignore_errors=True)
    plan = DownloadPlan(DATASET, data_type, out, repo, mirror=base, unpack=unpack, jobs=jobs, progress=False)
    started = time.perf_counter()
    report = download(plan)
    seconds = time.perf_counter() - started
    if report.failures:
        raise RuntimeError(f"the bench download failed: {report.failures[:3]}")
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def child_download(base: str, repo: str, out: str) -> None:
    """In a fresh process: RSS after imports, then the peak over one download of the big shard."""
    import tracemalloc

    from freqtag.data.download import DownloadPlan, download

    before = peak_rss_mib()
    tracemalloc.start()
    started = time.perf_counter()
    report = download(DownloadPlan(DATASET, "audio", Path(out), Path(repo), mirror=base, jobs=1, progress=False))
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    peak = peak_rss_mib()
    print(json.dumps({"ok": not report.failures, "rss_after_imports_mib": before, "rss_peak_mib": peak,
                      "tracemalloc_peak_mib": traced_peak / 2**20, "seconds": seconds}))  # fmt: skip


def child_mtg_hash(path: str) -> None:
    """MTG's compute_sha256: the file read whole, then hashed."""
    before = peak_rss_mib()
    with open(path, "rb") as f:
        hashlib.sha256(f.read()).hexdigest()
    print(json.dumps({"rss_before_mib": before, "rss_peak_mib": peak_rss_mib()}))


def memory(base: str, mirror: Path, repo: Path, tmp: Path, gb: float) -> dict:
    folder = mirror / DATASET / "audio"
    folder.mkdir(parents=True, exist_ok=True)
    big = folder / f"{DATASET}_audio-00.tar"
    with open(big, "wb") as f:
        f.truncate(int(gb * 1e9))  # sparse: made at once, reads as zeros
    write_lists(repo, "audio", {big.name: sha256_file(big)}, {})
    out = tmp / "out-big"
    run = subprocess.run([sys.executable, __file__, "--child-download", base, str(repo), str(out)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    freqtag = json.loads(run.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    run = subprocess.run([sys.executable, __file__, "--child-mtg-hash", str(big)], capture_output=True, text=True,
                         check=True)  # fmt: skip
    mtg = json.loads(run.stdout.strip().splitlines()[-1])
    big.unlink()
    return {"shard_gb": gb, "freqtag": freqtag, "mtg_read_whole": mtg,
            "freqtag_mb_s": gb * 1e3 / freqtag["seconds"]}


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-mb", type=int, default=64)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--unpack", action="store_true", help="also time the download with --unpack")
    p.add_argument("--big-gb", type=float, default=1.0, help="size of the shard for the memory probe (0: skip)")
    p.add_argument("--tmp", type=Path, default=Path("/tmp/freqtag-bench-download"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "download.json")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-download", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child-mtg-hash", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.serve, args.port_file)
    if args.child_download:
        return child_download(*args.child_download)
    if args.child_mtg_hash:
        return child_mtg_hash(args.child_mtg_hash)

    from machine import machine

    os.environ.setdefault("FREQTAG_DOWNLOAD_BACKOFF", "0.1")
    shutil.rmtree(args.tmp, ignore_errors=True)
    mirror, repo = args.tmp / "mirror", args.tmp / "mtg"
    args.tmp.mkdir(parents=True)
    server = None
    try:
        total = make_shards(mirror, repo, args.shards, args.shard_mb)
        server, base = start_server(mirror, args.tmp)
        rows = []
        for unpack in (False, True) if args.unpack else (False,):
            for jobs in args.jobs:
                seconds = timed_download(base, repo, args.tmp / "out", jobs, unpack)
                rows.append({"jobs": jobs, "unpack": unpack, "seconds": seconds, "mb_s": total / 1e6 / seconds})
        mem = memory(base, mirror, repo, args.tmp, args.big_gb) if args.big_gb else None
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(args.tmp, ignore_errors=True)
    result = {"machine": machine(), "shards": args.shards, "shard_mb": total / 1e6 / args.shards,
              "total_mb": total / 1e6, "throughput": rows, "memory": mem}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.shards} shards x {total / 1e6 / args.shards:.0f} MB from a local mirror (127.0.0.1)")
    print(f"{'jobs':>4} {'unpack':>6} {'seconds':>8} {'MB/s':>8}")
    for r in rows:
        print(f"{r['jobs']:>4} {str(r['unpack']):>6} {r['seconds']:>8.2f} {r['mb_s']:>8.1f}")
    if mem:
        f, m = mem["freqtag"], mem["mtg_read_whole"]
        print(f"{mem['shard_gb']:g} GB shard, one job: peak RSS {f['rss_peak_mib']:.0f} MiB "
              f"(after imports {f['rss_after_imports_mib']:.0f} MiB; Python allocations peak "
              f"{f['tracemalloc_peak_mib']:.1f} MiB), {mem['freqtag_mb_s']:.0f} MB/s; MTG's read-whole hash: "
              f"peak RSS {m['rss_peak_mib']:.0f} MiB")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
