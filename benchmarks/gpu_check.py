"""One prepared check of the whole project on a device: train, resume, bound, sample, benchmarks.

    python benchmarks/gpu_check.py --device cuda --out runs/gpu_check   # on a GPU (or: bash benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --small --out runs/gpu_check   # the CI mode: tiny sizes, seconds

In order, stopping at the first failure with one line ``gpu_check: FAILED <what>: <why>`` and exit code 1:

1. environment: torch, Pyro, the device (and diffusers, optional);
2. train and resume: each of the ``elbo``, ``simple`` (ReverseProcess) and ``hybrid``
   (LearnedVarianceReverseProcess) objectives and the discrete-state programs ``masked`` and ``uniform``
   (CategoricalReverseProcess over MaskedForwardProcess / UniformForwardProcess, on the bound) on the
   digits and the CIFAR-10 presets (CIFAR-10:
   synthetic 8-bit images written as a ``cifar-10-batches-py`` folder, the full 35.7M-parameter
   network in the device mode), in float32 and under bf16 autocast: N steps straight, and N/2 steps
   then a resume to N (the same explicit warm-up); the two runs' network and EMA weights must agree
   (CPU: exactly; CUDA: ``torch.use_deterministic_algorithms(True, warn_only=True)`` with
   ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, and a relative difference ||w_resumed - w_straight|| /
   ||w_straight - w_half|| up to ``--resume-rtol``, reported, failing only above it);
3. bound: the fp32 ``elbo`` checkpoint of each preset (and the ``masked`` and ``uniform`` ones of digits)
   rebuilt on the device and on the CPU,
   :func:`pyro_ddpm.evaluate.bound` of the same test images with the same seed on both; the
   per-image totals must agree to ``--bound-rtol`` (on CUDA with TF32 off; the TF32 difference is
   reported beside it);
4. sampling: ancestral and DDIM from the fp32 ``elbo`` and ``hybrid`` checkpoints: shape, finite
   values on the data grid, seconds;
5. benchmarks: ``train_speed.py`` (with the diffusers loop and the fixed per-step cost),
   ``evaluate_speed.py`` and ``sample_speed.py`` on the device, their Markdown tables written to
   ``--out``.

``--out`` receives ``gpu_check.md`` (the summary and every table), ``gpu_check.json`` (all numbers)
and the benchmark tables ``bench_*.md``, rewritten after each phase so that a run stopped by a
timeout still leaves what it measured. docs/gpu_check.md says how to run it on a CUDA machine and how to
read its report.
"""

from __future__ import annotations

import os

# cuBLAS is deterministic only with a fixed workspace, which must be chosen before CUDA initializes.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, markdown_table, sync  # noqa: E402

PRESETS = ("digits", "cifar10")
OBJECTIVES = {  # objective -> TrainConfig fields
    "elbo": dict(model="ReverseProcess", objective="elbo"),
    "simple": dict(model="ReverseProcess", objective="simple"),
    "hybrid": dict(model="LearnedVarianceReverseProcess", objective="hybrid"),
    # discrete-state diffusion: the categorical model over the masked and the uniform forward process
    "masked": dict(model="CategoricalReverseProcess", guide="MaskedForwardProcess", objective="elbo"),
    "uniform": dict(model="CategoricalReverseProcess", guide="UniformForwardProcess", objective="elbo"),
}
# The checkpoints whose bound is checked on the device against the CPU (the discrete ones on digits only: a
# CIFAR-10 bound on the CPU is minutes per image at T = 1000).
BOUND_OBJECTIVES = {"elbo": PRESETS, "masked": ("digits",), "uniform": ("digits",)}
PRECISIONS = ("fp32", "bf16")
INJECTIONS = ("bad-setting", "resume", "bound", "sample")

# The sizes of the two modes. "device": the GPU check (T = 1000, the presets' full networks, few steps and
# small CIFAR-10 batches: about 4 minutes on one H200, estimated); "small": the CI mode (seconds on one CPU core).
SIZES = {
    "device": dict(
        T=1000,
        steps=50,
        warmup=10,
        lr=2e-4,
        batch={"digits": 128, "cifar10": 16},
        net_overrides={},
        cifar_per_batch=64,
        bound_images=16,
        bound_cpu_images={"digits": 16, "cifar10": 1},
        bound_max_batch=4096,
        bound_cpu_max_batch=250,
        bound_fp64={"digits"},
        samples=16,
        ddim_steps=50,
        sample_plan={
            ("digits", "elbo"): ("ancestral", "ddim"),
            ("digits", "hybrid"): ("ancestral", "ddim"),
            ("cifar10", "elbo"): ("ancestral", "ddim"),
            ("cifar10", "hybrid"): ("ddim",),
            ("digits", "masked"): ("ancestral",),
            ("digits", "uniform"): ("ancestral",),
        },
        bench=[
            (
                "train_digits",
                "train_speed.py",
                ["--preset", "digits", "--batch", "128", "--repeats", "20", "--fixed-cost"],
            ),
            ("train_cifar10", "train_speed.py", ["--preset", "cifar10", "--batch", "64", "--repeats", "10"]),
            (
                "evaluate_digits",
                "evaluate_speed.py",
                ["--preset", "digits", "--T", "1000", "--images", "64", "--repeats", "3"],
            ),
            (
                "sample_digits",
                "sample_speed.py",
                ["--preset", "digits", "--T", "1000", "--images", "64", "--ddim-steps", "50", "--repeats", "2"],
            ),
        ],
    ),
    "small": dict(
        T=10,
        steps=4,
        warmup=2,
        lr=1e-3,
        batch={"digits": 4, "cifar10": 4},
        net_overrides={"ch": 8},
        cifar_per_batch=2,
        bound_images=4,
        bound_cpu_images={"digits": 4, "cifar10": 4},
        bound_max_batch=4096,
        bound_cpu_max_batch=7,
        bound_fp64={"digits", "cifar10"},
        samples=4,
        ddim_steps=5,
        sample_plan={
            **{(p, o): ("ancestral", "ddim") for p in PRESETS for o in ("elbo", "hybrid")},
            **{(p, o): ("ancestral",) for p in PRESETS for o in ("masked", "uniform")},
        },
        bench=[
            (
                "train_digits",
                "train_speed.py",
                ["--preset", "digits", "--batch", "4", "--T", "10", "--repeats", "2", "--fixed-cost", "--no-memory"],
            ),
            (
                "evaluate_digits",
                "evaluate_speed.py",
                ["--preset", "digits", "--T", "5", "--images", "2", "--repeats", "1", "--no-memory"],
            ),
            (
                "sample_digits",
                "sample_speed.py",
                [
                    "--preset",
                    "digits",
                    "--T",
                    "10",
                    "--images",
                    "2",
                    "--ddim-steps",
                    "4",
                    "--repeats",
                    "1",
                    "--no-memory",
                ],
            ),
        ],
    ),
}
TARGET_SECONDS = 240  # the device mode's time target on one GPU (an estimate; longer runs get a note)


class Failed(Exception):
    """A check failed: ``what`` (which check) and ``why`` (one line)."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")
        self.what, self.why = what, " ".join(str(why).split())


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- the report
class Report:
    """The checks so far, written to ``out/gpu_check.md`` and ``out/gpu_check.json`` after each one."""

    def __init__(self, args, argv):
        self.args, self.out = args, Path(args.out)
        self.command = shlex.join(["python", "benchmarks/gpu_check.py", *argv])
        self.start = time.perf_counter()
        self.rows: list[dict] = []  # one per check: what, ok, detail, seconds
        self.tables: dict[str, tuple[list[str], list[list[str]]]] = {}
        self.data: dict = {"command": self.command, "mode": "small" if args.small else "device", "device": args.device}
        self.bench: dict[str, str] = {}
        self.failed: dict | None = None

    def add(self, what: str, detail: str, seconds: float, **data) -> None:
        self.rows.append({"check": what, "ok": True, "detail": detail, "seconds": round(seconds, 3), **data})
        print(f"  ok  {what}: {detail} ({seconds:.1f} s)", flush=True)
        self.write()

    def table(self, name: str, headers: list[str], row: list) -> None:
        self.tables.setdefault(name, (headers, []))[1].append([str(c) for c in row])

    def fail(self, failure: Failed) -> None:
        self.failed = {"check": failure.what, "why": failure.why}
        self.rows.append({"check": failure.what, "ok": False, "detail": failure.why, "seconds": None})
        self.write()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def summary_table(self) -> str:
        rows = [
            [
                r["check"],
                "ok" if r["ok"] else "FAILED",
                r["detail"],
                "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            ]
            for r in self.rows
        ]
        return markdown_table(["check", "result", "detail", "s"], rows)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        status = (
            f"FAILED at {self.failed['check']}: {self.failed['why']}"
            if self.failed
            else "passed so far"
            if not self.data.get("finished")
            else "all checks passed"
        )
        lines = [
            f"# gpu_check: {status}",
            "",
            f"`{self.command}`",
            "",
            f"{self.data.get('machine', '')}; {self.data.get('versions', '')}",
            "",
            f"Mode {self.data['mode']}, {self.elapsed:.0f} s so far"
            if not self.data.get("finished")
            else f"Mode {self.data['mode']}, {self.elapsed:.0f} s in all"
            + (f" (target {TARGET_SECONDS} s)" if self.data["mode"] == "device" else ""),
            "",
            self.summary_table(),
        ]
        for name, (headers, rows) in self.tables.items():
            lines += [f"## {name}", "", markdown_table(headers, rows)]
        for name, text in self.bench.items():
            lines += [f"## benchmark {name}", "", text]
        notes = self.data.get("notes")
        if notes:
            lines += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
        (self.out / "gpu_check.md").write_text("\n".join(lines))
        payload = dict(
            self.data,
            checks=self.rows,
            failed=self.failed,
            seconds=round(self.elapsed, 1),
            tables={k: {"headers": h, "rows": r} for k, (h, r) in self.tables.items()},
        )
        (self.out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))

    def note(self, text: str) -> None:
        self.data.setdefault("notes", [])
        if text not in self.data["notes"]:
            self.data["notes"].append(text)
            print(f"  note: {text}", flush=True)


@contextlib.contextmanager
def step(what: str):
    """Turn any exception inside into ``Failed(what, one line)``, printing the traceback to stdout."""
    try:
        yield
    except Failed:
        raise
    except Exception as e:  # noqa: BLE001 - every error is a failure of this check
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        raise Failed(what, one_line(e)) from None


def timed_call(device: str, fn, *args, **kwargs):
    """(fn(*args, **kwargs), its seconds), with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    sync(device)
    return value, time.perf_counter() - start


# ----------------------------------------------------------------------------- device settings
def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and convolutions on or off (torch's defaults: matmul off, cuDNN on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def tf32(enabled: bool, device: str):
    if not device.startswith("cuda"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(enabled)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def deterministic(device: str, seen: list[str]):
    """On CUDA: deterministic algorithms (warn only), cuDNN benchmark off; the warnings of ops that have
    no deterministic implementation are collected in ``seen``."""
    if not device.startswith("cuda"):
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            text = " ".join(str(w.message).split())[:300]
            if "determinis" in text and text not in seen:
                seen.append(text)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


# ----------------------------------------------------------------------------- data
def write_fake_cifar(folder: Path, per_batch: int, test: int, seed: int = 0) -> Path:
    """A ``cifar-10-batches-py`` folder of synthetic 8-bit images (per_batch per training batch, ``test`` in
    the test batch), in the python version's format: pickled dicts with (N, 3072) uint8 CHW rows."""
    rng = np.random.default_rng(seed)
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:32, 0:32]
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        # smooth colour gradients plus noise: image-like, every level reachable
        base = rng.uniform(0, 255, size=(n, 3, 1, 1)) + rng.uniform(-4, 4, size=(n, 3, 1, 1)) * (yy + xx)
        images = np.clip(base + rng.normal(0, 20, size=(n, 3, 32, 32)), 0, 255).astype(np.uint8)
        batch = {
            b"batch_label": b"synthetic",
            b"labels": [0] * n,
            b"data": images.reshape(n, 3072),
            b"filenames": [b"synthetic_%d.png" % i for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


# ----------------------------------------------------------------------------- the checks
def check_environment(report: Report, args) -> None:
    with step("environment"):
        import pyro

        from pyro_ddpm.runtime import check_device

        try:
            check_device(args.device)
        except ValueError as e:
            raise Failed("environment", str(e)) from None
        try:
            import diffusers

            diffusers_version = diffusers.__version__
        except ImportError:
            diffusers_version = "not installed"
        versions = (
            f"Python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
            f"diffusers {diffusers_version}"
        )
        if args.device.startswith("cuda"):
            versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        report.data.update(machine=machine(args.device), versions=versions)
        report.add("environment", versions, 0.0)


def train_and_resume(report: Report, args, sizes: dict, work: Path, data_for: dict) -> dict:
    """For each (preset, objective, precision): straight vs half + resume; {key: the straight run's directory}."""
    from pyro_ddpm import checkpoint
    from pyro_ddpm.train import TrainConfig, train

    runs, seen = {}, []
    N = sizes["steps"]
    first = True
    for preset in args.presets:
        for objective in args.objectives:
            for precision in args.precisions:
                key = f"{preset}/{objective}/{precision}"
                config = TrainConfig(
                    data=data_for[preset],
                    **OBJECTIVES[objective],
                    T=sizes["T"],
                    steps=N,
                    batch_size=sizes["batch"][preset],
                    net=preset,
                    net_overrides=dict(sizes["net_overrides"]),
                    warmup=sizes["warmup"],
                    lr=sizes["lr"],
                    log_every=N,
                    checkpoint_every=N,
                    device=args.device,
                    precision=precision,
                    seed=0,
                )
                if args.inject == "bad-setting" and first:
                    config.lr = float("nan")  # an injected bad setting: the trainer must refuse it
                first = False
                where = work / preset / objective / precision
                with step(f"train {key}"), deterministic(args.device, seen):
                    _, seconds = timed_call(args.device, train, config, where / "straight", progress=False)
                    half = dataclasses.replace(config, steps=N // 2)
                    _, seconds_half = timed_call(args.device, train, half, where / "resumed", progress=False)
                    at_half = checkpoint.load(where / "resumed")
                    _, seconds_resume = timed_call(
                        args.device, train, config, where / "resumed", progress=False, resume=True
                    )
                records = [json.loads(line) for line in (where / "straight" / "metrics.jsonl").read_text().splitlines()]
                # the trainer's own figure (its logging window: all N steps), else the wall time of the whole call
                images_per_s = (records[-1].get("images_per_s") if records else None) or N * config.batch_size / seconds
                report.add(
                    f"train {key}", f"{N} steps, {images_per_s:.0f} images/s", seconds, images_per_s=images_per_s
                )
                with step(f"resume {key}"):
                    detail, data = compare_resume(args, where, at_half, key)
                report.add(f"resume {key}", detail, seconds_half + seconds_resume, **data)
                report.table(
                    "train and resume",
                    [
                        "preset",
                        "objective",
                        "precision",
                        "steps",
                        "batch",
                        "images/s",
                        "train s",
                        "resume: net",
                        "resume: EMA",
                    ],
                    [
                        preset,
                        objective,
                        precision,
                        N,
                        config.batch_size,
                        f"{images_per_s:.0f}",
                        f"{seconds:.1f}",
                        data["net"]["text"],
                        data["ema"]["text"],
                    ],
                )
                runs[key] = where / "straight"
                if not (precision == "fp32" and (objective == "hybrid" or objective in BOUND_OBJECTIVES)):
                    shutil.rmtree(where, ignore_errors=True)  # only the fp32 elbo/hybrid runs are used again
                else:
                    shutil.rmtree(where / "resumed", ignore_errors=True)
    if seen:
        report.data["nondeterministic_ops"] = seen
        report.note(
            "ops without a deterministic CUDA implementation during training (warn_only): "
            + " | ".join(s[:160] for s in seen)
        )
    return runs


def compare_resume(args, where: Path, at_half, key: str) -> tuple[str, dict]:
    from pyro_ddpm import checkpoint

    straight, resumed = checkpoint.load(where / "straight"), checkpoint.load(where / "resumed")
    if straight.step != resumed.step or not resumed.finished:
        raise Failed(
            f"resume {key}",
            f"the resumed run is at step {resumed.step} (finished {resumed.finished}), "
            f"the uninterrupted one at {straight.step}",
        )
    if args.inject == "resume":
        name = next(iter(resumed.weights["net"]))
        resumed.weights["net"][name] = resumed.weights["net"][name] + 1e-3  # an injected resume error
    exact = not args.device.startswith("cuda")
    out, texts = {}, []
    for part in ("net", "ema"):
        a, b, h = straight.weights[part], resumed.weights[part], at_half.weights[part]
        if a.keys() != b.keys():
            raise Failed(f"resume {key}", f"the {part} weights of the two runs have different names")
        floats = [k for k in a if a[k].is_floating_point()]
        equal = all(torch.equal(a[k], b[k]) for k in a)
        diff = math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in floats))
        update = math.sqrt(sum(float((a[k].double() - h[k].double()).pow(2).sum()) for k in floats))
        max_abs = max((float((a[k].double() - b[k].double()).abs().max()) for k in floats), default=0.0)
        rel = diff / update if update > 0 else (0.0 if diff == 0 else math.inf)
        text = "identical" if equal else f"max abs {max_abs:.2e}, rel {rel:.2e}"
        out[part] = {"identical": equal, "max_abs_diff": max_abs, "rel_diff": rel, "text": text}
        texts.append(f"{part} {text}")
        if exact and not equal:
            raise Failed(
                f"resume {key}",
                f"the resumed run's {part} weights differ from the uninterrupted run's "
                f"(max abs diff {max_abs:.3e}); on CPU they must be identical",
            )
        if not exact and rel > args.resume_rtol:
            raise Failed(
                f"resume {key}",
                f"the resumed run's {part} weights differ from the uninterrupted run's by "
                f"{rel:.3e} of the update after the resume (max abs {max_abs:.3e}; "
                f"tolerance {args.resume_rtol:g})",
            )
    rule = "identical (CPU)" if exact else f"rel <= {args.resume_rtol:g}"
    return "; ".join(texts) + f" [{rule}]", {"net": out["net"], "ema": out["ema"]}


def per_image_totals(model, guide, x, max_batch: int, device: str):
    from pyro_ddpm.evaluate import bound

    idata, seconds = timed_call(device, bound, model, guide, x, seed=0, max_batch=max_batch)
    L = idata.bound["L"].values  # (draw, image, t + 1), nats
    return L.sum(-1).mean(0), seconds, int(idata.bound.attrs["dims"])


def check_bound(report: Report, args, sizes: dict, runs: dict, data_for: dict) -> None:
    from pyro_ddpm import checkpoint, data

    cuda = args.device.startswith("cuda")
    checks = [(p, o) for o in BOUND_OBJECTIVES for p in args.presets if p in BOUND_OBJECTIVES[o]]
    for preset, objective in checks:
        key = f"{preset}/{objective}/fp32"
        if key not in runs:
            continue
        name = preset if objective == "elbo" else f"{preset}/{objective}"
        what = f"bound {name}"
        with step(what):
            state = checkpoint.load(runs[key])
            x = data.load(data_for[preset]).test[: sizes["bound_images"]].float()
            n_cpu = min(sizes["bound_cpu_images"][preset], len(x))
            model, guide = state.build(device=args.device)
            with tf32(False, args.device):
                on_device, seconds_device, dims = per_image_totals(
                    model, guide, x.to(args.device), sizes["bound_max_batch"], args.device
                )
            tf32_rel = None
            if cuda:  # torch's default settings (TF32 convolutions): reported, not checked
                with tf32(True, args.device):
                    with_tf32, _, _ = per_image_totals(
                        model, guide, x.to(args.device), sizes["bound_max_batch"], args.device
                    )
                tf32_rel = float(np.max(np.abs(with_tf32 - on_device) / np.abs(on_device)))
            cpu_model, cpu_guide = state.build(device="cpu")
            on_cpu, seconds_cpu, _ = per_image_totals(
                cpu_model, cpu_guide, x[:n_cpu], sizes["bound_cpu_max_batch"], "cpu"
            )
            fp64_rel = None
            if preset in sizes["bound_fp64"]:  # the float32 rounding floor: the same cpu evaluation in float64
                on_fp64, _, _ = per_image_totals(
                    copy.deepcopy(cpu_model).double(),
                    cpu_guide,
                    x[:n_cpu].double(),
                    sizes["bound_cpu_max_batch"],
                    "cpu",
                )
                fp64_rel = float(np.max(np.abs(on_cpu - on_fp64) / np.abs(on_fp64)))
            if args.inject == "bound":
                on_device = on_device * (1 + 10 * args.bound_rtol)  # an injected disagreement
            rel = np.abs(on_device[:n_cpu] - on_cpu) / np.abs(on_cpu)
            worst = float(rel.max())
            to_bpd = 1.0 / (dims * math.log(2))
            if not (np.isfinite(on_device).all() and np.isfinite(on_cpu).all()):
                raise Failed(what, "the bound is not finite")
            if worst > args.bound_rtol:
                raise Failed(
                    what,
                    f"per-image totals on {args.device} and cpu differ by {worst:.3e} relative at worst "
                    f"(tolerance {args.bound_rtol:g}; image {int(rel.argmax())}: "
                    f"{on_device[int(rel.argmax())]:.6f} vs {on_cpu[int(rel.argmax())]:.6f} nats)",
                )
        detail = (
            f"{len(x)} images on {args.device} (max batch {sizes['bound_max_batch']}; "
            f"{float(on_device.mean()) * to_bpd:.4f} bits/dim), {n_cpu} on cpu (max batch "
            f"{sizes['bound_cpu_max_batch']}); max rel diff {worst:.2e} <= {args.bound_rtol:g}"
            + (f"; cpu fp32 vs fp64 {fp64_rel:.2e}" if fp64_rel is not None else "")
            + (f"; with TF32 {tf32_rel:.2e} (not checked)" if tf32_rel is not None else "")
        )
        report.add(
            what,
            detail,
            seconds_device + seconds_cpu,
            max_rel_diff=worst,
            tf32_max_rel_diff=tf32_rel,
            fp64_max_rel_diff=fp64_rel,
            bits_per_dim_device=float(on_device.mean()) * to_bpd,
            bits_per_dim_cpu=float(on_cpu.mean()) * to_bpd,
            seconds_device=seconds_device,
            seconds_cpu=seconds_cpu,
        )
        report.table(
            "bound: device against cpu",
            [
                "preset",
                "T",
                "images device / cpu",
                "bits/dim device",
                "bits/dim cpu (same images)",
                "max rel diff, per-image total",
                "tolerance",
                "cpu fp32 vs fp64 (rounding)",
                "TF32 max rel diff (info)",
                "s device",
                "s cpu",
            ],
            [
                name,
                state.config["T"],
                f"{len(x)} / {n_cpu}",
                f"{float(on_device.mean()) * to_bpd:.5f}",
                f"{float(on_cpu.mean()) * to_bpd:.5f}",
                f"{worst:.2e}",
                f"{args.bound_rtol:g}",
                "-" if fp64_rel is None else f"{fp64_rel:.2e}",
                "-" if tf32_rel is None else f"{tf32_rel:.2e}",
                f"{seconds_device:.2f}",
                f"{seconds_cpu:.2f}",
            ],
        )


def check_samples(report: Report, args, sizes: dict, runs: dict) -> None:
    from pyro_ddpm import checkpoint
    from pyro_ddpm.sample import sample

    n = sizes["samples"]
    for preset in args.presets:
        for objective in ("elbo", "hybrid", "masked", "uniform"):
            key = f"{preset}/{objective}/fp32"
            samplers = sizes["sample_plan"].get((preset, objective), ())
            if key not in runs or not samplers:
                continue
            state = checkpoint.load(runs[key])
            levels, shape = int(state.data["levels"]), tuple(state.data["shape"])
            model, _ = state.build(device=args.device)
            T = model.T
            for sampler in samplers:
                steps = None if sampler == "ancestral" else min(sizes["ddim_steps"], T)
                what = f"sample {preset}/{objective} {sampler}"
                with step(what):
                    torch.manual_seed(0)
                    x, seconds = timed_call(args.device, sample, model, n, sampler=sampler, steps=steps)
                    x = x.detach().float().cpu()
                    if args.inject == "sample":
                        x[0].fill_(0.5 / (levels - 1))  # an injected value off the data grid
                    if tuple(x.shape) != (n, *shape):
                        raise Failed(what, f"samples have shape {tuple(x.shape)}, expected {(n, *shape)}")
                    if not torch.isfinite(x).all():
                        raise Failed(what, f"{int((~torch.isfinite(x)).sum())} sample values are not finite")
                    k = (x.double() + 1.0) * (levels - 1) / 2.0
                    off = float((k - k.round()).abs().max())
                    if float(k.min()) < -1e-3 or float(k.max()) > levels - 1 + 1e-3 or off > 1e-3:
                        raise Failed(
                            what,
                            f"samples leave the {levels}-level grid of [-1, 1] (range "
                            f"[{float(x.min()):.4f}, {float(x.max()):.4f}], off-grid by {off:.2e})",
                        )
                calls = T if steps is None else steps
                report.add(
                    what,
                    f"{n} x {shape}, {calls} steps, range [{float(x.min()):.3f}, {float(x.max()):.3f}]"
                    f" on the {levels}-level grid",
                    seconds,
                )
                report.table(
                    "sampling",
                    ["preset", "objective", "sampler", "network calls", "images", "s", "ms per call", "range"],
                    [
                        preset,
                        objective,
                        sampler,
                        calls,
                        n,
                        f"{seconds:.2f}",
                        f"{1000 * seconds / calls:.2f}",
                        f"[{float(x.min()):.3f}, {float(x.max()):.3f}]",
                    ],
                )


def run_benchmarks(report: Report, args, sizes: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}  # the scripts' own defaults
    for name, script, argv in sizes["bench"]:
        what = f"benchmark {name}"
        md = Path(args.out).resolve() / f"bench_{name}.md"
        # run in the output folder, so that the command each table records names its file plainly
        command = [sys.executable, str(HERE / script), *argv, "--device", args.device, "--markdown", md.name]
        print(f"  run {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=args.bench_timeout, cwd=md.parent
            )
        except subprocess.TimeoutExpired:
            raise Failed(what, f"{script} ran past {args.bench_timeout} s") from None
        seconds = time.perf_counter() - start
        sys.stdout.write(done.stdout)
        if done.returncode != 0:
            sys.stdout.write(done.stderr)
            last = [line for line in done.stderr.splitlines() if line.strip()]
            raise Failed(what, f"{script} exited with {done.returncode}: {last[-1] if last else 'no message'}")
        if not md.is_file():
            raise Failed(what, f"{script} wrote no table to {md}")
        report.bench[name] = md.read_text()
        report.add(what, f"table written to {md.name}", seconds)


# ----------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="the device under test (default cuda)")
    p.add_argument("--small", action="store_true", help="tiny sizes (the CI mode; T = 10, tiny networks)")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or "runs/gpu_check",
        help="folder for gpu_check.md, gpu_check.json and the benchmark tables (default $OUT or runs/gpu_check)",
    )
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (even; default: the mode's)")
    p.add_argument(
        "--bound-rtol",
        type=float,
        default=1e-4,
        help="tolerance on the relative difference of per-image bound totals, device vs cpu (default 1e-4)",
    )
    p.add_argument(
        "--resume-rtol",
        type=float,
        default=1e-2,
        help="CUDA only: tolerance on ||w_resumed - w_straight|| / ||w_straight - w_half|| (default 1e-2); "
        "on CPU the weights must be identical",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark scripts")
    p.add_argument("--bench-timeout", type=int, default=300, help="seconds per benchmark script (default 300)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder, removed after)")
    p.add_argument(
        "--inject",
        choices=INJECTIONS,
        default=None,
        help="force a failure to test the check itself: a bad training setting (lr = nan), a changed "
        "resumed weight, a device bound off by 10x the tolerance, a sample off the grid",
    )
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    sizes = dict(SIZES["small" if args.small else "device"])
    if args.steps is not None:
        if args.steps < 2 or args.steps % 2:
            parser().error("--steps must be an even number >= 2")
        sizes["steps"] = args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report(args, argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    print(
        f"gpu_check: {report.data['mode']} mode on {args.device}; runs under {work}; reports in {args.out}", flush=True
    )
    try:
        check_environment(report, args)
        data_for = {"digits": "digits"}
        if "cifar10" in args.presets:
            data_for["cifar10"] = str(
                write_fake_cifar(work / "data", sizes["cifar_per_batch"], max(sizes["bound_images"], sizes["samples"]))
            )
            report.note(
                "CIFAR-10 here is synthetic: 8-bit images (colour gradients plus noise) written as a "
                f"cifar-10-batches-py folder, {5 * sizes['cifar_per_batch']} training images"
            )
        print("[1/4] train and resume", flush=True)
        runs = train_and_resume(report, args, sizes, work, data_for)
        print("[2/4] bound on the device against the cpu", flush=True)
        check_bound(report, args, sizes, runs, data_for)
        print("[3/4] sampling", flush=True)
        check_samples(report, args, sizes, runs)
        if not args.no_bench:
            print("[4/4] benchmarks", flush=True)
            run_benchmarks(report, args, sizes)
    except Failed as failure:
        report.fail(failure)
        print(report.summary_table(), flush=True)
        print(f"gpu_check: FAILED {failure.what}: {failure.why}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report.data["finished"] = True
    if report.data["mode"] == "device" and report.elapsed > TARGET_SECONDS:
        report.note(f"the check took {report.elapsed:.0f} s, over its {TARGET_SECONDS} s target")
    report.write()
    print(report.summary_table(), flush=True)
    print(
        f"gpu_check: OK, {len(report.rows)} checks passed in {report.elapsed:.0f} s; {Path(args.out) / 'gpu_check.md'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
