"""A decoder of one's own: the discretized logistic p_theta(x_0 | x_1), trained, evaluated and sampled.

    python examples/custom_likelihood.py            # T = 100, 400 steps on digits: about a minute on CPU
    python examples/custom_likelihood.py --quick    # T = 10, a few steps: seconds

The recipe: a decoder is one subclass of :class:`pyro_ddpm.likelihoods.Likelihood` that defines
``__call__(loc, scale) -> Distribution`` (elementwise, batch shape = the data's shape) and its data kind
(``levels``, ``discrete``); the base supplies ``check(x)`` and the self-description of every program class:
``config()`` (the constructor's arguments), ``from_config(**config)`` and ``for_data(dataset)`` (see
:mod:`pyro_ddpm.likelihoods`). Registered with ``@LIKELIHOODS.register(name=...)`` it is named to the
trainer by that name; a checkpoint stores ``{"class": name, "config": config()}`` and any process that
imports this file rebuilds it (a class in an importable module can instead be named ``"module:Class"``
and imported with ``--trust-code``). The reverse process calls it
at t = 1 with the mean mu = mu_theta(x_1, 1) (Eq. 11) and scale sigma_1 (Eq. 1); it is the site
``x_0`` of both forms of :mod:`pyro_ddpm.protocol`, whose log-probability is the term L_0 of Eq. 5.

The decoder here is the discretized logistic of PixelCNN++ (Salimans et al. 2017, Eq. 2) with one
mixture component, in place of the discretized Gaussian of Eq. 13. Data lie on the K-level grid
x = -1 + 2k/(K - 1) (digits: K = 17); with half-bin h = 1/(K - 1), the bin of x is [x - h, x + h],
the edge bins extended to -inf (x = -1) and +inf (x = +1) so that they absorb the tails:

    P(x) = sigmoid((x + h - mu) / s) - sigmoid((x - h - mu) / s),    with sigmoid(+-inf) = 1, 0,

the mass of the bin under a logistic with mean mu and scale s, whose CDF is sigmoid((y - mu) / s).
The logistic's variance is s^2 pi^2 / 3, so s = sigma_1 sqrt(3) / pi gives it the variance sigma_1^2 of
the Gaussian it replaces. Since sigmoid(y) / (1 - sigmoid(y)) = e^y, for a < b

    sigmoid(b) - sigmoid(a) = sigmoid(b) (1 - sigmoid(a)) - sigmoid(a) (1 - sigmoid(b))
                            = sigmoid(b) sigmoid(-a) (1 - e^{a - b}),

so log P(x) = log sigmoid(b) + log sigmoid(-a) + log(-expm1(a - b)) with a = (x - h - mu)/s,
b = (x + h - mu)/s: three terms without cancellation, exact at every mu and s (PixelCNN++ falls back to
the density at the bin centre where the difference underflows); at x = -1 the last two terms are 0
(a = -inf), at x = +1 the first and last (b = +inf). A draw is a logistic draw rounded to the nearest
level (clipped into [-1, 1]): the bins are exactly the rounding cells.

Trains the reverse process with this decoder on digits (objective ``elbo``), prints the per-term
bound on the test split (bits/dim), then L_0 beside the discretized Gaussian's on the *same* network
and the same noise (``model.with_likelihood(...)``: only L_0 can differ), and writes ``samples.png``
and ``custom_likelihood.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch.distributions.utils import broadcast_all

from pyro_ddpm import checkpoint, data, grid
from pyro_ddpm.evaluate import bound, format_summary, summarize
from pyro_ddpm.files import atomic_write
from pyro_ddpm.likelihoods import LOG_PROB_FLOOR, DiscretizedGaussian, DiscretizedGaussianLikelihood, check_images
from pyro_ddpm.registry import LIKELIHOODS
from pyro_ddpm.sample import sample, save_png
from pyro_ddpm.train import TrainConfig, train

NAME = "custom_likelihood"
LOGISTIC_SCALE = math.sqrt(3.0) / math.pi  # s / sigma for equal variances: s^2 pi^2 / 3 = sigma^2


class DiscretizedLogistic(DiscretizedGaussian):
    """A logistic with mean ``loc`` and scale ``scale`` (s) discretized to K levels in [-1, 1], elementwise.

    The grid, the support and the argument checks are :class:`~pyro_ddpm.likelihoods.DiscretizedGaussian`'s
    (the same bins); only the mass of a bin and the draw differ.
    """

    def log_prob(self, value):
        """log sigmoid(b) + log sigmoid(-a) + log(1 - e^{a - b}) in float64, edge terms dropped (see above)."""
        if self._validate_args:
            check_images(value, self.levels, name="DiscretizedLogistic value")
        value, loc, scale = broadcast_all(value, self.loc, self.scale)
        x, mu, s = value.double(), loc.double(), scale.double()
        K = self.levels
        k = grid.position(x, K).round()  # the level index: bin edges shared exactly by neighbours
        lower, upper = grid.edges(k, K)
        a, b = (lower - mu) / s, (upper - mu) / s
        first, last = k <= 0, k >= K - 1
        zero = torch.zeros_like(a)
        lp = (
            torch.where(last, zero, F.logsigmoid(b))
            + torch.where(first, zero, F.logsigmoid(-a))
            + torch.where(first | last, zero, torch.log(-torch.expm1(a - b)))
        )
        return lp.clamp_min(LOG_PROB_FLOOR).to(loc.dtype)

    def sample(self, sample_shape=torch.Size()):
        """An exact draw: mu + s log(u / (1 - u)), u ~ U(0, 1), rounded to the nearest level."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            tiny = torch.finfo(self.loc.dtype).tiny
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(tiny, 1.0 - 1e-7)
            y = self.loc.expand(shape) + self.scale.expand(shape) * (torch.log(u) - torch.log1p(-u))
            return grid.value(grid.position(y.clamp(-1.0, 1.0), self.levels).round(), self.levels)


@LIKELIHOODS.register(name="discretized_logistic")
class DiscretizedLogisticLikelihood(DiscretizedGaussianLikelihood):
    """The decoder: :class:`DiscretizedLogistic` at mean mu_theta(x_1, 1), scale s = sigma_1 sqrt(3) / pi.

    Everything else is inherited: the constructor (``levels``), ``discrete``, ``check`` on the K-level grid,
    ``config``, ``for_data`` (the base :class:`~pyro_ddpm.likelihoods.Likelihood`'s)."""

    def __call__(self, loc, scale) -> DiscretizedLogistic:
        return DiscretizedLogistic(loc, scale * LOGISTIC_SCALE, self.levels)

    def __repr__(self):
        return f"DiscretizedLogisticLikelihood(levels={self.levels})"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/examples/{NAME}", help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 400; --quick: 20)")
    ap.add_argument("--T", type=int, default=None, help="diffusion steps (default 100; --quick: 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny network, T = 10, a few steps (for tests)")
    args = ap.parse_args(argv)
    for name, (quick, full) in {"steps": (20, 400), "T": (10, 100)}.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.T < 2:
        raise ValueError(f"--T must be at least 2, got {args.T}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    digits = data.load("digits")
    config = TrainConfig(
        data="digits",
        objective="elbo",
        likelihood="discretized_logistic",
        T=args.T,
        steps=args.steps,
        seed=args.seed,
        lr=1e-3,
        batch_size=32 if args.quick else 64,
        net_overrides={"ch": 8} if args.quick else {},
        log_every=max(1, args.steps // 10),
        checkpoint_every=args.steps,
    )
    run = out / "run"
    ckpt = train(config, run, progress=not args.quick, resume=(run / checkpoint.FILENAME).exists())
    pyro.clear_param_store()
    model, guide = checkpoint.build(checkpoint.load(ckpt))  # the decoder rebuilt from its config()

    x = digits.test if not args.quick else digits.test[:16]
    summaries = {}
    for label, m in (
        ("discretized logistic", model),
        ("discretized Gaussian", model.with_likelihood(DiscretizedGaussianLikelihood(digits.levels))),
    ):
        summaries[label] = summarize(bound(m, guide, x, seed=args.seed))  # same noise: only L_0 differs
    print(
        format_summary(
            summaries["discretized logistic"],
            header=f"digits test split, T = {args.T}, {args.steps} steps, decoder {model.likelihood!r}",
        )
    )
    print(f"\nL_0 on the same network and noise ({len(x)} test images), bits/dim:")
    print(f"{'decoder':<22} {'L_0':>11} {'+- s.e.':>10} {'L_0 nats/image':>15} {'total':>9}")
    for label, s in summaries.items():
        L_0 = s["distortion_L_0"]
        print(
            f"{label:<22} {L_0['bits_per_dim']:>11.4e} {L_0['se']:>10.2e} {L_0['nats_per_image']:>15.4e} "
            f"{s['total']['bits_per_dim']:>9.5f}"
        )

    pyro.set_rng_seed(args.seed)
    samples = sample(model, 16 if args.quick else 64)
    save_png(samples, out / "samples.png")
    result = {
        "T": args.T,
        "steps": args.steps,
        "seed": args.seed,
        "likelihood": LIKELIHOODS.describe(model.likelihood),
        "test_images": len(x),
        "bits_per_dim": {
            label: {k: s[k]["bits_per_dim"] for k in ("total", "prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0")}
            for label, s in summaries.items()
        },
        "samples_levels": sorted({int(v) for v in grid.position(samples, digits.levels).round().flatten().tolist()}),
        "samples_on_grid": bool(grid.off_grid(samples, digits.levels).max() < 1e-4),
    }
    atomic_write(out / f"{NAME}.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"\nwrote {out / 'samples.png'}, {out / f'{NAME}.json'} and the run in {run}")
    return result


if __name__ == "__main__":
    main()
