"""Where a run executes: its device, its processes (``torchrun``), its threads, its signals, and the pool
that trains a comparison's runs side by side. None of it changes what a run computes.

- Device: :func:`resolve_device` (``"auto"``), :func:`check_device`, :func:`device_line`.
- Processes: :class:`Processes`, the rank, world size and what data-parallel training changes.
- Threads: :func:`torch_threads`, :func:`default_threads`.
- Signals: :func:`stop_on_signals` turns SIGINT/SIGTERM into a request to stop after the current step;
  :class:`Interrupted` says where the checkpoint is and how to resume; :class:`Terminated` is SIGTERM
  outside a training loop.
- Random streams: :func:`own_rng` (draws inside leave the run's stream alone).
- Side by side: :func:`parallelism` and :func:`run_side_by_side`, one process per run.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path

import torch
import torch.distributed as dist
from pyro import poutine

from pyro_ddpm.options import positive

AUTO_DEVICE = "auto"
DEVICE_HELP = "cpu, cuda, cuda:N, or auto: CUDA when torch sees a GPU, else the CPU"
THREADS_HELP = (
    "torch threads (default: $OMP_NUM_THREADS when set, 1 under pytest-xdist, else torch's choice); "
    "two jobs side by side on N cores: --threads N/2 each"
)


def resolve_device(device: str | None) -> str | None:
    """The device ``"auto"`` stands for: ``"cuda"`` when torch sees a CUDA device, else ``"cpu"``; under
    ``torchrun`` with CUDA, ``"cuda:LOCAL_RANK"`` (one GPU per process). Any other value is returned as is."""
    if device != AUTO_DEVICE:
        return device
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and local_rank is not None and local_rank.isdigit():
        return f"cuda:{int(local_rank)}"
    return "cuda"


def device_line(device: str) -> str:
    """The line a run prints first: the device it trains on (on the CPU, whether CUDA was there to use)."""
    no_cuda = torch.device(device).type == "cpu" and not torch.cuda.is_available()
    return f"pyro-ddpm: training on {device}" + (" (no CUDA device found)" if no_cuda else "")


def check_device(device: str) -> str:
    """The device ``device`` stands for (``"auto"`` resolved), or one ValueError unless it names a device this
    torch build has."""
    device = resolve_device(device)
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build/machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif d.type not in ("cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported (use cpu or cuda[:N])")
    return device


class Processes:
    """The processes of a run: rank, world size, and what data-parallel training changes (one place).

    With one process every method is the identity; under ``torchrun`` the network is wrapped in
    ``DistributedDataParallel``, both programs are scaled by the world size and values are gathered.
    """

    def __init__(self, device: str):
        self.created = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.created = True
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # where collective operations take their tensors: NCCL reduces device tensors only
        self.device = torch.device(device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")

    @property
    def many(self) -> bool:
        return self.world > 1

    def wrap(self, program):
        """The training program with its network in DistributedDataParallel (when there are many processes)."""
        if not self.many:
            return program
        return program.with_network(torch.nn.parallel.DistributedDataParallel(program.eps))

    def scale(self):
        """``poutine.scale`` by the world size: DDP averages the gradients, so each process sums B/world images."""
        return poutine.scale(scale=float(self.world)) if self.many else contextlib.nullcontext()

    def shard(self, batch: int) -> slice:
        """This process's contiguous share of a global batch of ``batch`` items."""
        if batch % self.world:
            raise ValueError(f"batch_size {batch} is not divisible by the {self.world} processes")
        n = batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The values of every process, concatenated in rank order (the global batch's)."""
        if not self.many:
            return values
        out = [torch.zeros_like(values) for _ in range(self.world)]
        dist.all_gather(out, values)
        return torch.cat(out)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.many:
            where = values.device
            values = values.to(self.device, copy=True)
            dist.all_reduce(values)
            values = (values / self.world).to(where)
        return values

    def check_in_sync(self, net: torch.nn.Module, step: int) -> None:
        if not self.many:
            return
        flat = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()]).cpu()
        summary = torch.stack(
            [flat.sum(), flat.abs().sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()]
        )
        summary = summary.to(self.device)  # NCCL gathers device tensors only
        gathered = [torch.zeros_like(summary) for _ in range(self.world)]
        dist.all_gather(gathered, summary)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"processes hold different parameters at step {step}")

    def close(self, completed: bool = True) -> None:
        """Leave the process group this object created.

        After a completed run every process first waits for the others: one that left while another still
        held the group (rank 0 writing the last checkpoint) could make that one abort as it exited. The
        group is then destroyed, and what still refers to it (the DDP wrapper, which reference cycles keep
        alive) is collected at once rather than when the interpreter shuts down. After a failure there is
        no wait: the others may never reach it, and ``torchrun`` stops them.
        """
        if self.created and dist.is_initialized():
            if completed:
                dist.barrier()
            dist.destroy_process_group()
            gc.collect()


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; the message says how to resume.

    Attributes: ``signal`` (its name), ``step``, ``steps`` (the run's total), ``checkpoint`` and ``out``;
    ``others``: the runs the same signal stopped beside this one (a comparison's processes), each an
    ``Interrupted`` of its own.
    """

    def __init__(
        self,
        signal_name: str,
        step: int,
        steps: int,
        checkpoint: Path,
        out: Path,
        resume_hint: str | None = None,
        others: tuple[Interrupted, ...] = (),
    ):
        self.signal, self.step, self.steps, self.checkpoint, self.out = signal_name, step, steps, checkpoint, out
        self.resume_hint, self.others = resume_hint, tuple(others)
        hint = resume_hint or f"pyro-ddpm train --out {out} --resume"
        also = "".join(
            f"; {o.out} stopped at step {o.step} of {o.steps}, checkpoint saved to {o.checkpoint}" for o in self.others
        )
        super().__init__(
            f"{signal_name} received: stopped at step {step} of {steps}; checkpoint saved to {checkpoint}{also}; "
            f"resume with: {hint}"
        )

    def __reduce__(self):  # it crosses processes (a comparison's workers): rebuilt from its fields, not its message
        return type(self), (
            self.signal,
            self.step,
            self.steps,
            self.checkpoint,
            self.out,
            self.resume_hint,
            self.others,
        )

    def with_hint(self, resume_hint: str) -> Interrupted:
        """The same stop with another resume instruction (e.g. re-running a comparison)."""
        return Interrupted(self.signal, self.step, self.steps, self.checkpoint, self.out, resume_hint, self.others)

    def with_others(self, signal_name: str, others: list[Interrupted]) -> Interrupted:
        """This stop and ``others`` as one, by the signal ``signal_name`` (what stopped the caller: the
        runs in its processes were stopped by the SIGTERM it sent them)."""
        return Interrupted(signal_name, self.step, self.steps, self.checkpoint, self.out, self.resume_hint, others)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (which handles it itself): stop as Ctrl-C does (the command line
    turns SIGTERM into it)."""


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a request to stop after the current step (a list: ``[signal name]`` or ``[]``).

    A second signal while the first is being honoured raises KeyboardInterrupt (stop now: an atomic
    write under way leaves the old file).
    """
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def default_threads() -> int | None:
    """The torch thread count a run uses when none is given: ``$OMP_NUM_THREADS`` when set, 1 under
    pytest-xdist (its workers share the cores), else None (torch's own choice)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return 1
    return None


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` inside, restored after; None: :func:`default_threads`."""
    if threads is None:
        threads = default_threads()
    if threads is not None:
        positive("threads", threads)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def own_rng():
    """Random numbers drawn inside are not taken from the training run's stream."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- runs side by side
def parallelism(device: str, threads: int | None, runs: int, jobs: int | None = None) -> tuple[int, int, int]:
    """(training processes, torch threads per training process, torch threads for measuring) for ``runs``
    runs of a comparison.

    A small network's training step gains little from a second thread (on 2 cores the digits eps model
    trains at the same images/s with 1 thread as with 2), so on the CPU the runs train side by side, as
    many processes as there are threads to share (or runs), each with an equal share. Measuring (batches
    of up to ``max_batch`` pairs) does use the threads -- two one-thread evaluations side by side each
    took 2.2 times as long as one with both threads -- so the runs are then measured one after another
    with every thread. The threads to share are ``threads`` per process when it is set, else torch's
    thread count (``$OMP_NUM_THREADS``, ``--threads``, or torch's choice: the physical cores). Runs on a
    GPU share one process. ``jobs`` fixes the number of training processes.
    """
    if jobs is not None:
        positive("jobs", jobs)
    budget = torch.get_num_threads()
    if jobs is None:
        if device != "cpu":
            jobs = 1
        else:
            jobs = budget // threads if threads else budget
    jobs = max(1, min(jobs, runs))
    return jobs, threads or max(1, budget // jobs), threads or budget


def _stop(signum, frame):
    raise KeyboardInterrupt


def _watch_parent(parent: int, grace: float = 60.0) -> None:
    """Stop this process once its parent is gone (killed however it was): SIGTERM (a training run saves
    its checkpoint and stops, and the process exits), and if it is still alive after ``grace`` seconds,
    exit."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)


def _start_worker(threads: int) -> None:
    """A worker process of :func:`run_side_by_side`: its own process group (the terminal's Ctrl-C goes to the
    comparison, which stops its processes once, by SIGTERM), ``threads`` torch threads, signals ignored
    between runs, and a watch on its parent (an orphan stops as on SIGTERM)."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()


def _run_task(task, args: tuple, parent: int) -> None:
    """One task in a worker process. SIGTERM stops it: inside training by saving a checkpoint (training's
    own handler), before or after it at once."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        task(*args)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.getppid() != parent:  # orphaned: nobody will read the result
            os._exit(1)


def run_side_by_side(task, tasks: dict, jobs: int, threads: int, log) -> None:
    """Call ``task(*args)`` for every ``key: args`` of ``tasks`` (``task`` a module-level function, e.g. one
    that trains a run), ``jobs`` at a time, each in a process of ``threads`` torch threads.

    A task starts only when a process is free, so a stop leaves none queued; on an interrupt or a task's
    error the tasks under way are stopped (SIGTERM: a training run saves its checkpoint) before it is
    raised again -- an interrupt as one :class:`Interrupted` naming every stopped run and the signal this
    process got, which says how to resume."""
    context = multiprocessing.get_context("spawn")  # forking a process that has run torch's thread pools can hang
    before = set(multiprocessing.active_children())
    queue, running, finished = list(tasks.items()), {}, 0
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(threads,)) as pool:
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    key, args = queue.pop(0)
                    running[pool.submit(_run_task, task, args, os.getpid())] = key
                done, _ = wait_for(running, return_when=FIRST_COMPLETED)
                for future in done:
                    key = running.pop(future)
                    future.result()
                    finished += 1
                    log(f"done: {key} ({finished} of {len(tasks)})")
        except BaseException as error:
            for child in set(multiprocessing.active_children()) - before:  # this pool's processes
                child.terminate()
            wait_for(running)
            stopped = [f.exception() for f in running if isinstance(f.exception(), Interrupted)]
            if isinstance(error, KeyboardInterrupt) and stopped:
                name = "SIGTERM" if isinstance(error, Terminated) else "SIGINT"
                raise stopped[0].with_others(name, stopped[1:]) from None
            raise
