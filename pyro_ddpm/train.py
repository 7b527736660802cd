"""Training: Pyro SVI on the per-timestep form of the bound, with warm-up, clipping and an EMA.

Each step draws a minibatch x_0 and K timesteps per image (uniform on 1..T) and calls
``svi.step(x_0, t, weight)`` with ``TraceMeanField_ELBO``: one network call over the B*K pairs.
The objective (``elbo`` or ``simple``) only changes the per-timestep weights and the t = 1 term
(see :mod:`pyro_ddpm.elbo`). Optimizer: Adam through Pyro's ``LambdaLR`` (linear warm-up), with
Pyro's gradient clipping, which clips each parameter tensor's norm (the paper clipped the global
norm). The EMA of the network (paper: 0.9999) uses the decay min(decay, (1 + n) / (10 + n)) after
n updates, so short runs average over their recent past instead of their initialization.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pyro_ddpm import checkpoint, data as datasets
from pyro_ddpm.elbo import OBJECTIVES, objective
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import PRESETS, build_network, network_config
from pyro_ddpm.protocol import draw_timesteps
from pyro_ddpm.schedule import VARIANCES, Schedule


@dataclass
class TrainConfig:
    data: str = "digits"
    objective: str = "elbo"
    steps: int = 3000
    batch_size: int = 128
    timesteps_per_image: int = 1  # K
    T: int = 1000
    schedule: str = "linear"
    variance: str = "large"
    net: str | None = None  # a preset of pyro_ddpm.nets.PRESETS; default: the data set's
    net_overrides: dict = dataclasses.field(default_factory=dict)  # e.g. {"ch": 16}
    lr: float = 2e-4
    warmup: int | None = None  # default min(5000, steps // 10), the paper's 5000 for long runs
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    device: str = "cpu"
    log_every: int = 100
    validate: bool = False  # pyro.enable_validation during training (slower)

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; choose one of {VARIANCES}")
        if self.net is not None and self.net not in PRESETS:
            raise ValueError(f"unknown network preset {self.net!r}; choose one of {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "timesteps_per_image", "T"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")


def _ema_avg(decay: float):
    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged + (1.0 - d) * (current - averaged)

    return avg


def build(config: TrainConfig, dataset: datasets.Dataset):
    """Network, model and guide for ``config`` on ``dataset`` (on ``config.device``)."""
    preset = dict(PRESETS[config.net or dataset.preset], **config.net_overrides)
    net = build_network(preset)
    if tuple(getattr(net, "shape", dataset.shape)) != dataset.shape:
        raise ValueError(f"network preset {config.net!r} expects data of shape {net.shape}, "
                         f"but {dataset.name} has shape {dataset.shape}")
    schedule = Schedule.from_name(config.schedule, config.T)
    model = ReverseProcess(net, schedule, config.variance, DiscretizedGaussianLikelihood(dataset.levels),
                           shape=dataset.shape).to(config.device)
    guide = ForwardProcess(model.schedule, event_dim=len(dataset.shape))
    return model, guide


def train(config: TrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train, write ``out/metrics.jsonl`` and ``out/checkpoint.pt``; return the checkpoint's path."""
    config.check()
    out = Path(out)
    dataset = datasets.load(config.data, seed=0)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    pyro.enable_validation(config.validate)
    model, guide = build(config, dataset)
    net = model.eps
    train_model, weight = objective(config.objective, model)

    warmup = config.warmup if config.warmup is not None else min(5000, config.steps // 10)
    optim = pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": config.lr},
         "lr_lambda": lambda step: min(1.0, (step + 1) / max(warmup, 1))},
        clip_args={"clip_norm": config.grad_clip},
    )
    svi = SVI(train_model.per_timestep, guide.per_timestep, optim, loss=TraceMeanField_ELBO())
    ema = AveragedModel(net, avg_fn=_ema_avg(config.ema_decay), use_buffers=True)

    x_train = dataset.train.to(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch = max(1, len(x_train) // config.batch_size)
    B, K, D = min(config.batch_size, len(x_train)), config.timesteps_per_image, dataset.dims
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    log_path.unlink(missing_ok=True)
    net.train()
    start, window_loss, window_steps = time.perf_counter(), 0.0, 0
    bar = tqdm(range(config.steps), desc=f"train {config.objective}", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if step % per_epoch == 0:
            order = torch.randperm(len(x_train), generator=generator).to(config.device)
        idx = order[(step % per_epoch) * B:(step % per_epoch + 1) * B]
        x0 = x_train[idx]
        t = draw_timesteps(len(idx), K, model.T, generator, config.device)
        loss = svi.step(x0, t, weight)
        optim.step()  # the learning-rate schedulers
        ema.update_parameters(net)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training stopped: the loss became {loss} at step {step + 1}; "
                                     f"no checkpoint of this run was written")
        window_loss += loss / len(idx)
        window_steps += 1
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - start
            record = {"step": step + 1, "objective": config.objective,
                      "loss_per_image": window_loss / window_steps, "images_per_s": (step + 1) * B / elapsed}
            if config.objective == "elbo":
                record["bits_per_dim"] = record["loss_per_image"] / (D * math.log(2))
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss_per_image']:.4g}", img_s=f"{record['images_per_s']:.0f}")
            window_loss, window_steps = 0.0, 0

    state = {
        "step": config.steps,
        "config": dataclasses.asdict(config),
        "network": network_config(net),
        "schedule": {"name": config.schedule, "betas": model.schedule.betas.cpu()},
        "variance": config.variance,
        "likelihood": model.likelihood.config(),
        "data": {"name": dataset.name, "shape": list(dataset.shape), "levels": dataset.levels},
        "net": {k: v.cpu() for k, v in net.state_dict().items()},
        "ema": {k: v.cpu() for k, v in ema.module.state_dict().items()},
        "optim": optim.get_state(),
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
    }
    return checkpoint.save(state, out / checkpoint.FILENAME)
