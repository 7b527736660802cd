"""Diffusion as a hierarchical VAE: a one-latent Pyro VAE beside the DDPM, on the same digits, in the same unit.

    python examples/diffusion_vs_vae.py            # DDPM T = 1000, a few minutes on CPU
    python examples/diffusion_vs_vae.py --quick    # seconds

Both are a Pyro model p(latents) p(x_0 | latents) with the same discretized-Gaussian decoder (Eq. 13,
17 levels for sklearn digits) and a Pyro guide q(latents | x_0); both are trained with ``SVI`` on the
mean-field ELBO and read term by term with :class:`pyro_ddpm.elbo.TermwiseELBO`:

    ==========  =======================================  ==================================================
                VAE (:mod:`pyro_ddpm.vae`)               DDPM (``models/reverse_process.py``,
                                                         ``guides/forward_process.py``, chain form)
    ==========  =======================================  ==================================================
    latents     one site ``z`` (``--z-dim`` numbers)     T sites ``x_T``, ..., ``x_1``, each shaped like x_0
    prior       p(z) = N(0, I)                           p(x_T) = N(0, I), then p_theta(x_{t-1} | x_t) (Eq. 1)
    decoder     p_theta(x_0 | z): discretized Gaussian   p_theta(x_0 | x_1): discretized Gaussian at
                at an MLP's mean, learned scales          mu_theta(x_1, 1), scale sigma_1
    guide       q_phi(z | x_0): a learned encoder        q(x_{1:T} | x_0): fixed, no parameters (Eqs. 4, 6, 7)
    rate        KL(q(z | x_0) || p(z))                   L_T + sum_{t>=2} L_{t-1}
    distortion  E_q -log p_theta(x_0 | z)                L_0
    ==========  =======================================  ==================================================

Bounds on the first ``--test-images`` images of the digits test split, in bits/dim (D = 64):

- DDPM: the negative ELBO of Eq. 5 from :func:`pyro_ddpm.evaluate.bound` (one noise draw per term).
- VAE (:class:`pyro_ddpm.vae.VAE`): the negative ELBO (``--draws`` draws of z per image for the
  distortion, analytic KL), and the tighter importance-weighted bound with ``--particles`` samples
  (Burda et al. 2016), which is Pyro's ``RenyiELBO`` with alpha = 0, evaluated image by image.

The default DDPM is trained for only 600 steps so that the example runs in minutes; pass
``--ddpm-checkpoint RUN`` to score a longer-trained digits DDPM (any run folder or checkpoint of
:func:`pyro_ddpm.train.train`) instead. Writes ``bounds.png`` (the rate/distortion split of both) and
``diffusion_vs_vae.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pyro
import torch

from pyro_ddpm import checkpoint, data, protocol, stats
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.evaluate import bound, summarize
from pyro_ddpm.figures import new_figure, save_figure
from pyro_ddpm.files import atomic_write
from pyro_ddpm.train import TrainConfig, train
from pyro_ddpm.vae import train_vae, vae_bounds

NAME = "diffusion_vs_vae"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/examples/{NAME}", help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="DDPM training steps (default 600; --quick: 4)")
    ap.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default 3000; --quick: 30)")
    ap.add_argument("--T", type=int, default=None, help="DDPM diffusion steps (default 1000; --quick: 10)")
    ap.add_argument("--z-dim", type=int, default=16, help="VAE latent dimensions (default %(default)s)")
    ap.add_argument("--test-images", type=int, default=None, help="test images scored (default 120; --quick: 16)")
    ap.add_argument("--draws", type=int, default=None, help="z draws per image for the VAE's ELBO (default 16)")
    ap.add_argument(
        "--particles", type=int, default=None, help="importance samples of the VAE's IWAE bound (default 256)"
    )
    ap.add_argument(
        "--ddpm-checkpoint",
        default=None,
        help="score this digits DDPM (a checkpoint or run folder) instead of training one",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny networks, T = 10, a few steps (for tests)")
    args = ap.parse_args(argv)
    defaults = {
        "steps": (4, 600),
        "vae_steps": (30, 3000),
        "T": (10, 1000),
        "test_images": (16, 120),
        "draws": (4, 16),
        "particles": (16, 256),
    }
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("steps", "vae_steps", "z_dim", "test_images", "draws", "particles"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.T < 2:
        raise ValueError(f"--T must be at least 2, got {args.T}")
    return args


def train_ddpm(args, out: Path, digits):
    """The EMA model and guide of ``--ddpm-checkpoint``, or of a run trained here (reused if ``out/ddpm`` holds it)."""
    if args.ddpm_checkpoint is not None:
        state = checkpoint.load(args.ddpm_checkpoint)
        state.check_data(digits.shape, digits.levels, what="digits")
        args.steps = int(state.step)
        return state.build()
    overrides = {"ch": 8, "dropout": 0.0} if args.quick else {}
    config = TrainConfig(
        data="digits",
        objective="elbo",
        steps=args.steps,
        T=args.T,
        seed=args.seed,
        batch_size=32 if args.quick else 128,
        net_overrides=overrides,
        lr=1e-3 if args.quick else 2e-4,
        log_every=max(1, args.steps // 4),
        checkpoint_every=args.steps,
    )
    run = out / "ddpm"
    ckpt = train(config, run, progress=not args.quick, resume=(run / checkpoint.FILENAME).exists())
    pyro.clear_param_store()
    return checkpoint.build(checkpoint.load(ckpt))


def plot(result: dict, path: Path) -> Path:
    fig, ((ax,),) = new_figure(size=(7.0, 5.0))
    labels = ["DDPM ELBO", "VAE ELBO", f"VAE IWAE-{result['particles']}"]
    ddpm, vae = result["ddpm"], result["vae"]
    rate = [ddpm["rate_bits_per_dim"], vae["rate_bits_per_dim"], np.nan]
    distortion = [ddpm["distortion_bits_per_dim"], vae["distortion_bits_per_dim"], np.nan]
    x = np.arange(3)
    ax.bar(x[:2], rate[:2], color="C0", label="rate: KL terms (DDPM: L_T + sum L_{t-1})")
    ax.bar(x[:2], distortion[:2], bottom=rate[:2], color="C1", label="distortion: -log p(x_0 | latent) (DDPM: L_0)")
    ax.bar(x[2:], [vae["iwae_bits_per_dim"]], color="C2", label="importance-weighted bound")
    for k, total in enumerate([ddpm["bits_per_dim"], vae["elbo_bits_per_dim"], vae["iwae_bits_per_dim"]]):
        ax.text(x[k], total, f"{total:.3f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(math.log2(result["levels"]), color="k", ls=":", lw=0.8, label=f"uniform over {result['levels']} levels")
    ax.margins(y=0.08)
    ax.set_xticks(x, labels)
    ax.set(ylabel="bits/dim (test images)", title=f"digits, {result['test_images']} test images")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    digits = data.load("digits")
    x = digits.test[: args.test_images]
    to_bpd = stats.unit_scale(digits.dims)

    model, guide = train_ddpm(args, out, digits)
    idata = bound(model, guide, x)
    summary = summarize(idata)
    L = idata.bound["L"].values.mean((0, 1)) * to_bpd  # column t: L_t in bits/dim
    small_t = min(10, model.T - 1)
    with torch.no_grad():  # the chain form: one site per latent layer, as in the VAE
        chain_terms = TermwiseELBO().terms(model.chain, guide.chain, x[:8])

    vae, losses = train_vae(digits, args.vae_steps, args.z_dim, hidden=32 if args.quick else 256, seed=args.seed)
    vb = vae_bounds(vae, x, args.draws, args.particles)
    pyro.clear_param_store()
    with torch.no_grad():
        vae_terms = TermwiseELBO().terms(vae.model, vae.guide, x[:8])

    result = {
        "data": "digits",
        "levels": digits.levels,
        "D": digits.dims,
        "test_images": len(x),
        "seed": args.seed,
        "particles": args.particles,
        "draws": args.draws,
        "ddpm": {
            "T": model.T,
            "steps": args.steps,
            "likelihood": repr(model.likelihood),
            "bits_per_dim": summary["total"]["bits_per_dim"],
            "se": summary["total"]["se"],
            "rate_bits_per_dim": summary["prior_L_T"]["bits_per_dim"] + summary["rate_L_1_to_L_T-1"]["bits_per_dim"],
            "distortion_bits_per_dim": summary["distortion_L_0"]["bits_per_dim"],
            f"L_0_to_L_{small_t - 1}_bits_per_dim": float(L[:small_t].sum()),
            "latent_sites": [name for name in chain_terms if name != protocol.X_0],
        },
        "vae": {
            "z_dim": args.z_dim,
            "steps": args.vae_steps,
            "likelihood": repr(vae.likelihood),
            "final_train_loss_bits_per_dim": float(np.mean(losses[-50:])),
            "latent_sites": [name for name in vae_terms if name != protocol.X_0],
        },
    }
    for name in ("rate", "distortion", "elbo", "iwae"):
        mean, se = stats.mean_se(vb[name] * to_bpd)
        result["vae"][f"{name}_bits_per_dim"], result["vae"][f"{name}_se"] = mean, se

    r_d, r_v = result["ddpm"], result["vae"]
    print(
        f"digits ({digits.levels} levels, D = {digits.dims}), first {len(x)} test images; bits/dim +- s.e. over images"
    )
    print(f"{'':<24} {'bound':>8} {'+- s.e.':>8} {'rate':>8} {'distortion':>11}  latent sites")
    print(
        f"{'DDPM, ELBO (Eq. 5)':<24} {r_d['bits_per_dim']:>8.4f} {r_d['se']:>8.4f} {r_d['rate_bits_per_dim']:>8.4f} "
        f"{r_d['distortion_bits_per_dim']:>11.4f}  {r_d['latent_sites'][0]} .. {r_d['latent_sites'][-1]} "
        f"({len(r_d['latent_sites'])} x {digits.dims} dims), T = {model.T}, {args.steps} steps"
    )
    print(
        f"{'VAE, ELBO':<24} {r_v['elbo_bits_per_dim']:>8.4f} {r_v['elbo_se']:>8.4f} {r_v['rate_bits_per_dim']:>8.4f} "
        f"{r_v['distortion_bits_per_dim']:>11.4f}  z ({args.z_dim} dims), {args.vae_steps} steps, {args.draws} draws"
    )
    print(
        f"{f'VAE, IWAE-{args.particles}':<24} {r_v['iwae_bits_per_dim']:>8.4f} {r_v['iwae_se']:>8.4f} "
        f"{'':>8} {'':>11}  RenyiELBO(alpha=0)"
    )
    print(
        f"(uniform over the {digits.levels} levels: {math.log2(digits.levels):.4f} bits/dim; of the DDPM's bound, "
        f"L_0 + ... + L_{small_t - 1} (t < {small_t}) take {L[:small_t].sum():.4f} bits/dim)"
    )
    print("traced per-site terms, first 8 test images (nats/image), TermwiseELBO on each chain form:")
    print("  VAE:  " + ", ".join(f"{n} {float(t.value.mean()):.2f}" for n, t in vae_terms.items()))
    names = list(chain_terms)
    shown = names[:2] + ["..."] + names[-3:] if len(names) > 6 else names
    print(
        "  DDPM: " + ", ".join("..." if n == "..." else f"{n} {float(chain_terms[n].value.mean()):.3g}" for n in shown)
    )

    plot(result, out / "bounds.png")
    atomic_write(out / f"{NAME}.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"wrote {out / 'bounds.png'} and {out / f'{NAME}.json'}")
    return result


if __name__ == "__main__":
    main()
