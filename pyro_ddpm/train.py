"""Training: Pyro SVI on the per-timestep form of the bound, with warm-up, clipping, EMA and checkpoints.

Each step draws a global minibatch x_0, K timesteps per image from the run's timestep sampler (uniform
on 1..T, Algorithm 1's draw, or an importance proposal with weights 1/(T p_t); :mod:`pyro_ddpm.timesteps`)
and the noise of x_t ~ q(x_t | x_0) from the run's own generator, and calls ``svi.step`` with
:class:`~pyro_ddpm.elbo.TermwiseELBO` (Pyro's ``TraceMeanField_ELBO`` that keeps its terms): one
network call over the B*K pairs. The guide draws x_t from that noise through
:class:`~pyro_ddpm.protocol.FixedNoise` (the guide's ``from_noise``), so a run is reproduced exactly by
its seed, whether it is resumed or split over processes. The objective changes only the model
program and the per-timestep weights, as the model class declares (``training_program``). The model
and guide are any classes of :mod:`pyro_ddpm.programs` (sites as in :mod:`pyro_ddpm.protocol`);
parameters of either (e.g. a learned schedule) are trained by the same SVI step.

Optimizer: one torch optimizer (Adam by default) over all parameters with the paper's global-norm
clipping and a linear warm-up (:class:`~pyro_ddpm.optim.JointOptimizer`). The EMA of the network
(paper: 0.9999) uses the decay min(decay, (1 + n) / (r + n)) after n updates (r = ``ema_ramp``, 10 by
default), so short runs average
their recent past rather than their initialization; evaluation and sampling use it.

Many processes: under ``torchrun`` (``torch.distributed`` initialized from the environment) each
process runs SVI on its contiguous shard of the global batch, with the network wrapped in
``DistributedDataParallel`` (gradients averaged across processes) and both programs scaled by the
world size, so the averaged gradient is the global batch's (:class:`Processes`). Rank 0 writes logs,
samples and checkpoints; at every checkpoint the ranks check that they hold identical parameters.
Dropout masks are drawn per process, so only dropout-free runs match a single-process run to round-off.

Safety: the run directory is locked while a run writes to it; stale temporaries of interrupted saves
are removed; SIGINT/SIGTERM save a checkpoint at the current step and stop with one line saying how
to resume; a NaN, infinite or exploding loss (far beyond the running median) stops the run, keeping
the last good checkpoint; Pyro's validation flag and torch's thread count are restored on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer import SVI
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pyro_ddpm import data as datasets
from pyro_ddpm import likelihoods, presets, protocol
from pyro_ddpm.checkpoint import FILENAME, TrainState, fingerprint, load_weights, write_bytes
from pyro_ddpm.elbo import TermwiseELBO, objective
from pyro_ddpm.files import RunLock, atomic_write, remove_stale_temporaries
from pyro_ddpm.nets import build_network
from pyro_ddpm.optim import JointOptimizer
from pyro_ddpm.programs import check_pair
from pyro_ddpm.registry import GUIDES, LIKELIHOODS, MODELS, NETWORKS, TIMESTEPS
from pyro_ddpm.sample import sample, save_png

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
LR_DECAYS = ("constant", "cosine")
# Fields that may change when a run is resumed; every other field must match the checkpoint.
RESUMABLE = ("steps", "device", "log_every", "sample_every", "checkpoint_every", "validate", "threads")
# A loss per image further than this factor times max(|median|, 1) from the running median is divergence.
DIVERGENCE_FACTOR = 1e3
LOSS_HISTORY = 200


@dataclass
class TrainConfig:
    data: str = "digits"
    objective: str = "elbo"  # one of the model class's objectives
    model: str = presets.PROGRAMS["model"]  # a registered model class, or an importable "module:Class"
    guide: str = presets.PROGRAMS["guide"]  # a registered guide class, or an importable "module:Class"
    schedule: str = presets.PROGRAMS["schedule"]  # what the guide class reads (its from_spec(T, schedule))
    T: int = 1000
    variance: str | None = None  # one of the model class's variances; default: its first
    likelihood: str | None = None  # a registered decoder; default: the data set's (likelihoods.default_for)
    timesteps: str = presets.PROGRAMS["timesteps"]  # a registered timestep sampler (pyro_ddpm.timesteps)
    model_options: dict = dataclasses.field(default_factory=dict)  # further keyword arguments of the model class
    steps: int = 3000
    batch_size: int = 128  # the global batch, over all processes
    timesteps_per_image: int = 1  # K
    net: str | None = None  # a preset of pyro_ddpm.presets.NETWORKS; default: the data set's
    net_overrides: dict = dataclasses.field(default_factory=dict)  # e.g. {"ch": 16, "dropout": 0.0}
    optimizer: str = "Adam"  # a torch.optim class
    lr: float = 2e-4
    warmup: int | None = None  # default min(5000, steps // 10) of the first run, stored: resuming keeps it
    lr_decay: str = "constant"  # after the warm-up: "constant", or "cosine" (to 0 over lr_decay_steps)
    lr_decay_steps: int | None = None  # default: the first run's steps, stored: resuming keeps it
    guide_lr_scale: float = 1.0  # the guide's parameters (a learned schedule) train at lr * guide_lr_scale
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_ramp: float = 10.0  # the EMA's decay after n updates is min(ema_decay, (1 + n) / (ema_ramp + n))
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else the CPU (resolved once, at construction)
    precision: str = "fp32"  # "bf16": the network under torch.autocast; the bound's algebra stays fp32
    compile: bool = False  # torch.compile the network (in place, parameter names unchanged)
    log_every: int = 100
    sample_every: int = 0  # write a grid of EMA samples every N steps (0: never)
    checkpoint_every: int = 1000
    validate: bool = False  # pyro.enable_validation during training (slower)
    threads: int | None = None  # torch threads; default: $OMP_NUM_THREADS, 1 under pytest-xdist, else torch's

    def __post_init__(self):
        # "auto" is resolved here, once, so every later use (and the checkpoint) sees the device itself
        self.device = resolve_device(self.device)

    def model_class(self, trust_code: bool = True) -> type:
        return MODELS.resolve(self.model, trust_code=trust_code)

    def check(self, trust_code: bool = True) -> None:
        """Raise one ValueError naming the first setting that cannot work (nothing is built or written)."""
        model_class = self.model_class(trust_code)
        self.model = MODELS.name_of(model_class)
        guide_class = GUIDES.resolve(self.guide, trust_code=trust_code)
        self.guide = GUIDES.name_of(guide_class)
        check_pair(model_class, guide_class)
        self.timesteps = TIMESTEPS.name_of(TIMESTEPS.resolve(self.timesteps, trust_code=trust_code))
        if self.likelihood is not None:
            self.likelihood = LIKELIHOODS.name_of(LIKELIHOODS.resolve(self.likelihood, trust_code=trust_code))
        if self.objective not in model_class.objectives:
            raise ValueError(
                f"{self.model} does not train on objective {self.objective!r}; "
                f"it supports {list(model_class.objectives)}"
            )
        if hasattr(model_class, "check_objective"):
            model_class.check_objective(self.objective, guide_class)
        if self.variance is not None and self.variance not in model_class.variances:
            raise ValueError(
                f"{self.model} has no variance {self.variance!r}; it implements {list(model_class.variances)}"
            )
        if not isinstance(getattr(torch.optim, self.optimizer, None), type):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: not a class in torch.optim")
        if self.net is not None and self.net not in presets.NETWORKS:
            raise ValueError(f"unknown network preset {self.net!r}; choose one of {sorted(presets.NETWORKS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {sorted(PRECISIONS)}")
        for name in ("steps", "batch_size", "timesteps_per_image", "T", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.T < 2:
            raise ValueError(f"T must be at least 2, got {self.T}")
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be 0 (never) or positive, got {self.sample_every}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"unknown lr_decay {self.lr_decay!r}; choose one of {list(LR_DECAYS)}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps must be positive, got {self.lr_decay_steps}")
        if not (math.isfinite(self.guide_lr_scale) and self.guide_lr_scale >= 0):
            raise ValueError(f"guide_lr_scale must be a number >= 0, got {self.guide_lr_scale}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not (math.isfinite(self.ema_ramp) and self.ema_ramp >= 1.0):
            raise ValueError(f"ema_ramp must be a number >= 1, got {self.ema_ramp}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        self.device = check_device(self.device)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(5000, self.steps // 10)

    def resolved(self, dataset) -> TrainConfig:
        """This config with the defaults it leaves open filled in (what a checkpoint stores)."""
        model_class = self.model_class()
        likelihood = self.likelihood or LIKELIHOODS.name_of(type(likelihoods.default_for(dataset)))
        return dataclasses.replace(
            self,
            variance=self.variance or next(iter(model_class.variances), None),
            warmup=self.warmup_steps,
            lr_decay_steps=(self.lr_decay_steps or self.steps) if self.lr_decay != "constant" else self.lr_decay_steps,
            likelihood=likelihood,
            net=self.net or dataset.preset,
        )


AUTO_DEVICE = "auto"


def resolve_device(device: str | None) -> str | None:
    """The device ``"auto"`` stands for: ``"cuda"`` when torch sees a CUDA device, else ``"cpu"``; under
    ``torchrun`` with CUDA, ``"cuda:LOCAL_RANK"`` (one GPU per process). Any other value is returned as is."""
    if device != AUTO_DEVICE:
        return device
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and local_rank is not None and local_rank.isdigit():
        return f"cuda:{int(local_rank)}"
    return "cuda"


def device_line(device: str) -> str:
    """The line a run prints first: the device it trains on (on the CPU, whether CUDA was there to use)."""
    no_cuda = torch.device(device).type == "cpu" and not torch.cuda.is_available()
    return f"pyro-ddpm: training on {device}" + (" (no CUDA device found)" if no_cuda else "")


def check_device(device: str) -> str:
    """The device ``device`` stands for (``"auto"`` resolved), or one ValueError unless it names a device this
    torch build has."""
    device = resolve_device(device)
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build/machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif d.type not in ("cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported (use cpu or cuda[:N])")
    return device


# ----------------------------------------------------------------------------- building the programs
def build(config: TrainConfig, dataset: datasets.Dataset, trust_code: bool = True):
    """Model and guide for ``config`` on ``dataset`` (on ``config.device``).

    The guide class builds itself with ``for_data(T, schedule, data)``; the model class is built by
    ``from_config(eps=network, schedule=guide.schedule, likelihood=..., variance=..., shape=...)`` around
    the guide's schedule (one schedule object: a learned schedule is learned for both), with the network
    preset given the output the class asks for (``network_config(preset, data)``).
    """
    model_class = config.model_class(trust_code)
    spec = protocol.DataSpec(dataset.shape, int(dataset.levels or 0))
    guide = GUIDES.resolve(config.guide, trust_code=trust_code).for_data(config.T, config.schedule, spec)
    likelihood = (
        likelihoods.default_for(dataset)
        if config.likelihood is None
        else likelihoods.by_name(config.likelihood, dataset, trust_code=trust_code)
    )
    preset = dict(presets.NETWORKS[config.net or dataset.preset], **config.net_overrides)
    net = build_network(model_class.network_config(preset, spec))
    if tuple(getattr(net, "shape", dataset.shape)) != model_class.network_input_shape(spec):
        raise ValueError(
            f"network preset {config.net!r} expects data of shape {net.shape}, "
            f"but {dataset.name} has shape {dataset.shape}"
        )
    variance = {"variance": config.variance} if model_class.variances else {}  # a class with variance rules
    model = model_class.from_config(
        eps=net,
        schedule=guide.schedule,
        likelihood=likelihood,
        shape=list(dataset.shape),
        **variance,
        **config.model_options,
    )
    model.to(config.device)
    guide.to(config.device)
    model.autocast = PRECISIONS[config.precision]
    return model, guide


def lr_factor(config: TrainConfig):
    """The learning rate at optimizer step n as a factor of ``config.lr``: a linear warm-up over
    ``config.warmup_steps``, then constant or a cosine decay to 0 at ``lr_decay_steps`` (0 after it)."""
    warmup = max(config.warmup_steps, 1)
    decay = config.lr_decay_steps or config.steps

    def factor(step: int) -> float:
        rise = min(1.0, (step + 1) / warmup)
        if config.lr_decay == "constant":
            return rise
        return rise * 0.5 * (1.0 + math.cos(math.pi * min(step, decay) / decay))

    return factor


def make_optimizer(config: TrainConfig, guide=None) -> JointOptimizer:
    """``config.optimizer`` over all parameters, global-norm clipping, the learning rate of :func:`lr_factor`;
    the guide's parameters (if any) at ``lr * config.guide_lr_scale``."""
    scaled = {id(p) for p in guide.parameters()} if guide is not None and config.guide_lr_scale != 1.0 else set()
    return JointOptimizer(
        getattr(torch.optim, config.optimizer),
        {"lr": config.lr},
        clip_norm=config.grad_clip,
        lr_lambda=lr_factor(config),
        lr_scale=(lambda p: config.guide_lr_scale if id(p) in scaled else 1.0) if scaled else None,
    )


class Processes:
    """The processes of a run: rank, world size, and what data-parallel training changes (one place).

    With one process every method is the identity; under ``torchrun`` the network is wrapped in
    ``DistributedDataParallel``, both programs are scaled by the world size and values are gathered.
    """

    def __init__(self, device: str):
        self.created = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.created = True
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # where collective operations take their tensors: NCCL reduces device tensors only
        self.device = torch.device(device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")

    @property
    def many(self) -> bool:
        return self.world > 1

    def wrap(self, program):
        """The training program with its network in DistributedDataParallel (when there are many processes)."""
        if not self.many:
            return program
        return program.with_network(torch.nn.parallel.DistributedDataParallel(program.eps))

    def scale(self):
        """``poutine.scale`` by the world size: DDP averages the gradients, so each process sums B/world images."""
        return poutine.scale(scale=float(self.world)) if self.many else contextlib.nullcontext()

    def shard(self, batch: int) -> slice:
        """This process's contiguous share of a global batch of ``batch`` items."""
        if batch % self.world:
            raise ValueError(f"batch_size {batch} is not divisible by the {self.world} processes")
        n = batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The values of every process, concatenated in rank order (the global batch's)."""
        if not self.many:
            return values
        out = [torch.zeros_like(values) for _ in range(self.world)]
        dist.all_gather(out, values)
        return torch.cat(out)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.many:
            where = values.device
            values = values.to(self.device, copy=True)
            dist.all_reduce(values)
            values = (values / self.world).to(where)
        return values

    def check_in_sync(self, net: torch.nn.Module, step: int) -> None:
        if not self.many:
            return
        flat = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()]).cpu()
        summary = torch.stack(
            [flat.sum(), flat.abs().sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()]
        )
        summary = summary.to(self.device)  # NCCL gathers device tensors only
        gathered = [torch.zeros_like(summary) for _ in range(self.world)]
        dist.all_gather(gathered, summary)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"processes hold different parameters at step {step}")

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def make_svi(config: TrainConfig, program, guide, processes: Processes | None = None) -> SVI:
    """The trainer's ``SVI`` on the objective's ``program`` (``objective(config.objective, model)[0]``);
    ``svi.elbo`` is its :class:`TermwiseELBO`.

    ``svi.step(x0, t, eps, weight)`` takes one step on the program with x_t drawn from the given noise
    ``eps`` (pair b * K + k) and per-timestep weights ``weight`` (the objective's times the timestep
    proposal's, or None).
    """
    processes = processes or Processes(config.device)
    train_program = processes.wrap(program)

    def svi_model(x0, t, eps, weight):
        with processes.scale():
            train_program.per_timestep(x0, t, weight)

    def svi_guide(x0, t, eps, weight):
        with processes.scale(), protocol.FixedNoise({protocol.X_t: eps}, guide.from_noise):
            guide.per_timestep(x0, t, weight)

    elbo = TermwiseELBO()
    svi = SVI(svi_model, svi_guide, make_optimizer(config, guide), loss=elbo)
    svi.elbo = elbo  # its last_terms: each pair's term of the last step
    return svi


def step_weight(objective_weight: torch.Tensor | None, proposal: torch.Tensor) -> torch.Tensor | None:
    """The per-timestep weights of one step: the objective's times the proposal's 1/(T p_t) (None: all 1)."""
    if objective_weight is None:
        return None if bool((proposal[1:] == 1).all()) else proposal
    return objective_weight * proposal.to(objective_weight)


def pair_losses(terms: dict, t: torch.Tensor, proposal: torch.Tensor, K: int, world: int) -> torch.Tensor:
    """Each pair's term of the optimized objective, as a loss-aware sampler wants it (weights of the
    objective kept, the proposal's 1/(T p_t) and the plate's T/K removed): (B*K,) in nats."""
    T = proposal.shape[0] - 1
    plate = (T / K) * world * proposal.to(t.device)[t]
    total = 0.0
    for term in terms.values():
        if term.per_pair:
            total = total + term.value * term.scale
    return (total / plate).detach()


def bound_estimates(terms: dict, t: torch.Tensor, proposal: torch.Tensor, K: int, images: int) -> torch.Tensor:
    """This batch's unbiased estimates of L_T, the rate L_1..L_{T-1} and L_0 (nats per image) from the
    terms of the bound's own programs (the proposal's weights 1/(T p_t) carried)."""
    T = proposal.shape[0] - 1
    w = (T / K) * proposal.to(t.device)[t]
    L_T = terms[protocol.X_T].value.sum()
    rate = (terms[protocol.X_PREV].value * w).sum()
    L_0 = (terms[protocol.X_0].value * w).sum()
    return torch.stack([L_T, rate, L_0]).detach().double().cpu() / images


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
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut by a kill: dropped
                continue
        atomic_write(self.path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))

    def add(self, loss_per_image: float, bound: torch.Tensor | None, images: int) -> None:
        self.losses.append(loss_per_image)
        if bound is not None:
            self.bounds.append(bound)
        self.images += images

    @staticmethod
    def _mean_se(values: list[float]) -> tuple[float, float]:
        n = len(values)
        mean = sum(values) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
        return mean, se

    def flush(self, step: int, config: TrainConfig, processes: Processes) -> dict:
        elapsed = time.perf_counter() - self.t0
        losses = processes.mean(torch.tensor(self.losses, dtype=torch.float64)).tolist()
        loss, loss_se = self._mean_se(losses)
        record = {
            "step": step,
            "objective": config.objective,
            "loss_per_image": loss,
            "loss_per_image_se": loss_se,
            "images_per_s": self.images * processes.world / elapsed,
            "window_steps": len(losses),
        }
        if self.bounds:
            b = processes.mean(torch.stack(self.bounds)) / (self.dims * math.log(2))  # (steps, 3) bits/dim
            for j, name in enumerate(("L_T", "rate", "L_0")):
                record[f"{name}_bits_per_dim"], record[f"{name}_bits_per_dim_se"] = self._mean_se(b[:, j].tolist())
            record["bits_per_dim"], record["bits_per_dim_se"] = self._mean_se(b.sum(1).tolist())
            record["bound_steps"] = len(self.bounds)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.losses, self.bounds, self.t0, self.images = [], [], time.perf_counter(), 0
        return record


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; the message says how to resume.

    Attributes: ``signal`` (its name), ``step``, ``steps`` (the run's total), ``checkpoint`` and ``out``;
    ``others``: the runs the same signal stopped beside this one (a comparison's processes), each an
    ``Interrupted`` of its own.
    """

    def __init__(
        self,
        signal_name: str,
        step: int,
        steps: int,
        checkpoint: Path,
        out: Path,
        resume_hint: str | None = None,
        others: tuple[Interrupted, ...] = (),
    ):
        self.signal, self.step, self.steps, self.checkpoint, self.out = signal_name, step, steps, checkpoint, out
        self.resume_hint, self.others = resume_hint, tuple(others)
        hint = resume_hint or f"pyro-ddpm train --out {out} --resume"
        also = "".join(
            f"; {o.out} stopped at step {o.step} of {o.steps}, checkpoint saved to {o.checkpoint}" for o in self.others
        )
        super().__init__(
            f"{signal_name} received: stopped at step {step} of {steps}; checkpoint saved to {checkpoint}{also}; "
            f"resume with: {hint}"
        )

    def __reduce__(self):  # it crosses processes (a comparison's workers): rebuilt from its fields, not its message
        return type(self), (
            self.signal,
            self.step,
            self.steps,
            self.checkpoint,
            self.out,
            self.resume_hint,
            self.others,
        )

    def with_hint(self, resume_hint: str) -> Interrupted:
        """The same stop with another resume instruction (e.g. re-running a comparison)."""
        return Interrupted(self.signal, self.step, self.steps, self.checkpoint, self.out, resume_hint, self.others)

    def with_others(self, signal_name: str, others: list[Interrupted]) -> Interrupted:
        """This stop and ``others`` as one, by the signal ``signal_name`` (what stopped the caller: the
        runs in its processes were stopped by the SIGTERM it sent them)."""
        return Interrupted(signal_name, self.step, self.steps, self.checkpoint, self.out, self.resume_hint, others)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (which handles it itself): stop as Ctrl-C does (the command line
    turns SIGTERM into it)."""


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a request to stop after the current step (a list: ``[signal name]`` or ``[]``).

    A second signal while the first is being honoured raises KeyboardInterrupt (stop now: an atomic
    write under way leaves the old file).
    """
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def default_threads() -> int | None:
    """The torch thread count a run uses when none is given: ``$OMP_NUM_THREADS`` when set, 1 under
    pytest-xdist (its workers share the cores), else None (torch's own choice)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return 1
    return None


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` inside, restored after; None: :func:`default_threads`."""
    if threads is None:
        threads = default_threads()
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ema_avg(decay: float, ramp: float = 10.0):
    """``AveragedModel``'s ``multi_avg_fn``: one foreach update of all tensors of a dtype per step."""

    def avg(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # integer buffers (e.g. counters) follow the network
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (ramp + n)))

    return avg


def _own_rng():
    """Random numbers drawn inside are not taken from the training run's stream."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


# ----------------------------------------------------------------------------- the loop
# The config fields that name program classes, and where each is resolved.
CLASS_FIELDS = {"model": MODELS, "guide": GUIDES, "likelihood": LIKELIHOODS, "timesteps": TIMESTEPS}


def _check_stored_classes(config: TrainConfig, asked: dict, trust_code: bool | None, origin: str) -> None:
    """On resume: a class name that only the checkpoint supplies (the caller did not name it) must be
    registered, unless ``trust_code`` is True; importing it would run code the checkpoint chose."""
    for field, registry in CLASS_FIELDS.items():
        name = getattr(config, field)
        if name is None or trust_code is True or asked.get(field) == name:
            continue
        registry.resolve(name, trust_code=False, origin=origin)


def train(
    config: TrainConfig, out: str | Path, progress: bool = True, resume: bool = False, trust_code: bool | None = None
) -> Path:
    """Train; write ``out/metrics.jsonl``, checkpoints ``out/checkpoint.pt`` and sample grids; return the checkpoint.

    With ``resume=True`` the run continues from ``out/checkpoint.pt``: the stored settings, with the
    fields of :data:`RESUMABLE` taken from ``config``; any other field of ``config`` that is set (not
    None) and differs is refused. On CPU a resumed run reproduces the uninterrupted one exactly.

    Nothing is written before the settings and the data have been checked; the run directory is then
    locked (:class:`~pyro_ddpm.files.RunLock`: a second writer is refused, naming the holder's PID) and
    the temporaries of interrupted saves are removed.

    With ``progress``, the first line on stderr names the device (:func:`device_line`).

    :param trust_code: whether a ``"module:Class"`` that is not registered may be imported (which runs its
        code). None (default): the classes ``config`` names may be, as they are the caller's choice, but
        on resume not those only the checkpoint names; True: those too; False: none.
    """
    out = Path(out)
    ckpt_path = out / FILENAME
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file, not a run directory")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and out.is_dir():
        RunLock.check_free(out)  # a live writer is named before anything else is looked at
    state, stamp = None, None
    if resume:
        stamp = _stamp(ckpt_path)
        state = TrainState.load(ckpt_path)
        asked = dataclasses.asdict(config)
        unknown = sorted(set(state.config) - set(asked))
        if unknown:
            raise ValueError(f"{state.origin} holds settings this version does not know: {unknown}")
        config = TrainConfig(**state.resume_config(asked, RESUMABLE))
        _check_stored_classes(config, asked, trust_code, state.origin)
    elif ckpt_path.exists():
        raise ValueError(f"{out} already holds a checkpoint: resume it (--resume) or choose another output directory")
    config.check(trust_code=trust_code is not False)
    dataset = datasets.load(config.data, seed=0)
    data_fingerprint = fingerprint(dataset.train)  # hashed once: checked on resume, stored in every checkpoint
    if state is not None:
        state.check_fingerprint(data_fingerprint)
    else:
        config = config.resolved(dataset)
    processes = Processes(config.device)
    try:  # rank 0 writes and holds the run directory's lock; the other ranks only train
        with (
            RunLock(out) if processes.rank == 0 else contextlib.nullcontext(),
            pyro.validation_enabled(config.validate),
            torch_threads(config.threads),
        ):
            if processes.rank == 0:
                if state is None and ckpt_path.exists() or state is not None and _stamp(ckpt_path) != stamp:
                    raise ValueError(
                        f"{ckpt_path} was written by another process while this run was starting; run the command again"
                    )
                remove_stale_temporaries(out)
            trust = trust_code is not False
            if progress and processes.rank == 0:
                print(device_line(config.device), file=sys.stderr, flush=True)
            return _train(config, dataset, data_fingerprint, out, state, processes, progress, trust)
    finally:
        processes.close()


def _stamp(path: Path):
    """(size, mtime) of ``path``, or None: whether a file was replaced between two looks."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _train(
    config, dataset, data_fingerprint: dict, out: Path, state, processes: Processes, progress: bool, trust_code: bool
) -> Path:
    ckpt_path = out / FILENAME
    B, K = min(config.batch_size, len(dataset.train)), config.timesteps_per_image
    shard = processes.shard(B)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    model, guide = build(config, dataset, trust_code=trust_code)
    if processes.many and any(p.requires_grad for p in guide.parameters()):
        raise ValueError(
            f"{config.guide} has parameters: training it over {processes.world} processes is not "
            "supported (only the network's gradients are averaged across processes); use one process"
        )
    net = model.eps
    sampler = TIMESTEPS.resolve(config.timesteps).from_config(T=model.T)
    generator = torch.Generator().manual_seed(config.seed)
    start, order, losses = 0, None, []
    if state is not None:
        load_weights(net, state.weights["net"], "network", state.origin)
        load_weights(guide, state.weights["guide"], "guide", state.origin)
        # the stored sampler's class may be imported only if it is the one the (checked) config names
        stored_sampler = state.programs["timesteps"]
        sampler = state.timestep_sampler(
            trust_code=trust_code
            and isinstance(stored_sampler, dict)
            and stored_sampler.get("class") == config.timesteps
        )
    ema = AveragedModel(
        net, multi_avg_fn=_ema_avg(config.ema_decay, config.ema_ramp), use_buffers=True
    )  # a copy, before compiling
    if config.compile:
        net.compile()
    program, objective_weight = objective(config.objective, model)
    svi = make_svi(config, program, guide, processes)
    optim = svi.optim
    prefix = "$$$module." if processes.many else "$$$"
    if state is not None:
        training = state.training
        optim.set_state(
            dict(training["optim"], names=[k.replace("$$$", prefix, 1) for k in training["optim"]["names"]])
        )
        load_weights(ema.module, state.weights["ema"], "network (EMA)", state.origin)
        ema.n_averaged.fill_(int(training["ema_updates"]))
        generator.set_state(training["rng"]["generator"])
        torch.set_rng_state(training["rng"]["torch"])
        if torch.cuda.is_available() and training["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(training["rng"]["cuda"])
        start, order, losses = state.step, training["order"], list(training.get("losses", []))
    sample_model = model.with_network(ema.module)
    writes = processes.rank == 0
    log = MetricsLog(out / "metrics.jsonl", dataset.dims, writes)
    if writes:
        if state is None:
            log.path.unlink(missing_ok=True)
        else:
            log.truncate(start)
    programs = {
        "model": MODELS.describe(model),
        "guide": GUIDES.describe(guide),
        "likelihood": LIKELIHOODS.describe(model.likelihood),
        "network": NETWORKS.describe(net),
        "timesteps": TIMESTEPS.describe(sampler),
    }
    data_record = {
        "name": dataset.name,
        "shape": list(dataset.shape),
        "levels": dataset.levels,
        "source": dataset.source,
        "fingerprint": data_fingerprint,
    }

    def snapshot(step: int) -> bytes | None:
        """The checkpoint of this step as bytes (rank 0; None elsewhere), refused if any weight is not finite."""
        processes.check_in_sync(net, step)
        if not writes:
            return None
        for what, module in (("network", net), ("EMA", ema.module), ("guide", guide)):
            if not all(bool(torch.isfinite(v).all()) for v in module.state_dict().values() if v.is_floating_point()):
                raise FloatingPointError(
                    f"training stopped: the {what} weights became non-finite at step {step}; "
                    f"{_kept(saved_at, ckpt_path)}"
                )
        return TrainState(
            step=step,
            config=dataclasses.asdict(config),
            programs=programs,
            data=data_record,
            weights={
                "net": _cpu(net.state_dict()),
                "ema": _cpu(ema.module.state_dict()),
                "guide": _cpu(guide.state_dict()),
                "timesteps": _cpu(sampler.state_dict()),
            },
            training={
                "optim": (lambda o: dict(o, names=[k.replace(prefix, "$$$", 1) for k in o["names"]]))(
                    optim.get_state()
                ),
                "ema_updates": int(ema.n_averaged),
                "order": order,
                "losses": losses[-LOSS_HISTORY:],
                "rng": {
                    "torch": torch.get_rng_state(),
                    "generator": generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
                "world_size": processes.world,
            },
            finished=step >= config.steps,
        ).to_bytes()

    x_train = dataset.train
    N = len(x_train)
    per_epoch = max(1, N // B)
    bound_stride = max(1, config.log_every // 8)  # steps whose batch gives a bound estimate, other objectives
    net.train()
    # A checkpoint is written once the next step's loss has passed the checks: the parameters it holds
    # have then been seen to give a finite, non-diverging loss (the final one and one on a signal are
    # written at once). ``pending`` is the (step, contents) waiting for that.
    saved_at, pending = start, None
    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc=f"train {config.objective}",
        disable=not progress or not writes,
        dynamic_ncols=True,
    )
    with stop_on_signals() as stop:
        for step in bar:
            if step % per_epoch == 0:
                order = torch.randperm(N, generator=generator)
            x0 = x_train[order[(step % per_epoch) * B : (step % per_epoch + 1) * B]]
            if dataset.flip:
                x0 = datasets.random_flip(x0, generator)
            t, proposal = sampler.draw(B, K, generator=generator)
            eps = protocol.standard_noise(guide.noise, (B, K, *dataset.shape), generator)
            weight = step_weight(objective_weight, proposal)
            x0, t, eps = (v[shard].to(config.device) for v in (x0, t, eps))
            eps = eps.reshape(-1, *dataset.shape)  # pair b * K + k
            weight = None if weight is None else weight.to(config.device)
            loss = svi.step(x0, t, eps, weight)
            optim.step()  # the learning-rate schedule
            terms, t_flat = svi.elbo.last_terms, t.reshape(-1)
            if sampler.learns:
                sampler.update(
                    processes.gather(t_flat).cpu(),
                    processes.gather(pair_losses(terms, t_flat, proposal, K, processes.world)).cpu(),
                )
            ema.update_parameters(net)
            done = step + 1
            per_image = loss / x0.shape[0] / processes.world
            _check_loss(per_image, done, losses, saved_at, ckpt_path)
            if pending is not None:  # its parameters gave this step's loss, which passed
                saved_at = _commit(pending, ckpt_path)
                pending = None
            losses = (losses + [per_image])[-LOSS_HISTORY:]
            bound = None
            if program is model:  # the terms are the bound's own
                bound = bound_estimates(terms, t_flat, proposal, K, x0.shape[0])
            elif done % bound_stride == 0:
                bound = _bound_of_batch(model, guide, x0, t, eps, proposal, K)
            log.add(per_image, bound, x0.shape[0])
            if done % config.log_every == 0 or done == config.steps:
                record = log.flush(done, config, processes)
                bar.set_postfix(loss=f"{record['loss_per_image']:.4g}", img_s=f"{record['images_per_s']:.0f}")
            if config.sample_every and done % config.sample_every == 0 and writes:
                _sample_grid(sample_model, dataset, out / "samples" / f"step_{done:07d}.png")
            if done == config.steps or stop:
                saved_at = _commit((done, snapshot(done)), ckpt_path)
            elif done % config.checkpoint_every == 0:
                pending = (done, snapshot(done))
            if stop:
                bar.close()
                raise Interrupted(stop[0], done, config.steps, ckpt_path, out)
    return ckpt_path


def _commit(pending: tuple[int, bytes | None], ckpt_path: Path) -> int:
    """Write a snapshot (rank 0 only holds one) and return its step."""
    step, contents = pending
    if contents is not None:
        write_bytes(ckpt_path, contents)
    return step


def _kept(saved_at: int, ckpt_path: Path) -> str:
    return (
        f"the last good checkpoint (step {saved_at}) is kept at {ckpt_path}"
        if saved_at
        else "no checkpoint was written"
    )


# The divergence check starts once this many losses are known (one: the first step's loss is the reference).
DIVERGENCE_MIN_HISTORY = 1


def _check_loss(per_image: float, step: int, history: list[float], saved_at: int, ckpt_path: Path) -> None:
    """Stop on a non-finite loss, or one further from the running median than :data:`DIVERGENCE_FACTOR` allows."""
    kept = _kept(saved_at, ckpt_path)
    if not math.isfinite(per_image):
        raise FloatingPointError(f"training stopped: the loss became {per_image} at step {step}; {kept}")
    if len(history) >= DIVERGENCE_MIN_HISTORY:
        median = statistics.median(history)
        if abs(per_image - median) > DIVERGENCE_FACTOR * max(abs(median), 1.0):
            raise FloatingPointError(
                f"training stopped: the loss diverged at step {step} ({per_image:.4g} per image, "
                f"running median {median:.4g}); {kept} (lower --lr?)"
            )


@torch.no_grad()
def _bound_of_batch(model, guide, x0, t, eps, proposal, K) -> torch.Tensor:
    """The bound's estimates on this step's batch, traced from the model itself (for objectives whose
    training program is another one), with the training run's random streams left alone."""
    with _own_rng():
        terms = TermwiseELBO().terms(
            model.per_timestep,
            protocol.FixedNoise({protocol.X_t: eps}, guide.from_noise)(guide.per_timestep),
            x0,
            t,
            step_weight(None, proposal.to(x0.device)),
        )
    return bound_estimates(terms, t.reshape(-1), proposal, K, x0.shape[0])


def _sample_grid(model, dataset, path: Path, n: int = 16) -> None:
    with _own_rng():
        torch.manual_seed(0)
        save_png(sample(model, n), path, reference=dataset.test if len(dataset.shape) == 1 else None)
