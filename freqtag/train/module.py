"""The LightningModule: the reference recipe (mixup, the ``optim`` optimizer, per-epoch cosine decay).

Randomness that shapes training is tied to ``(seed, epoch, step)`` so that a
run resumed from ``last.ckpt`` continues exactly as the uninterrupted run.

The steady-state step never makes the host wait for the device (issue #14):
the mixup permutation is drawn on the device, the non-finite-loss check reads
a flag copied back asynchronously (:class:`NonFiniteWatch`), and with
``optim.fused`` (the default on a GPU) the GradScaler of ``16-mixed`` checks
for inf on the device too. ``compile: true`` runs mixup, forward and loss
(and their backward) through ``torch.compile``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from freqtag.metrics import tagging_scores
from freqtag.model import FreqDepConv
from freqtag.train.losses import mixup_loss
from freqtag.train.overrides import ConfigError

__all__ = ["TaggingModule", "NonFiniteWatch", "track_probabilities", "seed_dropout", "COMPILE_MODES",
           "NONFINITE_EVERY"]

#: Valid ``compile_mode`` values: torch.compile's modes (``reduce-overhead`` adds CUDA graphs).
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Steps between two looks at the non-finite-loss flag (and at the last step of every epoch).
NONFINITE_EVERY = 8
_NOT_SEEN = -1


def seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the generator that dropout masks on ``device`` come from, and only that one.

    ``torch.manual_seed`` also queues a seed for every lazily initialised
    accelerator, with a formatted stack trace each time: 0.1 ms a step for nothing.
    """
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def track_probabilities(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Whole-track scoring: sigmoid per window, averaged over the windows -> (B, n_tags)."""
    return torch.sigmoid(net(x).float()).mean(dim=-1)


def _choice(name: str, value: Any) -> bool | None:
    """``auto`` -> None, ``true``/``false`` -> bool; anything else is a one-line error naming the setting."""
    if value == "auto" or value is None:
        return None
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name}={value!r}: valid values are auto, true, false")


def _kernels(optimizer: Callable[..., Any], fused: bool | None, foreach: bool | None) -> dict[str, bool | None]:
    """The resolved ``fused`` / ``foreach`` for the keywords the optimizer factory was given (``auto`` among them)."""
    given = getattr(optimizer, "keywords", {})
    return {k: v for k, v in (("fused", fused), ("foreach", foreach)) if k in given}


class NonFiniteWatch:
    """The first non-finite training loss, noticed without making the host wait for the device.

    Each step folds ``isfinite(loss)`` into a device scalar that keeps the
    first bad ``(epoch, step)``: two small kernels, nothing copied. Every
    ``every`` steps that scalar is copied to host memory without blocking
    (pinned memory and an event on a GPU) and read once the copy has landed,
    which a later step's :meth:`poll` sees without waiting. At the last step
    of an epoch the read waits (one sync an epoch), so the epoch's validation
    and ``last.ckpt`` never see non-finite weights. A loss that turns NaN at
    step s stops the run by step s + every - 1 on the CPU (the copy is done at
    once), and as soon as the copy lands on a GPU (a step or two later).
    ``bool(loss)`` every step, the old check, cost a full sync per step.
    """

    def __init__(self, every: int = NONFINITE_EVERY) -> None:
        if every < 1:
            raise ValueError(f"every={every}: must be at least 1")
        self.every = every
        self._first: torch.Tensor | None = None  # on the loss's device: epoch << 32 | step, or -1
        self._host: torch.Tensor | None = None
        self._host_view: np.ndarray | None = None  # the host copy, read through numpy (no tensor call)
        self._event: Any = None  # the pending copy's CUDA event; None: nothing pending or CPU
        self._pending = False

    def update(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Fold this step's loss in (device work only)."""
        if self._first is None or self._first.device != loss.device:
            self._first = torch.full((), _NOT_SEEN, dtype=torch.int64, device=loss.device)
            pinned = loss.device.type == "cuda"
            self._host = torch.full((1,), _NOT_SEEN, dtype=torch.int64, pin_memory=pinned)
            self._host_view = self._host.numpy()
            self._pending = False
        bad = ~torch.isfinite(loss.detach()) & (self._first < 0)
        self._first = torch.where(bad, (epoch << 32) | step, self._first)

    def poll(self, step: int, last_of_epoch: bool = False) -> tuple[int, int] | None:
        """The first bad (epoch, step) once it is known on the host, else None; waits only at ``last_of_epoch``."""
        if self._first is None:
            return None
        if last_of_epoch or (not self._pending and (step + 1) % self.every == 0):
            # the flag only ever goes from unset to set, so a newer copy over a pending one loses nothing
            self._host.copy_(self._first.view(1), non_blocking=True)  # type: ignore[union-attr]
            self._event = None
            if self._first.device.type == "cuda":
                self._event = torch.cuda.Event()
                self._event.record()
            self._pending = True
        if not self._pending:
            return None
        if self._event is not None:
            if last_of_epoch:
                self._event.synchronize()
            elif not self._event.query():
                return None
        self._pending = False
        code = int(self._host_view[0])  # type: ignore[index]
        return None if code == _NOT_SEEN else (code >> 32, code & 0xFFFFFFFF)


class TaggingModule(pl.LightningModule):
    """The training recipe around ``net`` and ``loss``; see the module docstring for what keeps the step sync-free.

    ``optimizer``: a factory taking the parameters (``hydra.utils.instantiate``
    of the ``optim`` config: a ``functools.partial`` of ``torch.optim.SGD``);
    its ``fused`` / ``foreach`` keywords may be ``auto`` (resolved here, by
    device) and ``foreach`` also sets the gradient clipping's kernels. Its
    keywords are recorded in the hyperparameters as before (``lr``, ...).
    None: a module that is never trained. ``compile`` / ``compile_mode``
    (top-level settings): torch.compile of :meth:`mixed_loss`, static shapes
    (one graph per batch size), with inductor drawing random numbers as eager
    does (``fallback_random``) so a compiled run's dropout masks are the
    eager run's.
    """

    #: torch.compile's backend; tests set ``aot_eager`` (graph capture and autograd without code generation)
    compile_backend: str | Callable[..., Any] = "inductor"

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        mixup_alpha: float = 0.2,
        seed: int = 42,
        compile: bool = False,  # noqa: A002 (the setting's name)
        compile_mode: str = "default",
    ) -> None:
        super().__init__()
        settings = dict(getattr(optimizer, "keywords", {}))
        fused, foreach = settings.get("fused", "auto"), settings.get("foreach", "auto")
        self._fused, self._foreach = _choice("optim.fused", fused), _choice("optim.foreach", foreach)
        if self._fused and self._foreach:
            raise ConfigError("optim.fused=true and optim.foreach=true: torch's SGD takes one of them; set "
                              "optim.foreach=auto (the clipping still uses foreach kernels)")
        if not isinstance(compile, bool):
            raise ConfigError(f"compile={compile!r}: valid values are true, false")
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode={compile_mode!r}: valid values are {', '.join(COMPILE_MODES)}")
        # the optimizer's keywords (lr, momentum, ...) as hyperparameters, in the order hparams.yaml always had
        kernels = {k: settings.pop(k) for k in ("fused", "foreach") if k in settings}
        self.save_hyperparameters({**settings, "mixup_alpha": mixup_alpha, "seed": seed, **kernels, "compile": compile,
                                   "compile_mode": compile_mode})
        self.optimizer = optimizer
        self.net = net
        self.loss = loss
        self._val_items: list[torch.Tensor] = []
        self._val_probs: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._compiled: Callable[..., torch.Tensor] | None = None  # made at the first step (picklable until then)
        self._cudagraphs = False  # the compile mode records CUDA graphs
        self._nonfinite = NonFiniteWatch()
        self._step = 0  # global_step of the last training_step

    @classmethod
    def from_config(cls, cfg: Any, net: nn.Module, loss: nn.Module) -> TaggingModule:
        """The module a run's composed config describes: ``optim``, ``mixup_alpha``, ``seed``, ``compile*``."""
        return cls(net, loss, optimizer=instantiate(cfg.optim), mixup_alpha=cfg.mixup_alpha, seed=cfg.seed,
                   compile=cfg.get("compile", False), compile_mode=cfg.get("compile_mode", "default"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- training -----------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout masks depend on (seed, step, rank) only, so a resumed run replays them exactly
        # (Lightning skips on_train_epoch_start for the epoch it resumes in, so seed per step)
        seed_dropout((self.hparams.seed * 1_000_003 + self.global_step) * 64 + self.global_rank, self.device)

    def mixup_draw(self, n: int, device: torch.device) -> tuple[float, torch.Tensor | None]:
        """(lam, permutation) of this step's mixup: lam ~ Beta(a, a) on the host, the permutation on ``device``.

        Both come from ``np.random.default_rng([seed, step, 2])``: lam is its
        first draw, the next seeds a generator on ``device`` that draws the
        permutation there, so nothing is copied to the device and a resumed
        run draws the same. (alpha <= 0: lam 1, no permutation.)
        """
        alpha = self.hparams.mixup_alpha
        if alpha <= 0:
            return 1.0, None
        rng = np.random.default_rng([self.hparams.seed, self.global_step, 2])
        lam = float(rng.beta(alpha, alpha))
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(int(rng.integers(2**63)))
        return lam, torch.randperm(n, generator=generator, device=device)

    def mixed_loss(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor | None, lam: float | torch.Tensor,
                   rest: float | torch.Tensor) -> torch.Tensor:
        """Mixup (``lam * x + rest * x[perm]``, ``rest = 1 - lam``), forward and mixup loss: what ``compile`` compiles.

        The compiled step gets lam and rest as 0-d device tensors (a float
        argument would be a constant of the graph, recompiled every step);
        both computed on the host in double, they give the eager arithmetic.
        """
        if perm is None:
            logits = self.net(x).squeeze(-1)
            return mixup_loss(self.loss, logits, y, y, lam, rest)
        logits = self.net(lam * x + rest * x[perm]).squeeze(-1)
        return mixup_loss(self.loss, logits, y, y[perm], lam, rest)

    def compiled_step(self, device: torch.device) -> Callable[..., torch.Tensor]:
        """torch.compile of :meth:`mixed_loss` (made once; static shapes, eager's random numbers).

        On the CPU, with FreqDepConv layers, inductor's C++ kernels are not
        vectorised (``cpp.simdlen=1``): torch 2.11's vectorised kernel for
        the backward of their frequency unfold writes past its buffer (glibc
        aborted with "double free or corruption" / "free(): invalid next
        size" within 4 steps, for both forms; unvectorised, 4 steps ran clean).
        """
        if self._compiled is None:
            mode = self.hparams.compile_mode
            kwargs: dict[str, Any] = {}
            if self.compile_backend == "inductor":
                from torch._inductor import list_mode_options

                options = list_mode_options(mode, dynamic=False)
                self._cudagraphs = bool(options.get("triton.cudagraphs"))
                kwargs["options"] = {**options, "fallback_random": True}
                if device.type == "cpu" and any(isinstance(m, FreqDepConv) for m in self.net.modules()):
                    kwargs["options"]["cpp.simdlen"] = 1
            self._compiled = torch.compile(self.mixed_loss, backend=self.compile_backend, dynamic=False, **kwargs)
        return self._compiled

    def teardown(self, stage: str) -> None:
        """Drop the compiled step: its graphs hang on mixed_loss's code object, one cache entry per module.

        A grid worker trains one module after another in the same process;
        past dynamo's limit of 8 entries a code object, the 9th would run eager.
        """
        if self._compiled is not None:
            torch._dynamo.reset_code(TaggingModule.mixed_loss.__code__)
            self._compiled = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["x"], batch["y"].float()
        lam, perm = self.mixup_draw(len(x), x.device)
        if self.hparams.compile:
            step = self.compiled_step(x.device)
            if x.device.type == "cuda" and self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs may be reused
            # lam and 1 - lam as 0-d tensors filled on the device (a fill kernel each, no copy)
            lam_t, rest_t = (torch.full((), v, dtype=torch.float32, device=x.device) for v in (lam, 1.0 - lam))
            loss = step(x, y, perm, lam_t, rest_t)
        else:
            loss = self.mixed_loss(x, y, perm, lam, 1.0 - lam)
        self._nonfinite.update(loss, self.current_epoch, self.global_step)
        self._step = self.global_step
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # at the epoch's last step the check waits, before validation and before last.ckpt is written
        last = batch_idx + 1 >= self.trainer.num_training_batches
        self._stop_if_nonfinite(self._step, last)

    def on_train_epoch_end(self) -> None:
        self._stop_if_nonfinite(self._step, True)

    def _stop_if_nonfinite(self, step: int, wait: bool) -> None:
        bad = self._nonfinite.poll(step, last_of_epoch=wait)
        if bad is not None:
            raise FloatingPointError(
                f"non-finite training loss at epoch {bad[0]}, step {bad[1]}; "
                f"the last good checkpoint is kept in checkpoints/last.ckpt"
            )

    # -- the cheap per-epoch check: centre crops of the validation tracks ----
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.net(batch["x"]).squeeze(-1).float()
        y = batch["y"]
        self.log("val/crop_loss", self.loss(logits, y.float()), on_epoch=True, batch_size=len(y), sync_dist=True)
        self._val_items.append(batch["item"].detach())
        self._val_probs.append(torch.sigmoid(logits).detach())
        self._val_targets.append(y.detach())

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        # each rank scored its own tracks: put them in their rows and sum over ranks (uneven shares are fine)
        n = len(self.trainer.val_dataloaders.dataset)
        items = torch.cat(self._val_items).long()
        probs = torch.zeros(n, self._val_probs[0].shape[-1], device=self.device, dtype=torch.float32)
        targets = torch.zeros_like(probs)
        seen = torch.zeros(n, device=self.device, dtype=torch.float32)
        probs[items] = torch.cat(self._val_probs)
        targets[items] = torch.cat(self._val_targets).float()
        seen[items] = 1.0
        self._val_items.clear()
        self._val_probs.clear()
        self._val_targets.clear()
        probs, targets, seen = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in (probs, targets, seen))
        if self.trainer.sanity_checking:
            return
        keep = seen > 0
        try:
            scores = tagging_scores(probs[keep].cpu(), targets[keep].cpu())
        except ValueError:  # a tag with no positive among the crops seen (tiny sanity runs)
            return
        # the same figures on every rank (computed from the summed rows): sync_dist only marks them as global
        self.log("val/crop_pr_auc", scores["pr_auc"], prog_bar=True, sync_dist=True)
        self.log("val/crop_roc_auc", scores["roc_auc"], prog_bar=True, sync_dist=True)

    # -- optimisation -------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer is None:
            raise ValueError("TaggingModule(optimizer=None) cannot be trained: pass instantiate(cfg.optim)")
        # fused auto: on a GPU (one kernel for the whole update, and GradScaler's inf check stays on the device);
        # elsewhere torch's default (a per-tensor loop on the CPU: the CPU results stay what they were)
        fused = self._fused if self._fused is not None else (True if self.device.type == "cuda" else None)
        opt = self.optimizer(self.parameters(), **_kernels(self.optimizer, fused, None if fused else self._foreach))
        # per-epoch cosine decay from lr to 0 over max_epochs, no warm-up (the reference schedule)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs), eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping (trainer.gradient_clip_*) with ``optim.foreach``, and also for a fused optimizer.

        Under 16-mixed Lightning leaves a fused optimizer's gradients scaled
        (its step unscales them) and refuses to clip them; ``unscale_`` here
        keeps found_inf on the device, and GradScaler.step then hands it to
        the fused step instead of reading it on the host (the ``.item()`` a
        plain optimizer costs every step).
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        params = list(self.trainer.precision_plugin.main_params(optimizer))
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=self._foreach)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=self._foreach)
