"""What the benchmark scripts share: the machine's name, timing with device syncs, peak memory, Markdown."""

from __future__ import annotations

import platform
import resource
import shlex
import subprocess
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> str:
    """The CPU (and GPU), torch version and thread count, in one line."""
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""
    return (
        f"{cpu_name()} ({platform.machine()}){gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}"
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: str) -> float:
    """CUDA: peak allocated since the last :func:`reset_peak`; CPU: this process's peak resident set (never resets)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def timed(fn, device: str) -> float:
    """Seconds of one call of ``fn``, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def random_model(preset: str, T: int, levels: int, device: str, seed: int):
    """The preset's network (its zero-initialised layers re-drawn small, so eps_theta is not 0) in a
    reverse process with the linear schedule, large variance and a ``levels``-level decoder, in eval mode."""
    from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
    from pyro_ddpm.models import ReverseProcess
    from pyro_ddpm.nets import build_network
    from pyro_ddpm.presets import NETWORKS as PRESETS
    from pyro_ddpm.schedule import Schedule

    torch.manual_seed(seed)
    net = build_network(PRESETS[preset])
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.02)
    return ReverseProcess(net, Schedule.linear(T), "large", DiscretizedGaussianLikelihood(levels)).to(device).eval()


def fresh_process_peak(script: str, argv: list[str]) -> tuple[float, float]:
    """Run ``script argv`` in a fresh Python process that prints ``peak_mib P increase_mib I``; return (P, I).

    On CPU the resident-set peak of a process never goes down, so each phase is measured in its own process.
    """
    import sys

    out = subprocess.run([sys.executable, script, *argv], check=True, capture_output=True, text=True).stdout.split()
    return float(out[out.index("peak_mib") + 1]), float(out[out.index("increase_mib") + 1])


def memory_cells(names, peaks: dict, device: str, no_memory: bool, measure) -> tuple[str, dict]:
    """(column title, {name: cell}) of peak memory: CUDA peaks as measured in-process; on CPU
    ``measure(name) -> (peak, increase)`` in a fresh process per name (``no_memory``: not measured)."""
    if device.startswith("cuda"):
        return "peak CUDA MiB allocated", {name: f"{peaks[name]:.0f}" for name in names}
    if no_memory:
        return "peak RSS MiB (not measured)", {name: "-" for name in names}
    cells = {}
    for name in names:
        peak, increase = measure(name)
        cells[name] = f"{peak:.0f} (+{increase:.1f})"
    return "peak RSS MiB, own process (increase)", cells


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, table: str, argv: list[str], script: str) -> None:
    """Write ``table`` under ``title`` with the command that made it, atomically."""
    from pyro_ddpm.files import atomic_write

    command = shlex.join(["python", f"benchmarks/{Path(script).name}", *argv])
    text = f"{title}\n\n{table}\n`{command}`\n"
    atomic_write(path, lambda f: f.write(text.encode()))
