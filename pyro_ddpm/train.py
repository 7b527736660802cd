"""Training: Algorithm 1 as Pyro SVI on the per-timestep form of the bound, with warm-up, clipping, EMA and
checkpoints.

:meth:`Trainer.step` is the algorithm: draw K timesteps per image from the run's timestep sampler
(uniform on 1..T, or an importance proposal with weights 1/(T p_t); :mod:`pyro_ddpm.timesteps`) and the
noise of x_t ~ q(x_t | x_0) from the run's own generator, call ``svi.step`` with
:class:`~pyro_ddpm.elbo.TermwiseELBO` (Pyro's ``TraceMeanField_ELBO`` that keeps its terms: one network
call over the B*K pairs), advance the learning-rate schedule and update the EMA. The guide draws x_t from
that noise through :class:`~pyro_ddpm.protocol.FixedNoise`, so a run is reproduced exactly by its seed,
whether it is resumed or split over processes. The objective changes only the model program and the
per-timestep weights, as the model class declares (``training_program``); parameters of the guide (a
learned schedule) are trained by the same step.

Everything else a run does is a hook beside the step (:mod:`pyro_ddpm.hooks`: divergence guard, metrics,
sample grids, checkpoints); where it runs (device, ``torchrun`` processes, threads, signals) is
:mod:`pyro_ddpm.runtime`; its saved state is :mod:`pyro_ddpm.checkpoint`.

Optimizer: one torch optimizer (Adam by default) over all parameters with the paper's global-norm
clipping and a linear warm-up (:class:`~pyro_ddpm.optim.JointOptimizer`). The EMA of the network
(paper: 0.9999) uses the decay min(decay, (1 + n) / (r + n)) after n updates (r = ``ema_ramp``), so short
runs average their recent past rather than their initialization; evaluation and sampling use it.

Many processes: under ``torchrun`` each process runs SVI on its contiguous shard of the global batch,
with the network in ``DistributedDataParallel`` and both programs scaled by the world size, so the
averaged gradient is the global batch's (:class:`~pyro_ddpm.runtime.Processes`). Rank 0 writes logs,
samples and checkpoints. Dropout masks are drawn per process, so only dropout-free runs match a
single-process run to round-off.

Safety: the run directory is locked while a run writes to it; stale temporaries of interrupted saves
are removed; SIGINT/SIGTERM save a checkpoint at the current step and stop with one line saying how
to resume; Pyro's validation flag and torch's thread count are restored on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pyro_ddpm import checkpoint, hooks, likelihoods, presets, protocol
from pyro_ddpm import data as datasets
from pyro_ddpm.elbo import TermwiseELBO, objective, step_weight
from pyro_ddpm.files import RunLock, remove_stale_temporaries
from pyro_ddpm.nets import build_network
from pyro_ddpm.optim import JointOptimizer
from pyro_ddpm.options import (
    at_least,
    check_all,
    integer,
    option,
    optional,
    plain_dict,
    positive,
    positive_number,
    resumable,
    within,
)
from pyro_ddpm.programs import check_pair
from pyro_ddpm.registry import GUIDES, LIKELIHOODS, MODELS, TIMESTEPS
from pyro_ddpm.runtime import (
    DEVICE_HELP,
    THREADS_HELP,
    Processes,
    check_device,
    device_line,
    resolve_device,
    stop_on_signals,
    torch_threads,
)
from pyro_ddpm.runtime import Interrupted as Interrupted  # what train() raises on a stop
from pyro_ddpm.runtime import Terminated as Terminated

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
LR_DECAYS = ("constant", "cosine")


def _declared(attribute: str) -> list[str]:
    """The union, in registration order, of what the registered model classes declare (variances, objectives)."""
    out = []
    for name in MODELS.names():
        for value in getattr(MODELS.resolve(name), attribute):
            if value not in out:
                out.append(value)
    return out


def _class_help(what: str, registry) -> callable:
    return lambda: f"{what}: {', '.join(registry.names())}, or 'module:Class'"


def _optimizer(name: str, value) -> None:
    if not isinstance(getattr(torch.optim, str(value), None), type):
        raise ValueError(f"unknown optimizer {value!r}: not a class in torch.optim")


@dataclass
class TrainConfig:
    """A training run's settings: the one schema. The command line's flags, their help and defaults, the
    resume rule (only ``resumable`` fields may change) and the checkpoint's stored config are generated
    from these fields (:mod:`pyro_ddpm.options`)."""

    data: str = option(
        "digits",
        lambda: (
            f"a data set ({', '.join(datasets.NAMES)}), mnist or cifar10 (from the data cache; --download "
            "fetches them), or a path (MNIST IDX files, CIFAR-10 python tarball or folder)"
        ),
    )
    objective: str = option(
        "elbo", "what SVI optimizes; each model declares which it supports", choices=lambda: _declared("objectives")
    )
    model: str = option(presets.PROGRAMS["model"], _class_help("the reverse-process program", MODELS))
    guide: str = option(presets.PROGRAMS["guide"], _class_help("the forward-process program", GUIDES))
    schedule: str = option(
        presets.PROGRAMS["schedule"],
        "what the guide class reads as its schedule (its from_spec: a schedule name, or betas as a comma list "
        "or .npy/text file for a guide over given betas)",
    )
    T: int = option(1000, "number of diffusion steps", check=at_least(2, integer=True))
    variance: str | None = option(
        None,
        "sigma_t^2 rule; each model implements some (default: the model's first)",
        choices=lambda: _declared("variances"),
    )
    likelihood: str | None = option(
        None, lambda: _class_help("the decoder p(x_0 | x_1)", LIKELIHOODS)() + " (default: the data set's)"
    )
    timesteps: str = option(
        presets.PROGRAMS["timesteps"],
        "timestep sampling: uniform, or loss-aware importance sampling (unbiased)",
        choices=lambda: TIMESTEPS.names(),
    )
    model_options: dict = option(
        help="a keyword argument of the model class (VALUE read as a number, true/false or text); repeatable",
        name="--model-option",
        check=plain_dict,
        factory=dict,
    )
    steps: int = option(3000, "total training steps", check=positive, resumable=True)
    batch_size: int = option(128, "the global batch, over all processes", check=positive)
    timesteps_per_image: int = option(1, "K timesteps per image per step", check=positive, flags=("-K",))
    net: str | None = option(None, "network preset (default: the data set's)", choices=lambda: sorted(presets.NETWORKS))
    net_overrides: dict = option(
        help="override a key of the network preset (e.g. ch=16); repeatable",
        name="--net-option",
        shortcuts={"ch": (int, "the preset's base channel count"), "dropout": (float, "the preset's dropout")},
        check=plain_dict,
        factory=dict,
    )
    optimizer: str = option("Adam", "a torch.optim class", check=_optimizer)
    lr: float = option(2e-4, "learning rate", check=positive_number)
    warmup: int | None = option(
        None,
        "warm-up steps (default min(5000, steps/10) of the first run; stored: resuming keeps it)",
        check=optional(at_least(0, integer=True)),
    )
    lr_decay: str = option("constant", "after the warm-up: constant, or cosine decay to 0", choices=LR_DECAYS)
    lr_decay_steps: int | None = option(
        None, "length of the cosine decay (default: the first run's steps)", check=optional(positive)
    )
    guide_lr_scale: float = option(
        1.0, "learning-rate factor of the guide's parameters, e.g. a learned schedule", check=at_least(0)
    )
    grad_clip: float = option(1.0, "global gradient-norm clip", check=positive_number)
    ema_decay: float = option(0.9999, "EMA decay", check=within(0.0, 1.0))
    ema_ramp: float = option(
        10.0,
        "the EMA decay after n updates is min(decay, (1 + n) / (ramp + n)): it averages about the last "
        "n / (ramp - 1) steps early on",
        check=at_least(1),
    )
    seed: int = option(0, "the run's seed (weights, data order, timesteps, noise)", check=integer)
    device: str = option("auto", DEVICE_HELP, resumable=True)
    precision: str = option(
        "fp32",
        "bf16: the network under autocast; the bound's algebra stays fp32",
        choices=list(PRECISIONS),
    )
    compile: bool = option(False, "torch.compile the network (in place, parameter names unchanged)")
    log_every: int = option(100, "steps per metrics record", check=positive, resumable=True)
    sample_every: int = option(
        0, "write a grid of EMA samples every N steps (0: never)", check=at_least(0, integer=True), resumable=True
    )
    checkpoint_every: int = option(1000, "steps between checkpoints", check=positive, resumable=True)
    validate: bool = option(False, "pyro.enable_validation during training (slower)", resumable=True)
    threads: int | None = option(None, THREADS_HELP, check=optional(positive), resumable=True)

    def __post_init__(self):
        # "auto" is resolved here, once, so every later use (and the checkpoint) sees the device itself
        self.device = resolve_device(self.device)

    def model_class(self, trust_code: bool = True) -> type:
        return MODELS.resolve(self.model, trust_code=trust_code)

    def check(self, trust_code: bool = True) -> None:
        """Raise one ValueError naming the first setting that cannot work (nothing is built or written):
        the classes it names and their pairing, then each field's own check, then the device."""
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
        if self.net is not None and self.net not in presets.NETWORKS:
            raise ValueError(f"unknown network preset {self.net!r}; choose one of {sorted(presets.NETWORKS)}")
        check_all(self)
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


RESUMABLE = resumable(TrainConfig)  # the fields a resumed run may change; every other one must match


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

    # the programs' modules become param sites on the first step only (pyro.module every step cost about 2 ms
    # of Pyro's handlers); the JointOptimizer keeps stepping every parameter it was given
    elbo = TermwiseELBO(register_once=True)
    svi = SVI(svi_model, svi_guide, make_optimizer(config, guide), loss=elbo)
    svi.elbo = elbo  # its last_terms: each pair's term of the last step
    return svi


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


def _ema_avg(decay: float, ramp: float = 10.0):
    """``AveragedModel``'s ``multi_avg_fn``: one foreach update of all tensors of a dtype per step."""

    def avg(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # integer buffers (e.g. counters) follow the network
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (ramp + n)))

    return avg


@dataclass
class Step:
    """What one training step saw and gave: the loss per image, the pairs' draws and the ELBO's terms."""

    loss: float
    x0: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    proposal: torch.Tensor
    terms: dict


class Trainer:
    """One training run: the programs, SVI on the objective's program, the EMA, the timestep sampler and the
    run's random generator, at step ``start``. :meth:`step` is Algorithm 1; :meth:`run` loops over it and
    calls the hooks (:mod:`pyro_ddpm.hooks`) after every step."""

    def __init__(
        self,
        config: TrainConfig,
        dataset,
        processes: Processes,
        fingerprint: dict | None = None,
        trust_code: bool = True,
    ):
        self.config, self.dataset, self.processes = config, dataset, processes
        self.B, self.K = min(config.batch_size, len(dataset.train)), config.timesteps_per_image
        self.shard = processes.shard(self.B)
        pyro.clear_param_store()
        pyro.set_rng_seed(config.seed)
        self.model, self.guide = build(config, dataset, trust_code=trust_code)
        if processes.many and any(p.requires_grad for p in self.guide.parameters()):
            raise ValueError(
                f"{config.guide} has parameters: training it over {processes.world} processes is not "
                "supported (only the network's gradients are averaged across processes); use one process"
            )
        self.net = self.model.eps
        self.sampler = TIMESTEPS.resolve(config.timesteps).from_config(T=self.model.T)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.ema = AveragedModel(self.net, multi_avg_fn=_ema_avg(config.ema_decay, config.ema_ramp), use_buffers=True)
        if config.compile:
            self.net.compile()  # after the EMA's copy
        self.program, self.objective_weight = objective(config.objective, self.model)
        self.svi = make_svi(config, self.program, self.guide, processes)
        self.param_prefix = "$$$module." if processes.many else "$$$"  # the network's names under DDP
        self.start, self.order, self.losses = 0, None, []
        self.per_epoch = max(1, len(dataset.train) // self.B)
        self.writes = processes.rank == 0
        self.bar, self.stop = None, []
        self.data_record = {
            "name": dataset.name,
            "shape": list(dataset.shape),
            "levels": dataset.levels,
            "source": dataset.source,
            "fingerprint": fingerprint,  # of the training split (checkpoint.fingerprint): a resume must match it
        }

    def batch(self, step: int) -> torch.Tensor:
        """The step's images: the epoch's permutation is drawn at its first step, then each batch is flipped."""
        if step % self.per_epoch == 0:
            self.order = torch.randperm(len(self.dataset.train), generator=self.generator)
        i = step % self.per_epoch
        x0 = self.dataset.train[self.order[i * self.B : (i + 1) * self.B]]
        return datasets.random_flip(x0, self.generator) if self.dataset.flip else x0

    def step(self, x0: torch.Tensor) -> Step:
        """Algorithm 1: t and the noise for every pair, one SVI step, the learning-rate schedule, the EMA."""
        B, K, shape = self.B, self.K, self.dataset.shape
        t, proposal = self.sampler.draw(B, K, generator=self.generator)
        eps = protocol.standard_noise(self.guide.noise, (B, K, *shape), self.generator)
        weight = step_weight(self.objective_weight, proposal)
        x0, t, eps = (v[self.shard].to(self.config.device) for v in (x0, t, eps))
        eps = eps.reshape(-1, *shape)  # pair b * K + k
        loss = self.svi.step(x0, t, eps, None if weight is None else weight.to(self.config.device))
        self.svi.optim.step()  # the learning-rate schedule
        terms = self.svi.elbo.last_terms
        if self.sampler.learns:  # a loss-aware proposal learns from every process's pairs
            gather = self.processes.gather
            losses = pair_losses(terms, t.reshape(-1), proposal, K, self.processes.world)
            self.sampler.update(gather(t.reshape(-1)).cpu(), gather(losses).cpu())
        self.ema.update_parameters(self.net)
        return Step(loss / x0.shape[0] / self.processes.world, x0, t, eps, proposal, terms)

    def run(self, run_hooks, progress: bool = True) -> None:
        """Steps ``start`` .. ``config.steps``, each followed by every hook, ``hook(self, step, result)``; a SIGINT or
        SIGTERM is honoured after the step (``self.stop`` names it, and the checkpoint hook stops the run)."""
        self.net.train()
        desc, config = f"train {self.config.objective}", self.config
        bar = tqdm(
            range(self.start, config.steps),
            initial=self.start,
            total=config.steps,
            desc=desc,
            disable=not progress or not self.writes,
            dynamic_ncols=True,
        )
        with bar as self.bar, stop_on_signals() as self.stop:
            for step in self.bar:
                result = self.step(self.batch(step))
                for hook in run_hooks:
                    hook(self, step + 1, result)


def train(
    config: TrainConfig, out: str | Path, progress: bool = True, resume: bool = False, trust_code: bool | None = None
) -> Path:
    """Train; write ``out/metrics.jsonl``, checkpoints ``out/checkpoint.pt`` and sample grids; return the checkpoint.

    With ``resume=True`` the run continues from ``out/checkpoint.pt``: the stored settings, with the
    fields of :data:`RESUMABLE` taken from ``config``; any other field of ``config`` that is set (not
    None) and differs is refused. On CPU a resumed run reproduces the uninterrupted one exactly.

    Nothing is written before the settings and the data have been checked; the run directory is then
    locked (:class:`~pyro_ddpm.files.RunLock`: a second writer is refused, naming the holder's PID) and
    the temporaries of interrupted saves are removed. With ``progress``, the first line on stderr names
    the device (:func:`~pyro_ddpm.runtime.device_line`).

    :param trust_code: whether a ``"module:Class"`` that is not registered may be imported (which runs its
        code). None (default): the classes ``config`` names may be, as they are the caller's choice, but
        on resume not those only the checkpoint names; True: those too; False: none.
    """
    out = Path(out)
    path = out / checkpoint.FILENAME
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file, not a run directory")
    if int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
        RunLock.check_free(out)  # a live writer is named before anything else is looked at
    state, stamp = None, checkpoint.stamp(path)
    if resume:
        state, stored = checkpoint.resumed_config(path, dataclasses.asdict(config), RESUMABLE, trust_code)
        config = TrainConfig(**stored)
    elif path.exists():
        raise ValueError(f"{out} already holds a checkpoint: resume it (--resume) or choose another output directory")
    config.check(trust_code=trust_code is not False)
    dataset = datasets.load(config.data, seed=0)
    fingerprint = checkpoint.fingerprint(dataset.train)  # hashed once: checked on resume, stored in every checkpoint
    if state is not None:
        state.check_fingerprint(fingerprint)
    else:
        config = config.resolved(dataset)
    processes, completed = Processes(config.device), False
    try:  # rank 0 writes and holds the run directory's lock; the other ranks only train
        with (
            RunLock(out) if processes.rank == 0 else contextlib.nullcontext(),
            pyro.validation_enabled(config.validate),
            torch_threads(config.threads),
        ):
            if processes.rank == 0:
                if checkpoint.stamp(path) != stamp:
                    raise ValueError(
                        f"{path} was written by another process while this run was starting; run the command again"
                    )
                remove_stale_temporaries(out)
            if progress and processes.rank == 0:
                print(device_line(config.device), file=sys.stderr, flush=True)
            trainer = Trainer(config, dataset, processes, fingerprint, trust_code=trust_code is not False)
            if state is not None:
                checkpoint.restore(trainer, state, trust_code=trust_code is not False)
            trainer.run(training_hooks(trainer, out), progress)
            del trainer  # so that Processes.close can free what refers to the process group
            completed = True
            return path
    finally:
        processes.close(completed)


def training_hooks(trainer: Trainer, out: Path) -> list:
    """The hooks of a run writing to ``out``, in their order: the divergence guard, the commit of a checkpoint
    waiting for that guard, the metrics log, sample grids, the checkpoint (last: it stops the run on a signal)."""
    config, dataset = trainer.config, trainer.dataset
    log = hooks.MetricsLog(out / "metrics.jsonl", dataset.dims, trainer.writes)
    if trainer.writes:
        log.truncate(trainer.start) if trainer.start else log.path.unlink(missing_ok=True)
    saver = hooks.Checkpointer(out / checkpoint.FILENAME, config.checkpoint_every, saved_at=trainer.start)
    reference = dataset.test if len(dataset.shape) == 1 else None
    return [
        hooks.LossGuard(saver.kept),
        saver.confirm,
        hooks.Metrics(log),
        hooks.SampleGrid(out / "samples", config.sample_every, reference),
        saver,
    ]
