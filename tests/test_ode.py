"""The probability-flow ODE likelihood against closed forms (float64).

Gaussian data x_0 ~ N(m, Sigma) (D = 3, a full covariance). The optimal eps-predictor at any real t,
with abar(t) from -log abar piecewise linear through the integers (the interpolation the ODE is
documented to call the network with), is

    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - a) (a Sigma + (1 - a) I)^{-1} (x_t - sqrt(a) m),  a = abar(t)

(x_t = sqrt(a) x_0 + sqrt(1 - a) eps is jointly Gaussian with eps, Cov(eps, x_t) = sqrt(1 - a) I).
In y = x / sqrt(a), sigma^2 = (1 - a) / a it is sigma (Sigma + sigma^2 I)^{-1} (y - m), and the ODE
dy/dsigma = eps* has the solution y(sigma) = m + (Sigma + sigma^2 I)^{1/2} Sigma^{-1/2} (y_0 - m), so
the flow's density with the prior N(0, (1 + sigma_T^2) I) of y_T (p(x_T) = N(0, I)) is

    log p(x_0) = log N(y_T; 0, (1 + sigma_T^2) I) + 1/2 log det(Sigma + sigma_T^2 I) - 1/2 log det Sigma,

computed below with numpy's eigendecomposition. As sigma_T -> infinity it tends to N(x_0; m, Sigma).
For quantized data (K levels) the exact discrete NLL is computed with scipy over the bins.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from pyro_ddpm import evaluate
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import LearnedVarianceReverseProcess, ReverseProcess
from pyro_ddpm.ode import ContinuousSchedule, log_density, ode_likelihood
from pyro_ddpm.schedule import Schedule

T = 50
BETAS = np.linspace(1e-4, 0.5, T)  # abar_T ~ 2e-7: the prior N(0, I) nearly matches q(x_T)
GAMMA = np.concatenate([[0.0], np.cumsum(-np.log1p(-BETAS))])  # -log abar_k, k = 0..T


def abar_at(t: torch.Tensor) -> torch.Tensor:
    """abar(t) for real t in [0, T]: -log abar linear between the integers (numpy's interp)."""
    return torch.as_tensor(np.exp(-np.interp(t.detach().double().cpu().numpy(), np.arange(T + 1), GAMMA)))


class GaussianEps(nn.Module):
    """eps* for N(m, Sigma) data at integer or real t; optionally with a v half (a learned variance)."""

    def __init__(self, m, Sigma, with_v=False):
        super().__init__()
        self.m, self.Sigma, self.with_v = torch.as_tensor(m), torch.as_tensor(Sigma), with_v

    def forward(self, x, t):
        a = abar_at(t).to(x)[:, None]
        D = x.shape[1]
        C = a[:, :, None] * self.Sigma.to(x) + (1 - a[:, :, None]) * torch.eye(D, dtype=x.dtype)
        eps = (1 - a).sqrt() * torch.linalg.solve(C, (x - a.sqrt() * self.m.to(x)).unsqueeze(-1)).squeeze(-1)
        return torch.cat([eps, torch.full_like(eps, 0.3)], 1) if self.with_v else eps


def flow_log_density(x, m, Sigma):
    """The closed form of the module docstring (numpy, float64)."""
    S2 = math.expm1(GAMMA[-1])
    w, V = np.linalg.eigh(Sigma)
    Mmat = V @ np.diag(np.sqrt((w + S2) / w)) @ V.T
    yT = m + (x - m) @ Mmat.T
    D = x.shape[1]
    return -0.5 * (yT**2).sum(1) / (1 + S2) - 0.5 * D * np.log(2 * np.pi * (1 + S2)) + 0.5 * np.log((w + S2) / w).sum()


def correlated_gaussian(D=3, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(D, D)) * 0.3
    return np.array([0.1, -0.2, 0.3])[:D], A @ A.T + 0.05 * np.eye(D), rng


def test_continuous_schedule_interpolates_the_discrete_one():
    cs = ContinuousSchedule(Schedule(BETAS))
    abar = np.exp(-GAMMA)
    for t in (0, 1, 7, T):
        assert cs.sigma_of_t(t) == pytest.approx(math.sqrt((1 - abar[t]) / abar[t]), rel=1e-12, abs=1e-15)
    # between integers: log(1 + sigma^2) is linear in t, and t(sigma) inverts sigma(t)
    g = math.log1p(cs.sigma_of_t(3.25) ** 2)
    assert g == pytest.approx(0.75 * GAMMA[3] + 0.25 * GAMMA[4], rel=1e-12)
    for t in (0.3, 2.5, 49.9):
        assert cs.t_of_sigma(cs.sigma_of_t(t)) == pytest.approx(t, rel=1e-9)


@pytest.mark.parametrize(
    "method,kwargs,tol",
    [
        ("rk4", {"steps": 200}, 1e-5),
        ("dopri5", {"rtol": 1e-8, "atol": 1e-8}, 1e-6),
    ],
)
def test_ode_log_density_equals_the_closed_form_flow(method, kwargs, tol):
    if method != "rk4":
        pytest.importorskip("torchdiffeq")  # the optional extra "ode"; rk4 is this module's own
    m, Sigma, rng = correlated_gaussian()
    x = rng.multivariate_normal(m, Sigma, size=8)
    got = log_density(
        GaussianEps(m, Sigma), torch.tensor(x), Schedule(BETAS), divergence="exact", method=method, **kwargs
    ).numpy()
    want = flow_log_density(x, m, Sigma)
    assert np.abs(got - want).max() < tol
    # and the flow's density is the data density up to the prior mismatch O(|m| sqrt(abar_T)) ~ 1e-4
    assert np.abs(want - stats.multivariate_normal(m, Sigma).logpdf(x)).max() < 1e-3


def test_rk4_converges_at_fourth_order():
    m, Sigma, rng = correlated_gaussian()
    x = rng.multivariate_normal(m, Sigma, size=4)
    want = flow_log_density(x, m, Sigma)
    err = [
        np.abs(log_density(GaussianEps(m, Sigma), torch.tensor(x), Schedule(BETAS), steps=n).numpy() - want).max()
        for n in (25, 50)
    ]
    assert 8 < err[0] / err[1] < 32  # 2^4 = 16 for a fourth-order method


def test_model_input_learned_variance_uses_the_eps_half():
    m, Sigma, rng = correlated_gaussian()
    x = torch.tensor(rng.multivariate_normal(m, Sigma, size=4))
    s = Schedule(BETAS)
    plain = ReverseProcess(GaussianEps(m, Sigma), s, "large", shape=(3,))
    learned = LearnedVarianceReverseProcess(GaussianEps(m, Sigma, with_v=True), s, "learned", shape=(3,))
    a = ode_likelihood(plain, x, levels=0, steps=100)
    b = ode_likelihood(learned, x, levels=0, steps=100)
    np.testing.assert_allclose(a["nats"], b["nats"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a["nats"], -flow_log_density(x.numpy(), m, Sigma), atol=1e-4)
    assert a["unit"] == "nats_per_dim" and a["nats_per_dim"] == pytest.approx(a["nats"].mean() / 3)
    assert a["network_calls"] == 4 * 100 and a["backward_passes"] == 3 * 400


def test_hutchinson_is_unbiased_for_a_nonlinear_network():
    """Same trajectory, random probes: the mean of the Rademacher and Gaussian estimates is the exact value."""
    torch.manual_seed(0)
    D = 4
    net = nn.Sequential(nn.Linear(D + 1, 16), nn.Tanh(), nn.Linear(16, D)).double()

    def eps(x, t):
        return net(torch.cat([x, (t / T)[:, None]], 1))

    x = torch.randn(1, D, dtype=torch.float64) * 0.3
    s = Schedule(BETAS)
    exact = float(log_density(eps, x, s, divergence="exact", steps=20))
    n = 400
    g = torch.Generator().manual_seed(1)
    for kind in ("rademacher", "gaussian"):
        z = torch.randn(1, n, D, generator=g, dtype=torch.float64)
        z = z.sign() if kind == "rademacher" else z
        est = log_density(eps, x.expand(n, D), s, divergence=kind, probe_noise=z, steps=20).numpy()
        se = est.std(ddof=1) / math.sqrt(n)
        assert se > 1e-4  # the probes do matter here (the Jacobian is not diagonal)
        assert abs(est.mean() - exact) < 4 * se


def test_flow_density_integrates_to_one():
    """D = 1, a network that is not the optimal one: the change of variables must still normalize."""

    def eps(x, t):
        a = abar_at(t).to(x)[:, None]
        star = (1 - a).sqrt() * (x - a.sqrt() * 0.1) / (a * 0.09 + 1 - a)
        return star + 0.1 * (1 - a).sqrt() * torch.tanh(2 * x + t[:, None] / T)

    grid = torch.linspace(-4, 4, 4001, dtype=torch.float64)[:, None]
    p = log_density(eps, grid, Schedule(BETAS), steps=100).exp().numpy()
    assert p[0] < 1e-6 and p[-1] < 1e-6
    mass = float(np.sum((p[1:] + p[:-1]) / 2) * (grid[1, 0] - grid[0, 0]))
    assert mass == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------- quantized data: bounds in bits/dim
M, S, K, D, N = 0.1, 0.3, 17, 3, 400


@pytest.fixture(scope="module")
def quantized():
    rng = np.random.default_rng(1)
    h = 1.0 / (K - 1)
    k = np.clip(np.round((rng.normal(M, S, size=(N, D)) + 1) / (2 * h)), 0, K - 1).astype(int)
    grid = -1 + 2 * np.arange(K) / (K - 1)
    upper = np.where(np.arange(K) == K - 1, np.inf, grid + h)
    lower = np.where(np.arange(K) == 0, -np.inf, grid - h)
    P = stats.norm.cdf((upper - M) / S) - stats.norm.cdf((lower - M) / S)  # the rounding's level probabilities
    x0 = torch.tensor(grid[k])
    eps = GaussianEps(np.full(D, M), S**2 * np.eye(D))
    result = ode_likelihood(eps, x0, Schedule(BETAS), levels=K, steps=100, seed=0)
    return {"x0": x0, "nll": -np.log(P[k]).sum(1), "eps": eps, "result": result}


def paired(a, b):
    d = a - b
    return d.mean(), d.std(ddof=1) / math.sqrt(len(d))


def test_dequantized_ode_bound_is_above_the_exact_discrete_nll(quantized):
    r = quantized["result"]
    assert r["discrete"] and r["bound"] and r["settings"]["dequantize"]
    diff, se = paired(r["nats"], quantized["nll"])
    assert diff > -3 * se
    assert r["bits_per_dim"] == pytest.approx(r["nats"].mean() / (D * math.log(2)))
    assert r["se"] == pytest.approx(r["nats"].std(ddof=1) / math.sqrt(N) / (D * math.log(2)))


def test_dequantization_term_matches_its_closed_form(quantized):
    """E_u[-log p(x + u)] - D log Delta for the flow's Gaussian N(m', s'^2): with E u^2 = Delta^2 / 12,
    per dimension (x - m')^2 / 2s'^2 + Delta^2 / 24 s'^2 + log(2 pi s'^2) / 2 - log Delta."""
    S2 = math.expm1(GAMMA[-1])
    mp, sp2 = (
        M * (1 - S / math.sqrt(S**2 + S2)),
        S**2 * (1 + S2) / (S**2 + S2),
    )  # y_0 = m + s (y_T - m) / sqrt(s^2 + S^2)
    delta = 2.0 / (K - 1)
    x = quantized["x0"].numpy()
    closed = ((x - mp) ** 2 / (2 * sp2) + delta**2 / (24 * sp2) + 0.5 * np.log(2 * np.pi * sp2) - np.log(delta)).sum(1)
    diff, se = paired(quantized["result"]["nats"], closed)
    assert abs(diff) < 3 * se and se < 0.02


def test_ode_bound_is_below_the_variational_bound(quantized):
    """Measured, not guaranteed: two different models of the same network (see docs/evaluate_elsewhere.md).
    With beta_1 = 1e-4 the bound's L_1 pays to code x_1 at precision sqrt(beta_1) << the bin width."""
    model = ReverseProcess(quantized["eps"], Schedule(BETAS), "large", DiscretizedGaussianLikelihood(K), shape=(D,))
    L = evaluate.bound(model, ForwardProcess(model.schedule, event_dim=1), quantized["x0"]).bound["L"].values
    diff, se = paired(L.mean(0).sum(-1), quantized["result"]["nats"])
    assert diff > 3 * se


def test_settings_and_reproducibility():
    m, Sigma, rng = correlated_gaussian()
    x = torch.tensor(np.round((rng.multivariate_normal(m, Sigma, size=6).clip(-1, 1) + 1) * 127.5) / 127.5 - 1)
    s = Schedule(BETAS)
    a = ode_likelihood(GaussianEps(m, Sigma), x, s, divergence="rademacher", draws=2, steps=10, seed=3, max_batch=4)
    b = ode_likelihood(GaussianEps(m, Sigma), x, s, divergence="rademacher", draws=2, steps=10, seed=3, max_batch=6)
    c = ode_likelihood(GaussianEps(m, Sigma), x, s, divergence="rademacher", draws=2, steps=10, seed=4)
    np.testing.assert_allclose(a["nats_draws"], b["nats_draws"], rtol=1e-12)  # batching does not matter
    assert np.abs(a["nats_draws"] - c["nats_draws"]).max() > 1e-6  # the seed does
    assert a["settings"]["divergence"] == "rademacher" and a["settings"]["steps"] == 10 and "se_noise" in a
    assert a["network_calls"] == 2 * 2 * 4 * 10  # draws x batches x 4 evaluations x steps


def test_bad_input_is_named():
    s = Schedule(BETAS)
    eps = GaussianEps(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="off the 17-level grid"):
        ode_likelihood(eps, torch.full((2, 3), 0.01, dtype=torch.float64), s, levels=17)
    with pytest.raises(ValueError, match="schedule"):
        ode_likelihood(eps, torch.zeros(2, 3, dtype=torch.float64), levels=17)
    with pytest.raises(ValueError, match="data shape"):
        ode_likelihood(ReverseProcess(eps, s, "large", shape=(3,)), torch.zeros(2, 4, dtype=torch.float64), levels=17)
    from pyro_ddpm.models import X0PredictionReverseProcess

    with pytest.raises(ValueError, match="needs an eps network"):  # its network predicts x_0, not eps
        ode_likelihood(
            X0PredictionReverseProcess(eps, s, "large", shape=(3,)), torch.zeros(2, 3, dtype=torch.float64), levels=0
        )
    with pytest.raises(ValueError, match="x0 an"):
        ode_likelihood(eps, s, torch.zeros(2, 3, dtype=torch.float64))  # the arguments swapped
    with pytest.raises(ValueError, match="divergence"):
        ode_likelihood(eps, torch.zeros(2, 3, dtype=torch.float64), s, levels=17, divergence="hutch")
