"""The library in one page: a DDPM on sklearn digits as a Pyro model and guide, trained with SVI.

    python examples/quickstart.py --steps 500 --T 200

Builds the reverse process (model) and the forward process (guide), trains with Pyro's SVI on the
per-timestep form of the true bound, reads the bound term by term with TermwiseELBO, checks that
the chain form traced by TraceMeanField_ELBO gives the same total, and samples with Predictive.
"""

import argparse
import math

import pyro
import torch
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO

from pyro_ddpm import data, protocol
from pyro_ddpm.elbo import TermwiseELBO, objective
from pyro_ddpm.evaluate import bound, format_summary, summarize
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import build_network
from pyro_ddpm.presets import NETWORKS
from pyro_ddpm.schedule import Schedule


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--objective", default="elbo", choices=["elbo", "simple"])
    args = ap.parse_args()

    pyro.set_rng_seed(0)
    digits = data.load("digits")
    schedule = Schedule.linear(args.T)
    model = ReverseProcess(build_network(NETWORKS["digits"]), schedule, "large", DiscretizedGaussianLikelihood(17))
    guide = ForwardProcess(schedule)

    train_model, weight = objective(args.objective, model)
    svi = SVI(train_model.per_timestep, guide.per_timestep, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    for step in range(args.steps):
        x0 = digits.train[torch.randint(len(digits.train), (128,))]
        t = protocol.draw_timesteps(128, 1, schedule.T)  # one timestep per image
        loss = svi.step(x0, t, weight)
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {loss / 128:.2f} per image")

    x = digits.test[:32]
    idata = bound(model, guide, x)  # arviz InferenceData: L (draw, image, t) nats, column t = L_t
    print(format_summary(summarize(idata)))

    # The chain form, traced by Pyro's own ELBO, estimates the same bound (one chain sample per image).
    with torch.no_grad():
        chain = TraceMeanField_ELBO().loss(model.chain, guide.chain, x) / (len(x) * digits.dims * math.log(2))
        terms = TermwiseELBO().terms(model.chain, guide.chain, x)
    print(f"chain form: {chain:.4f} bits/dim; per-site terms: {', '.join(list(terms)[:3])} ... x_0")

    with torch.no_grad():
        samples = Predictive(model.chain, num_samples=1, return_sites=["x_0"])(None, 16)["x_0"][0]
    print("samples", tuple(samples.shape), "levels used:", sorted(set(((samples + 1) * 8).round().int().flatten().tolist())))


if __name__ == "__main__":
    main()
