"""How much does one SVI step of the trainer cost against a plain-torch Algorithm 1 step?

    python benchmarks/train_speed.py --preset digits --batch 128 --repeats 30 --markdown runs/bench/train.md

Both use the same network (same initial weights), batch, dtype and device. The baseline is
Algorithm 1 in plain torch: t ~ U{1..T}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the eps-MSE,
backward, one Adam step over all parameters. The Pyro steps are exactly the trainer's
(:func:`pyro_ddpm.train.make_svi`: ``svi.step`` of the objective's program with ``TermwiseELBO``,
the guide drawing x_t from the given noise, Adam with global-norm clipping and warm-up), for the
``elbo`` and ``simple`` objectives. Median over repeats after warm-up; the three are interleaved so
that load on a shared machine hits all alike. Peak memory: CUDA max allocated per variant; on CPU
each variant is re-run in a fresh process and its peak resident set reported (``--no-memory`` skips).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (fresh_process_peak, machine, markdown_table, memory_cells, peak_mib, reset_peak, timed,  # noqa: E402
                    write_markdown)

from pyro_ddpm import protocol  # noqa: E402
from pyro_ddpm.guides import ForwardProcess  # noqa: E402
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood  # noqa: E402
from pyro_ddpm.models import ReverseProcess  # noqa: E402
from pyro_ddpm.nets import build_network  # noqa: E402
from pyro_ddpm.presets import NETWORKS as PRESETS  # noqa: E402
from pyro_ddpm.schedule import Schedule, at  # noqa: E402
from pyro_ddpm.elbo import objective  # noqa: E402
from pyro_ddpm.train import TrainConfig, make_svi  # noqa: E402

SHAPES = {"digits": ((1, 8, 8), 17), "mnist": ((1, 28, 28), 256), "cifar10": ((3, 32, 32), 256)}
BASELINE = "plain torch (Algorithm 1)"
VARIANTS = (BASELINE, "SVI elbo", "SVI simple")


def make_steps(args, only=None) -> dict:
    """The step functions of the variants (all, or ``only`` one), on identical networks and data, each
    with its own Pyro param-store state (the programs all name their network "eps"): ``{name: (step, state)}``."""
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

    steps = {}
    if only in (None, BASELINE):
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

        steps[BASELINE] = (torch_step, None)
    for name in ("elbo", "simple"):
        if only not in (None, f"SVI {name}"):
            continue
        model = ReverseProcess(fresh_net(), schedule, "large", DiscretizedGaussianLikelihood(levels))
        program, weight = objective(name, model)
        svi = make_svi(TrainConfig(objective=name, T=args.T, warmup=1), program,
                       ForwardProcess(schedule, event_dim=len(shape)))

        def svi_step(svi=svi, weight=weight):
            t = protocol.draw_timesteps(args.batch, 1, args.T, device=args.device)
            svi.step(x0, t, torch.randn_like(x0), weight)
            svi.optim.step()

        steps[f"SVI {name}"] = (svi_step, {"params": {}, "constraints": {}})
    return steps


def run(args, only=None) -> dict:
    steps = make_steps(args, only)
    store = pyro.get_param_store()
    times, peaks = {k: [] for k in steps}, {}
    start_peak = peak_mib(args.device)
    for name, (step, state) in steps.items():  # warm-up
        reset_peak(args.device)
        with store.scope(state) if state is not None else contextlib.nullcontext():
            for _ in range(3):
                step()
        peaks[name] = peak_mib(args.device)
    for _ in range(args.repeats):
        for name, (step, state) in steps.items():
            with store.scope(state) if state is not None else contextlib.nullcontext():
                times[name].append(timed(step, args.device))
    if only is not None:
        print(f"peak_mib {peaks[only]:.1f} increase_mib {peaks[only] - start_peak:.1f}")
    return {name: (statistics.median(ts), peaks[name]) for name, ts in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory runs on CPU")
    ap.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant (memory runs)
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    if args.only:
        run(args, args.only)
        return {}

    result = run(args)
    memory_kind, memory = memory_cells(result, {name: peak for name, (_, peak) in result.items()}, args.device,
                                       args.no_memory, lambda name: fresh_process_peak(__file__, [
                                           "--preset", args.preset, "--batch", str(args.batch), "--T", str(args.T),
                                           "--repeats", "2", "--device", args.device, "--only", name]))
    base = result[BASELINE][0]
    params = sum(p.numel() for p in build_network(PRESETS[args.preset]).parameters())
    print(f"machine  : {machine(args.device)}, pyro {pyro.__version__}")
    print(f"settings : preset {args.preset} {SHAPES[args.preset][0]} ({params} parameters), batch {args.batch}, "
          f"T {args.T}, K 1, float32, median of {args.repeats}")
    rows = []
    for name, (med, peak) in result.items():
        print(f"{name:<28} {1000 * med:8.2f} ms/step   ratio {med / base:5.3f}   {memory_kind} {memory[name]}")
        rows.append([name, f"{1000 * med:.2f}", f"{med / base:.3f}", memory[name]])
    if args.markdown:
        write_markdown(args.markdown, f"Training step, preset {args.preset}, batch {args.batch}, T {args.T}, "
                       f"{machine(args.device)}", markdown_table(["step", "ms/step", "ratio", memory_kind], rows),
                       argv if argv is not None else sys.argv[1:], __file__)
    return {name: {"seconds": med, "ratio": med / base, "peak_mib": peak} for name, (med, peak) in result.items()}


if __name__ == "__main__":
    main()
