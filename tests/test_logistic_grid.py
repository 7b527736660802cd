"""The logistic-mixture prior of the grid models, against scipy's logistic distribution in float64.

The prior's bin masses are differences of scipy's logistic CDF at the bin edges (halfway between levels,
the end bins open); the posterior is Bayes' rule with scipy's normal density; the moment-matched scale
is beta_tilde_t + coef_x0_t^2 Var[x_0 | x_t] of that posterior. None of it calls the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import (
    LogisticGridReverseProcess,
    MomentMatchedLogisticGridReverseProcess,
)
from pyro_ddpm.models.logistic_grid import S0, logistic_mixture_logits
from pyro_ddpm.protocol import DataSpec
from pyro_ddpm.schedule import Schedule

pytestmark = pytest.mark.usefixtures("float64")


def values(K):
    return np.array([-1.0 + 2.0 * k / (K - 1) for k in range(K)])


def np_prior(a, mu, r, K):
    """P(v_k) = sum_m pi_m [F((e_k+ - mu_m) / s_m) - F((e_k- - mu_m) / s_m)], F scipy's logistic CDF (its
    survival function right of mu_m)."""
    pi = np.exp(a - a.max())
    pi /= pi.sum()
    v = values(K)
    edges = np.concatenate([[-np.inf], v[:-1] + 1.0 / (K - 1), [np.inf]])
    p = np.zeros(K)
    for m in range(len(a)):
        s = S0 * math.exp(r[m])
        hi, lo = (edges[1:] - mu[m]) / s, (edges[:-1] - mu[m]) / s
        # the difference on the side of the tail it lies in: no cancellation of two numbers near 1
        d = np.where(
            lo > 0, stats.logistic.sf(lo) - stats.logistic.sf(hi), stats.logistic.cdf(hi) - stats.logistic.cdf(lo)
        )
        p += pi[m] * d
    return p


@pytest.mark.parametrize("K", [2, 17, 256])
@pytest.mark.parametrize("M", [1, 3])
def test_bin_masses_are_differences_of_the_logistic_cdf(K, M):
    rng = np.random.default_rng(K + M)
    C, P = 2, 5  # channels, positions
    out = rng.normal(scale=[[[2.0]], [[0.8]], [[1.5]]], size=(3, M, C * P)).reshape(3, M, C, P)
    out[2, :, 0, 0] = -6.0  # a sharp component (s = 0.5 e^-6, well under a bin of 256 levels)
    out[2, :, 1, 0] = 4.0  # a flat one
    net = torch.tensor(out.transpose(2, 0, 1, 3).reshape(1, C * 3 * M, P))  # (B, C * 3M, P)
    logp = logistic_mixture_logits(net, K, M).reshape(C, K, P).numpy()
    for c in range(C):
        for i in range(P):
            expected = np_prior(out[0, :, c, i], out[1, :, c, i], out[2, :, c, i], K)
            np.testing.assert_allclose(np.exp(logp[c, :, i]), expected, rtol=1e-9, atol=1e-300)
            assert math.isclose(np.exp(logp[c, :, i]).sum(), 1.0, rel_tol=1e-12)


def test_a_sharp_component_puts_its_mass_on_one_level():
    K = 17
    out = torch.zeros(1, 3, 1)
    out[0, 1] = float(values(K)[9])  # mu on level 9
    out[0, 2] = -8.0  # s = 0.5 e^-8 << 1/16
    p = logistic_mixture_logits(out.double(), K, 1).exp().flatten()
    assert p[9] > 1 - 1e-12 and p.sum().item() == pytest.approx(1.0, abs=1e-12)


class MixtureParams(torch.nn.Module):
    """A 'network' returning fixed mixture parameters (a, mu, r) per pixel, whatever x_t and t."""

    def __init__(self, params: np.ndarray):  # (D, 3, M)
        super().__init__()
        self.register_buffer("params", torch.as_tensor(params, dtype=torch.float64).reshape(-1))
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return (self.params + 0.0 * self.anchor).expand(x.shape[0], -1)


@pytest.mark.parametrize("cls", [LogisticGridReverseProcess, MomentMatchedLogisticGridReverseProcess])
@pytest.mark.parametrize("t", [1, 4, 9])
def test_posterior_mean_and_scale_are_bayes_rule_under_the_logistic_prior(cls, t, ref):
    K, D, M, T = 17, 3, 3, 10
    schedule = Schedule.linear(T, 0.02, 0.3)
    c = ref.constants(schedule.betas.numpy())
    rng = np.random.default_rng(t)
    params = rng.normal(size=(D, 3, M))
    variance = "small" if cls is LogisticGridReverseProcess else None
    model = cls(MixtureParams(params), schedule, variance, DiscretizedGaussianLikelihood(K), shape=(D,))
    x_t = rng.normal(size=D)
    prior = np.array([np_prior(params[d, 0], params[d, 1], params[d, 2], K) for d in range(D)])
    like = stats.norm.pdf(x_t[:, None], math.sqrt(c["abar"][t]) * values(K)[None], math.sqrt(1 - c["abar"][t]))
    w = prior * like
    w /= w.sum(1, keepdims=True)
    x0_hat = (w * values(K)).sum(1)
    var = (w * (values(K) - x0_hat[:, None]) ** 2).sum(1)
    loc, scale = (v.detach()[0].numpy() for v in model.transition(torch.tensor(x_t)[None], torch.tensor([t])))
    np.testing.assert_allclose(loc, c["coef_x0"][t] * x0_hat + c["coef_xt"][t] * x_t, rtol=1e-9, atol=1e-13)
    s2 = c["sigma2_small"][t] + (c["coef_x0"][t] ** 2 * var if cls is MomentMatchedLogisticGridReverseProcess else 0)
    np.testing.assert_allclose(scale, np.sqrt(s2) * np.ones(D), rtol=1e-9)


def test_simple_trains_the_same_mean_under_the_fixed_small_variance():
    K, D, M = 17, 4, 3
    schedule = Schedule.linear(10, 0.02, 0.3)
    params = np.random.default_rng(0).normal(size=(D, 3, M))
    model = MomentMatchedLogisticGridReverseProcess(
        MixtureParams(params), schedule, likelihood=DiscretizedGaussianLikelihood(K), shape=(D,)
    )
    mean_only, weight = model.training_program("simple")
    x_t, t = torch.randn(2, D), torch.tensor([3, 7])
    assert type(mean_only) is LogisticGridReverseProcess and mean_only.variance == "small"
    assert mean_only.eps is model.eps and weight is not None
    torch.testing.assert_close(mean_only.predict_eps(x_t, t), model.predict_eps(x_t, t))


def test_the_network_gives_3m_channels_per_data_channel_and_continuous_data_is_refused():
    assert MomentMatchedLogisticGridReverseProcess.output_channels(DataSpec((3, 8, 8), 256)) == 27
    with pytest.raises(ValueError, match="needs grid data"):
        LogisticGridReverseProcess.output_channels(DataSpec((1, 8, 8), 0))
