"""`freqtag serve`: the tagging page and its HTTP API on this machine, until Ctrl-C.

The checkpoints are loaded once, as ``predict`` loads them (several form an
ensemble), before the port is opened; the server binds its own socket so that
``--port 0`` prints the port it really got. Ctrl-C (or SIGTERM) lets requests
in flight finish (at most ``GRACE_S``), then removes the upload folder and
exits 0. Only this module's parser is imported by ``freqtag --help``; torch,
Starlette and uvicorn come when the command runs.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from typing import Any

from freqtag.system.exits import FAILED, error, usage

__all__ = ["add_serve_arguments", "run_serve", "GRACE_S"]

GRACE_S = 10  # seconds requests in flight get to finish after Ctrl-C
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve a page (drop audio files: top tags, decisions, a bar chart and the taggram, with a player) and an "
        "API: POST /api/tag (multipart file; ?windows=1 adds the per-window data) returns `predict --format json`'s "
        "record, GET /api/model describes the model. Binds to 127.0.0.1 unless --host says otherwise; Ctrl-C stops it."
    )
    p.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT",
                   help="run directories, final.ckpt files, https:// URLs (#sha256=HEX to check) or "
                   "hf://ORG/REPO[/FILE][@REVISION]; several form an ensemble (mean of probabilities)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port, printed)")
    p.add_argument("--max-upload-mb", type=float, default=100.0, metavar="MB",
                   help="largest audio file accepted, in MiB (default: 100); larger uploads are refused with HTTP 413")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="files tagged at once, in threads beside the web server (default: 2); more wait their turn")
    p.add_argument("--top", type=int, default=5, help="tags listed per file (default: 5)")
    p.add_argument("--threshold", default="auto",
                   help="'auto' (per-tag thresholds chosen on validation by training, default) or a probability")
    p.add_argument("--device", default="auto", help="where the network runs: auto, cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=None, metavar="WINDOWS",
                   help="windows per forward pass (default: 16384 frames' worth); bounds memory, never changes the result")
    p.add_argument("--low-memory", action="store_true",
                   help="give freed memory back to the system between chunks (lower peak, slower on a CPU)")


def _check_options(args: argparse.Namespace) -> str | None:
    """The first bad option's one-line message, or None."""
    if args.top < 1:
        return f"--top {args.top}: must be at least 1"
    if not args.max_upload_mb > 0:
        return f"--max-upload-mb {args.max_upload_mb:g}: must be more than 0 (MiB)"
    if args.jobs < 1:
        return f"--jobs {args.jobs}: must be at least 1"
    if args.batch_size is not None and args.batch_size < 1:
        return f"--batch-size {args.batch_size}: must be at least 1 window"
    if not 0 <= args.port <= 65535:
        return f"--port {args.port}: must be 0 (any free port) to 65535"
    return None


def _load(args: argparse.Namespace) -> tuple[list[Any], Any, str] | int:
    """Models and thresholds as ``predict`` gets them; an exit status on failure."""
    from freqtag.system.allocator import keep_freed_memory
    from freqtag.tag.commands import decision_thresholds, load_checked, warn_synthetic
    from freqtag.tag.predict import parse_threshold

    if not args.low_memory:
        keep_freed_memory()
    try:
        fixed = parse_threshold(args.threshold)
    except ValueError as e:
        return usage(str(e), "serve")
    models = load_checked(args.ckpt, args.device, "serve")
    if isinstance(models, int):
        return models
    chosen = decision_thresholds(models, fixed, "serve")
    if isinstance(chosen, int):
        return chosen
    warn_synthetic(models, "serve")
    return (models, *chosen)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one); OSError names the fix."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"--host {host}: not an address of this machine ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                      f"pass another --port, or --port 0 for any free one") from None
    sock.set_inheritable(True)
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # "all" addresses: this machine's
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    """Load, listen, serve until Ctrl-C or SIGTERM; 0 after a clean stop, 1 or 2 when it cannot start."""
    bad = _check_options(args)
    if bad:
        return usage(bad, "serve")
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    models, thresholds, source = loaded
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        error(str(e), "serve")
        return FAILED
    import uvicorn

    from freqtag.tag.serve.app import create_app
    from freqtag.tag.serve.service import TaggingService
    from freqtag.tag.serve.uploads import UploadFolder

    folder = UploadFolder()
    service = TaggingService(models, thresholds, source, top=args.top, batch_size=args.batch_size, jobs=args.jobs,
                             max_upload_bytes=int(args.max_upload_mb * 2**20))
    config = uvicorn.Config(create_app(service, folder), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACE_S)
    server = uvicorn.Server(config)
    if args.host not in LOOPBACK:
        print(f"freqtag serve: warning: --host {args.host} listens beyond this machine: anyone who can reach port "
              f"{sock.getsockname()[1]} can use the page and upload files", file=sys.stderr)
    info = service.describe()
    print(f"freqtag serve: {len(models)} model{'s' if len(models) > 1 else ''}, {info['features']}, "
          f"{info['n_tags']} tags; uploads up to {args.max_upload_mb:g} MiB in {folder.path}", file=sys.stderr)
    print(f"freqtag serve: {_url(args.host, sock)} (Ctrl-C stops it)", flush=True)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # uvicorn re-raises it at the end
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        service.close()
        folder.close()
        sock.close()
    print("freqtag serve: stopped", file=sys.stderr, flush=True)
    return 0
