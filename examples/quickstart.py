"""The library in one page: a DDPM on sklearn digits as a Pyro model and guide, trained with SVI.

    python examples/quickstart.py --steps 500 --T 200
    python examples/quickstart.py --quick    # T = 10, a tiny network, 20 steps: seconds

Builds the reverse process (model) and the forward process (guide), trains with Pyro's SVI on the
per-timestep form of the true bound, reads the bound term by term with TermwiseELBO, checks that
the chain form traced by TraceMeanField_ELBO gives the same total, and samples with Predictive.
Writes ``quickstart.json`` (the bound's summary, the chain-form estimate) and ``samples.png`` under ``--out``.
"""

import argparse
import json

import pyro
import torch
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO

from pyro_ddpm import data, protocol, stats
from pyro_ddpm.elbo import TermwiseELBO, objective
from pyro_ddpm.evaluate import bound, format_summary, summarize
from pyro_ddpm.files import atomic_write, check_directory
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import build_network
from pyro_ddpm.presets import NETWORKS
from pyro_ddpm.sample import save_png
from pyro_ddpm.schedule import Schedule

NAME = "quickstart"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/examples/{NAME}", help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 500; --quick: 20)")
    ap.add_argument("--T", type=int, default=None, help="diffusion steps (default 200; --quick: 10)")
    ap.add_argument("--objective", default="elbo", choices=["elbo", "simple"])
    ap.add_argument("--quick", action="store_true", help="tiny network, T = 10, a few steps (for tests)")
    args = ap.parse_args(argv)
    for name, (quick, full) in {"steps": (20, 500), "T": (10, 200)}.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.T < 2:
        raise ValueError(f"--T must be at least 2, got {args.T}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = check_directory(args.out)  # before training: a folder that cannot be written is refused now
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    digits = data.load("digits")
    schedule = Schedule.linear(args.T)
    preset = dict(NETWORKS["digits"], **({"ch": 8} if args.quick else {}))
    model = ReverseProcess(build_network(preset), schedule, "large", DiscretizedGaussianLikelihood(17))
    guide = ForwardProcess(schedule)

    train_model, weight = objective(args.objective, model)
    svi = SVI(train_model.per_timestep, guide.per_timestep, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    batch = 32 if args.quick else 128
    for step in range(args.steps):
        x0 = digits.train[torch.randint(len(digits.train), (batch,))]
        t = protocol.draw_timesteps(batch, 1, schedule.T)  # one timestep per image
        loss = svi.step(x0, t, weight)
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1}: loss {loss / batch:.2f} per image")

    model.eval()  # evaluation and sampling without dropout (the traced terms are then one fixed program's)
    x = digits.test[: 16 if args.quick else 32]
    summary = summarize(bound(model, guide, x))  # from an arviz InferenceData: L (draw, image, t) nats, column t = L_t
    print(format_summary(summary))

    # The chain form, traced by Pyro's own ELBO, estimates the same bound (one chain sample per image).
    with torch.no_grad():
        chain = stats.bits_per_dim(TraceMeanField_ELBO().loss(model.chain, guide.chain, x), len(x) * digits.dims)
        terms = TermwiseELBO().terms(model.chain, guide.chain, x)
    print(f"chain form: {chain:.4f} bits/dim; per-site terms: {', '.join(list(terms)[:3])} ... x_0")

    with torch.no_grad():
        samples = Predictive(model.chain, num_samples=1, return_sites=["x_0"])(None, 16)["x_0"][0]
    levels = sorted(set(((samples + 1) * 8).round().int().flatten().tolist()))
    print("samples", tuple(samples.shape), "levels used:", levels)

    result = {
        "T": args.T,
        "steps": args.steps,
        "objective": args.objective,
        "test_images": len(x),
        "bits_per_dim": summary["total"]["bits_per_dim"],
        "se": summary["total"]["se"],
        "chain_bits_per_dim": chain,
        "sites": list(terms),
        "samples_levels": levels,
    }
    save_png(samples, out / "samples.png")
    atomic_write(out / f"{NAME}.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"wrote {out / 'samples.png'} and {out / f'{NAME}.json'}")
    return result


if __name__ == "__main__":
    main()
