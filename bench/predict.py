"""Whole-track tagging on CPU: freqtag's chunked scoring against the reference's evaluation loop, and memory.

1. Throughput (tracks/s) on the same network and the same 4-minute tracks,
   same run, alternating the two methods over ``--rounds``:

   - ``reference``: the reference's evaluation loop: one whole track per
     forward pass (batch 1), normalise, network, sigmoid, mean over windows,
     under ``torch.no_grad``.
   - ``freqtag``: :class:`freqtag.wholetrack.WindowStream` as ``predict`` uses it
     (frames pushed in 6-s pieces as the audio stream delivers them, chunks of
     at most 16,384 frames, inference mode).

   The features are random log-mel frames of the recipe's shape (the network
   does the same work whatever the values); the model is the paper's
   ``freq_dep`` at mel128 x 224 with random weights. Both must give the same
   probabilities (checked, 1e-5).

2. Peak memory (VmHWM of a fresh child process, reset after its imports and model load) of ``tag_file`` on
   generated audio files of ``--minutes`` each (44.1 kHz mono WAV; the mel128
   recipe, so decoding, silence trimming and the second decode pass of long
   files are all included), next to the child's RSS after its imports and the
   model load. The target is a peak that does not grow with the length.

3. ``--workers-only``: ``freqtag predict`` end to end (decoding, features,
   network, output) on ``--files`` generated 44.1 kHz stereo MP3 files of
   ``--file-minutes`` each, in this process (``--workers 0``) against worker
   processes (``--workers N`` for each N of ``--workers``: on a CPU each
   worker runs the whole pipeline on one thread), alternating over
   ``--rounds`` after one warm-up run each (the fork server started, the model
   loaded per call as the command does); the 1-minute load average is taken
   before each run, and the figures are medians. All outputs are checked
   equal, bit for bit. ``--candidates`` adds the designs that lost, in the
   same rounds: ``N features`` (workers decode and compute features, this
   process runs the network on torch's threads: the design on a GPU) and
   ``N features 1 thread`` (the same with one torch thread here). First, per
   file, in this process: decoding, decoding + features, and the network with
   1 and with 2 torch threads (alternating; medians), each with the load.
   Models: the paper's ``freq_dep`` mel128 x 224 and a ``convs`` mel96 x 128
   (random weights): their shares of features and network differ.

Both run with freed memory kept in the process, as ``freqtag predict`` does
(``keep_freed_memory``; ``--malloc default`` leaves glibc's defaults, with
which a chunk page-faults the network's buffers back in).

    python bench/predict.py [--tracks 3] [--rounds 2] [--minutes 5 20 60] [--malloc keep|default]
                            [--out bench/results/predict.json]
    python bench/predict.py --workers-only [--files 16] [--file-minutes 2] [--workers 2] [--rounds 2]
                            [--candidates] [--models freq_dep convs]
                            [--out bench/results/predict_workers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freqtag.system.allocator import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def make_checkpoint(path: Path, filters: str, n_mels: int, length: int) -> Path:
    from freqtag.features import FeatureSpec
    from freqtag.model import FreqTagNet

    torch.manual_seed(0)
    net = FreqTagNet(n_mels, length, filters=filters).eval()
    spec = FeatureSpec.load("mel128" if n_mels == 128 else "mel96")
    torch.save({"state_dict": net.state_dict(), "features": spec.to_dict(), "tags": [f"tag{i}" for i in range(56)],
                "model": {"_target_": "freqtag.model.FreqTagNet", "n_mels": n_mels, "input_length": length,
                          "n_tags": 56, "filters": filters},
                "input_length": length, "mean": 1.1, "std": 20.2}, path)
    return path


def throughput(args: argparse.Namespace, scratch: Path) -> dict:
    from freqtag.tag.models import load_model
    from freqtag.train.module import track_probabilities

    model = load_model(make_checkpoint(scratch / "fd128.ckpt", "freq_dep", 128, 224))
    frames = int(round(4 * 60 * model.spec.frames_per_second))
    rng = np.random.default_rng(0)
    tracks = [(rng.standard_normal((frames, 128)) * 20.2 + 1.1).astype(np.float32) for _ in range(args.tracks)]
    piece = int(6 * model.spec.frames_per_second)

    def reference() -> list[np.ndarray]:
        out = []
        with torch.no_grad():
            for t in tracks:
                out.append(track_probabilities(model.net, model.normalise(t))[0].numpy())
        return out

    def freqtag() -> list[np.ndarray]:
        out = []
        for t in tracks:
            s = model.stream()
            for k in range(0, len(t), piece):
                s.push(t[k : k + piece])
            out.append(s.finish().mean(axis=0))
        return out

    a, b = reference(), freqtag()  # warm-up, and the check
    diff = float(max(np.abs(x - y).max() for x, y in zip(a, b)))
    assert diff < 1e-5, diff
    times: dict[str, list[float]] = {"reference": [], "freqtag": []}
    for _ in range(args.rounds):
        for name, fn in (("reference", reference), ("freqtag", freqtag)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rate = {k: args.tracks / float(np.median(v)) for k, v in times.items()}
    return {"tracks": args.tracks, "frames_per_track": frames, "model": "freq_dep mel128 x 224",
            "tracks_per_s": rate, "ratio": rate["freqtag"] / rate["reference"], "max_abs_diff": diff,
            "seconds": times}


def write_audio(path: Path, minutes: float, rate: int = 44100) -> None:
    import soundfile as sf

    rng = np.random.default_rng(1)
    block = rate * 10
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        for k in range(int(minutes * 6)):
            t = (np.arange(block) + k * block) / rate
            x = 0.2 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.1 * t)) + 0.02 * rng.standard_normal(block)
            f.write(x.astype(np.float32))


def _status(key: str) -> int:
    """A KiB figure of /proc/self/status (VmRSS: now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def child(ckpt: str, audio: str, malloc: str) -> None:
    """Run in a fresh process: RSS after loading, peak RSS after tagging (KiB, Linux ru_maxrss)."""
    from freqtag.tag.models import load_model
    from freqtag.tag.predict import tag_file

    if malloc == "keep":
        keep_freed_memory()
    torch.set_num_threads(1)
    model = load_model(ckpt)
    try:  # reset the peak (VmHWM) to the current RSS: the imports' own transient peak is not the tagging's
        Path("/proc/self/clear_refs").write_text("5")
        base, peak = _status("VmRSS"), lambda: _status("VmHWM")
    except OSError:
        base, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = tag_file(Path(audio), [model])
    print(json.dumps({"loaded_kib": base, "peak_kib": peak(),
                      "seconds": time.perf_counter() - t0, "windows": len(r.windows[0]), "passes": r.passes,
                      "duration_s": r.duration_s}))


def memory(args: argparse.Namespace, scratch: Path) -> list[dict]:
    # the convs network: the same activation shapes per chunk as freq_dep (so the same memory), 3x faster
    ckpt = make_checkpoint(scratch / "cv128.ckpt", "convs", 128, 224)
    rows = []
    for minutes in args.minutes:
        wav = scratch / f"{minutes:g}min.wav"
        write_audio(wav, minutes)
        res = subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(wav), args.malloc], capture_output=True,
                             text=True, check=True)
        wav.unlink()
        row = {"minutes": minutes, **json.loads(res.stdout.strip().splitlines()[-1])}
        row["peak_mib"] = round(row["peak_kib"] / 1024, 1)
        row["growth_mib"] = round((row["peak_kib"] - row["loaded_kib"]) / 1024, 1)
        rows.append(row)
        print(f"  {minutes:g} min: peak {row['peak_mib']} MiB (+{row['growth_mib']} MiB over the loaded model), "
              f"{row['passes']} decode pass(es), {row['seconds']:.1f} s", flush=True)
    return rows


def write_mp3(path: Path, minutes: float, seed: int, rate: int = 44100) -> Path:
    """A stereo chord with tremolo and noise, as MP3 (the format MTG-Jamendo ships); FLAC if MP3 cannot be written."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(minutes * 60 * rate)) / rate
    f0 = 110.0 * (1 + seed % 5)
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3, 5)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * t))
    x = (0.2 * x + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    stereo = np.stack([x, 0.7 * x], axis=1)
    try:
        sf.write(path, stereo, rate, format="MP3")
        return path
    except (sf.LibsndfileError, ValueError, TypeError):
        flac = path.with_suffix(".flac")
        sf.write(flac, stereo, rate)
        return flac


def split_times(ckpt: Path, files: list[str], rounds: int) -> dict[str, Any]:
    """Seconds per file (medians over the first 3 files and ``rounds``) of decoding, decoding + features, and the
    network with 1 and with 2 torch threads (alternating; wall and CPU time), in this process, with the 1-minute
    load."""
    from freqtag.audio.decode import decoded_blocks
    from freqtag.prepare.pool import Job
    from freqtag.tag.models import load_model
    from freqtag.tag.runner import decode_features

    model = load_model(ckpt)
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {"decode": [], "decode_and_features": [], "network_1_thread": [],
                                     "network_2_threads": [], "network_1_thread_cpu": [], "network_2_threads_cpu": []}
    loads: list[float] = []
    outs: dict[int, np.ndarray] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for f in files[:3]:
            loads.append(os.getloadavg()[0])
            t0 = time.perf_counter()
            for _ in decoded_blocks(Path(f)):
                pass
            t1 = time.perf_counter()
            d = decode_features(Job("0", f), (model.spec,))
            t2 = time.perf_counter()
            if r:
                times["decode"].append(t1 - t0)
                times["decode_and_features"].append(t2 - t1)
            for n, key in ((1, "network_1_thread"), (2, "network_2_threads")):
                torch.set_num_threads(n)
                t0, c0 = time.perf_counter(), time.process_time()
                s = model.stream()
                s.push(d.frames[0])
                outs[n] = s.finish()
                if r:
                    times[key].append(time.perf_counter() - t0)
                    times[key + "_cpu"].append(time.process_time() - c0)  # both threads' (spinning included)
            torch.set_num_threads(threads)
            assert np.array_equal(outs[1], outs[2]), "the network's result depends on the thread count"
    out: dict[str, Any] = {k: float(np.median(v)) for k, v in times.items()}
    out["seconds"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    out["load_1min"] = [round(x, 2) for x in loads]
    out["frames"] = int(d.frames[0].shape[0])
    return out


#: --models: key -> (name, (filters, n_mels, input_length)); their shares of features and network differ.
WORKER_MODELS = {"freq_dep": ("freq_dep mel128 x 224", ("freq_dep", 128, 224)),
                 "convs": ("convs mel96 x 128", ("convs", 96, 128))}


def family_cpu_seconds() -> float:
    """CPU seconds of this process and of its children (the fork server), with the children they have reaped
    (the workers): the work a run did, whatever share of the cores the machine's other jobs left it."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid; then utime, stime, cutime, cstime are fields 11-14 after the name
            total += sum(int(v) for v in fields[11:15]) / tick
    return total


def designs(args: argparse.Namespace) -> dict[str, tuple[int, bool | None, int | None]]:
    """label -> (--workers, network in the workers (None: predict's choice), torch threads in this process)."""
    out: dict[str, tuple[int, bool | None, int | None]] = {"0": (0, None, None)}
    for n in args.workers:
        out[str(n)] = (n, None, None)
        if args.candidates:
            out[f"{n} features"] = (n, False, None)
            out[f"{n} features 1 thread"] = (n, False, 1)
    return out


def workers_bench(args: argparse.Namespace, scratch: Path) -> dict:
    """tracks/s of `freqtag predict` end to end, --workers 0 against --workers N, same files, same run."""
    from freqtag.cli import build_parser

    files = [str(write_mp3(scratch / f"w{i}.mp3", args.file_minutes, i)) for i in range(args.files)]
    models = {name: make_checkpoint(scratch / f"{key}.ckpt", *recipe) for key, (name, recipe) in WORKER_MODELS.items()
              if key in args.models}
    parser = build_parser()
    runs = designs(args)
    result: dict = {"files": len(files), "minutes_per_file": args.file_minutes, "cores": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
                    "designs": {k: {"workers": w, "network_in_workers": nw, "main_threads": t}
                                for k, (w, nw, t) in runs.items()}, "models": {}}
    threads = torch.get_num_threads()
    for name, ckpt in models.items():
        def run(label: str) -> tuple[float, str]:
            workers, network_workers, main_threads = runs[label]
            out = scratch / "out.json"
            a = parser.parse_args(["predict", "--ckpt", str(ckpt), *files, "--threshold", "0.5", "--format", "json",
                                   "--no-progress", "--workers", str(workers), "--out", str(out)])
            a.network_workers = network_workers
            torch.set_num_threads(main_threads or threads)
            c0 = family_cpu_seconds()
            try:
                t0 = time.perf_counter()
                code = a.run(a)
                seconds = time.perf_counter() - t0
            finally:
                torch.set_num_threads(threads)
            assert code == 0, code
            time.sleep(0.5)  # the fork server reaps the workers that have just exited
            cpu[label].append(family_cpu_seconds() - c0)
            return seconds, out.read_text()

        parts = split_times(ckpt, files, args.rounds)
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        texts = {k: run(k)[1] for k in runs}  # warm-up (the fork server, the first imports), and the check
        assert all(t == texts["0"] for t in texts.values()), "outputs differ between designs"
        times: dict[str, list[float]] = {k: [] for k in runs}
        loads: dict[str, list[float]] = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k in runs:
                loads[k].append(round(os.getloadavg()[0], 2))
                times[k].append(run(k)[0])
        rate = {k: len(files) / float(np.median(v)) for k, v in times.items()}
        net1 = parts["decode_and_features"] + parts["network_1_thread"]
        result["models"][name] = {
            "tracks_per_s": rate,
            "speedup": {k: rate[k] / rate["0"] for k in runs if k != "0"},
            "seconds": times,
            # CPU seconds per file of this process, the fork server and the workers: less sensitive to the load
            "cpu_seconds_per_file": {k: float(np.median(v)) / len(files) for k, v in cpu.items()},
            "load_1min": loads,
            "load_1min_median": float(np.median(sum(loads.values(), []))),
            "seconds_per_file": parts,
            "intra_op_speedup_2_threads": parts["network_1_thread"] / parts["network_2_threads"],
            # estimates, not measurements: N one-thread pipelines on N free cores, from this process's split
            "estimated_tracks_per_s_per_core": 1.0 / net1,
        }
        print(f"  {name}: per file: decode {parts['decode']:.2f} s, decode + features {parts['decode_and_features']:.2f} s, "
              f"network "
              f"{parts['network_1_thread']:.2f} s on 1 thread / {parts['network_2_threads']:.2f} s on 2 "
              f"(1-min load {min(parts['load_1min']):.1f}-{max(parts['load_1min']):.1f})", flush=True)
        print("    " + ", ".join(f"--workers {k}: {rate[k]:.3f} tracks/s" for k in runs)
              + " (speed-up " + ", ".join(f"{k}: {rate[k] / rate['0']:.2f}x" for k in runs if k != "0")
              + "; CPU s/file " + ", ".join(f"{k}: {v:.2f}" for k, v in result["models"][name]["cpu_seconds_per_file"].items())
              + f"; 1-min load median {result['models'][name]['load_1min_median']:.1f}, "
              f"{min(sum(loads.values(), [])):.1f}-{max(sum(loads.values(), [])):.1f})", flush=True)
    for f in files:
        Path(f).unlink()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracks", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--minutes", type=float, nargs="+", default=[5.0, 20.0, 60.0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict.json")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: freed memory stays in the process, as `freqtag predict` does (default); default: glibc's")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--workers-only", action="store_true", help="only the --workers comparison (3. above)")
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to compare with 0")
    p.add_argument("--files", type=int, default=16,
                   help="two-minute files per run (default 16: a worker's start-up, about 0.6 CPU s, is then a small share)")
    p.add_argument("--file-minutes", type=float, default=2.0)
    p.add_argument("--models", nargs="+", choices=tuple(WORKER_MODELS), default=list(WORKER_MODELS),
                   help="the networks of --workers-only (default both)")
    p.add_argument("--candidates", action="store_true",
                   help="also the designs that lost: feature workers with the network here (N features), and that "
                   "with one torch thread here (N features 1 thread)")
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.malloc == "keep":
        keep_freed_memory()
    from machine import machine

    scratch = Path(os.environ.get("FREQTAG_DATA_DIR", REPO / "data")) / "bench" / "predict"
    scratch.mkdir(parents=True, exist_ok=True)
    if args.workers_only:
        out = args.out if args.out != p.get_default("out") else args.out.with_name("predict_workers.json")
        print(f"predict end to end: {args.files} MP3 files of {args.file_minutes:g} min, "
              f"{', '.join(designs(args))}, {args.rounds} rounds; 1-min load now {os.getloadavg()[0]:.1f}", flush=True)
        result = {"machine": machine(), "workers": workers_bench(args, scratch)}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"wrote {out}")
        return
    print(f"throughput: {args.tracks} tracks of 4 minutes, freq_dep mel128 x 224, {args.rounds} rounds, "
          f"malloc {args.malloc}", flush=True)
    tp = throughput(args, scratch)
    r = tp["tracks_per_s"]
    print(f"  reference {r['reference']:.3f} tracks/s, freqtag {r['freqtag']:.3f} tracks/s, ratio {tp['ratio']:.3f}")
    print("peak memory of tag_file (mel128, fresh process each):", flush=True)
    mem = memory(args, scratch)
    result = {"machine": machine(), "malloc": args.malloc, "throughput": tp, "memory": mem}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
