"""The ``pyro-ddpm`` command: train, evaluate, sample, compare."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _train_args(p: argparse.ArgumentParser) -> None:
    from pyro_ddpm.data import LOADERS
    from pyro_ddpm.nets import PRESETS
    from pyro_ddpm.schedule import VARIANCES
    from pyro_ddpm.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", default=d.data, help=f"a data set ({', '.join(sorted(LOADERS))}) or a path "
                   "(MNIST IDX files, CIFAR-10 python tarball or folder); default %(default)s")
    p.add_argument("--steps", type=int, default=None, help=f"total training steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch (default {d.batch_size})")
    p.add_argument("--timesteps-per-image", "-K", type=int, default=d.timesteps_per_image,
                   help="K timesteps per image per step (default %(default)s)")
    p.add_argument("--T", type=int, default=d.T, help="number of diffusion steps (default %(default)s)")
    p.add_argument("--schedule", default=d.schedule,
                   help="linear, cosine, learned (with --guide LearnedForwardProcess), or for --guide "
                   "UserBetasForwardProcess the betas: comma-separated or a .npy/text file (default %(default)s)")
    p.add_argument("--variance", default=d.variance, choices=VARIANCES + ("learned",),
                   help="sigma_t^2: large (beta_t), small (beta_tilde_t), or learned (with a learned-variance model)")
    p.add_argument("--model", default=d.model, help="the reverse-process program: a class in pyro_ddpm.models "
                   "(ReverseProcess, X0PredictionReverseProcess, VPredictionReverseProcess, LearnedVarianceReverseProcess) "
                   "or 'module:Class'")
    p.add_argument("--guide", default=d.guide, help="the forward-process program: a class in pyro_ddpm.guides "
                   "(ForwardProcess, LearnedForwardProcess with --schedule learned, CosineForwardProcess, ...) or 'module:Class'")
    p.add_argument("--likelihood", default=None, help="the decoder p(x_0 | x_1) (default: the data set's)")
    p.add_argument("--timesteps", default=d.timesteps, choices=["uniform", "importance"],
                   help="timestep sampling: uniform, or loss-aware importance sampling (unbiased)")
    p.add_argument("--optimizer", default=d.optimizer, help="a torch.optim class (default %(default)s)")
    p.add_argument("--net", default=None, choices=sorted(PRESETS), help="network preset (default: the data set's)")
    p.add_argument("--ch", type=int, default=None, help="override the preset's base channel count")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(5000, steps/10))")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help=f"default {d.device}")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="bf16: the network under autocast; the bound's algebra stays fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="sample grid every N steps (0: never)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-progress", action="store_true")


def _config(args, objective: str):
    from pyro_ddpm.train import TrainConfig

    overrides = {k: v for k, v in (("ch", args.ch), ("dropout", args.dropout)) if v is not None}
    d = TrainConfig()
    given = lambda name: getattr(args, name) if getattr(args, name) is not None else getattr(d, name)  # noqa: E731
    return TrainConfig(
        data=args.data, objective=objective, steps=given("steps"), batch_size=given("batch_size"),
        timesteps_per_image=args.timesteps_per_image, T=args.T, schedule=args.schedule, variance=args.variance,
        model=args.model, guide=args.guide, likelihood=args.likelihood, timesteps=args.timesteps,
        optimizer=args.optimizer, net=args.net, net_overrides=overrides, lr=given("lr"), warmup=args.warmup,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed, device=given("device"),
        precision=given("precision"), compile=args.compile, log_every=args.log_every,
        sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
    )


def _evaluate(args, run: Path, stem: str | None = None):
    """Evaluate a run's checkpoint as ``args`` asks; write netCDF, JSON and figures; return the summary."""
    from pyro_ddpm import checkpoint, data as datasets
    from pyro_ddpm.evaluate import bound, save, summarize
    from pyro_ddpm.likelihoods import TanhDiscretizedGaussianLikelihood
    from pyro_ddpm.models import ClippedReverseProcess
    from pyro_ddpm.schedule import Schedule

    state = checkpoint.load(run)
    stored = state["data"]
    dataset = datasets.load(args.data or (f"{stored['name']}:{stored['source']}" if stored.get("source") else stored["name"]))
    checkpoint.check_data(state, dataset.shape, dataset.levels, what=f"data set {dataset.name!r}")
    expected = Schedule.from_name(args.schedule, args.T) if args.T is not None else None
    model, guide = checkpoint.build(
        state, schedule=expected, device=args.device,
        model_class=ClippedReverseProcess if args.clip_denoised else None,
        likelihood=TanhDiscretizedGaussianLikelihood(dataset.levels) if args.cdf == "tanh" else None)
    x = getattr(dataset, args.split)[:args.limit].to(args.device)
    idata = bound(model, guide, x, draws=args.draws, max_batch=args.max_batch, seed=args.seed,
                  progress=not args.no_progress)
    idata.bound.attrs.update(split=args.split, data=dataset.name, clip_denoised=int(args.clip_denoised), cdf=args.cdf,
                             checkpoint=str(checkpoint.resolve(run)), step=state["step"],
                             objective=state["config"]["objective"])
    summary = summarize(idata)
    summary.update(split=args.split, data=dataset.name, objective=state["config"]["objective"], step=state["step"],
                   clip_denoised=args.clip_denoised, cdf=args.cdf)
    run_dir = run if run.is_dir() else run.parent
    stem = stem or f"bound_{args.split}"
    paths = save(idata, summary, run_dir, stem)
    if not args.no_figures:
        from pyro_ddpm.figures import save_all

        paths.update(save_all(idata, run_dir, stem))
    return summary, paths


def cmd_train(args) -> int:
    import dataclasses

    from pyro_ddpm import checkpoint
    from pyro_ddpm.train import RESUMABLE, TrainConfig, train

    if args.resume:
        # Continue the run in --out with its stored configuration; --steps sets the new total.
        stored = TrainConfig(**checkpoint.load(Path(args.out) / checkpoint.FILENAME)["config"])
        asked = _config(args, stored.objective)
        config = dataclasses.replace(stored, **{k: getattr(asked, k) for k in RESUMABLE if k != "steps"},
                                     steps=args.steps if args.steps is not None else stored.steps)
    else:
        config = _config(args, args.objective)
    path = train(config, args.out, progress=not args.no_progress, resume=args.resume)
    print(f"checkpoint written to {path}")
    return 0


def cmd_evaluate(args) -> int:
    from pyro_ddpm.evaluate import format_summary

    summary, paths = _evaluate(args, Path(args.run))
    header = (f"{summary['data']} {summary['split']} split, objective {summary['objective']}, step {summary['step']}; "
              f"{'exact log-CDF' if args.cdf == 'exact' else 'tanh-approximated CDF'}, clip_denoised={args.clip_denoised}")
    print(format_summary(summary, header))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_sample(args) -> int:
    from pyro_ddpm import checkpoint, data as datasets
    from pyro_ddpm.sample import sample, save_png

    state = checkpoint.load(args.run)
    model, _ = checkpoint.build(state, device=args.device)
    torch.manual_seed(args.seed)
    x = sample(model, args.n, sampler=args.sampler, steps=args.steps, eta=args.eta)
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    out = Path(args.out) if args.out else run_dir / "samples.png"
    reference = datasets.load(state["data"]["name"]).test if x.dim() == 2 else None  # 2-D toys: registered names
    save_png(x, out, reference=reference)
    print(f"{args.n} samples written to {out}")
    return 0


def cmd_compare(args) -> int:
    """Train the same network from the same seed on each objective; report bound, sample scores, baseline."""
    from pyro_ddpm.compare import PRESETS, compare

    preset = dict(PRESETS.get(args.data, {}))
    overrides = dict(preset.pop("net_overrides", {}))
    for flag in ("steps", "batch_size", "lr", "device", "precision"):
        if getattr(args, flag) is not None:
            preset[flag] = getattr(args, flag)
    config = _config(args, "elbo")
    config.net_overrides = {**overrides, **config.net_overrides}
    for key, value in preset.items():
        setattr(config, key, value)
    compare(config, args.out, objectives=args.objectives, seeds=args.seeds, num_samples=args.samples,
            draws=args.draws, max_batch=args.max_batch, limit=args.limit, progress=not args.no_progress)
    return 0


def _eval_args(p: argparse.ArgumentParser, standalone: bool = True) -> None:
    from pyro_ddpm.data import LOADERS

    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--max-batch", type=int, default=4096, help="(image, timestep) pairs per network call")
    p.add_argument("--draws", type=int, default=1, help="noise draws per term (default %(default)s)")
    p.add_argument("--clip-denoised", action="store_true",
                   help="clip the x_0 prediction to [-1, 1] in the mean, as the official evaluation does")
    p.add_argument("--cdf", default="exact", choices=["exact", "tanh"],
                   help="decoder CDF: exact log-CDF or the official tanh approximation")
    p.add_argument("--no-figures", action="store_true")
    if standalone:
        p.add_argument("--split", default="test", choices=["train", "test"])
        p.add_argument("--data", default=None, choices=sorted(LOADERS), help="data set (default: the checkpoint's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
        p.add_argument("--schedule", default="linear", choices=["linear", "cosine"],
                       help="with --T: the schedule the checkpoint must have")
        p.add_argument("--T", type=int, default=None, help="the T the checkpoint must have")
        p.add_argument("--device", default="cpu")
        p.add_argument("--no-progress", action="store_true")


def parser() -> argparse.ArgumentParser:
    from pyro_ddpm.elbo import OBJECTIVES

    ap = argparse.ArgumentParser(prog="pyro-ddpm", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with Pyro SVI")
    _train_args(p)
    p.add_argument("--objective", default="elbo", choices=OBJECTIVES,
                   help="elbo (the bound), simple (L_simple), hybrid (L_simple + 0.001 L_vlb, learned variance)")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl, samples/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its stored settings (--steps: the new total)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-term bits/dim of a trained model on a data split")
    p.add_argument("run", help="run directory or checkpoint file")
    _eval_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="ancestral sampling (Algorithm 2) to a PNG")
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--sampler", default="ancestral", choices=["ancestral", "ddim"],
                   help="ancestral (Algorithm 2; respaced when --steps < T) or DDIM")
    p.add_argument("--steps", type=int, default=None, help="network calls per image, 2..T (default T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic given x_T)")
    p.add_argument("--out", default=None, help="PNG path (default RUN/samples.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="train with each objective and compare bound, samples and a baseline")
    _train_args(p)
    _eval_args(p, standalone=False)
    p.add_argument("--objectives", nargs="+", default=["elbo", "simple", "hybrid"], choices=OBJECTIVES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds per objective")
    p.add_argument("--samples", type=int, default=256, help="samples per model for the sample scores")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compare)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FloatingPointError) as e:
        print(f"pyro-ddpm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
