"""The bound is a weighted eps-loss: Eq. 12 read off a trained model's traced ELBO.

    python examples/bound_is_weighted_eps_loss.py            # digits, T = 1000, a few minutes on CPU
    python examples/bound_is_weighted_eps_loss.py --quick    # tiny network, T = 10: seconds

For t >= 2 the term of Eq. 5 that ``TraceMeanField_ELBO`` takes at site x_{t-1} (the analytic KL
between the guide's q(x_{t-1} | x_t, x_0) and the model's p_theta(x_{t-1} | x_t)) equals

    L_{t-1} = w_t ||eps - eps_theta(x_t, t)||^2 + D C_t,   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (Eq. 12)

for each image and each noise draw, not only in expectation. The example trains the DDPM on sklearn
digits with the true bound, traces the bound of a few test images term by term
(:func:`pyro_ddpm.evaluate.bound`, fed this script's own noise), measures the eps-MSE of the same
network at the same x_t directly, and prints both side by side. Everything after training runs in
float64, so the two agree to round-off (about 1e-11 relative at T = 1000). In float32 the traced
terms themselves move by about 5e-6 relative (up to 7e-5; measured on the default run), more than the
1e-6 the identity is checked to.

It then plots w_t and C_t against t: L_simple (Eq. 14) sets every w_t to 1 and drops D C_t, and
these are the weights it throws away. Finally it computes the gradients of the two training
objectives (:func:`pyro_ddpm.elbo.objective`) on one batch and checks each against its
eps-MSE form: L_simple's is Algorithm 1's plain ||eps - eps_theta||^2, the bound's the w_t-weighted
one (with the decoder's L_0 at t = 1). The network is in eval mode (no dropout) for both, so they
differentiate the same function.

Writes ``weights.png`` (w_t, D C_t and the traced terms against t), ``identity.json`` (every number
printed, per timestep) and the training run under ``run/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_ddpm import checkpoint, data, protocol
from pyro_ddpm.elbo import objective
from pyro_ddpm.evaluate import bound, summarize
from pyro_ddpm.figures import new_figure, save_figure
from pyro_ddpm.files import atomic_write
from pyro_ddpm.schedule import at
from pyro_ddpm.train import TrainConfig, train

NAME = "bound_is_weighted_eps_loss"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/examples/{NAME}", help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 400; --quick: 4)")
    ap.add_argument("--T", type=int, default=None, help="diffusion steps (default 1000; --quick: 10)")
    ap.add_argument("--images", type=int, default=None, help="test images traced (default 8; --quick: 4)")
    ap.add_argument("--batch", type=int, default=64, help="images in the gradient comparison (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny network, T = 10, a few steps (for tests)")
    args = ap.parse_args(argv)
    quick = dict(steps=4, T=10, images=4) if args.quick else dict(steps=400, T=1000, images=8)
    for name, value in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "T", "images", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.T < 2:
        raise ValueError(f"--T must be at least 2, got {args.T}")
    return args


def trained_model(args, out: Path):
    """Train (or reuse the finished run in ``out/run``) on digits with the true bound; model and guide in float64."""
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
    run = out / "run"
    ckpt = train(config, run, progress=not args.quick, resume=(run / checkpoint.FILENAME).exists())
    pyro.clear_param_store()  # the trainer's parameters; the rebuilt EMA network registers its own
    model, guide = checkpoint.build(checkpoint.load(ckpt))
    return model.double(), guide


@torch.no_grad()
def eps_mse(model, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """||eps - eps_theta(x_t, t)||^2 per image and t = 1..T, measured from the network: (N, T).

    ``noise`` (N, T, *shape) is the eps of x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4).
    """
    s, (N, T) = model.schedule, noise.shape[:2]
    t = torch.arange(1, T + 1).repeat(N)
    eps = noise.reshape(N * T, *noise.shape[2:])
    x0 = x0.repeat_interleave(T, dim=0)
    x_t = at(s.sqrt_abar, t, x0) * x0 + at(s.sqrt_one_minus_abar, t, x0) * eps
    return ((eps - model.predict_eps(x_t, t)) ** 2).flatten(1).sum(-1).reshape(N, T)


def gradients(model, guide, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict:
    """Both objectives' gradients on one batch, each beside the gradient of its eps-MSE form."""
    params = list(model.eps.parameters())
    flat_grad = lambda loss: torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])  # noqa: E731
    elbo = TraceMeanField_ELBO()
    guide_fn = protocol.FixedNoise({protocol.X_t: eps}, guide.from_noise)(guide.per_timestep)
    grads = {}
    for name in ("elbo", "simple"):
        pyro.clear_param_store()
        train_model, weight = objective(name, model)
        grads[name] = flat_grad(elbo.differentiable_loss(train_model.per_timestep, guide_fn, x0, t, weight))

    # The eps-MSE forms (one timestep per image here, so the plate's scale is T).
    s, T, tf = model.schedule, model.T, t.reshape(-1)
    w, first = s.variance(model.variance).w[tf], tf == 1
    x_t = at(s.sqrt_abar, tf, x0) * x0 + at(s.sqrt_one_minus_abar, tf, x0) * eps

    def squared_error():
        return ((eps - model.predict_eps(x_t, tf)) ** 2).flatten(1).sum(-1)

    algorithm1 = flat_grad(squared_error().sum())  # Algorithm 1: the plain eps-MSE
    loc, scale = model.transition(x_t, tf)
    decoder = -model.likelihood(loc[first], scale[first]).log_prob(x0[first]).flatten(1).sum(-1)
    weighted = flat_grad(T * (w * squared_error())[~first].sum() + T * decoder.sum())

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    g_elbo, g_simple = grads["elbo"], grads["simple"]
    return {
        "batch": int(x0.shape[0]),
        "timesteps": tf.tolist(),
        "elbo": {"grad_norm": float(g_elbo.norm()), "vs_weighted_eps_mse_rel_diff": rel(g_elbo, weighted)},
        "simple": {"grad_norm": float(g_simple.norm()), "vs_algorithm1_rel_diff": rel(g_simple, algorithm1)},
        "cosine_elbo_simple": float(g_elbo @ g_simple / (g_elbo.norm() * g_simple.norm())),
        "parameters": int(g_elbo.numel()),
    }


def plot(result: dict, path: Path) -> Path:
    t = np.asarray(result["t"])
    fig, ((ax_w, ax_c, ax_l),) = new_figure(1, 3, size=(15.0, 4.0))
    ax_w.plot(t, result["w"], label="w_t, fixed large sigma_t^2 = beta_t (used)")
    ax_w.plot(t, result["w_small"], ls="--", label="w_t, fixed small sigma_t^2 = beta~_t")
    ax_w.axhline(1.0, color="k", lw=0.8, ls=":", label="L_simple: w_t = 1")
    ax_w.set(xscale="log", yscale="log", xlabel="t", ylabel="w_t (Eq. 12)", title="the weights L_simple replaces by 1")
    ax_w.legend(fontsize=7)
    k = t >= 2
    ax_c.plot(t[k], np.asarray(result["D_C"])[k])
    ax_c.set(
        xscale="log",
        yscale="log",
        xlabel="t",
        ylabel="D C_t (nats)",
        title="the constants L_simple drops (large variance)",
    )
    kl, mse = np.asarray(result["kl"]), np.asarray(result["mse"])
    ax_l.plot(t[k], kl[k], lw=1.5, label="traced KL at site x_{t-1} (L_{t-1})")
    ax_l.plot(
        t[k],
        (np.asarray(result["w"]) * mse + np.asarray(result["D_C"]))[k],
        ".",
        ms=3,
        label="w_t * eps-MSE + D C_t (measured)",
    )
    ax_l.plot(t[k], mse[k], lw=1, alpha=0.7, label="eps-MSE: L_simple's term")
    ax_l.set(
        xscale="log",
        yscale="log",
        xlabel="t",
        ylabel="nats per image",
        title=f"mean over {result['images']} test images, one noise draw",
    )
    ax_l.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    model, guide = trained_model(args, out)
    digits = data.load("digits")
    T, D, shape = model.T, digits.dims, digits.shape
    g = torch.Generator().manual_seed(args.seed + 1)

    # The traced bound, with this script's noise (so the MSE below sees the very same x_t).
    x0 = digits.test[: args.images].double()
    noise = torch.randn((1, len(x0), T, *shape), generator=g, dtype=torch.float64)
    idata = bound(model, guide, x0, noise=noise)
    L = idata.bound["L"].values[0]  # (N, T + 1), column s holds L_s
    mse = eps_mse(model, x0, noise[0]).numpy()  # (N, T), column t - 1 holds t

    s = model.schedule
    w, C = (c.numpy() for c in s.variance(model.variance)[1:])
    kl = np.concatenate([[np.nan], L[:, :T].mean(0)])  # index t: L_{t-1}, the KL at site x_{t-1} (t >= 2)
    mse_t = np.concatenate([[np.nan], mse.mean(0)])
    predicted = w * mse_t + D * C
    per_image = np.abs(L[:, 1:T] - (w[2:] * mse[:, 1:] + D * C[2:])) / np.abs(L[:, 1:T])
    summary = summarize(idata)
    result = {
        "data": "digits",
        "D": D,
        "T": T,
        "images": len(x0),
        "variance": model.variance,
        "seed": args.seed,
        "steps": args.steps,
        "dtype": "float64",
        "betas": s.betas.tolist(),
        "t": list(range(1, T + 1)),
        "w": w[1:].tolist(),
        "w_small": s.variance("small").w[1:].tolist(),
        "D_C": (D * C[1:]).tolist(),
        "kl": kl[1:].tolist(),  # entry t - 1: L_{t-1} for t >= 2; entry 0 (t = 1, the decoder's L_0) is NaN
        "mse": mse_t[1:].tolist(),
        "L_0": float(L[:, 0].mean()),
        "L_T": float(L[:, T].mean()),
        "max_rel_diff_per_image": float(per_image.max()),
        "bits_per_dim": summary["total"]["bits_per_dim"],
        "w_range": [float(w[1:].min()), float(w[1:].max())],
    }
    result["kl"][0] = None  # JSON has no NaN
    batch = digits.train[torch.randperm(len(digits.train), generator=g)[: args.batch]].double()
    t = torch.randint(1, T + 1, (len(batch), 1), generator=g)
    eps = torch.randn((len(batch), *shape), generator=g, dtype=torch.float64)
    result["gradients"] = gradients(model, guide, batch, t, eps)

    # ------------------------------------------------------------------ the table
    print(
        f"digits, T = {T}, D = {D}, {len(x0)} test images, one noise draw each, float64; "
        f"bound {result['bits_per_dim']:.4f} bits/dim after {args.steps} steps"
    )
    print(f"{'t':>5} {'w_t':>10} {'D C_t':>10} {'eps-MSE':>10} {'traced KL':>12} {'w*MSE+DC':>12} {'rel diff':>9}")
    shown = sorted({t for t in (2, 3, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= T} | {T})
    for t_ in shown:
        rd = abs(kl[t_] - predicted[t_]) / abs(kl[t_])
        print(
            f"{t_:>5} {w[t_]:>10.4g} {D * C[t_]:>10.4g} {mse_t[t_]:>10.4g} {kl[t_]:>12.6g} "
            f"{predicted[t_]:>12.6g} {rd:>9.1e}"
        )
    print(f"max relative difference over all t >= 2 and images: {result['max_rel_diff_per_image']:.1e}")
    print(
        f"w_t spans {w[1:].min():.3g} .. {w[1:].max():.3g} (ratio {w[1:].max() / w[1:].min():.0f}), "
        f"largest at t = {int(np.argmax(w[1:])) + 1}; L_0 = {result['L_0']:.4g}, L_T = {result['L_T']:.3g} nats"
    )
    gr = result["gradients"]
    print(f"gradients on one batch of {gr['batch']} training images (one t each), {gr['parameters']} parameters:")
    print(
        f"  bound:    |grad| {gr['elbo']['grad_norm']:.4g}, vs grad of T sum w_t eps-MSE + T L_0: "
        f"rel diff {gr['elbo']['vs_weighted_eps_mse_rel_diff']:.1e}"
    )
    print(
        f"  L_simple: |grad| {gr['simple']['grad_norm']:.4g}, vs grad of sum eps-MSE (Algorithm 1): "
        f"rel diff {gr['simple']['vs_algorithm1_rel_diff']:.1e}"
    )
    print(f"  cosine(bound, L_simple) = {gr['cosine_elbo_simple']:.4f}")

    plot(result, out / "weights.png")
    atomic_write(out / "identity.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"wrote {out / 'weights.png'} and {out / 'identity.json'}")
    return result


if __name__ == "__main__":
    main()
