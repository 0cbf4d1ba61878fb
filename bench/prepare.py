"""Audio -> features throughput: `freqtag prepare --audio-dir` against the reference's way.

What is measured: seconds of audio turned into features per second of wall
time (the real-time factor, RTF), for mel128 and mel96, on real music:

- ``reference``: the reference's way, one file at a time in one process:
  ``librosa.load(path, sr=None, mono=True)`` (soundfile + channel mean),
  torchaudio resampling when the file's rate is not the recipe's,
  ``librosa.effects.trim(top_db=60)`` (mel128), the torchaudio transform
  (``MelSpectrogram`` + ``AmplitudeToDB`` for mel128; ``Spectrogram`` + Slaney
  filterbank + ``20*log10`` for mel96), first frame dropped (mel128), then
  ``np.save`` of one float32 ``.npy`` per file. Transforms are built once;
  torch keeps its default threads.
- ``freqtag wN``: :func:`freqtag.prepare.command.prepare_audio` with N worker
  processes, ``--device cpu``: each worker decodes, averages, resamples, trims
  and transforms its files and hands float16 features to the main process,
  which writes the resumable parts and assembles the HDF5 store.
- ``freqtag wN, main transform``: the path ``--device cuda`` takes, run on the
  CPU: workers hand the waveforms over and the main process transforms them
  in batches. It shows why the CPU path transforms in the workers.

Each pipeline runs in a fresh child process (``--child``), one after the
other, so each pays its own interpreter start and imports: ``rtf`` is on the
wall time from launch to exit, ``rtf_work`` on the wall time after the imports
(for freqtag this still includes spawning the workers, which import torch).
The child reports its CPU seconds and its workers' (with the fork server that
forked them, which imports torch once for all of them), so the main process's
share of the work is visible.

Audio: the two clips of ``../shared/data/audio`` (vibe_ace.ogg, 61 s stereo
44.1 kHz Vorbis; house_lo.mp3, 7 s mono 11.025 kHz) plus vibe_ace re-encoded
once as a 44.1 kHz stereo MP3 (MTG-Jamendo's own kind of file), linked
repeatedly under distinct names until ``--minutes`` of audio; ``--extra DIR``
adds every audio file under DIR (e.g. Debian's planetblupi-music-ogg,
``apt-get download planetblupi-music-ogg && dpkg -x ...``). Repeated links
read the same bytes, so the page cache is warm: decoding, not the disk, is
measured. Scratch files live under ``<data dir>/bench/prepare`` ($FREQTAG_DATA_DIR
or ./data, which git ignores).

Profile: one process, one torch thread, CPU time of every step of
freqtag's path on each distinct file (decode, channel mean, resample,
silence/trim, log-mel transform, float16 + checks, handing the waveform
between processes, writing), as milliseconds per minute of audio and shares.

Check: the first file's features from both pipelines are compared (the
store holds float16, so they agree to float16 rounding).

    python bench/prepare.py [--minutes 60] [--features mel128 mel96] [--workers 1 2]
                            [--extra DIR] [--out bench/results/prepare.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
CLIPS = REPO.parent / "shared" / "data" / "audio"


def data_dir() -> Path:
    return Path(os.environ.get("FREQTAG_DATA_DIR", REPO / "data"))


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def fork_server_cpu_seconds() -> float:
    """CPU of multiprocessing's fork server and of the workers it forked and reaped (0 if none ran).

    The workers are its children, not ours, so RUSAGE_CHILDREN misses them.
    """
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------- the set


def build_set(scratch: Path, minutes: float, extra: Path | None) -> list[Path]:
    """The benchmark's audio folder: real clips linked repeatedly (see the module docstring)."""
    import soundfile as sf

    from freqtag.audio.decode import AUDIO_EXTENSIONS

    sources = scratch / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    mp3 = sources / "vibe_ace_44k.mp3"
    if not mp3.is_file():
        x, sr = sf.read(CLIPS / "vibe_ace.ogg", dtype="float32")
        tmp = mp3.with_suffix(".tmp")
        sf.write(tmp, x, sr, format="MP3")
        tmp.replace(mp3)
    unit = [CLIPS / "vibe_ace.ogg", mp3, CLIPS / "house_lo.mp3"]
    folder = scratch / "audio"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    files, total, i = [], 0.0, 0
    while total < minutes * 60:
        src = unit[i % len(unit)]
        link = folder / f"{i:04d}_{src.name}"
        link.symlink_to(src)
        files.append(link)
        total += sf.info(src).duration
        i += 1
    if extra is not None:
        for src in sorted(p for p in extra.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS):
            link = folder / f"extra_{src.name}"
            link.symlink_to(src.resolve())
            files.append(link)
    return files


# ------------------------------------------------------------------ children


def child_reference(features: str, files: list[Path], out: Path, threads: int) -> dict:
    import librosa
    import numpy as np
    import torch
    import torchaudio

    from freqtag.features import FeatureSpec

    if threads:
        torch.set_num_threads(threads)
    spec = FeatureSpec.load(features)
    librosa.effects.trim(librosa.load(files[0], sr=None, mono=True)[0])  # librosa's lazy imports: start-up, not work
    imported = time.perf_counter()
    if spec.name == "mel128":
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=44100, n_fft=2048, win_length=2048, hop_length=1024, f_min=0.0, f_max=16000.0, n_mels=128,
            power=2.0, center=True, pad_mode="reflect", norm=None, mel_scale="htk",
        )  # fmt: skip
        to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)

        def transform(y: torch.Tensor) -> torch.Tensor:
            return to_db(mel(y))[:, 1:]
    else:
        spectrogram = torchaudio.transforms.Spectrogram(n_fft=512, hop_length=256, power=2, center=True, pad_mode="constant")
        fb = torchaudio.functional.melscale_fbanks(257, 0, 6000, 96, 12000, norm="slaney", mel_scale="slaney")

        def transform(y: torch.Tensor) -> torch.Tensor:
            return 20 * torch.log10(torch.clamp((spectrogram(y).T @ fb).T, min=1e-10))

    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        y, sr = librosa.load(path, sr=None, mono=True)
        if sr != spec.sample_rate:
            y = torchaudio.functional.resample(torch.from_numpy(y), sr, spec.sample_rate).numpy()
        if spec.trim_top_db is not None:
            y, _ = librosa.effects.trim(y, top_db=spec.trim_top_db)
        np.save(out / f"{i:05d}.npy", transform(torch.from_numpy(y)).numpy())
    return {"imported": imported}


def child_freqtag(features: str, folder: Path, out: Path, workers: int) -> dict:
    from freqtag.prepare.command import prepare_audio

    imported = time.perf_counter()
    report = prepare_audio(folder, out, features, workers=workers, progress=False)
    assert not report.skipped, report.skipped
    return {"imported": imported, "tracks": report.written}


def child_main_transform(features: str, folder: Path, out: Path, workers: int) -> dict:
    """prepare_audio's other path (the one --device cuda takes), on the CPU."""
    import functools

    from freqtag.audio import decode as audio
    from freqtag.audio.logmel import LogMel
    from freqtag.features import FeatureSpec
    from freqtag.prepare import command as prepare

    imported = time.perf_counter()
    spec = FeatureSpec.load(features)
    jobs = prepare.audio_jobs(folder, None, out)
    report = prepare.build_store(
        jobs, functools.partial(prepare.load_audio, spec=spec, min_frames=prepare.DEFAULT_MIN_FRAMES), out, spec,
        [j.track_id for j in jobs], stats_split="all", workers=workers, progress=False, transform=LogMel(spec),
        initializer=audio.quiet_decoder_messages, chunk_size=prepare.AUDIO_CHUNK_SIZE,
    )  # fmt: skip
    assert not report.skipped, report.skipped
    return {"imported": imported, "tracks": report.written}


def run_child(args: argparse.Namespace) -> None:
    files = [Path(p) for p in json.loads(Path(args.files).read_text())]
    if args.child == "reference":
        info = child_reference(args.child_features, files, Path(args.child_out), args.child_workers)
    elif args.child == "freqtag":
        info = child_freqtag(args.child_features, files[0].parent, Path(args.child_out), args.child_workers)
    else:
        info = child_main_transform(args.child_features, files[0].parent, Path(args.child_out), args.child_workers)
    end = time.perf_counter()
    info.update(
        work_seconds=end - info.pop("imported"),
        cpu_self=cpu_seconds(resource.RUSAGE_SELF),
        cpu_workers=cpu_seconds(resource.RUSAGE_CHILDREN) + fork_server_cpu_seconds(),
    )
    print(json.dumps(info))


def launch(kind: str, features: str, files_json: Path, out: Path, workers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--child-features", features, "--files", str(files_json),
           "--child-out", str(out), "--child-workers", str(workers)]  # fmt: skip
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{kind} {features} failed:\n{done.stderr}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    info["wall_seconds"] = wall
    return info


# ------------------------------------------------------------------- profile


def profile(features: str, files: list[Path]) -> dict:
    """CPU time of each step of freqtag's CPU path, one process, one thread, one pass (see the module docstring)."""
    import numpy as np
    import soundfile as sf
    import torch

    from freqtag.audio import decode, loudness
    from freqtag.audio.logmel import LogMel
    from freqtag.audio.resample import resample
    from freqtag.features import FeatureSpec
    from freqtag.prepare.pool import _checked

    torch.set_num_threads(1)
    spec = FeatureSpec.load(features)
    transform = LogMel(spec)
    steps: dict[str, float] = {}
    per_source: dict[str, dict[str, float]] = {}
    waveform_handover = 0.0
    seconds = 0.0

    def roundtrip(x: np.ndarray) -> np.ndarray:
        return pickle.loads(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL))

    for path in files:
        source = Path(os.readlink(path)).name if path.is_symlink() else path.name
        mine = per_source.setdefault(source, {"audio_seconds": 0.0, "cpu_seconds": 0.0, "decode": 0.0})

        def timed(step: str, fn, *a):  # type: ignore[no-untyped-def]
            c = time.process_time()
            r = fn(*a)
            took = time.process_time() - c
            steps[step] = steps.get(step, 0.0) + took
            mine["cpu_seconds"] += took
            if step == "decode":
                mine["decode"] += took
            return r

        x2, sr = timed("decode", lambda p: sf.read(p, dtype="float32", always_2d=True), path)
        seconds += x2.shape[0] / sr
        mine["audio_seconds"] += x2.shape[0] / sr
        x = timed("channel mean", decode.to_mono, x2)
        x = timed("resample", resample, x, sr, spec.sample_rate, spec.resample)
        ms = timed("silence + trim", loudness.frame_mean_squares, x, loudness.TRIM_FRAME_LENGTH, loudness.TRIM_HOP_LENGTH)
        if spec.trim_top_db is not None:
            start, end = timed(
                "silence + trim", loudness.kept_interval, ms, x.shape[0], spec.trim_top_db, loudness.TRIM_HOP_LENGTH
            )
            x = x[start:end]
        f = timed("log-mel transform", lambda y: transform([y])[0], x)
        f16 = timed("float16 + checks", _checked, f, spec.n_mels)
        timed("hand-over of the features (pickle round trip)", roundtrip, f16)
        timed("write (npz)", lambda a: np.savez(io.BytesIO(), track=a), f16)
        c = time.process_time()
        roundtrip(x)  # what the main-transform path (--device cuda) hands over instead
        waveform_handover += time.process_time() - c
    total = sum(steps.values())
    minutes = seconds / 60
    return {
        "audio_seconds": round(seconds, 1),
        "ms_per_audio_minute": {k: round(1000 * v / minutes, 2) for k, v in steps.items()},
        "share": {k: round(v / total, 3) for k, v in steps.items()},
        "realtime_factor_one_core": round(seconds / total, 1),
        "per_source": {
            k: {"ms_per_audio_minute": round(1000 * v["cpu_seconds"] / (v["audio_seconds"] / 60), 1),
                "decode_share": round(v["decode"] / v["cpu_seconds"], 3)}
            for k, v in per_source.items()
        },  # fmt: skip
        "not_in_the_cpu_path": {
            "waveform hand-over (pickle round trip), ms per audio minute": round(1000 * waveform_handover / minutes, 2)
        },
    }


# ---------------------------------------------------------------------- main


def compare(reference_npy: Path, store: Path, track_id: str) -> float:
    import numpy as np

    from freqtag.data.store import FeatureStore

    ref = np.load(reference_npy).T
    ours = FeatureStore(store).track(track_id).astype(np.float32)
    assert ref.shape == ours.shape, (ref.shape, ours.shape)
    return float(np.abs(ref - ours).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="audio to process per pipeline (default 60)")
    parser.add_argument("--features", nargs="+", default=["mel128", "mel96"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each pipeline, in rotating order; best kept")
    parser.add_argument("--extra", type=Path, default=None, help="more audio: every audio file under this folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prepare.json")
    parser.add_argument("--child", choices=("reference", "freqtag", "main-transform"), help=argparse.SUPPRESS)
    parser.add_argument("--child-features", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    import soundfile as sf

    scratch = data_dir() / "bench" / "prepare"
    files = build_set(scratch, args.minutes, args.extra)
    audio_seconds = sum(sf.info(f).duration for f in files)
    files_json = scratch / "files.json"
    files_json.write_text(json.dumps([str(f) for f in files]))
    print(f"{len(files)} files, {audio_seconds / 60:.1f} min of audio; load average {os.getloadavg()}", flush=True)
    result: dict = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": os.getloadavg(),
                    "note": "shared machine: other jobs ran at the same time, so wall times are noisy"},
        "audio": {"files": len(files), "seconds": round(audio_seconds, 1),
                  "sources": sorted({Path(os.readlink(f)).name for f in files})},
        "features": {},
    }  # fmt: skip
    for features in args.features:
        out = scratch / "out" / features
        shutil.rmtree(out, ignore_errors=True)
        # (name, child kind, workers or reference torch threads); threads 0 = torch's default
        plan = [("reference", "reference", 0), ("reference 1 thread", "reference", 1)]
        plan += [(f"freqtag w{w}", "freqtag", w) for w in args.workers]
        plan += [(f"freqtag w{max(args.workers)}, main transform", "main-transform", max(args.workers))]
        every: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
        for r in range(args.rounds):
            for name, kind, n in plan[r % len(plan) :] + plan[: r % len(plan)]:
                target = out / (f"ref{n}_npy" if kind == "reference" else f"{kind}_w{n}.h5")
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                info = launch(kind, features, files_json, target, n)
                every[name].append(info)
                print(f"{features:7s} {name:31s} wall {info['wall_seconds']:6.1f} s  "
                      f"RTF {audio_seconds / info['wall_seconds']:6.1f}  cpu main {info['cpu_self']:5.1f} s, "
                      f"workers {info['cpu_workers']:5.1f} s  load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        runs = {}
        for name, infos in every.items():
            info = dict(min(infos, key=lambda i: i["wall_seconds"]))
            info["walls"] = [round(i["wall_seconds"], 2) for i in infos]
            info["rtf"] = round(audio_seconds / info["wall_seconds"], 1)
            info["rtf_work"] = round(audio_seconds / info["work_seconds"], 1)
            info["cpu_ms_per_audio_minute"] = round(1000 * (info["cpu_self"] + info["cpu_workers"]) / (audio_seconds / 60), 1)
            runs[name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()}
        best_ref = max(runs["reference"]["rtf"], runs["reference 1 thread"]["rtf"])
        for name, info in runs.items():
            if name.startswith("freqtag"):
                info["speedup_vs_best_reference"] = round(info["rtf"] / best_ref, 2)
                info["speedup_vs_reference_default_threads"] = round(info["rtf"] / runs["reference"]["rtf"], 2)
        first = files[0].relative_to(files[0].parent).as_posix()
        checks = {name: compare(out / "ref0_npy" / "00000.npy", out / f"{kind}_w{n}.h5", first)
                  for name, kind, n in plan if kind != "reference"}  # fmt: skip
        prof = profile(features, files)
        result["features"][features] = {"runs": runs, "max_abs_db_difference_first_file": checks, "profile": prof}
        shutil.rmtree(out, ignore_errors=True)
        print(f"{features} best of {args.rounds}: " + ", ".join(f"{k} RTF {v['rtf']}" for k, v in runs.items()))
        print(f"{features} profile, CPU ms per audio minute: {prof['ms_per_audio_minute']} "
              f"(one core: {prof['realtime_factor_one_core']}x real time)", flush=True)  # fmt: skip
    result["machine"]["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
