"""The importance-weighted bound (Burda, Grosse, Salakhutdinov 2016) of a DDPM from its own Pyro programs.

With K full chains x_{1:T}^k ~ q(x_{1:T} | x_0) (the guide's ``chain``) and log weights

    log w_k = log p_theta(x_0, x_{1:T}^k) - log q(x_{1:T}^k | x_0)                            (1)

(the model's ``chain`` replayed on the guide's draws: every site's log-probability, the observed
x_0's decoder included, minus the guide's), the bound on -log p_theta(x_0) is

    L_K(x_0) = -log (1/K) sum_k w_k  >=  -log p_theta(x_0),                                    (2)

E L_1 = the negative ELBO of Eq. 5 (the bound of :mod:`pyro_ddpm.evaluate`, there with each term's
expectation over x_t taken analytically), E L_K is non-increasing in K and tends to -log p_theta(x_0)
as K -> infinity (Burda et al. Theorem 1). Computed with ``poutine.trace`` of ``guide.chain`` and
``poutine.trace(poutine.replay(model.chain, trace=guide_trace))``, Pyro's own importance machinery
(``pyro.infer.Importance`` does the same per particle), vectorized over particles by repeating each
image, in chunks of at most ``max_chains`` chains under ``torch.no_grad`` (a chunk holds T sites of
``(chains, *shape)`` values), and reduced per image with a running log-sum-exp, so memory does not grow
with K. The effective sample size (sum w)^2 / sum w^2 is reported beside it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from pyro import poutine

from pyro_ddpm import stats
from pyro_ddpm.adapters import to_grid


def log_weights(model, guide, x0: torch.Tensor) -> torch.Tensor:
    """log w of Eq. (1) for one chain per row of ``x0`` ``(B, *shape)``: a (B,) tensor, from traced log-probs.

    Draws from the global RNG. Every sample site of both programs counts (with its scale and mask),
    so ``pyro.factor`` sites and any decoder are included.
    """
    guide_trace = poutine.trace(guide.chain).get_trace(x0)
    model_trace = poutine.trace(poutine.replay(model.chain, trace=guide_trace)).get_trace(x0)
    B = x0.shape[0]

    def total(trace):
        trace.compute_log_prob()
        out = torch.zeros(B, dtype=torch.float64, device=x0.device)
        for site in trace.nodes.values():
            if site["type"] == "sample":
                out = out + site["log_prob"].double().expand(B)
        return out

    return total(model_trace) - total(guide_trace)


def importance_weighted(
    model,
    guide,
    x0: torch.Tensor,
    particles: int = 16,
    max_chains: int = 256,
    seed: int = 0,
    return_log_weights: bool = False,
) -> dict:
    """L_K of Eq. (2) per image with its standard error over images; K = ``particles``.

    :param x0: ``(N, *shape)`` images (on the decoder's grid, integer levels such as uint8 mapped by
        :func:`pyro_ddpm.adapters.to_grid`, or continuous data for a density decoder).
    :param max_chains: chains traced at once (memory: about T * max_chains * D values).
    :param seed: the chunks draw from the global RNG, forked and seeded by (seed, chunk): the result
        depends on ``seed``, ``particles`` and ``max_chains``, and leaves the caller's RNG untouched.
    :returns: dict with ``nats`` (N,) = L_K per image, ``bits_per_dim`` (discrete decoder) or
        ``nats_per_dim`` (continuous) with ``se`` over images in that unit, ``elbo_nats`` (N,) the mean
        of -log w over the K chains (an estimate of the bound at K = 1), ``ess`` (N,), ``particles``,
        ``network_calls`` (T per traced chunk), ``seconds``; ``log_weights`` (N, K) if asked for.
    """
    start = time.perf_counter()
    if not x0.dtype.is_floating_point and hasattr(model.likelihood, "levels"):
        x0 = to_grid(x0, int(model.likelihood.levels)).to(model.device)
    if int(particles) < 1 or int(max_chains) < 1:
        raise ValueError(
            f"importance_weighted: particles and max_chains must be positive, got {particles}, {max_chains}"
        )
    if tuple(x0.shape[1:]) != tuple(model.shape):
        raise ValueError(
            f"importance_weighted: x0 has shape {tuple(x0.shape)}, but the model's data shape is "
            f"(N, {', '.join(map(str, model.shape))})"
        )
    K, N = int(particles), x0.shape[0]
    D = int(np.prod(x0.shape[1:]))
    per_call = min(K, int(max_chains))  # particles per traced chunk
    images = max(1, int(max_chains) // per_call)  # images per traced chunk
    lse = torch.full((N,), -math.inf, dtype=torch.float64)
    lse2 = torch.full((N,), -math.inf, dtype=torch.float64)
    mean_lw = torch.zeros(N, dtype=torch.float64)
    kept = torch.zeros(N, K, dtype=torch.float64) if return_log_weights else None
    calls, chunk = 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            for i in range(0, N, images):
                x = x0[i : i + images]
                b = x.shape[0]
                for k0 in range(0, K, per_call):
                    kc = min(per_call, K - k0)
                    torch.manual_seed(int(np.random.SeedSequence([int(seed), chunk]).generate_state(1)[0]))
                    chunk += 1
                    lw = log_weights(model, guide, x.repeat((kc,) + (1,) * (x.dim() - 1))).cpu().reshape(kc, b)
                    calls += model.T
                    rows = slice(i, i + b)
                    lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(lw, 0))
                    lse2[rows] = torch.logaddexp(lse2[rows], torch.logsumexp(2 * lw, 0))
                    mean_lw[rows] += lw.sum(0) / K
                    if kept is not None:
                        kept[rows, k0 : k0 + kc] = lw.T
    finally:
        model.train(was_training)
    nats = -(lse - math.log(K))
    discrete = bool(getattr(model.likelihood, "discrete", True))
    mean, se = stats.mean_se(stats.per_dim(nats, D, discrete))
    out = {
        "nats": nats.numpy(),
        "elbo_nats": (-mean_lw).numpy(),
        "ess": torch.exp(2 * lse - lse2).numpy(),
        "discrete": discrete,
        "unit": stats.unit(discrete),
        stats.unit(discrete): mean,
        "se": se,
        "particles": K,
        "images": N,
        "dims": D,
        "max_chains": int(max_chains),
        "seed": seed,
        "network_calls": calls,
    }
    if kept is not None:
        out["log_weights"] = kept.numpy()
    out["seconds"] = time.perf_counter() - start
    return out
