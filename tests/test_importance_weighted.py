"""The importance-weighted bound against the ELBO and the model's exact marginal (float64).

Continuous Gaussian data x_0 ~ N(m, s^2 I), D = 2, T = 10, the Gaussian density decoder and the
optimal eps-predictor of N(m, s^2) data, eps*(x_t, t) = sqrt(1 - abar_t)(x_t - sqrt(abar_t) m) /
(abar_t s^2 + 1 - abar_t). Its mean mu_theta(x_t, t) = u_t x_t + v_t is affine (Eq. 11), so with
x_T ~ N(0, 1) the reverse chain x_{t-1} = u_t x_t + v_t + sigma_t z is linear-Gaussian and the model's
marginal p_theta(x_0) is N(mu_0, v_0) per dimension, by the recursion mu <- u_t mu + v_t,
v <- u_t^2 v + sigma_t^2 from (0, 1) at t = T down to t = 1 (the decoder N(mu_theta(x_1, 1), sigma_1^2)
is the last step). -log p_theta(x_0) is then exact, computed below in numpy; every L_K must lie above it.
The ``small`` variance (sigma_t^2 = beta_tilde_t) leaves a large gap between the ELBO and the NLL here
(the model's marginal variance is 0.054 against the data's 0.09), so K matters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_ddpm import evaluate
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.importance_weighted import importance_weighted, log_weights
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, GaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.schedule import Schedule

pytestmark = pytest.mark.usefixtures("float64")

M, S, D, N, T = 0.1, 0.3, 2, 1000, 10
BETAS = np.linspace(0.01, 0.5, T)
ABAR = np.concatenate([[1.0], np.cumprod(1 - BETAS)])


class OptimalEps(nn.Module):
    def forward(self, x, t):
        a = torch.as_tensor(ABAR)[t].to(x)[:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S**2 + 1 - a)


def exact_nll(x0, variance):
    """-log p_theta(x_0) of the linear-Gaussian reverse chain (module docstring), per image."""
    beta = np.concatenate([[np.nan], BETAS])
    bt = np.concatenate([[np.nan], (1 - ABAR[:-1]) / (1 - ABAR[1:]) * BETAS])
    mean, var = 0.0, 1.0
    for t in range(T, 0, -1):
        s2 = bt[2] if t == 1 else (beta[t] if variance == "large" else bt[t])
        g = math.sqrt(1 - ABAR[t]) / (ABAR[t] * S**2 + 1 - ABAR[t])
        ec, r = beta[t] / math.sqrt(1 - ABAR[t]), 1 / math.sqrt(1 - beta[t])
        u, v = r * (1 - ec * g), r * ec * g * math.sqrt(ABAR[t]) * M
        mean, var = u * mean + v, u * u * var + s2
    return (0.5 * (x0 - mean) ** 2 / var + 0.5 * np.log(2 * np.pi * var)).sum(1)


def paired(a, b):
    d = np.asarray(a) - np.asarray(b)
    return d.mean(), d.std(ddof=1) / math.sqrt(len(d))


@pytest.fixture(scope="module")
def setup():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x0 = torch.tensor(np.random.default_rng(0).normal(M, S, size=(N, D)))
        model = ReverseProcess(OptimalEps(), Schedule(BETAS), "small", GaussianLikelihood(), shape=(D,))
        guide = ForwardProcess(model.schedule, event_dim=1)
        bound = evaluate.bound(model, guide, x0).bound["L"].values.mean(0).sum(-1)
        iw = {K: importance_weighted(model, guide, x0, particles=K, seed=K) for K in (1, 4, 16)}
        return {
            "x0": x0,
            "model": model,
            "guide": guide,
            "bound": bound,
            "iw": iw,
            "nll": exact_nll(x0.numpy(), "small"),
        }
    finally:
        torch.set_default_dtype(old)


def test_one_particle_is_the_elbo(setup):
    diff, se = paired(setup["iw"][1]["nats"], setup["bound"])
    assert abs(diff) < 3 * se
    # the K = 16 run's mean of -log w over its chains is a 16-fold lower-noise estimate of the same bound
    diff, se = paired(setup["iw"][16]["elbo_nats"], setup["bound"])
    assert abs(diff) < 3 * se


def test_bound_is_monotone_in_K_and_approaches_the_exact_nll_from_above(setup):
    iw, nll = setup["iw"], setup["nll"]
    for small, large in ((1, 4), (4, 16)):
        diff, se = paired(iw[small]["nats"], iw[large]["nats"])
        assert diff > 3 * se  # strictly decreasing here (the gap is large), hence non-increasing
    gaps = {K: paired(iw[K]["nats"], nll) for K in (1, 4, 16)}
    for gap, se in gaps.values():
        assert gap > -3 * se  # above the exact NLL
    assert gaps[16][0] < 0.1 * gaps[1][0]  # measured: 2.0 -> 0.47 -> 0.09 nats per image
    assert np.all(iw[16]["ess"] >= 1 - 1e-9) and np.all(iw[16]["ess"] <= 16 + 1e-9)


def test_log_weights_of_one_chain_by_hand():
    """log w of a single traced chain against the Gaussian log-densities written out (numpy)."""
    model = ReverseProcess(OptimalEps(), Schedule(BETAS), "large", GaussianLikelihood(), shape=(D,))
    guide = ForwardProcess(model.schedule, event_dim=1)
    x0 = torch.tensor([[0.2, -0.1]])

    torch.manual_seed(5)
    trace = poutine.trace(guide.chain).get_trace(x0)
    torch.manual_seed(5)
    lw = float(log_weights(model, guide, x0))
    xs = {s: trace.nodes[f"x_{s}"]["value"].numpy()[0] for s in range(1, T + 1)}
    xs[0] = x0.numpy()[0]
    beta = np.concatenate([[np.nan], BETAS])
    bt = np.concatenate([[np.nan], (1 - ABAR[:-1]) / (1 - ABAR[1:]) * BETAS])

    def logn(x, mu, var):
        return float((-0.5 * (x - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var)).sum())

    def mu_theta(x, t):
        eps = math.sqrt(1 - ABAR[t]) * (x - math.sqrt(ABAR[t]) * M) / (ABAR[t] * S**2 + 1 - ABAR[t])
        return (x - beta[t] / math.sqrt(1 - ABAR[t]) * eps) / math.sqrt(1 - beta[t])

    log_p = logn(xs[T], 0.0, 1.0) + sum(
        logn(xs[t - 1], mu_theta(xs[t], t), bt[2] if t == 1 else beta[t]) for t in range(T, 0, -1)
    )
    log_q = logn(xs[T], math.sqrt(ABAR[T]) * xs[0], 1 - ABAR[T])
    for t in range(T, 1, -1):
        loc = (
            math.sqrt(ABAR[t - 1]) * beta[t] / (1 - ABAR[t]) * xs[0]
            + math.sqrt(1 - beta[t]) * (1 - ABAR[t - 1]) / (1 - ABAR[t]) * xs[t]
        )
        log_q += logn(xs[t - 1], loc, bt[t])
    assert lw == pytest.approx(log_p - log_q, rel=1e-10)


def test_chunking_and_seed(setup):
    model, guide, x0 = setup["model"], setup["guide"], setup["x0"][:6].double()
    a = importance_weighted(model, guide, x0, particles=8, max_chains=4, seed=1, return_log_weights=True)
    b = importance_weighted(model, guide, x0, particles=8, max_chains=4, seed=1)
    c = importance_weighted(model, guide, x0, particles=8, max_chains=4, seed=2)
    np.testing.assert_array_equal(a["nats"], b["nats"])
    assert np.abs(a["nats"] - c["nats"]).max() > 1e-6
    lw = a["log_weights"]  # (N, K), chunks of 4 particles
    manual = -(np.logaddexp.reduce(lw, axis=1) - math.log(8))
    np.testing.assert_allclose(a["nats"], manual, rtol=1e-12)
    assert a["network_calls"] == 6 * 2 * T  # 6 images x 2 chunks of 4 particles x T transitions
    assert a["unit"] == "nats_per_dim"


def test_discrete_decoder_reports_bits_and_rejects_bad_shapes():
    model = ReverseProcess(OptimalEps(), Schedule(BETAS), "large", DiscretizedGaussianLikelihood(17), shape=(D,))
    guide = ForwardProcess(model.schedule, event_dim=1)
    x0 = torch.tensor([[0.125, -0.25], [0.0, 1.0]])
    r = importance_weighted(model, guide, x0, particles=4)
    assert r["unit"] == "bits_per_dim" and r["bits_per_dim"] == pytest.approx(r["nats"].mean() / (D * math.log(2)))
    assert np.all(r["nats"] > 0)  # a probability mass: -log P > 0
    with pytest.raises(ValueError, match="data shape"):
        importance_weighted(model, guide, torch.zeros(2, 3), particles=2)
    with pytest.raises(ValueError, match="positive"):
        importance_weighted(model, guide, x0, particles=0)
