"""What a training run does beside its steps: each hook is called as ``hook(trainer, step, result)`` after
every step of :meth:`pyro_ddpm.train.Trainer.run`, in the order the run lists them.

- :class:`LossGuard`: a NaN, infinite or exploding loss (far beyond the running median) stops the run,
  keeping the last good checkpoint;
- :class:`Metrics`: ``metrics.jsonl``, per logging window the mean and standard error of the loss and
  of the bound's estimates (L_T, rate, L_0, total; bits/dim) and images/s (:class:`MetricsLog`);
- :class:`SampleGrid`: a grid of EMA samples every N steps;
- :class:`Checkpointer`: the checkpoint, every N steps, at the last step and on a stop (then it raises
  :class:`~pyro_ddpm.runtime.Interrupted`, which says how to resume).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from pyro_ddpm import checkpoint, protocol, stats
from pyro_ddpm.elbo import TermwiseELBO, step_weight
from pyro_ddpm.files import atomic_write
from pyro_ddpm.runtime import Interrupted, own_rng
from pyro_ddpm.sample import sample, save_png

# A loss per image further than this factor times max(|median|, 1) from the running median is divergence.
DIVERGENCE_FACTOR = 1e3
# The divergence check starts once this many losses are known (one: the first step's loss is the reference).
DIVERGENCE_MIN_HISTORY = 1
LOSS_HISTORY = 200  # recent losses kept (and checkpointed) for the running median


class LossGuard:
    """Stop on a non-finite loss, or one further from the running median of the run's recent losses
    (``trainer.losses``, checkpointed) than :data:`DIVERGENCE_FACTOR` allows."""

    def __init__(self, kept):
        self.kept = kept  # () -> the sentence saying which checkpoint is kept

    def __call__(self, trainer, step: int, result) -> None:
        loss, history = result.loss, trainer.losses
        if not math.isfinite(loss):
            raise FloatingPointError(f"training stopped: the loss became {loss} at step {step}; {self.kept()}")
        if len(history) >= DIVERGENCE_MIN_HISTORY:
            median = statistics.median(history)
            if abs(loss - median) > DIVERGENCE_FACTOR * max(abs(median), 1.0):
                raise FloatingPointError(
                    f"training stopped: the loss diverged at step {step} ({loss:.4g} per image, "
                    f"running median {median:.4g}); {self.kept()} (lower --lr?)"
                )
        trainer.losses = (history + [loss])[-LOSS_HISTORY:]


def bound_estimates(terms: dict, t: torch.Tensor, proposal: torch.Tensor, K: int, images: int) -> torch.Tensor:
    """This batch's unbiased estimates of L_T, the rate L_1..L_{T-1} and L_0 (nats per image) from the
    terms of the bound's own programs (the proposal's weights 1/(T p_t) carried)."""
    T = proposal.shape[0] - 1
    w = (T / K) * proposal.to(t.device)[t]
    L_T = terms[protocol.X_T].value.sum()
    rate = (terms[protocol.X_PREV].value * w).sum()
    L_0 = (terms[protocol.X_0].value * w).sum()
    return torch.stack([L_T, rate, L_0]).detach().double().cpu() / images


@torch.no_grad()
def bound_of_batch(model, guide, result) -> dict:
    """The bound's terms on a step's batch, traced from the model itself (for objectives whose training
    program is another one), with the training run's random streams left alone."""
    with own_rng():
        return TermwiseELBO().terms(
            model.per_timestep,
            protocol.FixedNoise({protocol.X_t: result.eps}, guide.from_noise)(guide.per_timestep),
            result.x0,
            result.t,
            step_weight(None, result.proposal.to(result.x0.device)),
        )


class Metrics:
    """Log the loss and the bound's estimates: from the step's own terms when the training program is the
    model, else from the model on every ``log_every // 8``-th batch; one record per ``log_every`` steps."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def __call__(self, trainer, step: int, result) -> None:
        config = trainer.config
        terms = None
        if trainer.program is trainer.model:  # the terms are the bound's own
            terms = result.terms
        elif step % max(1, config.log_every // 8) == 0:
            terms = bound_of_batch(trainer.model, trainer.guide, result)
        bound = None
        if terms is not None:
            bound = bound_estimates(terms, result.t.reshape(-1), result.proposal, trainer.K, len(result.x0))
        self.log.add(result.loss, bound, len(result.x0))
        if step % config.log_every == 0 or step == config.steps:
            record = self.log.flush(step, config.objective, trainer.processes)
            if trainer.bar is not None:
                trainer.bar.set_postfix(loss=f"{record['loss_per_image']:.4g}", img_s=f"{record['images_per_s']:.0f}")


class SampleGrid:
    """A PNG grid of ``n`` samples of the EMA model every ``every`` steps (rank 0), drawn from seed 0 with
    the run's random streams left alone."""

    def __init__(self, folder: Path, every: int, reference=None, n: int = 16):
        self.folder, self.every, self.reference, self.n = folder, every, reference, n

    def __call__(self, trainer, step: int, result) -> None:
        if not self.every or step % self.every or not trainer.writes:
            return
        with own_rng():
            torch.manual_seed(0)
            x = sample(trainer.model.with_network(trainer.ema.module), self.n)
            save_png(x, self.folder / f"step_{step:07d}.png", reference=self.reference)


class Checkpointer:
    """The run's checkpoint: at the last step and on a stop at once (then :class:`Interrupted` is raised),
    and every ``every`` steps once the next step's loss has passed the guard (:meth:`confirm`, the hook
    after the guard) -- the parameters it holds have then been seen to give a finite, non-diverging loss.
    Rank 0 writes; every rank checks that the processes hold identical parameters."""

    def __init__(self, path: Path, every: int, saved_at: int = 0):
        self.path, self.every, self.saved_at = path, every, saved_at
        self.pending: tuple[int, bytes | None] | None = None  # a snapshot waiting for the next step's loss

    def kept(self) -> str:
        if self.saved_at:
            return f"the last good checkpoint (step {self.saved_at}) is kept at {self.path}"
        return "no checkpoint was written"

    def confirm(self, trainer, step: int, result) -> None:
        """The hook after the guard: the waiting snapshot's parameters gave this step's loss, which passed."""
        if self.pending is not None:
            self._commit(*self.pending)
            self.pending = None

    def __call__(self, trainer, step: int, result) -> None:
        stop = list(trainer.stop)  # read once: a signal arriving during a snapshot is honoured after the next step
        if step == trainer.config.steps or stop:
            self._commit(step, self.snapshot(trainer, step))
        elif step % self.every == 0:
            self.pending = (step, self.snapshot(trainer, step))
        if stop:
            raise Interrupted(stop[0], step, trainer.config.steps, self.path, self.path.parent)

    def snapshot(self, trainer, step: int) -> bytes | None:
        """The checkpoint of this step as bytes (rank 0; None elsewhere), refused if any weight is not finite."""
        trainer.processes.check_in_sync(trainer.net, step)
        if not trainer.writes:
            return None
        for what, module in (("network", trainer.net), ("EMA", trainer.ema.module), ("guide", trainer.guide)):
            if not all(bool(torch.isfinite(v).all()) for v in module.state_dict().values() if v.is_floating_point()):
                raise FloatingPointError(
                    f"training stopped: the {what} weights became non-finite at step {step}; {self.kept()}"
                )
        return checkpoint.snapshot(trainer, step).to_bytes()

    def _commit(self, step: int, contents: bytes | None) -> None:
        if contents is not None:
            checkpoint.write_bytes(self.path, contents)
        self.saved_at = step


class MetricsLog:
    """``metrics.jsonl``: per logging window, the mean and standard error of the loss and of the bound's
    estimates (L_T, rate, L_0, total; bits/dim), images/s; rank 0 writes."""

    def __init__(self, path: Path, dims: int, write: bool):
        self.path, self.dims, self.write = path, dims, write
        self.losses: list[float] = []
        self.bounds: list[torch.Tensor] = []
        self.t0, self.images = time.perf_counter(), 0

    def truncate(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run drops what was logged after its checkpoint)."""
        if not self.write or not self.path.exists():
            return
        lines = [(line, _step_of(line)) for line in self.path.read_text().splitlines()]
        kept = [line for line, at in lines if at is not None and at <= step]
        atomic_write(self.path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))

    def add(self, loss_per_image: float, bound: torch.Tensor | None, images: int) -> None:
        self.losses.append(loss_per_image)
        if bound is not None:
            self.bounds.append(bound)
        self.images += images

    def flush(self, step: int, objective: str, processes) -> dict:
        elapsed = time.perf_counter() - self.t0
        losses = processes.mean(torch.tensor(self.losses, dtype=torch.float64)).tolist()
        loss, loss_se = stats.mean_se(losses)
        record = {
            "step": step,
            "objective": objective,
            "loss_per_image": loss,
            "loss_per_image_se": loss_se,
            "images_per_s": self.images * processes.world / elapsed,
            "window_steps": len(losses),
        }
        if self.bounds:
            b = stats.bits_per_dim(processes.mean(torch.stack(self.bounds)), self.dims)  # (steps, 3)
            for j, name in enumerate(("L_T", "rate", "L_0")):
                record[f"{name}_bits_per_dim"], record[f"{name}_bits_per_dim_se"] = stats.mean_se(b[:, j].tolist())
            record["bits_per_dim"], record["bits_per_dim_se"] = stats.mean_se(b.sum(1).tolist())
            record["bound_steps"] = len(self.bounds)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.losses, self.bounds, self.t0, self.images = [], [], time.perf_counter(), 0
        return record


def _step_of(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line, or None for a line cut by a kill."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: Path) -> dict:
    """A run's ``metrics.jsonl`` as columns: step, the bound's estimate (bits/dim; NaN where a window has
    none) and the loss per image."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {
        "step": [r["step"] for r in records],
        "bound_bits_per_dim": [r.get("bits_per_dim", float("nan")) for r in records],
        "loss_per_image": [r["loss_per_image"] for r in records],
    }
