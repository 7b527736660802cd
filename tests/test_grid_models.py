"""The grid-aware reverse processes: the grid posterior's mean and the moment-matched variance.

Checked against independent float64 computations in numpy/scipy: the posterior weights by Bayes' rule
written out per grid value; the moment-matched Gaussian against the moments of the mixture
sum_k w_k N(mu_tilde(x_t, v_k), beta_tilde_t) computed by quadrature, and as the minimizer of the
expected KL; the whole bound of data drawn from independent per-pixel categoricals, scored by the model
whose logits are the log frequencies (the exact reverse up to the Gaussian transitions), against the
data's exact negative log-likelihood.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from scipy import integrate, stats

from pyro_ddpm import protocol
from pyro_ddpm.elbo import objective
from pyro_ddpm.evaluate import bound, summarize
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import BernoulliLikelihood, DiscretizedGaussianLikelihood, GaussianLikelihood
from pyro_ddpm.models import GridPosteriorReverseProcess, MomentMatchedGridReverseProcess
from pyro_ddpm.nets import MLP
from pyro_ddpm.protocol import DataSpec
from pyro_ddpm.schedule import Schedule

pytestmark = pytest.mark.usefixtures("float64")

MODELS = [GridPosteriorReverseProcess, MomentMatchedGridReverseProcess]


class Logits(torch.nn.Module):
    """A 'network' returning fixed logits per pixel (B, D * K), whatever x_t and t: a per-pixel prior."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float64).reshape(-1))
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so that pyro.module has a parameter to register

    def forward(self, x, t):
        return (self.logits + 0.0 * self.anchor).expand(x.shape[0], -1)


def values(K):
    return np.array([-1.0 + 2.0 * k / (K - 1) for k in range(K)])


def np_posterior(logits, x_t, abar, K):
    """w_k ∝ exp(l_k) N(x_t; sqrt(abar) v_k, 1 - abar), per pixel, with scipy's normal density."""
    v = values(K)
    w = np.array(
        [
            [
                math.exp(logits[d, k]) * stats.norm.pdf(x_t[d], math.sqrt(abar) * v[k], math.sqrt(1 - abar))
                for k in range(K)
            ]
            for d in range(len(x_t))
        ]
    )
    return w / w.sum(1, keepdims=True)


@pytest.mark.parametrize("K", [2, 5, 17])
@pytest.mark.parametrize("t", [1, 3, 9])
def test_posterior_weights_and_the_mean_are_bayes_rule(K, t, ref):
    D, T = 4, 10
    schedule = Schedule.linear(T, 0.02, 0.3)
    c = ref.constants(schedule.betas.numpy())
    rng = np.random.default_rng(K + t)
    logits = rng.normal(size=(D, K))
    model = GridPosteriorReverseProcess(Logits(logits), schedule, "small", DiscretizedGaussianLikelihood(K), shape=(D,))
    x_t = rng.normal(size=(1, D))
    tt = torch.tensor([t])
    out = model.network_output(torch.tensor(x_t), tt)
    w = np_posterior(logits, x_t[0], c["abar"][t], K)
    np.testing.assert_allclose(model.log_posterior(torch.tensor(x_t), tt, out)[0].exp().detach().numpy(), w, rtol=1e-10)
    x0_hat = (w * values(K)).sum(1)
    np.testing.assert_allclose(
        model.predict_x0(torch.tensor(x_t), tt, out)[0].detach().numpy(), x0_hat, rtol=1e-10, atol=1e-14
    )
    loc, scale = (v.detach() for v in model.transition(torch.tensor(x_t), tt))
    mean = c["coef_x0"][t] * x0_hat + c["coef_xt"][t] * x_t[0]  # Eq. 7 at x0_hat
    np.testing.assert_allclose(loc[0].numpy(), mean, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(scale[0].numpy(), math.sqrt(c["sigma2_small"][t]), rtol=1e-12)


@pytest.mark.parametrize("cls", MODELS)
def test_at_small_t_the_prediction_is_the_grid_value_whatever_the_logits(cls):
    """x_t of one grid value per pixel with noise far below the grid spacing: x0_hat is that value exactly.

    Digits' 17 levels at the paper's t = 1, 2 (sqrt(1 - abar_t) = 0.010, 0.015 against a spacing of 0.125):
    with |eps| <= 2.5 the likelihood favours the true value over its neighbours by at least 14 nats, more
    than the (wrong, random) prior's logits can move (differences of N(0, 8): below 8.5 here)."""
    K, D = 17, 64
    schedule = Schedule.linear(1000)
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(D, K))
    model = cls(Logits(logits), schedule, likelihood=DiscretizedGaussianLikelihood(K), shape=(D,))
    x0 = torch.tensor(values(K)[rng.integers(0, K, size=(8, D))])
    for t in (1, 2):
        tt = torch.full((8,), t)
        x_t = schedule.q_sample(x0, tt, torch.randn(8, D).clamp(-2.5, 2.5))
        out = model.network_output(x_t, tt)
        torch.testing.assert_close(model.predict_x0(x_t, tt, out).detach(), x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("t", [2, 5, 9])
def test_moment_matched_variance_is_the_mixtures_and_minimizes_the_expected_kl(t, ref):
    """s^2 = beta_tilde + coef_x0^2 Var[x_0 | x_t] equals the variance of sum_k w_k N(mu_tilde(v_k), beta_tilde)
    (by quadrature) and is where E_w KL(N(mu_tilde(v_k), beta_tilde) || N(m, s^2)) is smallest."""
    K, T = 5, 10
    schedule = Schedule.linear(T, 0.02, 0.3)
    c = ref.constants(schedule.betas.numpy())
    rng = np.random.default_rng(t)
    logits = rng.normal(size=(1, K))
    model = MomentMatchedGridReverseProcess(
        Logits(logits), schedule, likelihood=DiscretizedGaussianLikelihood(K), shape=(1,)
    )
    x_t = np.array([[0.3]])
    loc, scale = (v.detach() for v in model.transition(torch.tensor(x_t), torch.tensor([t])))
    w = np_posterior(logits, x_t[0], c["abar"][t], K)[0]
    mu = c["coef_x0"][t] * values(K) + c["coef_xt"][t] * x_t[0, 0]
    bt = c["beta_tilde"][t]

    def mixture(y):
        return sum(w[k] * stats.norm.pdf(y, mu[k], math.sqrt(bt)) for k in range(K))

    m = integrate.quad(lambda y: y * mixture(y), -10, 10, points=list(mu), limit=200)[0]
    v = integrate.quad(lambda y: (y - m) ** 2 * mixture(y), -10, 10, points=list(mu), limit=200)[0]
    assert float(loc) == pytest.approx(m, rel=1e-8)
    assert float(scale) ** 2 == pytest.approx(v, rel=1e-7)

    def expected_kl(s2):
        return float((w * ref.kl_normal(mu, bt, m, s2)).sum())

    s2 = float(scale) ** 2
    assert expected_kl(s2) < expected_kl(s2 * 1.01) and expected_kl(s2) < expected_kl(s2 * 0.99)
    with pytest.raises(ValueError, match="moment-matched"):
        model.sigma2


def test_moment_matched_decoder_scale_at_t1_floors_at_beta_tilde_2(ref):
    K, T = 5, 10
    schedule = Schedule.linear(T, 0.02, 0.3)
    c = ref.constants(schedule.betas.numpy())
    logits = np.zeros((1, K))
    model = MomentMatchedGridReverseProcess(
        Logits(logits), schedule, likelihood=DiscretizedGaussianLikelihood(K), shape=(1,)
    )
    x_t = np.array([[0.1]])
    _, scale = (v.detach() for v in model.transition(torch.tensor(x_t), torch.tensor([1])))
    w = np_posterior(logits, x_t[0], c["abar"][1], K)[0]
    var = float((w * values(K) ** 2).sum() - (w * values(K)).sum() ** 2)
    assert float(scale) ** 2 == pytest.approx(c["beta_tilde"][2] + var, rel=1e-9)  # coef_x0_1 = 1


@pytest.mark.parametrize(
    "cls,variance", [(GridPosteriorReverseProcess, "small"), (MomentMatchedGridReverseProcess, None)]
)
def test_the_bound_of_independent_categorical_data_is_above_its_exact_nll_and_close(cls, variance):
    """Pixels drawn independently from categoricals p_d; logits log p_d make the model the exact reverse of that
    distribution but for its Gaussian transitions, so its bound is >= the exact NLL (cross-entropy), and the
    moment-matched variance brings it close."""
    K, D, N, T = 5, 3, 300, 200
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(K) * 2.0, size=D)
    k = np.stack([rng.choice(K, size=N, p=p[d]) for d in range(D)], axis=1)
    x0 = torch.tensor(values(K)[k])
    nll = -np.log(p[np.arange(D), k]).sum(1)  # exact, nats per datum
    schedule = Schedule.linear(T, 1e-3, 0.1)
    model = cls(Logits(np.log(p)), schedule, variance, DiscretizedGaussianLikelihood(K), shape=(D,))
    total = bound(model, ForwardProcess(schedule), x0, seed=0).bound["L"].values[0].sum(1)
    gap = total - nll
    assert gap.mean() > -3 * gap.std(ddof=1) / math.sqrt(N)  # a bound, within Monte-Carlo error
    if cls is MomentMatchedGridReverseProcess:
        assert gap.mean() < 0.05 * nll.mean()


def test_binary_data_use_two_levels_and_the_bernoulli_decoder():
    schedule = Schedule.linear(10, 0.01, 0.2)
    net = MLP(dim=3, hidden=8, depth=1, temb_dim=8, out_channels=6)
    model = GridPosteriorReverseProcess(net, schedule, "large", BernoulliLikelihood(), shape=(3,))
    assert model.levels == 2 and GridPosteriorReverseProcess.output_channels(DataSpec((3,), 2)) == 6
    x0 = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]])
    L = bound(model, ForwardProcess(schedule), x0, seed=0).bound["L"].values
    assert np.isfinite(L).all() and (L[..., 1:] >= -1e-9).all()


def test_grid_models_refuse_continuous_data():
    with pytest.raises(ValueError, match="needs grid data"):
        GridPosteriorReverseProcess(MLP(dim=2), Schedule.linear(10), "large", GaussianLikelihood(), shape=(2,))
    with pytest.raises(ValueError, match="levels K >= 2"):
        GridPosteriorReverseProcess.output_channels(DataSpec((2,), 0))


def test_network_output_of_the_wrong_size_is_one_clear_error():
    schedule = Schedule.linear(10)
    model = GridPosteriorReverseProcess(
        MLP(dim=3, out_channels=3), schedule, "large", DiscretizedGaussianLikelihood(17), shape=(3,)
    )
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\).*expected \(2, 51\)"):
        model.transition(torch.zeros(2, 3), torch.tensor([1, 2]))


@pytest.mark.parametrize("cls", MODELS)
def test_simple_objective_is_algorithm_1_on_the_implied_eps(cls):
    """The gradient of ``simple`` is that of sum ||eps - eps_hat(x_t, t)||^2, eps_hat implied by x0_hat
    (K = 1 per image)."""
    K_levels, D, B, T = 5, 3, 6, 10
    schedule = Schedule.linear(T, 0.01, 0.2)
    torch.manual_seed(0)
    net = MLP(dim=D, hidden=16, depth=1, temb_dim=8, out_channels=D * K_levels).double()
    for q in net.parameters():
        torch.nn.init.normal_(q, std=0.3)
    model = cls(net, schedule, likelihood=DiscretizedGaussianLikelihood(K_levels), shape=(D,))
    guide = ForwardProcess(schedule)
    x0 = torch.tensor(values(K_levels)[np.random.default_rng(0).integers(0, K_levels, (B, D))])
    t = torch.tensor([[1], [2], [4], [6], [8], [10]])
    eps = torch.randn(B, D)
    program, weight = objective("simple", model)
    loss = TraceMeanField_ELBO().differentiable_loss(
        program.per_timestep,
        protocol.FixedNoise({protocol.X_t: eps}, guide.from_noise)(guide.per_timestep),
        x0,
        t,
        weight,
    )
    grads = torch.autograd.grad(loss, list(net.parameters()))
    pyro.clear_param_store()
    tf = t.reshape(-1)
    x_t = schedule.q_sample(x0, tf, eps)
    mse = ((eps - model.predict_eps(x_t, tf)) ** 2).sum()
    expected = torch.autograd.grad(mse, list(net.parameters()))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * float(b.abs().max()))
    if cls is MomentMatchedGridReverseProcess:  # its bound is another thing: elbo's gradient differs
        elbo_program, _ = objective("elbo", model)
        loss = TraceMeanField_ELBO().differentiable_loss(
            elbo_program.per_timestep,
            protocol.FixedNoise({protocol.X_t: eps}, guide.from_noise)(guide.per_timestep),
            x0,
            t,
        )
        g = torch.autograd.grad(loss, list(net.parameters()))
        assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(g, grads))


@pytest.mark.parametrize("cls", MODELS)
def test_ddim_and_ancestral_sampling_land_on_the_grid(cls):
    from pyro_ddpm.sample import sample

    K, D = 17, 3
    schedule = Schedule.linear(20, 0.01, 0.3)
    net = MLP(dim=D, hidden=8, depth=1, temb_dim=8, out_channels=D * K).double()
    model = cls(net, schedule, likelihood=DiscretizedGaussianLikelihood(K), shape=(D,))
    for kwargs in ({}, {"sampler": "ddim", "steps": 5}):
        x = sample(model, 6, **kwargs)
        k = (x + 1) * (K - 1) / 2
        assert x.shape == (6, D) and torch.all((k - k.round()).abs() < 1e-9)


def test_summary_reports_the_models_own_variance_rule():
    schedule = Schedule.linear(10, 0.01, 0.2)
    model = MomentMatchedGridReverseProcess(
        MLP(dim=3, out_channels=15).double(), schedule, likelihood=DiscretizedGaussianLikelihood(5), shape=(3,)
    )
    x0 = torch.tensor([[-1.0, 0.0, 1.0]])
    idata = bound(model, ForwardProcess(schedule), x0)
    assert idata.bound.attrs["variance"] == "moment_matched" and model.variance == "moment_matched"
    assert summarize(idata)["total"]["bits_per_dim"] > 0
