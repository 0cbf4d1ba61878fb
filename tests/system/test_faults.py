"""Faults: `freqtag prepare` and training killed (SIGKILL) at chosen points, and a full disk.

The kill points are named in the code (:func:`freqtag.system.faults.fault_point`);
``FREQTAG_FAULT=NAME[@K]`` makes the process SIGKILL itself the K-th time it
reaches NAME, so every interruption here is deterministic. After each kill
the same command is run again and must give exactly what an uninterrupted
run gives. The full disk is real where a tmpfs can be mounted (a user and
mount namespace, ``unshare -rm``), and simulated by failing the writes with
ENOSPC otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FREQTAG, assert_same_store
from tiny_data import Tiny, make_tiny, run

from freqtag.data.store import FeatureStore
from freqtag.data.store_writer import StoreWriter
from freqtag.features import FeatureSpec
from freqtag.prepare.report import read_report, report_path
from freqtag.system import faults
from freqtag.system.atomic import atomic_save
from freqtag.system.faults import FAULT_ENV, DiskFullError

MEL96 = FeatureSpec.load("mel96")
# every step of a prepare run where a kill leaves something different on disk
PREPARE_POINTS = [
    "store.part.written@2",   # a part's temporary file complete, not yet renamed
    "store.part.renamed@3",   # three parts kept
    "prepare.report",         # every part kept and the report written, nothing assembled
    "store.assemble",         # STORE.tmp half written
    "store.rename.before",    # STORE.tmp complete and fsynced, not renamed
    "store.rename.after",     # the store under its name, STORE.partial/ still there
    "store.cleanup",          # STORE.partial/ half removed
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    t = make_tiny(tmp_path_factory.mktemp("tiny"))
    (t.npy / Path("13/1013.npy")).write_bytes(b"\x93NUMPY not really")  # one bad file: a report to keep right
    return t


def prepare_args(t: Tiny, out: Path) -> list[str]:
    return [FREQTAG, "prepare", "--npy-dir", str(t.npy), "--splits", str(t.splits), "--tags", str(t.tags),
            "--out", str(out), "--workers", "0", "--batch-size", "4", "--no-progress"]  # fmt: skip


def with_fault(point: str) -> dict[str, str]:
    return {**os.environ, FAULT_ENV: point}


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> Path:
    out = tiny.root / "reference" / "mel96.h5"
    res = run(prepare_args(tiny, out))
    assert res.returncode == 1, res.stderr  # the one bad file
    assert [t for t, _, _ in read_report(report_path(out))] == ["track_0001013"]
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial")))


@pytest.mark.parametrize("point", PREPARE_POINTS)
def test_prepare_killed_at_each_point_resumes_to_the_same_store(tiny: Tiny, reference: Path, tmp_path: Path,
                                                                point: str) -> None:  # fmt: skip
    out = tmp_path / "mel96.h5"
    killed = run(prepare_args(tiny, out), env=with_fault(point))
    assert killed.returncode == -signal.SIGKILL, (point, killed.stdout, killed.stderr)
    complete = point in ("store.rename.after", "store.cleanup")
    assert out.exists() == complete  # the final name appears only when the store is whole
    if complete:
        assert_same_store(out, reference)

    again = run(prepare_args(tiny, out))
    assert again.returncode == 1, again.stderr  # the bad file, reported again
    assert "Traceback" not in again.stderr
    assert_same_store(out, reference)
    assert read_report(report_path(out)) == read_report(report_path(reference))
    assert leftovers(tmp_path) == []  # no STORE.partial/, no STORE.tmp, no part .tmp


def test_prepare_killed_again_and_again(tiny: Tiny, reference: Path, tmp_path: Path) -> None:
    """Interruptions compound: killed during a part, then during assembly, then before the rename."""
    out = tmp_path / "mel96.h5"
    for point in ("store.part.written@2", "store.assemble", "store.rename.before"):
        assert run(prepare_args(tiny, out), env=with_fault(point)).returncode == -signal.SIGKILL
        assert not out.exists()
    again = run(prepare_args(tiny, out))
    assert again.returncode == 1 and "kept from an interrupted run" in again.stdout
    assert_same_store(out, reference)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ checkpoints


def kill_while_writing_last_ckpt(tiny: Tiny, run_dir: Path) -> list[str]:
    """SIGKILL in the middle of the second write of last.ckpt; checks the first is intact. Returns the command."""
    args = tiny.train_args(run_dir, "trainer.max_epochs=3")
    killed = run(args, env=with_fault("checkpoint.written:last.ckpt@2"), cwd=run_dir.parent)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    stale = list(ckpts.glob(".last.ckpt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the write that was cut off, under another name
    last = torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["epoch"] == 0 and last["freqtag"]["tags"][0] == "mood/theme---action"
    assert not (ckpts / "final.ckpt").exists()
    return args


def test_training_killed_while_writing_last_ckpt(tiny: Tiny, tmp_path: Path) -> None:
    kill_while_writing_last_ckpt(tiny, tmp_path / "run")


@pytest.mark.slow
def test_training_killed_while_writing_last_ckpt_resumes_to_the_same_model(tiny: Tiny, tmp_path: Path) -> None:
    """... and the run resumed from that last.ckpt ends exactly as one never interrupted."""
    run_dir = tmp_path / "run"
    args = kill_while_writing_last_ckpt(tiny, run_dir)
    ckpts = run_dir / "checkpoints"
    resumed = run([*args, f"ckpt_path={ckpts / 'last.ckpt'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(ckpts.glob(".last.ckpt.*.tmp"))  # the dead writer's file is cleared by the next save
    whole = run(tiny.train_args(tmp_path / "whole", "trainer.max_epochs=3"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    for split in ("validation", "test"):
        np.testing.assert_allclose(np.load(run_dir / "predictions" / f"{split}.npz")["probs"],
                                   np.load(tmp_path / "whole" / "predictions" / f"{split}.npz")["probs"], atol=1e-6)


def test_atomic_save_cut_off_mid_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"epoch": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    def cut(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_save({"epoch": 2}, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------- full disk


def test_checkpoint_disk_full_names_the_file_and_keeps_the_old_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save({"epoch": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        class Full:
            def __init__(self, inner):  # type: ignore[no-untyped-def]
                self.inner, self.n = inner, 0

            def write(self, b):  # type: ignore[no-untyped-def]
                self.n += len(b)
                if self.n > 2000:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.inner.write(b)

            def flush(self):  # type: ignore[no-untyped-def]
                return self.inner.flush()

        return real_save(obj, Full(f), *a, **k)  # torch wraps the OSError in a RuntimeError, as for real

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as err:
        atomic_save({"epoch": 2, "w": torch.zeros(10_000)}, path)
    msg = str(err.value)
    assert f"disk full while writing {path}" in msg and "free some space" in msg
    assert "the previous last.ckpt is intact" in msg and "\n" not in msg
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_training_disk_full_at_the_second_checkpoint(tiny: Tiny, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = run(tiny.train_args(run_dir), env=with_fault("checkpoint.written:last.ckpt@2=enospc"),
              cwd=tmp_path)  # fmt: skip
    assert res.returncode == 1, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: disk full while writing") and "last.ckpt" in line, res.stderr[-2000:]
    assert "the previous last.ckpt is intact" in line and "Traceback" not in res.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["epoch"] == 0
    assert not list((run_dir / "checkpoints").glob("*.tmp")) and not (run_dir / "checkpoints" / "final.ckpt").exists()


def test_store_disk_full_writing_a_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "s.h5"
    x = {f"t{i}": np.full((50, 96), float(i), np.float32) for i in range(6)}
    writer = StoreWriter(out, MEL96, list(x))
    writer.add([(t, x[t]) for t in ("t0", "t1")])
    real_savez = np.savez

    def full(f, **arrays):  # type: ignore[no-untyped-def]
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*part-000001\.npz\.tmp .*free some space.*"
                                            r"the 2 tracks finished so far are kept in .*s\.h5\.partial"):  # fmt: skip
        writer.add([(t, x[t]) for t in ("t2", "t3")])
    assert sorted(p.name for p in writer.partial.iterdir()) == ["part-000000.npz", "spec.json"]
    monkeypatch.setattr(np, "savez", real_savez)
    resumed = StoreWriter(out, MEL96, list(x))  # after freeing space: the same command again
    assert resumed.todo() == ["t2", "t3", "t4", "t5"]
    resumed.add([(t, x[t]) for t in resumed.todo()])
    resumed.finish(list(x), "all")
    for t in x:
        np.testing.assert_array_equal(FeatureStore(out).track(t), x[t].astype(np.float16))


def test_prepare_disk_full_while_assembling_is_one_line_and_resumes(tiny: Tiny, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "mel96.h5"
    res = run(prepare_args(tiny, out), env=with_fault("store.assemble=enospc"))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"freqtag: error: disk full while writing {out}.tmp"), res.stderr
    assert "free some space and re-run" in lines[0] and f"kept in {out}.partial" in lines[0]
    assert not out.exists() and not Path(f"{out}.tmp").exists()
    again = run(prepare_args(tiny, out))
    assert again.returncode == 1 and "39 kept from an interrupted run" in again.stdout
    assert_same_store(out, reference)


# A real full disk: a 700 kB tmpfs (the parts fit, the assembled store does not) mounted in a private mount namespace (no privileges needed where
# unprivileged user namespaces are allowed). The driver runs inside it and reports what it saw.
REAL_DISK = textwrap.dedent(
    """
    import json, subprocess, sys, torch
    from pathlib import Path
    from freqtag.system.faults import DiskFullError
    from freqtag.system.atomic import atomic_save

    mnt, freqtag, npy, splits, tags, result = sys.argv[1:]
    mnt, seen = Path(mnt), {}
    out = mnt / "mel96.h5"
    cmd = [freqtag, "prepare", "--npy-dir", npy, "--splits", splits, "--tags", tags, "--out", str(out),
           "--workers", "0", "--batch-size", "4", "--no-progress"]
    full = subprocess.run(cmd, capture_output=True, text=True)
    seen["prepare_full"] = [full.returncode, full.stderr, sorted(p.name for p in mnt.iterdir())]
    subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)  # space freed
    again = subprocess.run(cmd, capture_output=True, text=True)
    seen["prepare_again"] = [again.returncode, again.stdout, again.stderr]
    (Path(result).parent / "from_tmpfs.h5").write_bytes(out.read_bytes())
    for p in list(mnt.iterdir()):
        p.unlink() if p.is_file() else None
    subprocess.run(["mount", "-o", "remount,size=1m", str(mnt)], check=True)
    ckpt = mnt / "last.ckpt"
    atomic_save({"epoch": 0, "w": torch.ones(100_000)}, ckpt)  # 400 kB: fits
    before = ckpt.read_bytes()
    try:
        atomic_save({"epoch": 1, "w": torch.ones(200_000)}, ckpt)  # 800 kB more: does not
        seen["ckpt"] = ["no error"]
    except DiskFullError as e:
        seen["ckpt"] = [str(e), ckpt.read_bytes() == before, sorted(p.name for p in mnt.iterdir())]
    Path(result).write_text(json.dumps(seen))
    """
)


def test_real_full_disk_on_a_tmpfs(tiny: Tiny, reference: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                           capture_output=True, text=True) if shutil.which("unshare") else None  # fmt: skip
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here; the full disk is simulated by the other tests")
    driver, result = tmp_path / "driver.py", tmp_path / "result.json"
    driver.write_text(REAL_DISK)
    script = f'mount -t tmpfs -o size=700k tmpfs "{mnt}" && exec "$@"'
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, str(driver), str(mnt), FREQTAG,
                          str(tiny.npy), str(tiny.splits), str(tiny.tags), str(result)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    seen = json.loads(result.read_text())
    code, stderr, files = seen["prepare_full"]
    assert code == 1 and stderr.count("\n") == 1, stderr  # one line
    assert f"disk full while writing {mnt}/mel96.h5" in stderr and "free space on its file system" in stderr
    assert "mel96.h5" not in files and "mel96.h5.partial" in files  # no half store under the name; the parts kept
    code, stdout, stderr = seen["prepare_again"]
    assert code == 1 and "kept from an interrupted run" in stdout, stderr
    assert_same_store(tmp_path / "from_tmpfs.h5", reference)
    message, intact, files = seen["ckpt"]
    assert f"disk full while writing {mnt}/last.ckpt" in message and "the previous last.ckpt is intact" in message
    assert intact and files == ["last.ckpt"]


def test_fault_points_do_nothing_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    faults.fault_point("store.assemble")
    monkeypatch.setenv(FAULT_ENV, "store.assemble@2=enospc")
    monkeypatch.setattr(faults, "_hits", {})
    faults.fault_point("store.rename.before")  # another point
    faults.fault_point("store.assemble")  # the first time: not yet
    with pytest.raises(OSError) as e:
        faults.fault_point("store.assemble")
    assert e.value.errno == errno.ENOSPC and faults.disk_full(RuntimeError("wrapped")) is False
