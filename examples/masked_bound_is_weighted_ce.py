"""The masked bound is a weighted cross-entropy: each traced L_{t-1} of the absorbing program, checked.

    python examples/masked_bound_is_weighted_ce.py            # T = 1000, 32 test digits: seconds on CPU
    python examples/masked_bound_is_weighted_ce.py --quick    # T = 10, 4 test digits

The guide is the masked (absorbing-state) forward process (``guides/masked.py``), the model the
x_0-parameterized ``CategoricalReverseProcess`` (``models/categorical.py``) around a small, untrained
digits U-Net. For t >= 2 the term ``TraceMeanField_ELBO`` takes at site x_{t-1} (the KL between the
guide's q(x_{t-1} | x_t, x_0) and the model's posterior mixture p_theta(x_{t-1} | x_t)), and at t = 1
the decoder's term at site x_0, equal

    L_{t-1} = w_t sum_{i: x_t^i = M} -log p_theta(x_0^i | x_t),    w_t = (alpha_{t-1} - alpha_t) / (1 - alpha_t)

for each image and each draw of x_t, not only in expectation (w_1 = 1; L_T = 0 since alpha_T = 0).
The script draws x_t from its own uniform noise (the guide's inverse-CDF draw, fed through
``protocol.FixedNoise`` as the trainer and the evaluator do), traces both programs' training form at
a set of timesteps including t = 1 and t = T, computes the cross-entropy over the masked pixels
directly from ``model.network_output(x_t, t)`` (log p_theta(x_0 = v_k | x_t)), and prints both sides
for the linear and the cosine masking schedules. Everything runs in float64; the two sides agree to
round-off (torch's ``Categorical(probs=...)`` stores the guide's one-hot posterior of an unmasked pixel
as log(1 - 2^-52) rather than 0, which leaves about -2e-16 nats per unmasked pixel on the traced side).

It then differentiates both sides with respect to the network's parameters (the loss SVI
differentiates, ``TermwiseELBO``'s sum of scaled terms, against (T/K) sum_pairs w_t CE), and does the
same for the ``simple`` objective (``model.training_program("simple")``): its weights
lambda_t = 1 / (T w_t) turn each traced term into lambda_t L_{t-1} = CE_t / T, and with the plate's
unbiasing scale T/K (K timesteps per image) each pair adds CE_t / K to the loss: the unweighted
cross-entropy over the masked pixels, averaged over the drawn timesteps.

The U-Net starts its residual branches and its read-out at zero (as the official code does), which
would make an untrained model's prediction uniform whatever x_t; here those layers are redrawn with
PyTorch's default initialization, so the prediction depends on x_t and t and every layer gets a
gradient. ``--out FILE`` also writes every number printed as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import torch

from pyro_ddpm import data, grid, presets, protocol
from pyro_ddpm.discrete import MASKING_SCHEDULES
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.files import atomic_write
from pyro_ddpm.guides import MaskedForwardProcess
from pyro_ddpm.likelihoods import default_likelihood
from pyro_ddpm.models import CategoricalReverseProcess
from pyro_ddpm.nets import build_network

NAME = "masked_bound_is_weighted_ce"
SHAPE, LEVELS = (1, 8, 8), 17  # the embedded digits


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=None, help="diffusion steps (default 1000; --quick: 10)")
    ap.add_argument("--images", type=int, default=None, help="test images traced (default 32; --quick: 4)")
    ap.add_argument("--ch", type=int, default=8, help="the U-Net's base width (default %(default)s)")
    ap.add_argument("--timesteps", type=int, nargs="+", default=None, help="timesteps shown (default: 1 .. T, spread)")
    ap.add_argument("--schedules", nargs="+", default=list(MASKING_SCHEDULES), help="masking schedules (default both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--quick", action="store_true", help="T = 10, 4 images (for tests)")
    args = ap.parse_args(argv)
    quick = dict(T=10, images=4) if args.quick else dict(T=1000, images=32)
    for name, value in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("images", "ch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.T < 2:
        raise ValueError(f"--T must be at least 2, got {args.T}")
    if args.timesteps is None:
        args.timesteps = default_timesteps(args.T)
    args.timesteps = sorted(set(args.timesteps))
    bad = [t for t in args.timesteps if not 1 <= t <= args.T]
    if bad:
        raise ValueError(f"--timesteps must lie in 1..T = 1..{args.T}, got {bad}")
    unknown = [s for s in args.schedules if s not in MASKING_SCHEDULES]
    if unknown:
        raise ValueError(f"unknown masking schedules {unknown}; choose from {list(MASKING_SCHEDULES)}")
    return args


def default_timesteps(T: int) -> list[int]:
    """t = 1, 2, 3, a spread of larger ones, T - 1 and T."""
    return sorted({t for t in (1, 2, 3, 5, 10, 50, 100, 300, 500, T - 1, T) if 1 <= t <= T})


def build(T: int, schedule: str, ch: int = 8, seed: int = 0):
    """(model, guide) in float64: the masked guide over 17 levels and the categorical model around a small,
    untrained digits U-Net whose zero-initialized layers are redrawn (see the module docstring)."""
    guide = MaskedForwardProcess(T, LEVELS, schedule, event_dim=len(SHAPE))
    spec = protocol.DataSpec(SHAPE, LEVELS)
    preset = dict(presets.NETWORKS["digits"], ch=ch, dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network(CategoricalReverseProcess.network_config(preset, spec))
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and not bool(module.weight.any()):
                module.reset_parameters()
    model = CategoricalReverseProcess(net, guide.schedule, default_likelihood(LEVELS), SHAPE)
    return model.double().eval(), guide


def draw_noise(images: int, K: int, seed: int) -> torch.Tensor:
    """Standard uniform noise for the guide's x_t, one per element of each (image, t) pair: (images * K, *SHAPE)."""
    g = torch.Generator().manual_seed(seed)
    return protocol.standard_noise("uniform", (images * K, *SHAPE), g, dtype=torch.float64)


def traced(model, guide, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, weight=None):
    """Both programs' training form traced on the pairs of ``t`` (B, K): (terms by site, the guide's x_t)."""
    pyro.clear_param_store()
    elbo = TermwiseELBO()
    model_trace, guide_trace = elbo.traces(
        model.per_timestep,
        protocol.FixedNoise({protocol.X_t: noise}, guide.from_noise)(guide.per_timestep),
        x0,
        t,
        weight,
    )
    return elbo.terms_from_traces(model_trace, guide_trace), guide_trace.nodes[protocol.X_t]["value"]


def masked_cross_entropy(model, guide, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """-sum_{i: x_t^i = M} log p_theta(x_0^i | x_t) per pair, from the network output, without the programs.

    Returns (cross-entropy (B*K,), masked pixels (B*K,), x_t): x_t is the guide's inverse-CDF draw of
    q(x_t | x_0) from ``noise``; ``model.network_output`` gives log p_theta(x_0 = v_k | x_t), (B*K, C, H, W, K).
    """
    x0, t = protocol.pairs(x0, t)
    x_t = guide.from_noise(guide.q_xt(x0, t), noise)
    log_p = model.network_output(x_t, t)
    at_x0 = log_p.gather(-1, grid.index(x0, LEVELS).unsqueeze(-1)).squeeze(-1)
    masked = x_t == guide.schedule.mask
    return -(at_x0 * masked).flatten(1).sum(-1), masked.flatten(1).sum(-1), x_t


def compare(model, guide, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, weight=None) -> dict:
    """The traced L_{t-1} per pair against weight[t] * CE (``weight`` defaults to the schedule's w_t)."""
    w = guide.schedule.weight if weight is None else weight
    terms, x_t_traced = traced(model, guide, x0, t, noise)
    ce, masked, x_t = masked_cross_entropy(model, guide, x0, t, noise)
    if not torch.equal(x_t, x_t_traced):
        raise AssertionError("the guide's traced x_t is not the draw of the given noise")
    tf = t.reshape(-1)
    L = (terms[protocol.X_PREV].value + terms[protocol.X_0].value).detach()  # masked to t > 1 and t = 1
    rhs = (w.to(ce)[tf] * ce).detach()
    _, simple = model.training_program("simple")  # (program, lambda_t = 1 / (T w_t))
    lam = simple.to(L)[tf]
    return {
        "t": tf,
        "L": L,
        "rhs": rhs,
        "ce": ce.detach(),
        "masked": masked,
        "L_T": terms[protocol.X_T].value.detach(),
        "lambda": lam,
        "simple_lhs": lam * L,  # lambda_t L_{t-1}
        "simple_rhs": ce.detach() / guide.T,  # CE / T
    }


def max_diffs(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> tuple[float, float]:
    """max |a - b| over all entries; max |a - b| / |b| over the entries ``where`` (b != 0 there)."""
    d = (a - b).abs()
    where = b != 0 if where is None else where
    rel = float((d[where] / b[where].abs()).max()) if bool(where.any()) else 0.0
    return float(d.max()), rel


def gradients(model, guide, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, weight=None) -> dict:
    """Gradients with respect to the network's parameters of the traced losses and their cross-entropy forms.

    ``elbo``: the traced loss sum(value * scale) (scale T/K) against (T/K) sum_pairs weight[t] CE;
    ``simple``: the loss traced with lambda_t = 1/(T w_t) against (1/K) sum_pairs CE. ``weight`` defaults to w_t.
    """
    params = [p for p in model.eps.parameters() if p.requires_grad]

    def flat_grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    w = guide.schedule.weight if weight is None else weight
    T, K, tf = guide.T, t.shape[1], t.reshape(-1)
    elbo = TermwiseELBO()
    out = {"parameters": sum(p.numel() for p in params)}
    for name in ("elbo", "simple"):
        program, lam = model.training_program(name)
        terms, _ = traced(program, guide, x0, t, noise, lam)
        loss = elbo.loss_from_terms(terms)
        ce, _, _ = masked_cross_entropy(model, guide, x0, t, noise)
        form = (T / K) * (w.to(ce)[tf] * ce).sum() if name == "elbo" else ce.sum() / K
        g_traced, g_form = flat_grad(loss), flat_grad(form)
        out[name] = {
            "loss": float(loss.detach()),
            "ce_form": float(form.detach()),
            "loss_rel_diff": float(((loss - form).abs() / form.abs()).detach()),
            "grad_norm": float(g_traced.norm()),
            "grad_rel_diff": float((g_traced - g_form).norm() / g_form.norm()),
        }
    return out


def run_schedule(schedule: str, x0: torch.Tensor, timesteps: list[int], T: int, ch: int, seed: int) -> dict:
    """The identity at ``timesteps`` for every image of ``x0``, and the gradients, under one masking schedule."""
    model, guide = build(T, schedule, ch, seed)
    t = torch.tensor(timesteps).expand(x0.shape[0], -1)
    noise = draw_noise(x0.shape[0], t.shape[1], seed + 1)
    c = compare(model, guide, x0, t, noise)
    rows = []
    for step in timesteps:
        i = c["t"] == step
        kept = c["masked"][i] > 0
        abs_diff, rel_diff = max_diffs(c["L"][i], c["rhs"][i], kept)
        _, simple_rel = max_diffs(c["simple_lhs"][i], c["simple_rhs"][i], kept)
        rows.append(
            {
                "t": step,
                "alpha": float(guide.schedule.alpha[step]),
                "w": float(guide.schedule.weight[step]),
                "lambda": float(c["lambda"][i][0]),
                "masked": int(c["masked"][i].sum()),
                "ce": float(c["ce"][i].mean()),
                "L": float(c["L"][i].mean()),
                "w_ce": float(c["rhs"][i].mean()),
                "max_abs_diff": abs_diff,
                "max_rel_diff": rel_diff,
                "simple_max_rel_diff": simple_rel,
            }
        )
    abs_all, rel_all = max_diffs(c["L"], c["rhs"], c["masked"] > 0)
    _, lam = model.training_program("simple")
    return {
        "schedule": schedule,
        "rows": rows,
        "max_abs_diff": abs_all,
        "max_rel_diff": rel_all,
        "simple_max_rel_diff": max_diffs(c["simple_lhs"], c["simple_rhs"], c["masked"] > 0)[1],
        "L_T_max_abs": float(c["L_T"].abs().max()),
        "lambda_T_w_minus_1": float((lam[1:] * T * guide.schedule.weight[1:] - 1.0).abs().max()),
        "gradients": gradients(model, guide, x0, t, noise),
    }


def main(argv=None) -> dict:
    args = parse(argv)
    x0 = data.load("digits").test[: args.images].double()
    result = {
        "data": "digits",
        "T": args.T,
        "images": len(x0),
        "levels": LEVELS,
        "dtype": "float64",
        "seed": args.seed,
        "timesteps": list(args.timesteps),
        "schedules": {s: run_schedule(s, x0, args.timesteps, args.T, args.ch, args.seed) for s in args.schedules},
    }

    # ------------------------------------------------------------------ the table
    K = len(args.timesteps)
    print(
        f"digits, {len(x0)} test images x {K} timesteps (one x_t each), T = {args.T}, 17 levels + mask, "
        f"untrained U-Net (ch {args.ch}), float64"
    )
    print(
        "CE = -sum over masked pixels of log p_theta(x_0 | x_t). CE, traced L = L_{t-1} and w_t*CE: means over the\n"
        "images; masked: pixels over all images; abs/rel diff: maxima over the images (rel: those with a masked\n"
        "pixel); lambda_t = 1/(T w_t): the simple objective's weights; simple rel: lambda_t L_{t-1} against CE / T"
    )
    for name, r in result["schedules"].items():
        print(f"\n{name} masking schedule")
        print(
            f"{'t':>5} {'alpha_t':>9} {'w_t':>9} {'lambda_t':>9} {'masked':>6} {'CE':>9} {'traced L':>11} "
            f"{'w_t*CE':>11} {'abs diff':>8} {'rel diff':>8} {'simple rel':>10}"
        )
        for row in r["rows"]:
            print(
                f"{row['t']:>5} {row['alpha']:>9.4g} {row['w']:>9.3g} {row['lambda']:>9.4g} {row['masked']:>6} "
                f"{row['ce']:>9.5g} {row['L']:>11.6g} {row['w_ce']:>11.6g} {row['max_abs_diff']:>8.1e} "
                f"{row['max_rel_diff']:>8.1e} {row['simple_max_rel_diff']:>10.1e}"
            )
        g = r["gradients"]
        print(
            f"all pairs: max abs diff {r['max_abs_diff']:.1e} nats, max rel diff {r['max_rel_diff']:.1e}; "
            f"L_T = {r['L_T_max_abs']:.1e} for every image; max |lambda_t T w_t - 1| = {r['lambda_T_w_minus_1']:.1e}"
        )
        print(f"traced losses (scale T/K = {args.T}/{K} per pair) and their gradients ({g['parameters']} parameters):")
        print(
            f"  bound  {g['elbo']['loss']:>11.6g} vs (T/K) sum w_t CE: rel diff {g['elbo']['loss_rel_diff']:.1e}; "
            f"|grad| {g['elbo']['grad_norm']:.4g}, rel diff {g['elbo']['grad_rel_diff']:.1e}"
        )
        print(
            f"  simple {g['simple']['loss']:>11.6g} vs (1/K) sum CE:     rel diff {g['simple']['loss_rel_diff']:.1e}; "
            f"|grad| {g['simple']['grad_norm']:.4g}, rel diff {g['simple']['grad_rel_diff']:.1e}"
        )
    if args.out is not None:
        out = Path(args.out)
        atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
