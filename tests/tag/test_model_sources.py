"""Checkpoints from https:// URLs and the Hugging Face Hub, and `export --format hub`, against a local server.

The server (http.server on 127.0.0.1, port 0, in a thread, stopped by the
test) serves plain files and the two Hub requests ``hf_hub_download`` makes:
HEAD then GET ``/{org}/{repo}/resolve/{revision}/{file}``, answered with
``X-Repo-Commit`` and ``ETag`` (and ``X-Error-Code`` on a 404, as the Hub
does). ``HF_ENDPOINT`` points at it; ``HF_HOME`` and ``FREQTAG_CACHE`` are
temporary folders. Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf
from tagging_models import trained_runs

from freqtag.cli import main as freqtag_main
from freqtag.tag.sources import parse_hf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Server:
    """Plain files under /files/NAME and Hub repositories {repo: {file: bytes}} at one commit."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                server.requests.append((self.command, self.path))
                status, headers, data = server.route(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/files/"):
            data = self.files.get(path[len("/files/"):])
            return (404, {}, b"not found") if data is None else (200, {}, data)
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {}, b"no such endpoint"
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found"
        if revision not in ("main", COMMIT):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b"Revision not found"
        data = self.repos[repo].get(name)
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"Entry not found"
        return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return trained_runs(tmp_path_factory)


@pytest.fixture
def server(monkeypatch, tmp_path) -> Iterator[Server]:
    s = Server()
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("FREQTAG_CACHE", str(tmp_path / "freqtag-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    t = np.arange(6 * 22050) / 22050
    sf.write(path, (0.3 * np.sin(2 * np.pi * 330 * t) * np.sin(2 * np.pi * 0.5 * t)).astype(np.float32), 22050)
    return path


def predict(capsys, ckpt: str | Path, wav: Path, *extra: str) -> tuple[int, list[dict] | None, str]:
    code = freqtag_main(["predict", "--ckpt", str(ckpt), str(wav), "--format", "json", "--no-progress", *extra])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def error_line(err: str) -> str:
    """The one error line (warnings about the synthetic demo model aside)."""
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert len(lines) == 1, err
    return lines[0]


def test_parse_hf():
    assert parse_hf("hf://org/repo") == ("org/repo", "final.ckpt", None)
    assert parse_hf("hf://org/repo/sub/m.ckpt@v2") == ("org/repo", "sub/m.ckpt", "v2")


def test_url_download_cache_digest_offline_and_404(runs, server, wav, tmp_path, monkeypatch, capsys):
    run = runs["mel96"]
    ckpt = (run / "checkpoints" / "final.ckpt").read_bytes()
    digest = hashlib.sha256(ckpt).hexdigest()
    server.files["run/final.ckpt"] = ckpt
    server.files["run/thresholds.tsv"] = (run / "checkpoints" / "thresholds.tsv").read_bytes()
    url = f"{server.url}/files/run/final.ckpt"

    code, local, _ = predict(capsys, run, wav)
    assert code == 0
    code, remote, err = predict(capsys, url, wav)  # --threshold auto: thresholds.tsv came along
    assert code == 0 and remote == local
    assert "synthetic demo data" in err and url in err
    (entry,) = (tmp_path / "freqtag-cache").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["final.ckpt", "source.json", "thresholds.tsv"]
    assert json.loads((entry / "source.json").read_text())["sha256"] == digest

    seen = len(server.requests)
    code, again, _ = predict(capsys, f"{url}#sha256={digest}", wav)  # from the cache, digest checked
    assert code == 0 and again == local and len(server.requests) == seen

    wrong = "0" * 64
    code, _, err = predict(capsys, f"{url}#sha256={wrong}", wav)
    line = error_line(err)
    assert code == 2 and "sha256 mismatch" in line and wrong in line and digest in line
    assert not list(entry.glob(".*"))  # the refused download left no temporary behind

    code, _, err = predict(capsys, f"{server.url}/files/nope/final.ckpt", wav)
    line = error_line(err)
    assert code == 2 and "404" in line and "/files/nope/final.ckpt" in line

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # URLs too: the cached copy, or a one-line refusal
    code, offline, _ = predict(capsys, url, wav)
    assert code == 0 and offline == local and len(server.requests) == seen + 2  # the two refused downloads only
    code, _, err = predict(capsys, f"{server.url}/files/other/final.ckpt", wav)
    line = error_line(err)
    assert code == 2 and "HF_HUB_OFFLINE" in line and "not in the cache" in line


def test_hub_reference_revisions_offline_and_errors(runs, server, wav, monkeypatch, capsys):
    run = runs["mel128"]
    server.repos["someone/tiny"] = {
        "final.ckpt": (run / "checkpoints" / "final.ckpt").read_bytes(),
        "thresholds.tsv": (run / "checkpoints" / "thresholds.tsv").read_bytes(),
    }
    code, local, _ = predict(capsys, run, wav)
    code, remote, _ = predict(capsys, "hf://someone/tiny", wav)
    assert code == 0 and remote == local
    assert ("HEAD", "/someone/tiny/resolve/main/thresholds.tsv") in server.requests
    code, pinned, _ = predict(capsys, f"hf://someone/tiny/final.ckpt@{COMMIT}", wav)
    assert code == 0 and pinned == local

    for ref, says in (("hf://someone/tiny@v9", "no revision 'v9'"), ("hf://someone/tiny/other.ckpt", "has no file"),
                      ("hf://nobody/nothing", "no repository nobody/nothing")):
        code, _, err = predict(capsys, ref, wav)
        line = error_line(err)
        assert code == 2 and ref in line and says in line, line

    server.stop()  # nothing to reach now: the cache must do
    server.__dict__["stop"] = lambda: None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, offline, _ = predict(capsys, "hf://someone/tiny", wav)
    assert code == 0 and offline == local
    code, _, err = predict(capsys, "hf://someone/other", wav)
    line = error_line(err)
    assert code == 2 and "HF_HUB_OFFLINE" in line and "not in the cache" in line


def test_export_hub_folder_serves_as_a_model(runs, server, wav, tmp_path, capsys):
    run = runs["mel96"]
    out = tmp_path / "hub"
    assert freqtag_main(["export", "--ckpt", str(run), "--format", "hub", "--out", str(out)]) == 0
    assert "huggingface-cli upload ORG/REPO" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "final.ckpt", "freqtag.json", "metrics.json", "thresholds.tsv"]
    card = (out / "README.md").read_text()
    digest = hashlib.sha256((out / "final.ckpt").read_bytes()).hexdigest()
    metrics = json.loads((run / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: freqtag") and "trained on freqtag's synthetic demo data" in card
    assert "dataset: **synthetic**" in card and digest in card
    assert "(`csv/hparams.yaml`)" in card and "mixup_alpha: 0.2" in card  # the run's recorded configuration
    assert f"{metrics['test']['pr_auc']:.4f}" in card and "## Tags (56)" in card
    assert json.loads((out / "freqtag.json").read_text())["data"]["dataset"] == "synthetic"

    server.repos["org/shared"] = {p.name: p.read_bytes() for p in out.iterdir()}
    code, local, _ = predict(capsys, run, wav)
    code, shared, _ = predict(capsys, f"hf://org/shared#sha256={digest}", wav)
    assert code == 0 and shared == local

    assert freqtag_main(["export", "--ckpt", str(wav), "--format", "hub", "--out", str(tmp_path / "x")]) == 2
    assert "not a freqtag final checkpoint" in capsys.readouterr().err


def test_hub_folder_of_a_checkpoint_without_run(runs, tmp_path, capsys):
    """A bare final.ckpt (no run folder): no metrics, said so; the thresholds beside it still come along."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("final.ckpt", "thresholds.tsv"):
        shutil.copy(runs["mel128"] / "checkpoints" / name, bare / name)
    assert freqtag_main(["export", "--ckpt", str(bare / "final.ckpt"), "--format", "hub", "--out",
                         str(tmp_path / "h")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["README.md", "final.ckpt", "freqtag.json",
                                                                  "thresholds.tsv"]
    assert "metrics.json was not beside the checkpoint" in (tmp_path / "h" / "README.md").read_text()
