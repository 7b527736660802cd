"""How much slower is ``pyro_ddpm.evaluate.bound`` than the network passes it cannot avoid?

One run, one randomly initialised network of a ``pyro_ddpm.nets`` preset, the same images, float32:

- ``bound``: :func:`pyro_ddpm.evaluate.bound` (Pyro traces of the per-timestep form, every term, the
  progressive-coding distortion), one noise draw;
- ``baseline``: plain torch under ``no_grad``: x_t ~ q(x_t | x_0) and eps_theta(x_t, t) over the same
  N * T (image, timestep) pairs in the same calls as ``bound`` makes (images_per_call = max(1,
  max_batch // T) images times steps_per_call = min(T, max_batch) timesteps per call).

Each is warmed up on its first row of calls, then timed ``--repeats`` times, alternating the two so that
load from other processes hits both alike; the medians and their ratio bound / baseline are printed
(the aim is <= 1.10). Peak memory: CUDA max allocated per phase; on CPU each phase is re-run once in a
fresh process, which reports its peak resident set and, in brackets, the increase over its peak before
the phase (``--no-memory`` skips those runs). Nothing is asserted.

    python benchmarks/evaluate_speed.py --preset digits --T 100 --images 64 --max-batch 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import math
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

from pyro_ddpm import data  # noqa: E402
from pyro_ddpm.evaluate import bound  # noqa: E402
from pyro_ddpm.guides import ForwardProcess  # noqa: E402
from pyro_ddpm.nets import build_network  # noqa: E402
from pyro_ddpm.presets import NETWORKS as PRESETS  # noqa: E402
from pyro_ddpm.schedule import at  # noqa: E402

DATASETS = {"digits": "digits", "toy2d": "swiss_roll"}  # presets with a shipped data set; others: random grid data
PHASES = ("baseline", "bound")


def make_images(preset: str, n: int, seed: int):
    """(images, levels): the test split of the preset's data set (repeated if short), or 256-level noise."""
    if preset in DATASETS:
        ds = data.load(DATASETS[preset])
        return torch.cat([ds.test] * math.ceil(n / len(ds.test)))[:n], ds.levels
    shape = build_network(PRESETS[preset]).shape
    k = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed))
    return k.float() * (2.0 / 255.0) - 1.0, 256


@torch.no_grad()
def baseline(model, x0: torch.Tensor, max_batch: int) -> None:
    """x_t ~ q(x_t | x_0) and eps_theta(x_t, t) for every (image, t), chunked as ``bound`` chunks them."""
    s, T = model.schedule, model.T
    images_per_call, steps_per_call = max(1, max_batch // T), min(T, max_batch)
    for i in range(0, x0.shape[0], images_per_call):
        x = x0[i : i + images_per_call]
        for t0 in range(1, T + 1, steps_per_call):
            steps = torch.arange(t0, min(t0 + steps_per_call, T + 1), device=x.device)
            t = steps.repeat(x.shape[0])
            xs = x.repeat_interleave(len(steps), 0)
            x_t = at(s.sqrt_abar, t, xs) * xs + at(s.sqrt_one_minus_abar, t, xs) * torch.randn_like(xs)
            model.eps(x_t, t)


def setup(args):
    x, levels = make_images(args.preset, args.images, args.seed)
    model = random_model(args.preset, args.T, levels, args.device, args.seed)
    guide = ForwardProcess(model.schedule, event_dim=len(model.shape))
    runs = {
        "baseline": lambda xs: baseline(model, xs, args.max_batch),
        "bound": lambda xs: bound(model, guide, xs, max_batch=args.max_batch, seed=args.seed),
    }
    return model, x.to(args.device), runs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the per-phase memory runs on CPU")
    p.add_argument("--only", choices=PHASES, help=argparse.SUPPRESS)  # one phase's memory (a fresh process)
    p.add_argument("--markdown", type=Path, help="also write the result as a Markdown table here")
    args = p.parse_args(argv)

    model, x, runs = setup(args)
    T, N = args.T, x.shape[0]
    images_per_call, steps_per_call = max(1, args.max_batch // T), min(T, args.max_batch)
    if args.only:
        runs[args.only](x[:images_per_call])
        before = peak_mib(args.device)
        runs[args.only](x)
        after = peak_mib(args.device)
        print(f"peak_mib {after:.1f} increase_mib {after - before:.1f}")
        return {}
    calls = math.ceil(N / images_per_call) * math.ceil(T / steps_per_call)
    for run in runs.values():  # warm-up
        run(x[:images_per_call])
    times, peaks = {name: [] for name in runs}, {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            reset_peak(args.device)
            times[name].append(timed(lambda run=run: run(x), args.device))
            peaks[name] = max(peaks.get(name, 0.0), peak_mib(args.device))
    median = {name: statistics.median(v) for name, v in times.items()}
    ratio = median["bound"] / median["baseline"]
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
                str(T),
                "--images",
                str(N),
                "--max-batch",
                str(args.max_batch),
                "--device",
                args.device,
                "--seed",
                str(args.seed),
                "--only",
                name,
            ],
        ),
    )

    title = (
        f"Evaluation, preset {args.preset} {tuple(model.shape)} ({sum(p.numel() for p in model.eps.parameters())} "
        f"parameters), T {T}, {N} images, max batch {args.max_batch} ({calls} calls, {N * T} pairs), float32, "
        f"pyro validation {'on' if pyro.infer.util.is_validation_enabled() else 'off'}, median of {args.repeats}; "
        f"{machine(args.device)}"
    )
    print(title)
    rows = []
    for name in runs:
        print(
            f"{name:<10}: median {median[name]:.3f} s ({N * T / median[name]:.0f} pairs/s) over "
            f"[{', '.join(f'{t:.3f}' for t in times[name])}], {memory_kind} {memory[name]}"
        )
        rows.append([name, f"{median[name]:.3f}", f"{N * T / median[name]:.0f}", memory[name]])
    print(f"ratio     : bound / baseline = {ratio:.3f} (target <= 1.10)")
    if args.markdown:
        table = markdown_table(["phase", "median s", "pairs/s", memory_kind], rows)
        table += "\n" + markdown_table(
            ["time ratio", "value", "target"], [["bound / baseline", f"{ratio:.3f}", "<= 1.10"]]
        )
        write_markdown(args.markdown, title, table, argv if argv is not None else sys.argv[1:], __file__)
    return {"median_s": median, "ratio": ratio, "peak_mib": peaks}


if __name__ == "__main__":
    main()
