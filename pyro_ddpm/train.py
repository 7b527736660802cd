"""Training: Pyro SVI on the per-timestep form of the bound, with warm-up, clipping, EMA and checkpoints.

Each step draws a global minibatch x_0, K timesteps per image (uniform on 1..T, or from the
loss-aware importance sampler with weights 1/(T p_t)) and the noise of x_t ~ q(x_t | x_0) from the
run's own generator, and calls ``svi.step`` with :class:`~pyro_ddpm.elbo.TermwiseELBO` (Pyro's
``TraceMeanField_ELBO`` that keeps its terms): one network call over the B*K pairs. The guide draws
x_t from that noise through :class:`~pyro_ddpm.protocol.FixedNoise` (a reparameterized draw), so a
run is reproduced exactly by its seed, whether it is resumed or split over processes. The objective
(``elbo``, ``simple``, ``hybrid``) changes only the model program and the per-timestep weights
(:mod:`pyro_ddpm.elbo`). The model and guide are any classes following :mod:`pyro_ddpm.protocol`
(``config.model``, ``config.guide``); parameters of either (e.g. a learned schedule) are trained by
the same SVI step.

Optimizer: one torch optimizer (Adam by default) over all parameters with the paper's global-norm
clipping and a linear warm-up (:class:`~pyro_ddpm.optim.JointOptimizer`). The EMA of the network
(paper: 0.9999) uses the decay min(decay, (1 + n) / (10 + n)) after n updates, so short runs average
their recent past rather than their initialization; evaluation and sampling use it.

Many processes: under ``torchrun`` (``torch.distributed`` initialized from the environment) each
process runs SVI on its contiguous shard of the global batch, with the network wrapped in
``DistributedDataParallel`` (gradients averaged across processes) and both programs scaled by the
world size, so the averaged gradient is the global batch's. Rank 0 writes logs, samples and
checkpoints; at every checkpoint the ranks check that they hold identical parameters. Dropout masks
are drawn per process, so only dropout-free runs match a single-process run to round-off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
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

from pyro_ddpm import checkpoint, data as datasets, likelihoods, protocol
from pyro_ddpm.elbo import OBJECTIVES, TermwiseELBO, objective
from pyro_ddpm.nets import PRESETS, build_network, network_config
from pyro_ddpm.optim import JointOptimizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
TIMESTEPS = ("uniform", "importance")
# Fields that may change when a run is resumed; every other field must match the checkpoint.
RESUMABLE = ("steps", "device", "log_every", "sample_every", "checkpoint_every", "validate")


@dataclass
class TrainConfig:
    data: str = "digits"
    objective: str = "elbo"
    model: str = "ReverseProcess"  # a class in pyro_ddpm.models, or an importable "module:Class"
    guide: str = "ForwardProcess"  # a class in pyro_ddpm.guides, or an importable "module:Class"
    likelihood: str | None = None  # the decoder; default: the data set's (see likelihoods.default_for)
    timesteps: str = "uniform"  # "uniform" or "importance" (loss-aware, guides.importance_sampling)
    steps: int = 3000
    batch_size: int = 128  # the global batch, over all processes
    timesteps_per_image: int = 1  # K
    T: int = 1000
    schedule: str = "linear"
    variance: str = "large"
    net: str | None = None  # a preset of pyro_ddpm.nets.PRESETS; default: the data set's
    net_overrides: dict = dataclasses.field(default_factory=dict)  # e.g. {"ch": 16, "dropout": 0.0}
    optimizer: str = "Adam"  # a torch.optim class
    lr: float = 2e-4
    warmup: int | None = None  # default min(5000, steps // 10): the paper's 5000 for long runs
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": the network under torch.autocast; the bound's algebra stays fp32
    compile: bool = False  # torch.compile the network (in place, parameter names unchanged)
    log_every: int = 100
    sample_every: int = 0  # write a grid of EMA samples every N steps (0: never)
    checkpoint_every: int = 1000
    validate: bool = False  # pyro.enable_validation during training (slower)

    def check(self) -> None:
        for field, package in (("model", "pyro_ddpm.models"), ("guide", "pyro_ddpm.guides")):
            setattr(self, field, checkpoint.program_name(getattr(self, field), package))
        if not isinstance(getattr(torch.optim, self.optimizer, None), type):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: not a class in torch.optim")
        if self.timesteps not in TIMESTEPS:
            raise ValueError(f"unknown timestep sampling {self.timesteps!r}; choose one of {TIMESTEPS}")
        if self.timesteps == "importance" and self.objective == "hybrid":
            raise ValueError("timesteps='importance' with objective='hybrid' is not supported: the hybrid program's "
                             "L_simple factor is not reweighted by the proposal, so the estimate would be biased")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.net is not None and self.net not in PRESETS:
            raise ValueError(f"unknown network preset {self.net!r}; choose one of {sorted(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {sorted(PRECISIONS)}")
        for name in ("steps", "batch_size", "timesteps_per_image", "T", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(5000, self.steps // 10)


def make_optimizer(config: TrainConfig) -> JointOptimizer:
    """``config.optimizer`` over all parameters, global-norm clipping, linear warm-up over ``config.warmup_steps``."""
    warmup = max(config.warmup_steps, 1)
    return JointOptimizer(getattr(torch.optim, config.optimizer), {"lr": config.lr}, clip_norm=config.grad_clip,
                          lr_lambda=lambda step: min(1.0, (step + 1) / warmup))


def make_svi(config: TrainConfig, model, guide, world: int = 1) -> tuple[SVI, torch.Tensor | None]:
    """The trainer's ``SVI`` and the objective's per-timestep weights; ``svi.elbo`` is its :class:`TermwiseELBO`.

    ``svi.step(x0, t, eps, weight)`` takes one step on the objective's program with x_t drawn from
    the given noise ``eps`` (pair b * K + k). With ``world`` > 1 processes the network is wrapped in
    ``DistributedDataParallel`` and both programs are scaled by ``world`` (DDP averages gradients).
    """
    train_model, weight = objective(config.objective, model)
    if world > 1:
        train_model = train_model.with_network(torch.nn.parallel.DistributedDataParallel(model.eps))
    scale = poutine.scale(scale=float(world)) if world > 1 else contextlib.nullcontext()

    def svi_model(x0, t, eps, weight):
        with scale:
            train_model.per_timestep(x0, t, weight)

    def svi_guide(x0, t, eps, weight):
        with scale, protocol.FixedNoise({protocol.X_t: eps}):
            guide.per_timestep(x0, t, weight)

    elbo = TermwiseELBO()
    svi = SVI(svi_model, svi_guide, make_optimizer(config), loss=elbo)
    svi.elbo = elbo  # its last_terms: each pair's term of the last step
    return svi, weight


def make_timestep_sampler(config: TrainConfig, T: int):
    """None for uniform timesteps (drawn inline), else the loss-aware importance sampler."""
    if config.timesteps == "uniform":
        return None
    from pyro_ddpm.guides.importance_sampling import LossAwareSampler

    return LossAwareSampler(T)


def _pair_terms(terms: dict, world: int) -> torch.Tensor:
    """Each pair's unweighted L_{t-1} (or L_0 at t = 1), in nats, from the terms of the last SVI step."""
    prev, x0 = terms[protocol.X_PREV], terms[protocol.X_0]
    values = (prev.value + x0.value).detach()
    if world > 1:
        gathered = [torch.zeros_like(values) for _ in range(world)]
        dist.all_gather(gathered, values)
        values = torch.cat(gathered)
    return values


def _ema_avg(decay: float):
    """``AveragedModel``'s ``multi_avg_fn``: one foreach update of all tensors of a dtype per step."""

    def avg(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # integer buffers (e.g. counters) follow the network
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return avg


def build(config: TrainConfig, dataset: datasets.Dataset):
    """Model and guide for ``config`` on ``dataset`` (on ``config.device``).

    The guide class builds itself with ``from_config(T, schedule, event_dim)``; the model class is
    built as ``Model(network, guide.schedule, variance, likelihood, shape=...)`` around the guide's
    schedule (one schedule object: a learned schedule is learned for both), with the network preset
    adapted by the class's ``network_config`` (e.g. twice the output channels for a learned variance).
    """
    model_class = checkpoint.program_class(config.model, "pyro_ddpm.models")
    guide_class = checkpoint.program_class(config.guide, "pyro_ddpm.guides")
    guide = guide_class.from_config(config.T, config.schedule, len(dataset.shape))
    preset = dict(PRESETS[config.net or dataset.preset], **config.net_overrides)
    net = build_network(model_class.network_config(preset))
    if tuple(getattr(net, "shape", dataset.shape)) != dataset.shape:
        raise ValueError(f"network preset {config.net!r} expects data of shape {net.shape}, "
                         f"but {dataset.name} has shape {dataset.shape}")
    likelihood = likelihoods.default_for(dataset) if config.likelihood is None else likelihoods.by_name(config.likelihood, dataset)
    model = model_class(net, guide.schedule, config.variance, likelihood, shape=dataset.shape)
    model.to(config.device)
    guide.to(config.device)
    model.autocast = PRECISIONS[config.precision]
    return model, guide


def _process_group(device: str) -> tuple[int, int]:
    """(rank, world size); initializes torch.distributed when launched by torchrun."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resume_config(config: TrainConfig, state: dict) -> None:
    saved = TrainConfig(**state["config"])
    differ = [f.name for f in dataclasses.fields(TrainConfig)
              if f.name not in RESUMABLE and getattr(saved, f.name) != getattr(config, f.name)]
    if differ:
        raise ValueError("cannot resume: the checkpoint was trained with different "
                         + ", ".join(f"{n}={getattr(saved, n)!r} (asked {getattr(config, n)!r})" for n in differ))
    if config.steps < state["step"]:
        raise ValueError(f"cannot resume to {config.steps} steps: the checkpoint is at step {state['step']}")


def train(config: TrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> Path:
    """Train; write ``out/metrics.jsonl``, checkpoints ``out/checkpoint.pt`` and sample grids; return the checkpoint.

    With ``resume=True`` the run continues from ``out/checkpoint.pt`` (``config`` must match it except
    for the fields in :data:`RESUMABLE`); on CPU it then reproduces the uninterrupted run exactly.
    """
    config.check()
    out = Path(out)
    ckpt_path = out / checkpoint.FILENAME
    state = None
    if resume:
        state = checkpoint.load(ckpt_path)
        _resume_config(config, state)
    elif ckpt_path.exists():
        raise ValueError(f"{out} already holds a checkpoint: resume it (--resume) or choose another output directory")
    dataset = datasets.load(config.data, seed=0)
    rank, world = _process_group(config.device)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} processes")

    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    pyro.enable_validation(config.validate)
    model, guide = build(config, dataset)
    if world > 1 and any(p.requires_grad for p in guide.parameters()):
        raise ValueError(f"{config.guide} has parameters: training it over {world} processes is not supported "
                         "(only the network's gradients are averaged across processes); use one process")
    net = model.eps
    if state is not None:
        net.load_state_dict(state["net"])
    ema = AveragedModel(net, multi_avg_fn=_ema_avg(config.ema_decay), use_buffers=True)  # a copy, before compiling
    if config.compile:
        net.compile()
    svi, weight = make_svi(config, model, guide, world)
    optim = svi.optim
    prefix = "$$$module." if world > 1 else "$$$"
    if state is not None:
        optim.set_state(dict(state["optim"], names=[k.replace("$$$", prefix, 1) for k in state["optim"]["names"]]))
        guide.load_state_dict(state["guide"])
    timesteps = make_timestep_sampler(config, model.T)
    if state is not None and timesteps is not None:
        timesteps.load_state_dict(state["timesteps"])
    generator = torch.Generator().manual_seed(config.seed)
    start, order = 0, None
    if state is not None:
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(int(state["ema_updates"]))
        generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start, order = state["step"], state["order"]
    sample_model = model.with_network(ema.module)

    x_train = dataset.train
    N, B, K, D = len(x_train), min(config.batch_size, len(dataset.train)), config.timesteps_per_image, dataset.dims
    per_epoch = max(1, N // B)
    shard = slice(rank * (B // world), (rank + 1) * (B // world))
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    if rank == 0 and not resume:
        log_path.unlink(missing_ok=True)

    def save(step: int) -> Path:
        in_sync = _ranks_in_sync(net) if world > 1 else True
        if not in_sync:
            raise RuntimeError(f"processes hold different parameters at step {step}")
        if rank != 0:
            return ckpt_path
        return checkpoint.save({
            "step": step,
            "config": dataclasses.asdict(config),
            "network": network_config(net),
            "schedule": {"name": config.schedule, "betas": model.schedule.betas.detach().cpu()},
            "variance": config.variance,
            "likelihood": model.likelihood.config(),
            "data": {"name": dataset.name, "shape": list(dataset.shape), "levels": dataset.levels,
                     "source": getattr(dataset, "source", "")},
            "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()},
            "ema_updates": int(ema.n_averaged),
            "guide": {k: v.detach().cpu() for k, v in guide.state_dict().items()},
            "optim": (lambda o: dict(o, names=[k.replace(prefix, "$$$", 1) for k in o["names"]]))(optim.get_state()),
            "timesteps": timesteps.state_dict() if timesteps is not None else None,
            "order": order,
            "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "world_size": world,
        }, ckpt_path)

    net.train()
    t0, window_loss, window_steps, saved_at = time.perf_counter(), 0.0, 0, start
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {config.objective}",
               disable=not progress or rank != 0, dynamic_ncols=True)
    for step in bar:
        if step % per_epoch == 0:
            order = torch.randperm(N, generator=generator)
        idx = order[(step % per_epoch) * B:(step % per_epoch + 1) * B]
        x0 = x_train[idx]
        if getattr(dataset, "flip", False):
            x0 = datasets.random_flip(x0, generator)
        if timesteps is None:
            t, step_weight = torch.randint(1, model.T + 1, (B, K), generator=generator), weight
        else:
            t, proposal_weight = timesteps.draw(B, K, generator=generator)
            step_weight = proposal_weight.to(config.device) * (1.0 if weight is None else weight)
        eps = torch.randn((B * K, *dataset.shape), generator=generator)
        t_global = t
        x0, t, eps = (v[shard].to(config.device) for v in (x0, t, eps.view(B, K, *dataset.shape)))
        eps = eps.reshape(-1, *dataset.shape)  # pair b * K + k
        loss = svi.step(x0, t, eps, step_weight)
        optim.step()  # the learning-rate schedule
        if timesteps is not None:
            optimized = _pair_terms(svi.elbo.last_terms, world)  # the loss the objective optimizes per pair:
            if weight is not None:  # for L_simple the reweighted term (as improved-diffusion's sampler)
                optimized = optimized * weight.to(optimized)[t_global.reshape(-1).to(optimized.device)]
            timesteps.update(t_global.reshape(-1), optimized)
        ema.update_parameters(net)
        if not math.isfinite(loss):
            kept = f"the last good checkpoint (step {saved_at}) is kept at {ckpt_path}" if saved_at else "no checkpoint was written"
            raise FloatingPointError(f"training stopped: the loss became {loss} at step {step + 1}; {kept}")
        window_loss += loss / B
        window_steps += 1
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            record = _log_record(config, done, window_loss / window_steps, B, D, t0, start, world)
            record.update(_term_estimates(model, guide, x0, t, eps, world, D,
                                          None if timesteps is None else proposal_weight.to(config.device)))
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss_per_image']:.4g}", img_s=f"{record['images_per_s']:.0f}")
            window_loss, window_steps = 0.0, 0
        if config.sample_every and done % config.sample_every == 0 and rank == 0:
            _sample_grid(sample_model, dataset, out / "samples" / f"step_{done:07d}.png")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
            saved_at = done
    return ckpt_path


def _log_record(config, step, loss_per_image, B, D, t0, start, world) -> dict:
    if world > 1:
        value = torch.tensor([loss_per_image], dtype=torch.float64)
        dist.all_reduce(value)
        loss_per_image = value.item() / world
    elapsed = time.perf_counter() - t0
    record = {"step": step, "objective": config.objective, "loss_per_image": loss_per_image,
              "images_per_s": (step - start) * B / elapsed}
    if config.objective == "elbo":
        record["bits_per_dim"] = loss_per_image / (D * math.log(2))
    return record


def _own_rng():
    """Random numbers drawn inside are not taken from the training run's stream."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


@torch.no_grad()
def _term_estimates(model, guide, x0, t, eps, world, D, proposal_weight=None) -> dict:
    """This batch's unbiased estimates of L_T, the rate and L_0 (bits/dim), from the traced terms
    (importance-sampled timesteps carry their weights 1/(T p_t))."""
    with _own_rng():
        terms = TermwiseELBO().terms(model.per_timestep, protocol.FixedNoise({protocol.X_t: eps})(guide.per_timestep),
                                     x0, t, proposal_weight)
    estimates = torch.stack([(term.value * term.scale).sum() / x0.shape[0]
                             for term in (terms[protocol.X_T], terms[protocol.X_PREV], terms[protocol.X_0])])
    if world > 1:
        dist.all_reduce(estimates)
        estimates /= world
    to_bpd = 1.0 / (D * math.log(2))
    return {f"{name}_bits_per_dim": float(v) * to_bpd for name, v in zip(("L_T", "rate", "L_0"), estimates)}


def _ranks_in_sync(net) -> bool:
    flat = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()]).cpu()
    summary = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()])
    gathered = [torch.zeros_like(summary) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, summary)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _sample_grid(model, dataset, path: Path, n: int = 16) -> None:
    from pyro_ddpm.sample import sample, save_png

    with _own_rng():
        torch.manual_seed(0)
        save_png(sample(model, n), path, reference=dataset.test if len(dataset.shape) == 1 else None)
