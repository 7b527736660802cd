"""The Gaussian data check: quantized Gaussian data, the analytic eps-predictor, closed-form terms.

Data: every dimension of x_0 is a N(m, s^2) draw rounded to the nearest of K = 17 levels in [-1, 1]
(the edge levels absorb the tails). The network is the optimal eps-predictor for *continuous*
N(m, s^2) data,

    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m) / (abar_t s^2 + 1 - abar_t),

so every term of Eq. 5 has a closed-form expectation over x_0 and the noise, derived below in numpy
from the exact moments of the quantized distribution (L_T, L_{t-1} from the Gaussian KL itself, not
from Eq. 12) and, for the decoder L_0, by Gauss-Hermite quadrature over eps summed over the levels.
The training form's Monte-Carlo terms must match them, and the bound must not fall below the data's
exact entropy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.schedule import Schedule

pytestmark = pytest.mark.usefixtures("float64")

M, S, K = 0.1, 0.3, 17
D, N = 16, 2000
T, BETA_1, BETA_T = 10, 0.02, 0.3


class OptimalEps(nn.Module):
    """The analytic eps-predictor for N(m, s^2) data (no learned parameters)."""

    def __init__(self, betas, m, s, dim):
        super().__init__()
        abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.register_buffer("abar", torch.tensor(np.concatenate([[1.0], abar])))
        self.m, self.s = float(m), float(s)
        self.shape = (dim,)

    def forward(self, x, t):
        a = self.abar[t].to(x.dtype).unsqueeze(-1)
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * self.m) / (a * self.s**2 + 1 - a)


def closed_form_terms(c, variance, ref, p, nodes=80):
    """E over x_0 ~ quantized N(m, s^2) and the noise of every term, nats per datum (D dims)."""
    levels = ref.grid(K)
    m1, m2 = float(p @ levels), float(p @ levels**2)
    abar, alpha, beta, bt = c["abar"], c["alpha"], c["beta"], c["beta_tilde"]
    out = {}
    # L_T = E KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1))
    out["T"] = D * 0.5 * (-np.log(1 - abar[T]) + (1 - abar[T]) + abar[T] * m2 - 1.0)

    def mu_theta_coefs(t):
        """mu_theta(x_t, t) = u x_t + v for the analytic predictor (Eq. 11)."""
        a, b = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        g = b / (abar[t] * S**2 + 1 - abar[t])
        ec = beta[t] / b
        r = 1.0 / np.sqrt(alpha[t])
        return r * (1 - ec * g), r * ec * g * a * M

    for t in range(2, T + 1):
        a, b = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        c0 = np.sqrt(abar[t - 1]) * beta[t] / (1 - abar[t])
        c1 = np.sqrt(alpha[t]) * (1 - abar[t - 1]) / (1 - abar[t])
        u, v = mu_theta_coefs(t)
        # mu_tilde - mu_theta = A x0 + B eps + C, with x_t = a x0 + b eps
        A = c0 + (c1 - u) * a
        B = (c1 - u) * b
        C = -v
        e_sq = A * A * m2 + 2 * A * C * m1 + C * C + B * B
        s2 = beta[t] if variance == "large" else bt[t]
        out[t - 1] = D * (0.5 * (np.log(s2 / bt[t]) + bt[t] / s2 - 1.0) + e_sq / (2 * s2))

    # L_0 = E -log P(x0 | mu_theta(x_1, 1), sigma_1), sigma_1^2 = beta_tilde_2, by Gauss-Hermite over eps
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / np.sqrt(2 * np.pi)
    u, v = mu_theta_coefs(1)
    x1 = np.sqrt(abar[1]) * levels[:, None] + np.sqrt(1 - abar[1]) * z[None, :]
    mu = u * x1 + v
    nll = -ref.disc_log_prob(np.broadcast_to(levels[:, None], mu.shape), mu, np.sqrt(bt[2]), K)
    out[0] = D * float(p @ (nll @ w))
    return out


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1234)
    y = M + S * torch.randn(N, D, generator=g, dtype=torch.float64)
    k = ((y.clamp(-1, 1) + 1) * (K - 1) / 2).round()
    return k * 2 / (K - 1) - 1


def test_quantized_probabilities_and_data_agree(data, ref):
    """Sanity of the test's own ingredients: p_k sums to 1 and matches the drawn data."""
    from scipy import stats

    p = ref.quantized_gaussian_probs(M, S, K)
    assert p.sum() == pytest.approx(1.0, abs=1e-14)
    counts = np.bincount(((data.numpy() + 1) * (K - 1) / 2).round().astype(int).ravel(), minlength=K)
    e = N * D * p
    big = e > 5
    chi2 = ((counts[big] - e[big]) ** 2 / e[big]).sum()
    assert stats.chi2.sf(chi2, big.sum() - 1) > 1e-4


def test_gauss_hermite_converged(ref):
    c = ref.constants(ref.linear_betas(T, BETA_1, BETA_T))
    p = ref.quantized_gaussian_probs(M, S, K)
    a = closed_form_terms(c, "large", ref, p, nodes=80)[0]
    b = closed_form_terms(c, "large", ref, p, nodes=160)[0]
    assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize("variance", ["large", "small"])
def test_terms_match_closed_forms(variance, data, ref):
    betas = ref.linear_betas(T, BETA_1, BETA_T)
    c = ref.constants(betas)
    p = ref.quantized_gaussian_probs(M, S, K)
    expected = closed_form_terms(c, variance, ref, p)

    sched = Schedule.linear(T, BETA_1, BETA_T)
    model = ReverseProcess(OptimalEps(betas, M, S, D), sched, variance, DiscretizedGaussianLikelihood(K))
    guide = ForwardProcess(sched)
    t = protocol.all_timesteps(N, T)
    terms = TermwiseELBO().terms(model.per_timestep, guide.per_timestep, data, t)
    for name in (protocol.X_PREV, protocol.X_0):
        assert float(terms[name].scale) == 1.0
    per = {"T": terms[protocol.X_T].value.detach().numpy()}
    prev = terms[protocol.X_PREV].value.detach().numpy().reshape(N, T)
    dec = terms[protocol.X_0].value.detach().numpy().reshape(N, T)
    assert np.all(prev[:, 0] == 0) and np.all(dec[:, 1:] == 0)
    per[0] = dec[:, 0]
    for tt in range(2, T + 1):
        per[tt - 1] = prev[:, tt - 1]

    for key, values in per.items():
        mean = values.mean()
        se = values.std(ddof=1) / np.sqrt(N)
        assert se > 0
        assert abs(mean - expected[key]) < 4 * se, (key, mean, expected[key], se)

    total = sum(per.values())
    mean, se = total.mean(), total.std(ddof=1) / np.sqrt(N)
    assert abs(mean - sum(expected.values())) < 4 * se
    # the bound is an upper bound on the exact NLL of the quantized data, D * entropy(p)
    nll = -D * float(p @ np.log(p))
    assert mean > nll - 4 * se, (mean, nll, se)
    assert sum(expected.values()) >= nll


@pytest.mark.parametrize("variance", ["large", "small"])
def test_evaluator_matches_closed_forms(variance, data, ref):
    """The same check through the evaluator's API (two noise draws per term, chunked network calls)."""
    from pyro_ddpm.evaluate import bound, summarize

    betas = ref.linear_betas(T, BETA_1, BETA_T)
    c = ref.constants(betas)
    p = ref.quantized_gaussian_probs(M, S, K)
    expected = closed_form_terms(c, variance, ref, p)
    sched = Schedule.linear(T, BETA_1, BETA_T)
    model = ReverseProcess(OptimalEps(betas, M, S, D), sched, variance, DiscretizedGaussianLikelihood(K))
    idata = bound(model, ForwardProcess(sched), data[:1000], draws=2, max_batch=997, seed=5)
    L = idata.bound["L"].values.mean(0)  # (images, T + 1): column s holds L_s
    for s in range(T + 1):
        key = "T" if s == T else s
        se = L[:, s].std(ddof=1) / np.sqrt(L.shape[0])
        assert abs(L[:, s].mean() - expected[key]) < 4 * se, (s, L[:, s].mean(), expected[key], se)
    summary = summarize(idata)
    nll_bpd = -float(p @ np.log(p)) / np.log(2)
    assert summary["total"]["bits_per_dim"] > nll_bpd - 4 * summary["total"]["se"]
    assert summary["total"]["bits_per_dim"] * D * np.log(2) == pytest.approx(
        sum(expected.values()), abs=4 * summary["total"]["se"] * D * np.log(2)
    )
