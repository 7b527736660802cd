"""The ``pyro-ddpm`` command: train, evaluate, sample, compare.

Every choice a flag offers (models, guides, decoders, timestep samplers, objectives, variances) is read
from the registered classes (:mod:`pyro_ddpm.registry`); nothing here names a variant. Errors are one
line on stderr with exit code 2; an interrupted run says where its checkpoint is and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pyro_ddpm import data as datasets
from pyro_ddpm import options, presets
from pyro_ddpm.checkpoint import FILENAME, TrainState, load_run
from pyro_ddpm.compare import DEFAULT_SAMPLES, compare, compare_config, default_samples
from pyro_ddpm.elbo import unwrap
from pyro_ddpm.evaluate import BoundSettings, Evaluation, evaluate_run, format_report
from pyro_ddpm.files import check_output_file
from pyro_ddpm.options import at_least, option, optional, positive
from pyro_ddpm.runtime import DEVICE_HELP, THREADS_HELP, Interrupted, Terminated, check_device, torch_threads
from pyro_ddpm.sample import SAMPLERS, sample, save_png
from pyro_ddpm.train import RESUMABLE, TrainConfig, train


def _add_train_args(p: argparse.ArgumentParser, compare_mode: bool = False) -> None:
    """Every :class:`~pyro_ddpm.train.TrainConfig` field as a flag (generated from its declaration); for
    ``compare`` the defaults shown are the comparison's on its default data set."""
    defaults = compare_config({})[0] if compare_mode else TrainConfig()
    preset = set(presets.settings(defaults.data).get("compare", {}).get("train", {})) if compare_mode else set()
    name = defaults.net or defaults.data  # the registered image sets share their network preset's name
    network = dict(presets.NETWORKS.get(name, {}), **defaults.net_overrides)

    def note(field: str) -> str | None:
        if field.startswith("net_overrides."):  # --ch, --dropout: the preset's value
            key = field.partition(".")[2]
            return f"{'the' if compare_mode else 'e.g. the'} {name} network: {network.get(key)}"
        if field in preset:
            value = getattr(defaults, field)
            return f"default {value}: the {defaults.data} preset of pyro_ddpm.presets; other data sets have their own"
        return None

    options.add_arguments(p, TrainConfig, defaults=defaults, note=note, skip=("objective",) if compare_mode else ())
    p.add_argument("--download", action="store_true", help=datasets.DOWNLOAD_HELP)
    p.add_argument("--no-progress", action="store_true")


def _given(args) -> dict:
    """The TrainConfig fields the user set on the command line."""
    return options.given(args, TrainConfig)


def cmd_train(args) -> int:
    given = _given(args)
    if args.resume:
        # Continue the run in --out with its stored settings: every field not set on this command line is
        # None ("not given"), so train() keeps the stored value, refuses a changed one, and imports no class
        # that only the checkpoint names (unless --trust-code).
        # The device is the exception: not given, it is "auto" on this machine (and for this process under
        # torchrun), not the device the checkpoint was written on.
        config = TrainConfig(**{**{f.name: None for f in dataclasses.fields(TrainConfig)}, "device": "auto", **given})
    else:
        config = TrainConfig(**given)
    if args.download:
        if args.resume:
            name = config.data or TrainState.load(Path(args.out) / FILENAME).config["data"]
        else:
            config.check(trust_code=True)  # refused settings are named before anything is downloaded
            name = config.data
        datasets.fetch(name)
    path = train(
        config,
        args.out,
        progress=not args.no_progress,
        resume=args.resume,
        trust_code=True if args.trust_code else None,
    )
    print(f"checkpoint written to {path}")
    return 0


def cmd_evaluate(args) -> int:
    report = evaluate_run(args.run, Evaluation(**options.given(args, Evaluation)), trust_code=args.trust_code)
    print(format_report(report))
    return 0


@dataclass
class Sampling:
    """The options of ``pyro-ddpm sample``: the flags are generated from these fields."""

    n: int = option(64, "number of samples", check=positive)
    sampler: str = option(
        "ancestral",
        "ancestral (Algorithm 2; respaced when --steps < T) or DDIM",
        choices=SAMPLERS,
    )
    steps: int | None = option(None, "network calls per image, 2..T (default T)", check=optional(positive))
    eta: float = option(0.0, "DDIM's eta (0: deterministic given x_T)")
    out: str | None = option(None, "PNG path (default RUN/samples.png)")
    seed: int = option(0, "seed of the samples' noise")
    device: str = option("auto", DEVICE_HELP)
    progress: bool = option(True, "no progress bar")
    threads: int | None = option(None, THREADS_HELP, check=optional(positive))


def cmd_sample(args) -> int:
    o = Sampling(**options.given(args, Sampling))
    options.check_all(o, as_flags=True)
    device = check_device(o.device)
    state, run_dir = load_run(args.run)
    out = check_output_file(Path(o.out) if o.out else run_dir / "samples.png", "sample grid", create=False)
    model, _ = state.build(device=device, trust_code=args.trust_code)
    torch.manual_seed(o.seed)
    x = sample(model, o.n, sampler=o.sampler, steps=o.steps, eta=o.eta, progress=o.progress)
    reference = datasets.load(state.data["name"]).test if x.dim() == 2 else None  # 2-D toys: registered names
    save_png(x, out, reference=reference)
    print(f"{o.n} samples written to {out}")
    return 0


def _default_arms_help() -> str:
    base, _, default_arms = compare_config({})
    return (
        f"the arms to run (default for {base.data}: {' '.join(default_arms)}; each data set's default arms and all "
        "arms: pyro_ddpm.presets)"
    )


def _samples_help() -> str:
    data = TrainConfig.data
    return (
        f"samples per model for the sample scores (default for {data}: {default_samples(data)}; else the data "
        f"set's, or {DEFAULT_SAMPLES})"
    )


@dataclass
class Comparison(BoundSettings):
    """The options of ``pyro-ddpm compare`` beside the training settings (the bound's on the test split, and
    these): the flags are generated from these fields."""

    arms: list[str] | None = option(None, _default_arms_help)
    seeds: list[int] = option(help="training seeds per arm (default 0)", factory=lambda: [0])
    samples: int | None = option(None, _samples_help, check=optional(at_least(2, integer=True)))
    vae: bool = option(True, "skip the Pyro VAE rows")
    jobs: int | None = option(
        None,
        "runs trained side by side, one process each, then measured one after another with every thread "
        "(default on the CPU: one per torch thread, or per --threads threads, at most one per run; 1 on a GPU)",
        check=optional(positive),
    )


def cmd_compare(args) -> int:
    """Train each arm from the same seed; report bound, its split, sample scores and the baselines."""
    o = Comparison(**options.given(args, Comparison))
    options.check_all(o, as_flags=True)
    config, arms, default_arms = compare_config(_given(args))
    chosen = o.arms or list(default_arms)
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; the arms of {config.data} are {sorted(arms)}")
    if args.download:
        datasets.fetch(config.data)
    settings = dict(num_samples=o.samples, draws=o.draws, max_batch=o.max_batch, limit=o.limit, vae=o.vae, jobs=o.jobs)
    try:
        chosen_arms = {a: arms[a] for a in chosen}
        result = compare(config, args.out, arms=chosen_arms, seeds=o.seeds, progress=not args.no_progress, **settings)
    except Interrupted as e:  # an arm's training stopped with its checkpoint: running the comparison again resumes it
        raise e.with_hint(
            "the same pyro-ddpm compare command (finished arms are kept, unfinished ones resume)"
        ) from None
    print("written: " + ", ".join(str(p) for p in result["paths"].values()))
    print(
        "runs (checkpoint.pt, metrics.jsonl, bound_test.nc/.json, samples.pt in each): "
        + ", ".join(str(r) for r in result["runs"])
    )
    return 0


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow importing a program class the checkpoint names that is not registered ('module:Class'): "
        "it runs that module's code",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyro-ddpm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with Pyro SVI")
    _add_train_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl, samples/)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its stored settings; only "
        + ", ".join(options.flag(k) for k in RESUMABLE)
        + " may change",
    )
    _trust_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-term bits/dim of a trained model on a data split")
    p.add_argument("run", nargs="?", default=None, help="run directory or checkpoint file (or --diffusers DIR)")
    options.add_arguments(p, Evaluation)
    _trust_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="ancestral sampling (Algorithm 2) or DDIM to a PNG")
    p.add_argument("run", help="run directory or checkpoint file")
    options.add_arguments(p, Sampling)
    _trust_arg(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="train each arm and compare bounds, their split, sample scores and baselines")
    _add_train_args(p, compare_mode=True)
    options.add_arguments(p, Comparison)
    p.add_argument("--out", required=True, help="the comparison's folder (a run directory per arm and seed)")
    p.set_defaults(func=cmd_compare)
    return ap


def _terminate(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        with torch_threads(getattr(args, "threads", None)):
            return args.func(args)
    except Interrupted as e:
        print(f"pyro-ddpm: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(
            f"pyro-ddpm: {name} received: stopped; files are written atomically, so none was left half-written",
            file=sys.stderr,
        )
        return 130
    except (ValueError, TypeError, FloatingPointError, OSError) as e:
        print(f"pyro-ddpm: error: {unwrap(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
