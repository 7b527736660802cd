"""A guide of one's own: a forward process whose schedule learns only its two endpoints, trained with the model.

    python examples/custom_guide.py            # T = 100, 400 steps on digits: about a minute on CPU
    python examples/custom_guide.py --quick    # T = 10, a few steps: seconds

The recipe: write a Pyro program that follows :mod:`pyro_ddpm.protocol`, register its class
(``@GUIDES.register(name=...)``) and name it to the trainer, train, evaluate and sample, with no change
to the library. Here the program is the forward process q(x_{1:T} | x_0) of Ho et al. (2020) (Eqs. 4,
6, 7: :class:`ForwardProcess`, unchanged) over a schedule with two parameters. In continuous time the
variational bound depends on the noise schedule only through its endpoints (Kingma et al. 2021, VDM,
section 5.1): so keep the *shape* of a fixed schedule and learn where it starts and ends. With
gamma_t = -log SNR_t = log((1 - abar_t) / abar_t), so that abar_t = sigmoid(-gamma_t), and s_t the
fixed schedule's gamma rescaled to run from 0 (t = 1) to 1 (t = T),

    gamma_t = g_1 + softplus(d) s_t,      s_t = (gamma^fixed_t - gamma^fixed_1) / (gamma^fixed_T - gamma^fixed_1),

gamma is strictly increasing whatever (g_1, d), gamma_1 = g_1 and gamma_T = g_1 + softplus(d): the two
endpoints, both free. With abar_0 = 1,

    beta_t = 1 - abar_t / abar_{t-1} = -expm1(log sigmoid(-gamma_t) - log sigmoid(-gamma_{t-1})),

each in (0, 1), and every constant of the bound (Eqs. 4, 7, 11, 12) follows by the library's
:func:`~pyro_ddpm.schedule.derive`, differentiably, in float64. Started at g_1 = gamma^fixed_1 and
softplus(d) = gamma^fixed_T - gamma^fixed_1, the guide first *is* that fixed guide (``linear`` or
``cosine`` with T steps). The model is built around ``guide.schedule`` by the trainer and the guide
registers the two parameters with ``pyro.module``, so one ``SVI`` step on the true bound (objective
``elbo``: Eq. 5; L_T = KL(q(x_T | x_0) || N(0, I)) pulls gamma_T up, the small-t terms pull gamma_1 to
where the decoder and the first transitions cost least) trains network and endpoints together. For any
parameter values the two programs are the fixed-schedule programs of those betas, so the bound stays
a bound. (The library's own learned schedules: VDM's monotone network, ``guides/learned_schedule.py``,
and a free table of increments, ``guides/learned_table.py``.)

Prints the per-term bound on the digits test split (bits/dim), how the schedule moved (abar_t and
gamma_t at a few t before and after), and writes ``samples.png``, ``schedule.png`` (gamma_t before and
after) and ``custom_guide.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from torch import nn

from pyro_ddpm import checkpoint, data, grid, protocol, stats
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.evaluate import bound, format_summary, summarize
from pyro_ddpm.figures import new_figure, save_figure
from pyro_ddpm.files import atomic_write
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.guides.learned_schedule import GammaSchedule, softplus_inverse
from pyro_ddpm.registry import GUIDES
from pyro_ddpm.sample import sample, save_png
from pyro_ddpm.schedule import Schedule
from pyro_ddpm.train import TrainConfig, train

NAME = "custom_guide"


class EndpointSchedule(GammaSchedule):
    """gamma_t = g_1 + softplus(d) s_t: a fixed schedule's shape s_t with two learned endpoints.

    :class:`~pyro_ddpm.guides.GammaSchedule` turns gamma_1..gamma_T into beta_t and every constant of the
    bound (as properties, cached under ``torch.no_grad()``); only gamma is defined here.

    :param betas: the fixed schedule beta_1..beta_T (T >= 2) whose shape is kept and where it starts.
    """

    def __init__(self, betas):
        super().__init__()
        gamma = self.start_at(betas)  # the fixed schedule's gamma_t; records T and the start
        span = gamma[-1] - gamma[0]
        self.register_buffer("shape", (gamma - gamma[0]) / span)  # s_t: 0 at t = 1, 1 at t = T
        self.g_1 = nn.Parameter(gamma[0].clone())
        self.d = nn.Parameter(softplus_inverse(span))

    def gamma_t(self) -> torch.Tensor:
        """gamma_1..gamma_T (float64), strictly increasing."""
        return self.g_1 + F.softplus(self.d) * self.shape


@GUIDES.register(name=NAME)
class EndpointForwardProcess(ForwardProcess):
    """:class:`ForwardProcess` (Eqs. 4, 6, 7) over an :class:`EndpointSchedule` (which it registers with Pyro,
    as it does any schedule that has parameters). Registered as ``"custom_guide"``: a checkpoint names it
    so, and any process that imports this file can rebuild the guide from it."""

    def config(self) -> dict:
        """The betas the schedule started at (its learned endpoints are the guide's ``state_dict()``)."""
        return {"start": self.schedule.start, "event_dim": self.event_dim}

    @classmethod
    def from_config(cls, *, start, event_dim: int | None = None) -> EndpointForwardProcess:
        return cls(EndpointSchedule(start), event_dim=event_dim)

    @classmethod
    def from_spec(cls, T: int, spec: str = "linear", event_dim: int | None = None) -> EndpointForwardProcess:
        """The schedule started at the fixed schedule ``spec`` (``linear`` or ``cosine``) with T steps."""
        return cls(EndpointSchedule(Schedule.from_name(spec, T).betas), event_dim=event_dim)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/examples/{NAME}", help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 400; --quick: 20)")
    ap.add_argument("--T", type=int, default=None, help="diffusion steps (default 100; --quick: 10)")
    ap.add_argument(
        "--init",
        default="linear",
        choices=["linear", "cosine"],
        help="the schedule whose shape is kept and where it starts",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny network, T = 10, a few steps (for tests)")
    args = ap.parse_args(argv)
    for name, (quick, full) in {"steps": (20, 400), "T": (10, 100)}.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.T < 2:
        raise ValueError(f"--T must be at least 2, got {args.T}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    digits = data.load("digits")
    config = TrainConfig(
        data="digits",
        objective="elbo",
        guide=NAME,
        schedule=args.init,
        T=args.T,
        steps=args.steps,
        seed=args.seed,
        lr=1e-3,
        batch_size=32 if args.quick else 64,
        net_overrides={"ch": 8} if args.quick else {},
        log_every=max(1, args.steps // 10),
        checkpoint_every=args.steps,
    )
    before = EndpointForwardProcess.from_spec(args.T, args.init).schedule
    run = out / "run"
    ckpt = train(config, run, progress=not args.quick, resume=(run / checkpoint.FILENAME).exists())
    pyro.clear_param_store()
    model, guide = checkpoint.build(checkpoint.load(ckpt))  # rebuilt from the checkpoint: the stored endpoints

    x = digits.test if not args.quick else digits.test[:16]
    summary = summarize(bound(model, guide, x))
    print(
        format_summary(
            summary, header=f"digits test split, T = {args.T}, endpoints learned from {args.init!r}, {args.steps} steps"
        )
    )

    with torch.no_grad():
        g0, g1 = before.gamma_t().numpy(), guide.schedule.gamma_t().numpy()
        a0, a1 = before.abar.numpy(), guide.schedule.abar.numpy()
        # L_T = KL(q(x_T | x_0) || N(0, I)) depends on the guide only: read it off the traced terms of the
        # pair built around the initial schedule, as the trainer builds it (Model(net, schedule, ...)).
        start = EndpointForwardProcess(before, event_dim=len(digits.shape))
        start_model = type(model)(model.eps, before, model.variance, model.likelihood, shape=model.shape)
        ones = torch.ones(len(x), 1, dtype=torch.long)
        prior = TermwiseELBO().terms(start_model.per_timestep, start.per_timestep, x, ones)[protocol.X_T]
        L_T_before = stats.bits_per_dim(float(prior.value.sum()), len(x) * digits.dims)
    print(
        f"\nL_T (test split, bits/dim): {L_T_before:.5f} at the initial schedule -> "
        f"{summary['prior_L_T']['bits_per_dim']:.5f} at the learned one"
    )
    at_t = sorted({1, max(1, args.T // 4), max(1, args.T // 2), max(1, 3 * args.T // 4), args.T})
    print("\nthe schedule, before -> after training:")
    print(f"{'t':>6} {'abar_t before':>14} {'abar_t after':>14} {'gamma_t before':>15} {'gamma_t after':>14}")
    for t in at_t:
        print(f"{t:>6} {a0[t]:>14.6g} {a1[t]:>14.6g} {g0[t - 1]:>15.4f} {g1[t - 1]:>14.4f}")

    pyro.set_rng_seed(args.seed)
    samples = sample(model, 64 if not args.quick else 16)
    save_png(samples, out / "samples.png")
    fig, ((ax,),) = new_figure(size=(5, 3.5))
    t = np.arange(1, args.T + 1)
    ax.plot(t, g0, label=f"start ({args.init})")
    ax.plot(t, g1, label=f"after {args.steps} steps")
    ax.set(xlabel="t", ylabel="gamma_t = -log SNR_t", title="learned endpoints")
    ax.legend()
    save_figure(fig, out / "schedule.png")

    result = {
        "T": args.T,
        "steps": args.steps,
        "init": args.init,
        "seed": args.seed,
        "guide": config.guide,
        "test_images": len(x),
        "t": at_t,
        "bits_per_dim": {
            k: summary[k]["bits_per_dim"] for k in ("total", "prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0")
        },
        "L_T_before": L_T_before,
        "gamma_before": g0.tolist(),
        "gamma_after": g1.tolist(),
        "abar_before": a0.tolist(),
        "abar_after": a1.tolist(),
        "samples_levels": sorted({int(v) for v in grid.position(samples, digits.levels).round().flatten().tolist()}),
    }
    atomic_write(out / f"{NAME}.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"\nwrote {out / 'samples.png'}, {out / 'schedule.png'}, {out / f'{NAME}.json'} and the run in {run}")
    return result


if __name__ == "__main__":
    main()
