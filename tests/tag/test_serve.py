"""`freqtag serve`: the real command on 127.0.0.1, its API over HTTP, and its page in headless Chromium.

One server process per module (``freqtag serve --port 0``, a small mel96
model, a 2 MiB upload limit, ``TMPDIR`` pointed at a test folder so its
private upload folder can be inspected) answers every test; the last test
stops it with Ctrl-C (SIGINT). The model's weights are untrained (the
serving path does not care; the records are checked against ``freqtag
predict`` on the same checkpoint), so building it takes a second instead of a
training run. The audio is the real clips of ../shared/data/audio.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import REPO

from freqtag.cli import main as freqtag_main
from freqtag.data.jamendo import MOODTHEME_TAGS, short_tag
from freqtag.features import FeatureSpec
from freqtag.model import FreqTagNet
from freqtag.tag.serve.app import STATIC_DIR

CLIPS = REPO.parent / "shared" / "data" / "audio"
CLIP, SHORT = CLIPS / "vibe_ace.ogg", CLIPS / "house_lo.mp3"
LIMIT_MB = 2
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def clips() -> dict[str, Path]:
    if not (CLIP.is_file() and SHORT.is_file()):
        pytest.skip(f"the real audio clips are not in {CLIPS} (vibe_ace.ogg, house_lo.mp3)")
    return {"clip": CLIP, "short": SHORT}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A run directory as training leaves it (final.ckpt, thresholds.tsv), with untrained mel96 weights."""
    run = tmp_path_factory.mktemp("serve-model") / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    net = FreqTagNet(96, 32, n_tags=len(MOODTHEME_TAGS), filters="convs").eval()
    torch.save({"state_dict": net.state_dict(), "features": FeatureSpec.load("mel96").to_dict(),
                "tags": list(MOODTHEME_TAGS), "input_length": 32, "mean": -22.7, "std": 20.3, "freqtag_version": "test",
                "model": {"_target_": "freqtag.model.FreqTagNet", "n_mels": 96, "input_length": 32,
                          "n_tags": len(MOODTHEME_TAGS), "filters": "convs"},
                "data": {"dataset": "synthetic", "task": "moodtheme", "split": 0, "features": "mel96",
                         "train_tracks": 180}}, run / "checkpoints" / "final.ckpt")
    thresholds = np.random.default_rng(0).uniform(0.3, 0.7, len(MOODTHEME_TAGS))
    (run / "checkpoints" / "thresholds.tsv").write_text("".join(f"{t}\t{v}\n" for t, v in zip(MOODTHEME_TAGS, thresholds)))
    return run


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    tmpdir: Path  # the server's TMPDIR: its private upload folder is made in here
    stdout: Path
    stderr: Path
    clip_record: dict[str, Any] = field(default_factory=dict)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
        u = urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, body = self.request("GET", path)
        return status, json.loads(body)

    def post_file(self, name: str, data: bytes, query: str = "", chunked: bool = False) -> tuple[int, Any]:
        """``curl -F file=@NAME``: one multipart file field, sent whole or in chunks (no Content-Length)."""
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        payload: Any = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
        status, _, out = self.request("POST", f"/api/tag{query}", payload,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"}, chunked)
        return status, json.loads(out)

    def upload_folders(self) -> list[Path]:
        return sorted(self.tmpdir.glob("freqtag-serve-*"))


def launch(ckpts: list[Path], base: Path, *extra: str) -> Server:
    """Start ``freqtag serve --port 0`` in its own process; :func:`wait_for_url` then gives its URL."""
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    out, err = base / "stdout.txt", base / "stderr.txt"
    freqtag = str(Path(sys.executable).parent / "freqtag")
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([freqtag, "serve", "--ckpt", *map(str, ckpts), "--port", "0", *extra],
                                stdout=o, stderr=e, stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmpdir)},
                                preexec_fn=stop_with_parent)
    return Server(proc, "", tmpdir, out, err)


def stop_with_parent() -> None:
    """In the child: SIGTERM when pytest dies (Linux), so that a killed test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for_url(server: Server, timeout: float = 300) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        urls = [w for w in server.stdout.read_text().split() if w.startswith("http://127.0.0.1:")]
        if urls:
            server.url = urls[0]
            return server
        if server.proc.poll() is not None:
            pytest.fail(f"freqtag serve exited with {server.proc.returncode} before serving: {server.stderr.read_text()}")
        time.sleep(0.1)
    server.proc.kill()
    pytest.fail(f"freqtag serve printed no URL in {timeout:.0f} s: {server.stderr.read_text()}")


def stop(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            return server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    s = launch([small_run], tmp_path_factory.mktemp("serve"), "--max-upload-mb", str(LIMIT_MB), "--jobs", "2")
    try:
        if CLIP.is_file():  # while it starts: predict's record of the clip, which the API and the page must give
            (s.clip_record,) = predict_json([small_run], CLIPS, [CLIP.name], "--windows")
        yield wait_for_url(s)
    finally:
        stop(s)


def predict_json(ckpts: list[Path], folder: Path, names: list[str], *extra: str) -> list[dict[str, Any]]:
    """``freqtag predict --format json`` run from ``folder`` on file names, as a user would in that folder."""
    import contextlib
    import io

    cwd = Path.cwd()
    buf, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            freqtag_main(["predict", "--ckpt", *map(str, ckpts), *names, "--format", "json", "--workers", "0",
                          "--no-progress", *extra])
    finally:
        os.chdir(cwd)
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def clip_record(server, clips) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """``freqtag predict --format json --windows vibe_ace.ogg``'s record (run in the clip's folder)."""
    return server.clip_record


# ------------------------------------------------------------------------ API


def test_model_description_and_offline_page(server, small_run):
    status, model = server.get_json("/api/model")
    assert status == 200
    assert model["tags"] == [short_tag(t) for t in MOODTHEME_TAGS] and model["n_tags"] == 56
    assert model["features"] == "mel96" and model["task"] == "moodtheme" and not model["ensemble"]
    assert model["synthetic"] and "synthetic demo data" in model["warning"]
    assert "180 training tracks" in model["models"][0]["trained_on"]
    assert model["max_upload_bytes"] == LIMIT_MB * 2**20
    expected = [float(line.split("\t")[1]) for line in (small_run / "checkpoints" / "thresholds.tsv").read_text().splitlines()]
    assert model["thresholds"] == pytest.approx(expected, abs=1e-12)
    assert model["threshold_source"].endswith("thresholds.tsv")

    status, headers, page = server.request("GET", "/")
    assert status == 200 and b'src="/static/app.js"' in page
    assert headers["content-security-policy"].startswith("default-src 'self'")  # the browser loads nothing else
    for f in STATIC_DIR.iterdir():  # ... and nothing else is asked for: no CDN, font or script from elsewhere
        text = f.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, never fetched
        assert "://" not in text, f"{f.name} names an outside resource"
        assert server.request("GET", f"/static/{f.name}")[0] == 200


def test_good_file_gives_predicts_record(server, small_run, clip_record):
    status, rec = server.post_file(CLIP.name, CLIP.read_bytes(), "?windows=1")
    assert status == 200
    assert rec == clip_record  # the same JSON as `freqtag predict --format json --windows vibe_ace.ogg`


def test_bad_files_get_predicts_message_and_the_server_goes_on(server, small_run, clips, tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(3 * 22050, np.float32), 22050)
    (tmp_path / "notes.mp3").write_text("this is not audio\n" * 50)
    (tmp_path / "notes.txt").write_text("this is not audio either\n")
    (tmp_path / "corrupt.ogg").write_bytes(CLIP.read_bytes()[:200] + np.random.default_rng(1).bytes(20000))
    names = ["silent.wav", "notes.mp3", "notes.txt", "corrupt.ogg"]
    expected = {r["path"]: r["error"] for r in predict_json([small_run], tmp_path, names)}
    assert set(expected) == set(names)
    for name in names:
        status, body = server.post_file(name, (tmp_path / name).read_bytes())
        assert status == 422, body
        assert body == {"path": name, "error": expected[name]}
    assert expected["silent.wav"].startswith("silent") and "corrupt or not audio" in expected["corrupt.ogg"]
    status, body = server.post_file("../../music/notes.mp3", (tmp_path / "notes.mp3").read_bytes())
    assert status == 422 and body["path"] == "notes.mp3"  # the client's base name only, never a path
    status, body = server.post_file("", b"")  # what a form with no file chosen sends
    assert status == 400 and "no file in the upload" in body["error"]
    status, body = server.post_file("empty.wav", b"")
    assert status == 422 and body == {"path": "empty.wav", "error": "empty file (0 bytes)"}

    status, _, body = server.request("POST", "/api/tag", b"file=song.mp3", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "curl -F file=@song.mp3" in json.loads(body)["error"]
    status, _, body = server.request("POST", "/api/tag", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n",
                                     {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and "no file in the upload" in json.loads(body)["error"]
    status, rec = server.post_file(SHORT.name, SHORT.read_bytes())  # still serving, and still right
    assert status == 200 and rec["path"] == SHORT.name and len(rec["tags"]) == 56
    assert server.proc.poll() is None


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_too_large_is_refused_naming_the_limit(server, chunked):
    status, body = server.post_file("big.mp3", b"\xff" * int((LIMIT_MB + 0.5) * 2**20), chunked=chunked)
    assert status == 413
    assert f"limit of {LIMIT_MB} MiB (--max-upload-mb {LIMIT_MB})" in body["error"]
    assert server.get_json("/api/model")[0] == 200


def test_two_requests_at_once_are_both_answered(server, clip_record):
    files = [CLIP, SHORT]
    results: dict[int, tuple[int, Any]] = {}
    start = threading.Barrier(len(files) + 1)

    def post(i: int) -> None:
        start.wait()
        results[i] = server.post_file(files[i].name, files[i].read_bytes())

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    start.wait()
    assert server.get_json("/api/model")[0] == 200  # the event loop answers while the files are being tagged
    for t in threads:
        t.join(timeout=300)
    (status, clip), (status_short, short) = results[0], results[1]
    assert status == status_short == 200
    plain = {k: v for k, v in clip_record.items() if k != "windows"}  # no ?windows=1: predict without --windows
    assert set(clip) == set(plain) and clip["path"] == CLIP.name and short["path"] == SHORT.name
    np.testing.assert_allclose(list(clip["tags"].values()), list(plain["tags"].values()), atol=1e-6)
    assert [t["tag"] for t in clip["top"]] == [t["tag"] for t in plain["top"]]
    assert set(short) == set(plain) and len(short["tags"]) == 56 and short["duration_s"] == pytest.approx(7.26, abs=0.05)


def test_uploads_are_deleted_after_tagging(server):
    (folder,) = server.upload_folders()
    assert folder.stat().st_mode & 0o777 == 0o700  # private to the server's user
    assert list(folder.iterdir()) == []  # every upload above, good or bad, too large or not, is gone


def test_usage_errors(server, small_run, capsys):
    assert freqtag_main(["serve", "--ckpt", str(small_run), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb 0: must be more than 0" in capsys.readouterr().err
    port = urlsplit(server.url).port
    assert freqtag_main(["serve", "--ckpt", str(small_run), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and "--port 0" in err


# ----------------------------------------------------------------------- page


def chromium(download_dir: Path) -> Any:
    """Headless Debian Chromium through chromedriver, offline, with a fresh profile; skips where absent."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.exists() and shutil.which(str(CHROMEDRIVER))):
        pytest.skip(f"no {CHROMIUM} or {CHROMEDRIVER}: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run does) to run the browser test")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1280,1500", "--autoplay-policy=no-user-gesture-required",
                f"--user-data-dir={download_dir / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def test_page_tags_the_clip_in_headless_chromium(server, clip_record, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.mp3"
    bad.write_text("not audio\n" * 50)
    driver = chromium(tmp_path)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 240, poll_frequency=0.2)
        wait.until(lambda d: "mel96" in d.find_element(By.ID, "model-facts").text)
        assert "synthetic demo data" in driver.find_element(By.ID, "model-warning").text
        driver.find_element(By.ID, "files").send_keys(f"{CLIP}\n{bad}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-state=done], .card[data-state=failed]")) == 2)
        card = driver.find_element(By.CSS_SELECTOR, ".card[data-state=done]")
        failed = driver.find_element(By.CSS_SELECTOR, ".card[data-state=failed]")
        assert card.find_element(By.CSS_SELECTOR, ".name").text == CLIP.name
        assert "notes.mp3: corrupt or not audio" in failed.find_element(By.CSS_SELECTOR, ".error").text

        shown = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".top-list .tag")]
        assert shown == [t["tag"] for t in clip_record["top"]]
        chips = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".decisions .chip")]
        assert chips == clip_record["decisions"]
        assert len(card.find_elements(By.CSS_SELECTOR, ".bars .bar-row")) == 56
        canvas = card.find_element(By.CSS_SELECTOR, ".taggram-canvas")
        assert int(canvas.get_attribute("data-columns")) == len(clip_record["windows"][0]["start_s"])
        lit = driver.execute_script(
            "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] && (d[i] < 200 || d[i + 2] < 200)) n++;"
            "return n / (c.width * c.height);", canvas)
        assert lit > 0.3, "the taggram canvas is mostly blank"
        driver.execute_script("const a = arguments[0]; a.currentTime = 30;", card.find_element(By.CSS_SELECTOR, "audio"))
        wait.until(lambda d: card.find_element(By.CSS_SELECTOR, ".now").text.startswith("at 30.0 s:"))
        driver.save_screenshot(str(tmp_path / "serve.png"))
        assert (tmp_path / "serve.png").stat().st_size > 20_000
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/api/tag" not in e["message"]]
        assert severe == []  # no script error, no resource refused by the page's Content-Security-Policy
        if os.environ.get("FREQTAG_SERVE_SCREENSHOT"):  # the README's picture: FREQTAG_SERVE_SCREENSHOT=docs/serve.png
            driver.execute_script("arguments[0].remove(); window.scrollTo(0, 0);", failed)
            driver.set_window_size(1280, 1480)
            driver.save_screenshot(str(tmp_path / "readme.png"))
            save_small_png(tmp_path / "readme.png", Path(os.environ["FREQTAG_SERVE_SCREENSHOT"]))
    finally:
        driver.quit()


def save_small_png(src: Path, dest: Path) -> None:
    """The screenshot in 128 colours (the page is flat colour and text): a small file for the README."""
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)


@pytest.mark.slow
def test_ensemble_of_trained_models_as_predict(tmp_path_factory, clips):
    """Several --ckpt behave as predict's ensemble: mel96 + mel128 trained runs, thresholds fitted on validation."""
    from tagging_models import trained_runs

    runs = trained_runs(tmp_path_factory)
    ckpts = [runs["mel96"], runs["mel128"]]
    s = launch(ckpts, tmp_path_factory.mktemp("serve-ensemble"))
    try:
        (expected,) = predict_json(ckpts, CLIPS, [CLIP.name], "--windows")
        wait_for_url(s)
        status, model = s.get_json("/api/model")
        assert status == 200 and model["ensemble"] and model["features"] == "mel128 + mel96"
        assert model["threshold_source"] == "fitted on the ensemble's validation predictions"
        status, rec = s.post_file(CLIP.name, CLIP.read_bytes(), "?windows=1&taggram=1")
        assert status == 200
        taggram = rec.pop("taggram")
        assert rec == expected
        finest = min(expected["windows"], key=lambda w: w["window_s"])  # the grid predict --plot draws on
        assert taggram["step_s"] == pytest.approx(finest["window_s"])
        assert len(taggram["activations"]) == len(finest["start_s"]) and len(taggram["activations"][0]) == 56
    finally:
        assert stop(s) == 0


# ----------------------------------------------------------------------- stop


def test_ctrl_c_stops_cleanly(server):
    (folder,) = server.upload_folders()
    assert stop(server) == 0
    assert "freqtag serve: stopped" in server.stderr.read_text()
    assert not folder.exists()  # the private upload folder goes with the server
    assert server.stdout.read_text().strip() == f"freqtag serve: {server.url} (Ctrl-C stops it)"


def test_upload_names_on_disk_are_ours():
    from freqtag.tag.serve.uploads import display_name, safe_name

    assert safe_name("../../my song (live).MP3") == "my_song_live_.mp3"  # the extension decides the decoder
    assert safe_name("C:\\music\\a.b.flac") == "a_b.flac" and safe_name("noext") == "noext"
    assert safe_name("../") == "upload" and safe_name(".ogg") == "upload.ogg"
    assert display_name("C:\\music\\a.flac") == "a.flac" and display_name("dir/") == "upload"
