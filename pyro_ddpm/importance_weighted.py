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
    x0 = _checked_images(model, x0, particles, max_chains)
    K, N = int(particles), x0.shape[0]
    sums = _WeightSums(N, K, return_log_weights)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            for rows, k0, kc, chunk in _chunks(N, K, int(max_chains)):
                torch.manual_seed(int(np.random.SeedSequence([int(seed), chunk]).generate_state(1)[0]))
                x = x0[rows]
                lw = log_weights(model, guide, x.repeat((kc,) + (1,) * (x.dim() - 1))).cpu().reshape(kc, x.shape[0])
                sums.add(rows, k0, lw)
    finally:
        model.train(was_training)
    out = sums.result(int(np.prod(x0.shape[1:])), bool(getattr(model.likelihood, "discrete", True)))
    out.update(max_chains=int(max_chains), seed=seed, network_calls=model.T * sums.chunks)
    if return_log_weights:
        out["log_weights"] = sums.kept.numpy()
    out["seconds"] = time.perf_counter() - start
    return out


def _checked_images(model, x0: torch.Tensor, particles: int, max_chains: int) -> torch.Tensor:
    """``x0`` on the model's grid (integer levels mapped) with the model's data shape, or one clear error."""
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
    return x0


def _chunks(N: int, K: int, max_chains: int):
    """(image rows, first particle, particles, chunk number) of each traced chunk of at most ``max_chains``
    chains: all K particles of as many images as fit, or an image's particles in parts."""
    per_call = min(K, max_chains)  # particles per traced chunk
    images = max(1, max_chains // per_call)  # images per traced chunk
    chunk = 0
    for i in range(0, N, images):
        for k0 in range(0, K, per_call):
            yield slice(i, min(i + images, N)), k0, min(per_call, K - k0), chunk
            chunk += 1


class _WeightSums:
    """Running per-image sums over the K chains' log weights: log sum w, log sum w^2 and the mean of log w
    (and every log w, when kept)."""

    def __init__(self, N: int, K: int, keep: bool):
        self.K, self.chunks = K, 0
        self.lse = torch.full((N,), -math.inf, dtype=torch.float64)
        self.lse2 = torch.full((N,), -math.inf, dtype=torch.float64)
        self.mean_lw = torch.zeros(N, dtype=torch.float64)
        self.kept = torch.zeros(N, K, dtype=torch.float64) if keep else None

    def add(self, rows: slice, k0: int, lw: torch.Tensor) -> None:
        """The log weights ``lw`` (particles, images) of particles k0.. of images ``rows``."""
        self.lse[rows] = torch.logaddexp(self.lse[rows], torch.logsumexp(lw, 0))
        self.lse2[rows] = torch.logaddexp(self.lse2[rows], torch.logsumexp(2 * lw, 0))
        self.mean_lw[rows] += lw.sum(0) / self.K
        if self.kept is not None:
            self.kept[rows, k0 : k0 + lw.shape[0]] = lw.T
        self.chunks += 1

    def result(self, D: int, discrete: bool) -> dict:
        """L_K per image (Eq. (2)), its mean in the bound's unit with the standard error, the K = 1 estimate, ESS."""
        nats = -(self.lse - math.log(self.K))
        mean, se = stats.mean_se(stats.per_dim(nats, D, discrete))
        return {
            "nats": nats.numpy(),
            "elbo_nats": (-self.mean_lw).numpy(),
            "ess": torch.exp(2 * self.lse - self.lse2).numpy(),
            "discrete": discrete,
            "unit": stats.unit(discrete),
            stats.unit(discrete): mean,
            "se": se,
            "particles": self.K,
            "images": len(nats),
            "dims": D,
        }
