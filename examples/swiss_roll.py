"""The 2-D swiss roll, in the spirit of Sohl-Dickstein et al. (2015): both objectives, trajectories, metrics.

    python examples/swiss_roll.py            # T = 1000, 3000 steps per objective: a couple of minutes on CPU
    python examples/swiss_roll.py --quick    # seconds

Trains the same reverse process (an MLP eps_theta, preset ``toy2d``) on the swiss roll twice, with the
true bound (``elbo``) and with L_simple (``simple``), and compares them with numbers that use the
known data distribution:

- the bound on the test split (1000 points), from the traced terms of Eq. 5
  (:func:`pyro_ddpm.evaluate.bound`). The data are the swiss roll of :func:`pyro_ddpm.data.load`:
  both coordinates scaled into [-1, 1] and quantized to 256 levels per coordinate, i.e. the grid
  -1 + 2k/255, k = 0..255 (bin width 2/255), and the decoder is the discretized Gaussian on that
  grid (Eq. 13), so the bound is a code length in bits per dimension (D = 2); a model spreading its
  mass uniformly over the grid would score 8 bits/dim.
- the distance between model samples and the test split, in 2-D: the energy distance
  (Szekely and Rizzo), sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|) with Euclidean |.|, from all
  pairwise distances (``scipy.spatial.distance.cdist``; the V-statistic, as
  ``scipy.stats.energy_distance`` computes it in 1-D), and the sliced 1-Wasserstein distance, the
  mean of ``scipy.stats.wasserstein_distance`` over ``--directions`` projections at evenly spaced
  angles on the half circle. The same distances between the training split and the test split (same
  number of points as the samples) are printed as the floor that finite samples allow.

Figures: ``trajectories.png`` (rows: the forward process q(x_t | x_0) applied to the test points, then
each model's reverse chain p_theta from x_T ~ N(0, I); columns: t = 0 .. T), ``terms.png`` (L_t against
t for both models, :func:`pyro_ddpm.figures.plot_terms`). Numbers: ``swiss_roll.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance

from pyro_ddpm import checkpoint, data, protocol
from pyro_ddpm.evaluate import bound, summarize
from pyro_ddpm.figures import new_figure, plot_terms, save_figure
from pyro_ddpm.files import atomic_write
from pyro_ddpm.train import TrainConfig, train

NAME = "swiss_roll"
OBJECTIVES = ("elbo", "simple")


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The energy distance between point sets a (n, d) and b (m, d): sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|)
    (V-statistic)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) == 0 or len(b) == 0:
        raise ValueError(
            f"energy_distance: need two non-empty point sets (n, d) of the same d, got {a.shape} and {b.shape}"
        )
    d2 = 2.0 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean()
    return math.sqrt(max(d2, 0.0))


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, directions: int = 180) -> float:
    """The sliced 1-Wasserstein distance between 2-D point sets: the mean over ``directions`` evenly spaced
    angles theta in [0, pi) of the 1-D Wasserstein distance between the projections on (cos theta, sin theta)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != 2 or b.shape[1] != 2 or len(a) == 0 or len(b) == 0:
        raise ValueError(f"sliced_wasserstein: need two non-empty 2-D point sets (n, 2), got {a.shape} and {b.shape}")
    if directions < 1:
        raise ValueError(f"sliced_wasserstein: directions must be positive, got {directions}")
    theta = np.pi * np.arange(directions) / directions
    u = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    pa, pb = a @ u.T, b @ u.T
    return float(np.mean([wasserstein_distance(pa[:, k], pb[:, k]) for k in range(directions)]))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/examples/{NAME}", help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per objective (default 3000; --quick: 30)")
    ap.add_argument("--T", type=int, default=None, help="diffusion steps (default 1000; --quick: 10)")
    ap.add_argument(
        "--schedule",
        default="linear",
        choices=["linear", "cosine"],
        help="the forward process's variance schedule (default %(default)s)",
    )
    ap.add_argument("--directions", type=int, default=180, help="projections of the sliced Wasserstein distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny network, T = 10, a few steps (for tests)")
    args = ap.parse_args(argv)
    for name, (quick, full) in {"steps": (30, 3000), "T": (10, 1000)}.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.T < 2:
        raise ValueError(f"--T must be at least 2, got {args.T}")
    if args.directions < 1:
        raise ValueError(f"--directions must be positive, got {args.directions}")
    return args


def trained(args, out: Path, name: str):
    """Train (or reuse the finished run in ``out/name``) with objective ``name``; the EMA model and guide."""
    overrides = {"hidden": 32, "depth": 1, "temb_dim": 16} if args.quick else {}
    config = TrainConfig(
        data="swiss_roll",
        objective=name,
        steps=args.steps,
        T=args.T,
        schedule=args.schedule,
        seed=args.seed,
        batch_size=64 if args.quick else 128,
        net_overrides=overrides,
        lr=1e-3,
        log_every=max(1, args.steps // 10),
        checkpoint_every=args.steps,
    )
    run = out / name
    ckpt = train(config, run, progress=not args.quick, resume=(run / checkpoint.FILENAME).exists())
    pyro.clear_param_store()
    return checkpoint.build(checkpoint.load(ckpt))


@torch.no_grad()
def reverse_trajectory(model, n: int, steps: list[int]) -> dict[int, np.ndarray]:
    """Ancestral sampling (Algorithm 2) of ``n`` points, traced: x_t at each of ``steps`` (t = 0..T)."""
    trace = poutine.trace(model.chain).get_trace(None, n)
    return {t: trace.nodes[protocol.chain_site(t)]["value"].double().numpy() for t in steps}


@torch.no_grad()
def forward_trajectory(guide, x0: torch.Tensor, steps: list[int], generator: torch.Generator) -> dict[int, np.ndarray]:
    """x_t ~ q(x_t | x_0) (Eq. 4) of the points ``x0`` at each of ``steps``."""
    out = {}
    for t in steps:
        if t == 0:
            out[t] = x0.double().numpy()
            continue
        loc, scale = guide.q_t(x0, torch.full((len(x0),), t))
        out[t] = (loc + scale * torch.randn(x0.shape, generator=generator)).double().numpy()
    return out


def plot_trajectories(rows: dict[str, dict[int, np.ndarray]], steps: list[int], path: Path) -> Path:
    fig, axes = new_figure(len(rows), len(steps), size=(2.2 * len(steps), 2.3 * len(rows)))
    for r, (label, traj) in enumerate(rows.items()):
        for c, t in enumerate(steps):
            ax = axes[r, c]
            ax.scatter(*traj[t].T, s=1, alpha=0.4, color=f"C{r}")
            lim = 1.1 if t == 0 else 3.0
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
            if r == 0:
                ax.set_title(f"t = {t}", fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    roll = data.load("swiss_roll")
    test = roll.test
    T = args.T
    steps = sorted({0, max(1, T // 10), max(1, T // 4), max(1, T // 2), T})
    g = torch.Generator().manual_seed(args.seed + 1)
    train_subset = roll.train[torch.randperm(len(roll.train), generator=g)[: len(test)]].double().numpy()
    floor = {
        "energy_distance": energy_distance(train_subset, test.numpy()),
        "sliced_wasserstein": sliced_wasserstein(train_subset, test.numpy(), args.directions),
    }

    result = {
        "data": "swiss_roll",
        "D": roll.dims,
        "levels": roll.levels,
        "grid": f"{roll.levels} levels per coordinate on [-1, 1]: -1 + 2k/{roll.levels - 1}",
        "T": T,
        "steps": args.steps,
        "seed": args.seed,
        "test_points": len(test),
        "directions": args.directions,
        "train_vs_test": floor,
        "objectives": {},
    }
    idatas, rows = {}, {}
    for name in OBJECTIVES:
        model, guide = trained(args, out, name)
        idata = bound(model, guide, test)
        summary = summarize(idata)
        idatas[name] = idata
        pyro.set_rng_seed(args.seed + 2)
        traj = reverse_trajectory(model, len(test), steps)
        if name == OBJECTIVES[0]:
            rows["forward q(x_t | x_0)"] = forward_trajectory(guide, test, steps, g)
        rows[f"reverse p_theta, {name}"] = traj
        samples = traj[0]
        result["objectives"][name] = {
            "bits_per_dim": summary["total"]["bits_per_dim"],
            "se": summary["total"]["se"],
            "L_T_bits_per_dim": summary["prior_L_T"]["bits_per_dim"],
            "rate_bits_per_dim": summary["rate_L_1_to_L_T-1"]["bits_per_dim"],
            "L_0_bits_per_dim": summary["distortion_L_0"]["bits_per_dim"],
            "energy_distance": energy_distance(samples, test.numpy()),
            "sliced_wasserstein": sliced_wasserstein(samples, test.numpy(), args.directions),
            "likelihood": repr(model.likelihood),
        }

    print(
        f"swiss roll, T = {T}, {args.steps} steps per objective; bound on the {len(test)} test points, "
        f"data on {result['grid']} (D = 2)"
    )
    print(
        f"{'':<16} {'bits/dim':>9} {'+- s.e.':>8} {'L_T':>9} {'rate':>8} {'L_0':>8} {'energy d.':>10} {'sliced W1':>10}"
    )
    for name, r in result["objectives"].items():
        print(
            f"{name:<16} {r['bits_per_dim']:>9.4f} {r['se']:>8.4f} {r['L_T_bits_per_dim']:>9.2e} "
            f"{r['rate_bits_per_dim']:>8.4f} {r['L_0_bits_per_dim']:>8.4f} {r['energy_distance']:>10.4f} "
            f"{r['sliced_wasserstein']:>10.4f}"
        )
    print(
        f"{'train vs test':<16} {'':>9} {'':>8} {'':>9} {'':>8} {'':>8} {floor['energy_distance']:>10.4f} "
        f"{floor['sliced_wasserstein']:>10.4f}"
    )
    print(
        f"(distances: {len(test)} model samples vs the test split; the last row is {len(test)} training points "
        f"vs the test split, the finite-sample floor)"
    )

    plot_trajectories(rows, steps, out / "trajectories.png")
    plot_terms(idatas, out / "terms.png")
    atomic_write(out / f"{NAME}.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"wrote {out / 'trajectories.png'}, {out / 'terms.png'} and {out / f'{NAME}.json'}")
    return result


if __name__ == "__main__":
    main()
