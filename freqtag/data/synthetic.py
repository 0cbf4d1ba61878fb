"""A synthetic MTG-Jamendo look-alike: the embedded dataset of the CPU demo.

Written in the real on-disk formats (tag list, split-0 TSVs, feature store),
so the demo runs the real code path. It is built to be *learned* by the paper
network in minutes on a CPU, and to *reward* frequency-dependent filters:

- tag = (motif, region): one of ``N_MOTIFS`` time-invariant spectral shapes
  (bumps, combs, notches, slopes; 6-12 bands wide on a 96-band axis) placed,
  with a little jitter, in one of ``N_REGIONS`` frequency regions, so the same
  shape means a different tag in each region;
- distractors: random motifs in the gaps between regions, where they mean
  nothing, so a detector that ignores *where* a shape sits is fooled;
- background in dB with roughly the real statistics of the feature kind
  (spectral tilt and colour, per-track level, time-varying loudness with
  beats and fades, moving melody notes, per-bin noise), so normalisation
  matters and no single band's mean gives the answer.

Every track is drawn from its own generator (``SeedSequence(seed, spawn_key=(i,))``),
so a track does not depend on the others or on the generation order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from freqtag.data.jamendo import MOODTHEME_TAGS, SPLITS, TAGS_FILE, split_file, write_split
from freqtag.data.store_writer import StoreWriter
from freqtag.features import FeatureSpec

__all__ = ["synthesize", "tag_layout", "is_synthetic", "N_MOTIFS", "N_REGIONS", "DEMO_TRACKS", "MANIFEST"]

N_MOTIFS, N_REGIONS = 14, 4  # 14 x 4 = the 56 tags; tag t is motif t // 4 in region t % 4
DEMO_TRACKS = 1000
MANIFEST = "synthetic.json"  # arguments + generator version; written last, marks a complete folder
VERSION = 2  # bump when the generated data changes (2: mel96's recipe gained resample/window)
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
TAGS_PER_TRACK = (0.4, 0.4, 0.2)  # P(1), P(2), P(3) tags: mean 1.8 like MTG
MIN_FRAMES, MAX_FRAMES = 60, 2000  # log-uniform: ~22% of tracks are shorter than 128 frames
# The global statistics of each feature kind on MTG-Jamendo, mean and std in dB: the synthetic tracks sit there.
LEVELS = {"mel96": (-24.4, 19.4), "mel128": (1.1, 20.2)}
MOTIF_DB = (22.0, 30.0)  # peak height of a tag's motif (and of a distractor)
NOISE_DB = 4.0  # per-bin noise std
NOTE_DB = (4.0, 10.0)  # melody note level

assert N_MOTIFS * N_REGIONS == len(MOODTHEME_TAGS)


def _motif(k: int, u: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Shape ``k`` at relative position ``u`` (-1..1 across its width; ``off`` in bands), peak |1|."""

    def g(c: float, s: float) -> np.ndarray:
        return np.exp(-(((u - c) / s) ** 2))

    inside = np.abs(u) <= 1.0
    taper = np.where(inside, np.cos(0.5 * np.pi * np.clip(u, -1, 1)) ** 0.5, 0.0)
    # Signs differ on purpose: with all-positive shapes a net first learns "energy in
    # region r" and stalls there; mixed signs make it learn the shapes themselves.
    shapes = (
        lambda: g(0, 0.3),  # narrow bump
        lambda: taper * (np.abs(u) < 0.75),  # plateau
        lambda: g(-0.5, 0.22) + g(0.5, 0.22),  # two peaks
        lambda: g(-0.67, 0.15) + g(0, 0.15) + g(0.67, 0.15),  # three peaks
        lambda: taper * np.cos(np.pi * off),  # comb, period 2 bands
        lambda: -g(0, 0.35),  # notch
        lambda: -(g(-0.5, 0.22) + g(0.5, 0.22)),  # two notches
        lambda: inside * (u + 1) / 2,  # rising slope, sharp top
        lambda: inside * (1 - u) / 2,  # falling slope
        lambda: taper * np.sign(-u),  # step down
        lambda: -u * g(0, 0.45) / 0.43,  # peak then notch
        lambda: g(-0.6, 0.2) + g(0.6, 0.2) - g(0, 0.2),  # peaks around a notch
        lambda: taper * np.cos(2 * np.pi * off / 3),  # comb, period 3 bands
        lambda: g(-0.5, 0.25) + 0.45 * g(0.5, 0.25),  # big peak, small peak
    )
    return shapes[k]()


def tag_layout(n_bands: int) -> dict[str, np.ndarray]:
    """Where things sit on a ``n_bands`` axis: region centres (tags), gap centres
    (distractors), each motif's width and the jitter, all in bands."""
    scale = n_bands / 96
    return {
        "regions": n_bands * (2 * np.arange(N_REGIONS) + 1) / (2 * N_REGIONS),
        "gaps": n_bands * np.arange(1, N_REGIONS) / N_REGIONS,
        "widths": scale * np.array([6, 8, 10, 12, 10, 8, 10, 9, 9, 8, 9, 12, 12, 10], dtype=float),
        "jitter": np.array(2.0 * scale),
    }


def _draw(shape: int, centre: float, width: float, n_bands: int) -> np.ndarray:
    off = np.arange(n_bands) - centre
    return _motif(shape, off / (width / 2), off)


def _track(seed: int, index: int, tags: np.ndarray, frames: int, n_bands: int, features: str) -> np.ndarray:
    """One track's log-mel frames, (frames, n_bands) float32, from its own generator."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    mean, std = LEVELS[features]
    k = std / 19.4  # the components below are sized for std 19.4
    lay = tag_layout(n_bands)
    b = np.arange(n_bands) / (n_bands - 1)
    t = np.arange(frames)[:, None]

    # Background spectrum: falling tilt, smooth random colour, track level.
    tilt = rng.uniform(40, 60) * (0.5 - b) - 10 * (b - 0.5) ** 2
    colour = sum(rng.normal(0, 3.0) * np.cos(np.pi * j * b + rng.uniform(0, 2 * np.pi)) for j in range(1, 5))
    spectrum = tilt + colour + rng.normal(0, 8.0)

    # Loudness over time (all bands): slow swell, beats, fade in and out.
    slow = sum(rng.uniform(1, 4) * np.sin(2 * np.pi * t / rng.uniform(80, 600) + rng.uniform(0, 2 * np.pi)) for _ in range(2))
    period = rng.uniform(8, 30)
    beats = rng.uniform(3, 8) * np.exp(-((t + rng.uniform(0, period)) % period) / rng.uniform(1.5, 4))
    fade_in, fade_out = rng.uniform(1, min(40, frames / 4), size=2)
    fade = 25 * (np.minimum(t / fade_in, 1) + np.minimum((frames - 1 - t) / fade_out, 1) - 2)
    x = spectrum[None, :] + slow + beats + fade

    # Melody: notes of 6-40 frames at random pitches with two harmonics, rests between.
    lengths = rng.integers(6, 41, size=frames // 6 + 1)
    note = np.repeat(np.arange(len(lengths)), lengths)[:frames]
    pitch = rng.uniform(0, n_bands, size=len(lengths))[note][:, None]
    step = rng.uniform(4, 12, size=len(lengths))[note][:, None] * n_bands / 96
    level = (rng.uniform(*NOTE_DB, size=len(lengths)) * (rng.random(len(lengths)) < 0.7))[note][:, None]
    bands = np.arange(n_bands)[None, :]
    for h, gain in enumerate((1.0, 0.6, 0.35)):
        x = x + gain * level * np.exp(-(((bands - pitch - h * step) / 1.2) ** 2))

    # The tags: each motif throughout the track in its region, slowly breathing.
    profile = np.zeros(n_bands)
    for tag in tags:
        motif, region = divmod(int(tag), N_REGIONS)
        centre = lay["regions"][region] + rng.uniform(-1, 1) * lay["jitter"]
        profile += rng.uniform(*MOTIF_DB) * _draw(motif, centre, lay["widths"][motif], n_bands)
    # Distractors: random motifs in the gaps between regions, where they mean nothing.
    for gap in lay["gaps"]:
        if rng.random() < 0.6:
            motif = int(rng.integers(N_MOTIFS))
            centre = gap + rng.uniform(-0.5, 0.5) * lay["jitter"]
            profile += rng.uniform(*MOTIF_DB) * _draw(motif, centre, lay["widths"][motif], n_bands)
    breathe = 0.8 + 0.2 * np.sin(2 * np.pi * t / rng.uniform(100, 400) + rng.uniform(0, 2 * np.pi))
    x = x + breathe * profile[None, :]

    x = x + rng.normal(0, NOISE_DB, size=(frames, n_bands))
    return (mean + k * x).astype(np.float32)


def _assign_tags(rng: np.random.Generator, n: int, weights: np.ndarray) -> list[list[int]]:
    """1-3 tags per track, in distinct regions, every tag at least min(3, T // 56) times.

    Tag counts are fixed first (a floor for every tag, the rest in proportion
    to ``weights``), then dealt at random and repaired by swaps, so even small
    splits hold every tag.
    """
    n_tags = len(weights)
    sizes = rng.choice(len(TAGS_PER_TRACK), size=n, p=TAGS_PER_TRACK) + 1
    total = int(sizes.sum())
    floor = min(3, total // n_tags)
    share = (total - floor * n_tags) * weights / weights.sum()
    counts = floor + np.floor(share).astype(int)
    counts[np.argsort(-(share - np.floor(share)), kind="stable")[: total - counts.sum()]] += 1
    pool = rng.permutation(np.repeat(np.arange(n_tags), counts))
    owner = np.repeat(np.arange(n), sizes)
    members = [list(range(s, s + k)) for s, k in zip(np.cumsum(sizes) - sizes, sizes)]

    def clash(slot: int, tag: int) -> bool:  # would ``tag`` at ``slot`` repeat a region of its track?
        return any(pool[o] % N_REGIONS == tag % N_REGIONS for o in members[owner[slot]] if o != slot)

    for slot in range(total):
        if not clash(slot, pool[slot]):
            continue
        for other in rng.permutation(total):
            if owner[other] != owner[slot] and not clash(other, pool[slot]) and not clash(slot, pool[other]):
                pool[slot], pool[other] = pool[other], pool[slot]
                break
        else:  # pragma: no cover - needs a split with almost one region
            raise RuntimeError("synthetic tag assignment failed; use more tracks")
    return [sorted(int(pool[o]) for o in m) for m in members]


def is_synthetic(folder: str | Path) -> bool:
    """Whether ``folder`` is a dataset made by :func:`synthesize` (its manifest says so)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("generator") == "freqtag.data.synthetic"
    except (OSError, ValueError, AttributeError):
        return False


# over 60 lines: the generation read top to bottom: its order is the data's (draws in sequence)
def synthesize(out: str | Path, tracks: int = DEMO_TRACKS, seed: int = 0, features: str = "mel96") -> Path:
    """Write the synthetic dataset into folder ``out`` and return ``out``.

    ``out/moodtheme_split.txt``, ``out/split-0/autotagging_moodtheme-*.tsv`` (60/20/20,
    artists unique per split) and ``out/<features>.h5`` (mean/std of the train
    split). Same arguments, same content. Built in a temporary folder that is
    renamed into place, so an interrupted run never leaves a complete-looking
    ``out``; a folder already made with the same arguments is returned as is.
    """
    out = Path(out)
    spec = FeatureSpec.load(features)
    if spec.name not in LEVELS:
        raise ValueError(f"synthetic data has no level model for features '{features}'; valid: {', '.join(LEVELS)}")
    if tracks < 300:
        raise ValueError(f"tracks={tracks}: use at least 300 so that every tag has positives in every split")
    manifest = {"generator": "freqtag.data.synthetic", "version": VERSION, "tracks": tracks, "seed": seed, "features": features}
    if out.exists():
        old = out / MANIFEST
        if old.is_file() and json.loads(old.read_text()) == manifest:
            return out
        if not old.is_file() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a synthetic dataset: pass an empty or new folder")

    meta = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**32,)))
    n_split = np.floor(np.array(SPLIT_FRACTIONS) * tracks).astype(int)
    n_split[0] += tracks - n_split.sum()
    which = np.repeat(np.arange(len(SPLITS)), n_split)[meta.permutation(tracks)]
    frames = np.exp(meta.uniform(np.log(MIN_FRAMES), np.log(MAX_FRAMES + 1), size=tracks)).astype(int)
    weights = meta.permutation(np.linspace(1, 4, len(MOODTHEME_TAGS)))
    ids = [f"track_{i + 1:07d}" for i in range(tracks)]
    labels = np.zeros((tracks, len(MOODTHEME_TAGS)), dtype=np.uint8)
    artists = [""] * tracks
    n_artists = 0
    for s in range(len(SPLITS)):
        rows = np.flatnonzero(which == s)
        for row, tags in zip(rows, _assign_tags(meta, len(rows), weights)):
            labels[row, tags] = 1
        sizes = meta.integers(1, 5, size=len(rows))  # an artist has 1-4 tracks, all in one split
        for row, a in zip(rows, np.repeat(np.arange(len(rows)), sizes)[: len(rows)]):
            artists[row] = f"artist_{n_artists + a:06d}"
        n_artists += len(rows)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # never mistaken for ``out``
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / TAGS_FILE).write_text("\n".join(MOODTHEME_TAGS) + "\n")
        for s, name in enumerate(SPLITS):
            rows = np.flatnonzero(which == s)
            write_split(
                split_file(tmp / "split-0", name),
                [ids[r] for r in rows],
                [f"{(r + 1) % 100:02d}/{r + 1}.mp3" for r in rows],
                frames[rows] / spec.frames_per_second,
                labels[rows],
                MOODTHEME_TAGS,
                artist_ids=[artists[r] for r in rows],
                album_ids=[artists[r].replace("artist", "album") for r in rows],
            )
        writer = StoreWriter(tmp / f"{features}.h5", spec, ids)
        batch: list[tuple[str, np.ndarray]] = []
        for r in range(tracks):
            batch.append((ids[r], _track(seed, r, np.flatnonzero(labels[r]), int(frames[r]), spec.n_mels, features)))
            if sum(len(x) for _, x in batch) >= 200_000 or r == tracks - 1:
                writer.add(batch)
                batch = []
        writer.finish([ids[r] for r in np.flatnonzero(which == 0)], "train")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
