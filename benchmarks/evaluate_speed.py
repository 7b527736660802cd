"""How much slower is ``pyro_ddpm.evaluate.bound`` than the network passes it cannot avoid?

One run, one randomly initialised network of a ``pyro_ddpm.nets`` preset, the same images, float32:

- ``bound``: :func:`pyro_ddpm.evaluate.bound` (Pyro traces of the per-timestep form, every term, the
  progressive-coding distortion), one noise draw;
- ``baseline``: plain torch under ``no_grad``: x_t ~ q(x_t | x_0) and eps_theta(x_t, t) over the same
  N * T (image, timestep) pairs in the same calls as ``bound`` makes (images_per_call = max(1,
  max_batch // T) images times steps_per_call = min(T, max_batch) timesteps per call).

Each is warmed up on its first row of calls, then timed ``--repeats`` times, alternating the two so that
load from other processes hits both alike; the medians and their ratio bound / baseline are printed
(the aim is <= 1.10). Nothing is asserted.

    python benchmarks/evaluate_speed.py --preset digits --T 100 --images 64 --max-batch 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import pyro
import torch

from pyro_ddpm import data
from pyro_ddpm.evaluate import bound
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import PRESETS, build_network
from pyro_ddpm.schedule import Schedule, at

DATASETS = {"digits": "digits", "toy2d": "swiss_roll"}  # presets with a shipped data set; others: random grid data


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def make_model(preset: str, T: int, levels: int, device: str, seed: int):
    """The preset's network with its zero-initialised layers re-drawn small, so eps_theta is not 0."""
    torch.manual_seed(seed)
    net = build_network(PRESETS[preset])
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.02)
    schedule = Schedule.linear(T)
    model = ReverseProcess(net, schedule, "large", DiscretizedGaussianLikelihood(levels)).to(device).eval()
    return model, ForwardProcess(model.schedule, event_dim=len(model.shape))


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
        x = x0[i:i + images_per_call]
        for t0 in range(1, T + 1, steps_per_call):
            steps = torch.arange(t0, min(t0 + steps_per_call, T + 1), device=x.device)
            t = steps.repeat(x.shape[0])
            xs = x.repeat_interleave(len(steps), 0)
            x_t = at(s.sqrt_abar, t, xs) * xs + at(s.sqrt_one_minus_abar, t, xs) * torch.randn_like(xs)
            model.eps(x_t, t)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_mib(device: str) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS so far (it never goes down)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def timed(fn, device: str) -> tuple[float, float]:
    """(seconds, peak memory in MiB) of one call of ``fn``."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start, peak_mib(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, help="also write the result as a Markdown table here")
    args = p.parse_args(argv)

    x, levels = make_images(args.preset, args.images, args.seed)
    model, guide = make_model(args.preset, args.T, levels, args.device, args.seed)
    x = x.to(args.device)
    T, N = args.T, x.shape[0]
    images_per_call, steps_per_call = max(1, args.max_batch // T), min(T, args.max_batch)
    calls = math.ceil(N / images_per_call) * math.ceil(T / steps_per_call)
    runs = {
        "baseline": lambda xs: baseline(model, xs, args.max_batch),
        "bound": lambda xs: bound(model, guide, xs, max_batch=args.max_batch, seed=args.seed),
    }
    times = {name: [] for name in runs}
    peaks = {name: timed(lambda: run(x[:images_per_call]), args.device)[1] for name, run in runs.items()}  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds, peak = timed(lambda: run(x), args.device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    median = {name: statistics.median(v) for name, v in times.items()}
    ratio = median["bound"] / median["baseline"]

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "process peak RSS (cumulative)"
    print(f"machine   : {cpu_name()} ({platform.machine()}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, pyro {pyro.__version__}, device {args.device} ({device_name})")
    print(f"settings  : preset {args.preset} shape {tuple(model.shape)} ({sum(p.numel() for p in model.eps.parameters())} "
          f"parameters), T {T}, {N} images, max batch {args.max_batch} -> {images_per_call} image(s) x "
          f"{steps_per_call} step(s) per call, {calls} calls, {N * T} pairs, float32, "
          f"pyro validation {'on' if pyro.infer.util.is_validation_enabled() else 'off'}, {args.repeats} repeat(s)")
    for name in runs:
        print(f"{name:<10}: median {median[name]:.3f} s ({N * T / median[name]:.0f} pairs/s) over "
              f"[{', '.join(f'{t:.3f}' for t in times[name])}], {memory} {peaks[name]:.0f} MiB")
    print(f"ratio     : bound / baseline = {ratio:.3f} (target <= 1.10)")

    if args.markdown:
        from pyro_ddpm.checkpoint import atomic_write

        table = (
            "| preset | T | images | max batch | device | threads | baseline (s) | bound (s) | ratio | peak MiB baseline / bound |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {args.preset} | {T} | {N} | {args.max_batch} | {args.device} ({device_name}) | {torch.get_num_threads()} "
            f"| {median['baseline']:.3f} | {median['bound']:.3f} | {ratio:.3f} "
            f"| {peaks['baseline']:.0f} / {peaks['bound']:.0f} |\n"
        )
        atomic_write(args.markdown, lambda f: f.write(table.encode()))
    return {"median_s": median, "ratio": ratio, "peak_mib": peaks}


if __name__ == "__main__":
    main()
