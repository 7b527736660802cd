"""How much does one SVI step of the trainer cost against a plain-torch Algorithm 1 step, and against the
loop a user would otherwise write with diffusers?

    python benchmarks/train_speed.py --preset digits --batch 128 --repeats 30 --fixed-cost \
        --markdown runs/bench/train.md

The plain-torch and Pyro steps use the same network (same initial weights), batch, dtype and device. The
baseline is Algorithm 1 in plain torch: t ~ U{1..T}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the
eps-MSE, backward, one Adam step over all parameters. The same step with the gradient's global norm
clipped as the trainer clips it (``TrainConfig.grad_clip``) is the next row: the trainer's optimizer
step without Pyro, so that what the SVI steps cost beyond it is what Pyro costs. The Pyro steps are
exactly the trainer's (:func:`pyro_ddpm.train.make_svi`: ``svi.step`` of the objective's program with
``TermwiseELBO``, the guide drawing x_t from the given noise, Adam with global-norm clipping and
warm-up), for the ``elbo`` and ``simple`` objectives. Ratios are to the first row.

``diffusers``: what a user would pick instead, the ecosystem's default loop (when diffusers is
installed; ``--no-diffusers`` skips it): a ``diffusers.UNet2DModel`` built from the same preset (the
same channels, levels, residual blocks and attention resolutions, single-head attention: the same
parameter count, printed beside the preset's), ``DDPMScheduler(num_train_timesteps=T).add_noise``,
the mean eps-MSE, backward and one ``AdamW`` step.

``--fixed-cost``: the same plain-torch and SVI steps with a one-parameter network (eps = w x_t) in
place of the U-Net: the SVI step's time there minus the plain step's is the fixed per-step cost of
tracing the two programs (sites, plates, masks, scales, KLs), the part of the Pyro step that does not
grow with the network. They are timed in an interleaved loop of their own, after the U-Net's: a small
step that follows a U-Net step runs with the caches that step left cold, which would bill whichever
small variant comes first for it.

Median over repeats after warm-up; the variants are interleaved so that load on a shared machine hits
all alike. Peak memory: CUDA max allocated per variant; on CPU each variant is re-run in a fresh
process and its peak resident set reported (``--no-memory`` skips).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    fresh_process_peak,
    machine,
    markdown_table,
    memory_cells,
    peak_mib,
    reset_peak,
    timed,
    write_markdown,
)

from pyro_ddpm import protocol  # noqa: E402
from pyro_ddpm.elbo import objective  # noqa: E402
from pyro_ddpm.guides import ForwardProcess  # noqa: E402
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood  # noqa: E402
from pyro_ddpm.models import ReverseProcess  # noqa: E402
from pyro_ddpm.nets import build_network  # noqa: E402
from pyro_ddpm.presets import NETWORKS as PRESETS  # noqa: E402
from pyro_ddpm.schedule import Schedule, at  # noqa: E402
from pyro_ddpm.train import TrainConfig, make_svi  # noqa: E402

SHAPES = {"digits": ((1, 8, 8), 17), "mnist": ((1, 28, 28), 256), "cifar10": ((3, 32, 32), 256)}
BASELINE = "plain torch (Algorithm 1)"
CLIPPED = "plain torch, gradient norm clipped as the trainer's"
SVI = ("SVI elbo", "SVI simple")
DIFFUSERS = "diffusers (UNet2DModel, DDPMScheduler.add_noise, AdamW)"
ONE = "1-parameter network"
FIXED = tuple(f"{name}, {ONE}" for name in ("plain torch", *SVI))
MAIN = (BASELINE, CLIPPED, *SVI, DIFFUSERS)
VARIANTS = MAIN + FIXED


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def diffusers_unet(preset: str):
    """A ``diffusers.UNet2DModel`` with the preset's architecture: block channels ch * ch_mult, the same
    residual blocks per level, attention blocks at the same resolutions (single head, as the DDPM
    U-Net's), the same dropout and GroupNorm epsilon; its parameter count equals the preset's."""
    from diffusers import UNet2DModel

    c = PRESETS[preset]
    resolutions = [c["resolution"] // 2**i for i in range(len(c["ch_mult"]))]
    attn = set(c["attn_resolutions"])
    return UNet2DModel(
        sample_size=c["resolution"],
        in_channels=c["in_channels"],
        out_channels=c["in_channels"],
        block_out_channels=tuple(c["ch"] * m for m in c["ch_mult"]),
        layers_per_block=c["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions),
        up_block_types=tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions)),
        norm_num_groups=math.gcd(32, c["ch"]),
        attention_head_dim=None,
        dropout=c["dropout"],
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
    )


class OneParameter(torch.nn.Module):
    """eps_theta(x_t, t) = w x_t: the smallest network the programs accept (for the fixed per-step cost)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.w * x


def wanted(args) -> list[str]:
    """The variants this run measures (diffusers only when installed and not switched off)."""
    names = [BASELINE, CLIPPED, *SVI]
    if args.diffusers and diffusers_available():
        names.append(DIFFUSERS)
    if args.fixed_cost:
        names += FIXED
    return names


def make_steps(args, names) -> dict:
    """The step functions of the variants ``names``, on identical networks and data, each SVI step with
    its own Pyro param-store state (the programs all name their network "eps"): ``{name: (step, state)}``."""
    torch.manual_seed(0)
    pyro.enable_validation(False)
    shape, levels = SHAPES[args.preset]
    schedule = Schedule.linear(args.T).to(args.device)
    x0 = (torch.randint(0, levels, (args.batch, *shape)) * 2.0 / (levels - 1) - 1).to(args.device)
    initial = build_network(PRESETS[args.preset]).state_dict()

    def fresh_net(one_parameter=False):
        if one_parameter:
            return OneParameter(shape).to(args.device).train()
        net = build_network(PRESETS[args.preset]).to(args.device)
        net.load_state_dict(initial)
        return net.train()

    def torch_step_of(net, clip=False):
        adam = torch.optim.Adam(net.parameters(), lr=2e-4)
        params, max_norm = list(net.parameters()), TrainConfig().grad_clip

        def torch_step():
            t = torch.randint(1, args.T + 1, (args.batch,), device=args.device)
            eps = torch.randn_like(x0)
            x_t = at(schedule.sqrt_abar, t, x0) * x0 + at(schedule.sqrt_one_minus_abar, t, x0) * eps
            loss = ((eps - net(x_t, t)) ** 2).sum()
            adam.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            adam.step()

        return torch_step

    def svi_step_of(net, name):
        model = ReverseProcess(net, schedule, "large", DiscretizedGaussianLikelihood(levels))
        program, weight = objective(name, model)
        svi = make_svi(
            TrainConfig(objective=name, T=args.T, warmup=1), program, ForwardProcess(schedule, event_dim=len(shape))
        )

        def svi_step():
            t = protocol.draw_timesteps(args.batch, 1, args.T, device=args.device)
            svi.step(x0, t, torch.randn_like(x0), weight)
            svi.optim.step()

        return svi_step

    def diffusers_step_of():
        from diffusers import DDPMScheduler

        torch.manual_seed(0)
        unet = diffusers_unet(args.preset).to(args.device).train()
        scheduler = DDPMScheduler(num_train_timesteps=args.T)
        adamw = torch.optim.AdamW(unet.parameters(), lr=2e-4)

        def diffusers_step():
            t = torch.randint(0, args.T, (args.batch,), device=args.device)
            noise = torch.randn_like(x0)
            noisy = scheduler.add_noise(x0, noise, t)
            loss = torch.nn.functional.mse_loss(unet(noisy, t).sample, noise)
            adamw.zero_grad()
            loss.backward()
            adamw.step()

        return diffusers_step

    steps = {}
    for name in names:
        if name in (BASELINE, CLIPPED):
            steps[name] = (torch_step_of(fresh_net(), clip=name == CLIPPED), None)
        elif name in SVI:
            steps[name] = (svi_step_of(fresh_net(), name.split()[1]), {"params": {}, "constraints": {}})
        elif name == DIFFUSERS:
            steps[name] = (diffusers_step_of(), None)
        elif name == FIXED[0]:
            steps[name] = (torch_step_of(fresh_net(one_parameter=True)), None)
        elif name in FIXED:
            steps[name] = (
                svi_step_of(fresh_net(one_parameter=True), name.split()[1].rstrip(",")),
                {"params": {}, "constraints": {}},
            )
        else:
            raise ValueError(f"unknown variant {name!r}")
    return steps


def run(args, names, only: bool = False) -> dict:
    """``{name: (median seconds, peak MiB)}``: the U-Net variants in one interleaved loop, then the
    one-parameter variants (``--fixed-cost``) in another (see the module docstring)."""
    steps = make_steps(args, names)
    store = pyro.get_param_store()
    times, peaks = {k: [] for k in steps}, {}
    start_peak = peak_mib(args.device)
    for name, (step, state) in steps.items():  # warm-up
        reset_peak(args.device)
        with store.scope(state) if state is not None else contextlib.nullcontext():
            for _ in range(3):
                step()
        peaks[name] = peak_mib(args.device)
    for group in ([n for n in steps if n not in FIXED], [n for n in steps if n in FIXED]):
        for _ in range(args.repeats):
            for name in group:
                step, state = steps[name]
                with store.scope(state) if state is not None else contextlib.nullcontext():
                    times[name].append(timed(step, args.device))
    if only:
        print(f"peak_mib {peaks[names[0]]:.1f} increase_mib {peaks[names[0]] - start_peak:.1f}")
    return {name: (statistics.median(ts), peaks[name]) for name, ts in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--no-diffusers",
        dest="diffusers",
        action="store_false",
        help="skip the diffusers loop (skipped anyway when diffusers is not installed)",
    )
    ap.add_argument(
        "--fixed-cost",
        action="store_true",
        help="also time the plain and SVI steps with a one-parameter network (Pyro's fixed per-step cost)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory runs on CPU")
    ap.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant (memory runs)
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    for name in ("batch", "T", "repeats"):
        if getattr(args, name) < 1 or (name == "T" and args.T < 2):
            ap.error(f"--{name} must be {'at least 2' if name == 'T' else 'positive'}")
    if args.only:
        run(args, [args.only], only=True)
        return {}

    names = wanted(args)
    result = run(args, names)
    main_names = [n for n in MAIN if n in result]
    memory_kind, memory = memory_cells(
        main_names,
        {name: result[name][1] for name in main_names},
        args.device,
        args.no_memory,
        lambda name: fresh_process_peak(
            __file__,
            [
                "--preset",
                args.preset,
                "--batch",
                str(args.batch),
                "--T",
                str(args.T),
                "--repeats",
                "2",
                "--device",
                args.device,
                "--only",
                name,
            ],
        ),
    )
    base, clipped = result[BASELINE][0], result[CLIPPED][0]
    params = sum(p.numel() for p in build_network(PRESETS[args.preset]).parameters())
    diffusers_params = sum(p.numel() for p in diffusers_unet(args.preset).parameters()) if DIFFUSERS in result else None
    if not args.diffusers:
        diffusers_note = "diffusers loop not run (--no-diffusers)"
    elif DIFFUSERS not in result:
        diffusers_note = "diffusers loop skipped: diffusers is not installed (pip install diffusers)"
    else:
        diffusers_note = None
    networks = f"{params} parameters" + (
        f"; diffusers UNet2DModel {diffusers_params} parameters" if diffusers_params is not None else ""
    )
    print(f"machine  : {machine(args.device)}, pyro {pyro.__version__}")
    print(
        f"settings : preset {args.preset} {SHAPES[args.preset][0]} ({networks}), batch {args.batch}, "
        f"T {args.T}, K 1, float32, median of {args.repeats}"
    )
    rows, out = [], {}
    width = max(len(name) for name in result)
    for name in main_names:
        med, peak = result[name]
        print(
            f"{name:<{width}} {1000 * med:8.2f} ms/step {args.batch / med:9.1f} images/s   ratio {med / base:5.3f}   "
            f"to clipped {med / clipped:5.3f}   {memory_kind} {memory[name]}"
        )
        rows.append(
            [name, f"{1000 * med:.2f}", f"{args.batch / med:.1f}", f"{med / base:.3f}", f"{med / clipped:.3f}"]
            + [memory[name]]
        )
        out[name] = {
            "seconds": med,
            "images_per_s": args.batch / med,
            "ratio": med / base,
            "ratio_to_clipped": med / clipped,
            "peak_mib": peak,
        }
    if diffusers_note:
        print(diffusers_note)
        rows.append([DIFFUSERS, "-", "-", "-", "-", "skipped" if args.diffusers else "not run"])
        out[DIFFUSERS] = {"skipped": diffusers_note}
    table = markdown_table(["step", "ms/step", "images/s", "ratio", "ratio to clipped", memory_kind], rows)
    if diffusers_note:
        table += f"\n{diffusers_note}.\n"
    if args.fixed_cost:
        plain = result[FIXED[0]][0]
        fixed_rows = []
        for name in FIXED:
            med = result[name][0]
            extra = "" if name == FIXED[0] else f"{1000 * (med - plain):.2f}"
            print(f"{name:<{width}} {1000 * med:8.2f} ms/step" + (f"   fixed cost {extra} ms/step" if extra else ""))
            fixed_rows.append([name, f"{1000 * med:.2f}", extra])
            out[name] = {"seconds": med, "fixed_cost_s": None if name == FIXED[0] else med - plain}
        table += (
            "\nThe fixed per-step cost of tracing the two programs (eps = w x_t, one parameter):\n\n"
            + markdown_table(["step, 1-parameter network", "ms/step", "SVI - plain torch, ms/step"], fixed_rows)
        )
    if args.markdown:
        title = (
            f"Training step, preset {args.preset} ({networks}), batch {args.batch}, T {args.T}, {machine(args.device)}"
        )
        write_markdown(args.markdown, title, table, argv if argv is not None else sys.argv[1:], __file__)
    out["parameters"] = {"pyro_ddpm": params, "diffusers": diffusers_params}
    return out


if __name__ == "__main__":
    main()
