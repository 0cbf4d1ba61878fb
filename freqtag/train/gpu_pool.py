"""GPU slots for grid jobs on one node: the device pool behind ``hydra/launcher=joblib_gpu``.

Hydra's joblib launcher runs the jobs of a sweep in ``n_jobs`` worker
processes that are reused from job to job. Mapping ``hydra.job.num`` to a GPU
(``num % n_gpus``) is wrong as soon as jobs last unequally (convs vs freq_dep,
128 vs 224 frames): job ``k + n_gpus`` would start on a GPU whose job ``k`` is
still running. Instead each worker process *claims* the lowest-numbered free
GPU of the sweep with an exclusive ``flock`` on a lock file and holds it for
its lifetime; the kernel releases the lock when the process ends, so a
crashed or recycled worker never leaves a GPU taken. With ``n_jobs`` equal to
the number of GPUs, every job runs alone on its own GPU.

A batch-32 run leaves a large GPU mostly idle, so the pool hands out *slots*:
``jobs_per_gpu`` slots per GPU, slot ``s`` on GPU ``s % n_gpus``. The lowest
free slot is claimed, so the GPUs fill evenly (one job on each before a
second on any), and ``n_jobs`` is GPUs x ``jobs_per_gpu``.

The job is pinned through ``CUDA_VISIBLE_DEVICES`` (Hydra's
``hydra.job.env_set``, applied in the worker before the job starts and before
the worker's first CUDA call), so the job sees one GPU and
``trainer.devices=1`` needs no change. The lock files live on the local disk
(the temp folder), keyed by the sweep directory: only processes of one node
compete, and shared file systems that lack ``flock`` play no part.

Two OmegaConf resolvers, registered when the configs package ``freqtag.conf``
is imported (i.e. whenever Hydra composes our configs, in every process):

- ``${freqtag.gpu_slots:JOBS_PER_GPU}`` (the launcher's ``n_jobs``, resolved in
  the main process): visible CUDA devices x JOBS_PER_GPU, an error when there is
  no device. It also fixes the list for the workers: when ``CUDA_VISIBLE_DEVICES``
  is unset it is set to ``0,...,n-1``, so workers never need to ask CUDA.
  (``${freqtag.gpu_count:}``: the devices alone.)
- ``${freqtag.gpu:POOL}``: the ``CUDA_VISIBLE_DEVICES`` entry of the GPU of the
  slot this process holds in the pool named POOL (the sweep directory),
  claimed on first use (jobs per GPU from ``FREQTAG_JOBS_PER_GPU``, set by the former).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["claim_gpu", "gpu_count", "gpu_slots", "visible_gpus", "pinned_gpu", "lock_dir", "register_resolvers",
           "GPUPoolError"]

# pool key -> (slot index, open lock file descriptor) held by this process
_HELD: dict[str, tuple[int, int]] = {}
# pool key -> the CUDA_VISIBLE_DEVICES entry of the held slot
_PINNED: dict[str, str] = {}
PER_GPU_ENV = "FREQTAG_JOBS_PER_GPU"
NO_GPU_FIX = "leave out hydra/launcher=joblib_gpu to run the jobs one after another on this machine"


class GPUPoolError(RuntimeError):
    """No GPU can be given to this job (none visible, or all held by other jobs)."""


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]  # NVML count: CUDA stays uninitialised


def gpu_count() -> int:
    """Visible CUDA devices, >= 1; pins the list into ``CUDA_VISIBLE_DEVICES`` for worker processes."""
    gpus = visible_gpus()
    if not gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise GPUPoolError(f"hydra/launcher=joblib_gpu runs one job per GPU, but no CUDA device is visible{shown}: {NO_GPU_FIX}")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(gpus))
    return len(gpus)


def _per_gpu(jobs_per_gpu: int | str) -> int:
    try:
        n = int(jobs_per_gpu)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise GPUPoolError(f"jobs_per_gpu={jobs_per_gpu!r}: must be a whole number >= 1 (grid jobs sharing one GPU)")
    return n


def gpu_slots(jobs_per_gpu: int | str = 1) -> int:
    """Grid jobs that may run at once: visible GPUs x ``jobs_per_gpu`` (the launcher's ``n_jobs``).

    Resolved in the launching process, it passes ``jobs_per_gpu`` on to the
    workers in ``FREQTAG_JOBS_PER_GPU`` (a job's hydra node cannot see the root config there).
    """
    per = _per_gpu(jobs_per_gpu)
    n = gpu_count() * per
    os.environ[PER_GPU_ENV] = str(per)
    return n


def lock_dir(pool: str | Path) -> Path:
    """The local folder of a pool's lock files, one per GPU slot (``gpu<k>.lock``)."""
    key = hashlib.sha1(str(Path(pool).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "freqtag-gpus" / key


def claim_gpu(pool: str | Path, n_gpus: int, wait_s: float = 30.0) -> int:
    """The slot 0..n_gpus-1 of ``pool`` that this process holds, claiming the lowest free one on first use.

    ``n_gpus`` counts slots (GPUs x jobs per GPU). A slot is held until the
    process exits. If all are held by other live processes (more concurrent
    jobs than slots) it retries for ``wait_s`` seconds, then raises ``GPUPoolError``.
    """
    key = str(Path(pool).resolve())
    if key in _HELD:
        return _HELD[key][0]
    if n_gpus < 1:
        raise GPUPoolError(f"a GPU pool needs at least one GPU, got {n_gpus}: {NO_GPU_FIX}")
    folder = lock_dir(pool)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for k in range(n_gpus):
            fd = os.open(folder / f"gpu{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
            _HELD[key] = (k, fd)
            return k
        if time.monotonic() >= deadline:
            raise GPUPoolError(
                f"all {n_gpus} GPUs of sweep {pool} are held by other jobs (lock files in {folder}): "
                f"set hydra.launcher.n_jobs to at most the number of GPU slots ({n_gpus}: GPUs x jobs_per_gpu)"
            )
        time.sleep(0.2)


def pinned_gpu(pool: str | Path, jobs_per_gpu: int | str | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that pins this process's jobs to the GPU of its slot of ``pool``.

    Cached: Hydra restores the variable after each job, and a later call must
    not read the pinned value back as the list of all GPUs.
    """
    key = str(Path(pool).resolve())
    if key not in _PINNED:
        gpus = visible_gpus()
        per = _per_gpu(os.environ.get(PER_GPU_ENV, 1) if jobs_per_gpu is None else jobs_per_gpu)
        slot = claim_gpu(pool, len(gpus) * per)
        _PINNED[key] = gpus[slot % len(gpus)]
    return _PINNED[key]


def register_resolvers() -> None:
    """Make ``${freqtag.gpu_count:}``, ``${freqtag.gpu_slots:N}`` and ``${freqtag.gpu:POOL}`` available (idempotent)."""
    if not OmegaConf.has_resolver("freqtag.gpu_count"):
        OmegaConf.register_new_resolver("freqtag.gpu_count", gpu_count)
    if not OmegaConf.has_resolver("freqtag.gpu_slots"):
        OmegaConf.register_new_resolver("freqtag.gpu_slots", gpu_slots)
    if not OmegaConf.has_resolver("freqtag.gpu"):
        OmegaConf.register_new_resolver("freqtag.gpu", lambda pool: pinned_gpu(str(pool)))
