"""How much does one SVI step of the per-timestep form cost against a plain-torch Algorithm 1 step?

    python benchmarks/train_speed.py --preset digits --batch 128 --repeats 50

Both use the same network (same initial weights), batch, dtype and device. The baseline is
Algorithm 1 in plain torch: t ~ U{1..T}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the eps-MSE,
backward, one Adam step over all parameters. The Pyro steps are ``svi.step`` with
``TraceMeanField_ELBO`` and the trainer's optimizer (Adam through ``pyro.optim.LambdaLR`` with
per-parameter clipping), for the ``elbo`` and ``simple`` objectives. Median over repeats after warm-up;
runs are interleaved so load on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_ddpm import protocol
from pyro_ddpm.elbo import objective
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import PRESETS, build_network
from pyro_ddpm.schedule import Schedule, at

SHAPES = {"digits": ((1, 8, 8), 17), "mnist": ((1, 28, 28), 256), "cifar10": ((3, 32, 32), 256)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    pyro.enable_validation(False)
    shape, levels = SHAPES[args.preset]
    schedule = Schedule.linear(args.T).to(args.device)
    x0 = (torch.randint(0, levels, (args.batch, *shape)) * 2.0 / (levels - 1) - 1).to(args.device)
    initial = build_network(PRESETS[args.preset]).state_dict()

    def fresh_net():
        net = build_network(PRESETS[args.preset]).to(args.device)
        net.load_state_dict(initial)
        return net.train()

    # plain torch, Algorithm 1
    net = fresh_net()
    adam = torch.optim.Adam(net.parameters(), lr=2e-4)

    def torch_step():
        t = torch.randint(1, args.T + 1, (args.batch,), device=args.device)
        eps = torch.randn_like(x0)
        x_t = at(schedule.sqrt_abar, t, x0) * x0 + at(schedule.sqrt_one_minus_abar, t, x0) * eps
        loss = ((eps - net(x_t, t)) ** 2).sum()
        adam.zero_grad()
        loss.backward()
        adam.step()

    steps = {"plain torch (Algorithm 1)": torch_step}
    for name in ("elbo", "simple"):
        pyro.clear_param_store()
        model = ReverseProcess(fresh_net(), schedule, "large", DiscretizedGaussianLikelihood(levels))
        train_model, weight = objective(name, model)
        optim = pyro.optim.LambdaLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 2e-4},
                                     "lr_lambda": lambda s: 1.0}, clip_args={"clip_norm": 1.0})
        svi = SVI(train_model.per_timestep, ForwardProcess(schedule).per_timestep, optim, TraceMeanField_ELBO())

        def svi_step(svi=svi, weight=weight):
            svi.step(x0, protocol.draw_timesteps(args.batch, 1, args.T, device=args.device), weight)

        steps[f"SVI, objective {name}"] = svi_step

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {k: [] for k in steps}
    for _ in range(3):
        for step in steps.values():
            step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["plain torch (Algorithm 1)"])
    params = sum(p.numel() for p in net.parameters())
    print(f"machine  : {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, pyro {pyro.__version__}, device {args.device}")
    print(f"settings : preset {args.preset} {shape} ({params} parameters), batch {args.batch}, T {args.T}, "
          f"K 1, float32, median of {args.repeats}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28} {1000 * med:8.2f} ms/step   ratio {med / base:5.3f}")


if __name__ == "__main__":
    main()
