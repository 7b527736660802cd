"""How much does sampling through the Pyro chain cost against the network passes it cannot avoid, and
how much faster is DDIM?

    python benchmarks/sample_speed.py --preset digits --T 1000 --images 16 --ddim-steps 50 --repeats 3 \\
        --markdown runs/bench/sample.md

One run, one randomly initialised network of a ``pyro_ddpm.nets`` preset (its zero-initialised layers
re-drawn small, so eps_theta is not 0), the same N images per batch, float32, one device:

- ``forward``: T plain calls ``net(x, t)`` over N images under ``torch.no_grad()``, t = T..1;
- ``ancestral``: :func:`pyro_ddpm.sample.sample` ``(model, N)``: the model's chain form (Algorithm 2,
  T Pyro sites, under ``no_grad``), as ``pyro-ddpm sample`` runs it;
- ``ddim``: ``sample(model, N, "ddim", steps=S)``: the DDIM program over S respaced steps, eta = 0.

Each phase is warmed up once (``forward`` and ``ancestral`` on min(T, S) steps, ``ddim`` in full), then
timed ``--repeats`` times, the phases alternating so that load from other processes hits all alike;
figures are medians. Ratios: ancestral / forward (the aim is <= 1.10) and ancestral / ddim (the aim is
>= 15 for T = 1000, S = 50). Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of each phase
after a reset; on CPU each phase is re-run once in a fresh process, which reports its peak resident
set (``ru_maxrss``, which never goes down within a process) and, in brackets, the increase over its
peak before the phase (imports, network). ``--no-memory`` skips those runs. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    fresh_process_peak,
    machine,
    markdown_table,
    memory_cells,
    peak_mib,
    random_model,  # noqa: E402
    reset_peak,
    timed,
    write_markdown,
)

from pyro_ddpm.models import ReverseProcess  # noqa: E402
from pyro_ddpm.presets import NETWORKS as PRESETS  # noqa: E402
from pyro_ddpm.sample import sample  # noqa: E402

PHASES = ("forward", "ancestral", "ddim")
LEVELS = {"digits": 17}  # 8-bit data otherwise


def make_model(preset: str, T: int, device: str, seed: int) -> ReverseProcess:
    return random_model(preset, T, LEVELS.get(preset, 256), device, seed)


@torch.no_grad()
def forward_passes(model: ReverseProcess, n: int, steps: int) -> None:
    """``steps`` calls of the bare network over n images, t counting down from T."""
    x = torch.randn((n, *model.shape), device=model.schedule.beta.device)
    t = torch.empty(n, dtype=torch.long, device=x.device)
    for step in range(model.T, model.T - steps, -1):
        model.eps(x, t.fill_(step))


def phases(model: ReverseProcess, n: int, ddim_steps: int, warm: bool = False) -> dict:
    """Each phase as a function of no arguments; ``warm``: the short warm-up versions."""
    short = min(model.T, ddim_steps)
    return {
        "forward": lambda: forward_passes(model, n, short if warm else model.T),
        "ancestral": lambda: sample(model, n, steps=short if warm else None, batch_size=n),
        "ddim": lambda: sample(model, n, "ddim", steps=ddim_steps, batch_size=n),
    }


def one_phase_memory(args) -> None:
    """In a fresh process: run one phase once (after its warm-up) and print its peak memory."""
    model = make_model(args.preset, args.T, args.device, args.seed)
    before = peak_mib(args.device)
    phases(model, args.images, args.ddim_steps, warm=True)[args.only]()
    phases(model, args.images, args.ddim_steps)[args.only]()
    after = peak_mib(args.device)
    print(f"peak_mib {after:.1f} increase_mib {after - before:.1f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-phase memory runs on CPU")
    ap.add_argument("--only", choices=PHASES, help=argparse.SUPPRESS)  # one phase's memory (a fresh process)
    ap.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    args = ap.parse_args(argv)
    for name in ("T", "images", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be positive")
    if not 2 <= args.ddim_steps <= args.T:
        ap.error(f"--ddim-steps must satisfy 2 <= S <= T = {args.T}")
    if args.only:
        one_phase_memory(args)
        return {}

    model = make_model(args.preset, args.T, args.device, args.seed)
    runs = phases(model, args.images, args.ddim_steps)
    peaks = {}
    for warm_up in phases(model, args.images, args.ddim_steps, warm=True).values():
        warm_up()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            reset_peak(args.device)
            times[name].append(timed(run, args.device))
            peaks[name] = max(peaks.get(name, 0.0), peak_mib(args.device))
    median = {name: statistics.median(v) for name, v in times.items()}
    memory_kind, memory = memory_cells(
        runs,
        peaks,
        args.device,
        args.no_memory,
        lambda name: fresh_process_peak(
            __file__,
            [
                "--preset",
                args.preset,
                "--T",
                str(args.T),
                "--images",
                str(args.images),
                "--ddim-steps",
                str(args.ddim_steps),
                "--device",
                args.device,
                "--seed",
                str(args.seed),
                "--only",
                name,
            ],
        ),
    )

    T, N, S = args.T, args.images, args.ddim_steps
    calls = {"forward": T, "ancestral": T, "ddim": S}
    params = sum(p.numel() for p in model.eps.parameters())
    title = (
        f"Sampling, preset {args.preset} {model.shape} ({params} parameters), {N} images, T {T}, DDIM {S} steps, "
        f"float32, pyro validation {'on' if pyro.infer.util.is_validation_enabled() else 'off'}, "
        f"median of {args.repeats}; {machine(args.device)}"
    )
    print(title)
    rows = []
    for name in runs:
        per_call = 1000 * median[name] / calls[name]
        print(
            f"{name:<10} {calls[name]:>5} network calls  median {median[name]:8.3f} s  ({per_call:.2f} ms/call) over "
            f"[{', '.join(f'{t:.3f}' for t in times[name])}]  {memory_kind} {memory[name]}"
        )
        rows.append([name, str(calls[name]), f"{median[name]:.3f}", f"{per_call:.2f}", memory[name]])
    figures = {
        "ancestral / forward": median["ancestral"] / median["forward"],
        "ancestral / ddim": median["ancestral"] / median["ddim"],
    }
    targets = {"ancestral / forward": "<= 1.10", "ancestral / ddim": ">= 15 (T 1000, S 50)"}
    for name, value in figures.items():
        print(f"ratio {name:<20} {value:.3f} (target {targets[name]})")
    table = markdown_table(["phase", "network calls", "median s", "ms per call", memory_kind], rows)
    table += "\n" + markdown_table(
        ["time ratio", "value", "target"], [[name, f"{value:.3f}", targets[name]] for name, value in figures.items()]
    )
    if args.markdown:
        write_markdown(args.markdown, title, table, argv if argv is not None else sys.argv[1:], __file__)
    return {"median_s": median, "ratios": figures, "peak_mib": peaks}


if __name__ == "__main__":
    main()
