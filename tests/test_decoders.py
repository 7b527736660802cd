"""The three decoders p_theta(x_0 | x_1) through one parametrized suite.

- ``bernoulli``: binary data x_0 in {-1, +1}, N(mu, s^2) restricted to the two points;
- ``discretized``: Eq. 13 on a K = 17 level grid;
- ``continuous``: the Gaussian density for non-quantized data.

Each expected number is computed independently in numpy/scipy float64 (the Bernoulli decoder from
its hand formula log sigmoid(2 x mu / s^2) and from the restricted Gaussian's definition, the
others from scipy.stats.norm and the conftest reference), with eps_theta called directly; the
evaluator's units (nats per image, bits/dim, nats/dim) are checked against the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from scipy import integrate, stats

from pyro_ddpm import protocol
from pyro_ddpm.data import Dataset, quantize
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.evaluate import bound, format_summary, summarize
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import (
    BernoulliLikelihood,
    DiscretizedGaussianLikelihood,
    GaussianLikelihood,
    SignedBernoulli,
    TanhDiscretizedGaussianLikelihood,
    by_name,
    check_images,
    default_for,
    default_likelihood,
)
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import MLP
from pyro_ddpm.registry import LIKELIHOODS
from pyro_ddpm.schedule import Schedule

pytestmark = [
    pytest.mark.usefixtures("float64"),
    # conditioning x_t in both programs makes it observed in both; Pyro then notes the guide site
    pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model"),
]

K = 17  # levels of the discretized decoder's data
T, BETA_1, BETA_T = 5, 0.05, 0.4
DIM = 3

DECODERS = {
    "bernoulli": BernoulliLikelihood,
    "discretized": lambda: DiscretizedGaussianLikelihood(K),
    "continuous": GaussianLikelihood,
}
NAMES = list(DECODERS)


# --------------------------------------------------------------------------- independent references
def np_log_prob(decoder: str, x, mu, s, ref):
    """log p(x | mu, s) per dimension, numpy/scipy float64."""
    x, mu, s = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (x, mu, s)))
    if decoder == "bernoulli":
        return -np.logaddexp(0.0, -2.0 * x * mu / s**2)  # log sigmoid(x * 2 mu / s^2)
    if decoder == "discretized":
        return ref.disc_log_prob(x, mu, s, K)
    return stats.norm.logpdf(x, loc=mu, scale=s)


def np_moments(decoder: str, mu, s, ref):
    """Mean and variance of x_0 under the decoder (numpy), for the sampling checks."""
    if decoder == "bernoulli":
        p = 1.0 / (1.0 + np.exp(-2.0 * mu / s**2))
        m = 2.0 * p - 1.0
        return m, 1.0 - m**2
    if decoder == "discretized":
        g = ref.grid(K)
        p = np.exp(ref.disc_log_prob(g, mu[..., None], s[..., None], K))
        m = (p * g).sum(-1)
        return m, (p * g**2).sum(-1) - m**2
    return mu, s**2


def data_for(decoder: str, n: int, seed: int = 0) -> torch.Tensor:
    """Data the decoder scores: signs, 17-level grid values, or unquantized normal draws (some beyond [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    if decoder == "bernoulli":
        return torch.randint(0, 2, (n, DIM), generator=g).double() * 2.0 - 1.0
    if decoder == "discretized":
        return torch.randint(0, K, (n, DIM), generator=g).double() * 2.0 / (K - 1) - 1.0
    return 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64)


def make(decoder: str, variance: str = "large", zero_net: bool = False, betas=(BETA_1, BETA_T)):
    torch.manual_seed(0)
    net = MLP(dim=DIM, hidden=16, depth=2, temb_dim=8).double()
    with torch.no_grad():
        for p in net.parameters():  # a non-trivial eps_theta, or eps_theta = 0 (last layer zero)
            torch.nn.init.normal_(p, std=0.3)
        if zero_net:
            for p in net.out[-1].parameters():
                p.zero_()
    schedule = Schedule.linear(T, *betas)
    return ReverseProcess(net, schedule, variance, DECODERS[decoder]()), ForwardProcess(schedule), net


def consts(ref, betas=(BETA_1, BETA_T)):
    return ref.constants(ref.linear_betas(T, *betas))


def mu_1_np(c, net, x_1):
    """mu_theta(x_1, 1) of Eq. 11, eps_theta called directly: numpy."""
    with torch.no_grad():
        eps = net(torch.as_tensor(x_1), torch.ones(len(x_1), dtype=torch.long)).numpy()
    return (x_1 - c["beta"][1] / math.sqrt(1.0 - c["abar"][1]) * eps) / math.sqrt(c["alpha"][1])


def sigma_1_np(c):
    return math.sqrt(c["beta_tilde"][2])  # sigma_1^2 = beta_tilde_2 for either variance


def np_(x):
    return x.detach().cpu().double().numpy()


# --------------------------------------------------------------------------- a. log-probabilities
@pytest.mark.parametrize("decoder", NAMES)
def test_log_prob_matches_closed_form(decoder, ref):
    rng = np.random.default_rng(1)
    n = 200
    mu = rng.uniform(-1.5, 1.5, n)
    s = np.exp(rng.uniform(np.log(0.02), np.log(2.0), n))
    x = np_(data_for(decoder, n, seed=2)[:, 0])
    got = DECODERS[decoder]()(torch.tensor(mu), torch.tensor(s)).log_prob(torch.tensor(x))
    assert got.shape == (n,) and got.dtype == torch.float64
    np.testing.assert_allclose(np_(got), np_log_prob(decoder, x, mu, s, ref), rtol=1e-10, atol=1e-12)


def test_bernoulli_is_the_gaussian_restricted_to_the_two_signs():
    """log N(x; mu, s^2) - log[N(+1; mu, s^2) + N(-1; mu, s^2)], from scipy, is the decoder's value."""
    mu = np.array([-2.0, -0.7, -0.01, 0.0, 0.03, 0.4, 1.0, 3.0])
    s = np.array([0.1, 0.5, 1.0, 2.0])
    mu, s = np.meshgrid(mu, s)
    for x in (-1.0, 1.0):
        expected = stats.norm.logpdf(x, mu, s) - np.logaddexp(
            stats.norm.logpdf(1.0, mu, s), stats.norm.logpdf(-1.0, mu, s)
        )
        got = SignedBernoulli(torch.tensor(mu), torch.tensor(s)).log_prob(torch.full(mu.shape, x))
        np.testing.assert_allclose(np_(got), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("decoder", NAMES)
@pytest.mark.parametrize("mu,s", [(0.0, 1.0), (0.3, 0.05), (-0.9, 0.2), (1.4, 0.6), (0.02, 0.01)])
def test_decoder_is_normalized(decoder, mu, s):
    """Masses sum to 1 over the support ({-1, +1}, the grid); the density integrates to 1 over R."""
    d = DECODERS[decoder]()(torch.tensor(mu), torch.tensor(s))
    if decoder == "continuous":
        total, err = integrate.quad(
            lambda v: math.exp(d.log_prob(torch.tensor(v)).item()),
            -np.inf,
            np.inf,
            points=None,
            epsabs=1e-12,
            epsrel=1e-12,
            limit=200,
        )
        assert total == pytest.approx(1.0, abs=1e-8)
        return
    support = torch.tensor([-1.0, 1.0]) if decoder == "bernoulli" else torch.linspace(-1.0, 1.0, K)
    lp = d.expand(support.shape).log_prob(support)
    assert (lp <= 0).all()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("decoder", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_means_and_scales_give_finite_values_and_gradients(decoder, dtype):
    loc = torch.tensor([1e30, -1e30, 3e38, -3e38, 0.0, 0.3, -1.0, 1.0], dtype=dtype)
    scale = torch.tensor([1e-30, 1e-8, 1e-3, 1.0, 1e8], dtype=dtype)
    loc, scale = [a.reshape(-1).clone() for a in torch.meshgrid(loc, scale, indexing="ij")]
    x = data_for(decoder, len(loc), seed=3)[:, 0].to(dtype)
    if decoder == "continuous":  # a density: the extremes overflow its -z^2/2 by design; test a sane range
        loc, scale = loc.clamp(-1e3, 1e3), scale.clamp(1e-3, 1e3)
    loc.requires_grad_(True)
    lp = DECODERS[decoder]()(loc, scale).log_prob(x)
    assert lp.dtype == dtype
    assert torch.isfinite(lp).all() and torch.isfinite(lp.sum())
    if decoder != "continuous":
        assert (lp <= 0).all()
    (grad,) = torch.autograd.grad(lp.sum(), [loc])
    assert torch.isfinite(grad).all()


def test_bernoulli_gradient_is_the_analytic_one():
    """d/dmu log sigmoid(2 x mu / s^2) = (2 x / s^2) sigmoid(-2 x mu / s^2)."""
    mu = torch.tensor([-0.8, -0.1, 0.0, 0.25, 0.9], requires_grad=True)
    s = torch.tensor([0.3, 0.5, 1.0, 0.7, 0.4])
    x = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    (grad,) = torch.autograd.grad(SignedBernoulli(mu, s).log_prob(x).sum(), [mu])
    m, sd, xv = np_(mu), np_(s), np_(x)
    expected = 2.0 * xv / sd**2 / (1.0 + np.exp(2.0 * xv * m / sd**2))
    np.testing.assert_allclose(np_(grad), expected, rtol=1e-10)


# --------------------------------------------------------------------------- b. L_0 of a tiny model
@pytest.mark.parametrize("decoder", NAMES)
@pytest.mark.parametrize("variance", ["large", "small"])
def test_chain_L0_is_the_independent_decoder_value(decoder, variance, ref):
    model, guide, net = make(decoder, variance)
    c = consts(ref)
    x0 = data_for(decoder, 6, seed=4)
    guide_tr = poutine.trace(guide.chain).get_trace(x0)
    terms = TermwiseELBO().terms(model.chain, poutine.replay(guide.chain, trace=guide_tr), x0)
    x_1 = np_(guide_tr.nodes["x_1"]["value"])
    mu = mu_1_np(c, net, x_1)
    expected = -np_log_prob(decoder, np_(x0), mu, sigma_1_np(c), ref).sum(-1)
    assert terms[protocol.X_0].scale == 1.0 and terms[protocol.X_0].value.shape == (6,)
    np.testing.assert_allclose(np_(terms[protocol.X_0].value), expected, rtol=1e-10, atol=1e-12)
    assert np.abs(mu - x_1).max() > 1e-3  # eps_theta is not trivial


# --------------------------------------------------------------------------- c. unbiasedness of the training form
def conditioned(fn, x_t):
    return poutine.condition(fn, data={protocol.X_t: x_t})


@pytest.mark.parametrize("decoder", NAMES)
def test_training_form_L0_averages_exactly_to_the_chain_L0_over_timesteps(decoder):
    """With x_t fixed to the chain's x_t, E_t of the (T/K-scaled) decoder term, K = 1, is the chain's L_0."""
    model, guide, _ = make(decoder)
    B = 5
    x0 = data_for(decoder, B, seed=5)
    guide_tr = poutine.trace(guide.chain).get_trace(x0)
    chain = TermwiseELBO().terms(model.chain, poutine.replay(guide.chain, trace=guide_tr), x0)[protocol.X_0].value
    total = torch.zeros(B, dtype=torch.float64)
    for s in range(1, T + 1):
        t = torch.full((B, 1), s)
        x_t = guide_tr.nodes[f"x_{s}"]["value"]
        term = TermwiseELBO().terms(conditioned(model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t)[
            protocol.X_0
        ]
        assert float(term.scale) == pytest.approx(T, rel=1e-15)  # T / K
        if s > 1:
            assert torch.equal(term.value, torch.zeros(B, dtype=term.value.dtype))
        total += float(term.scale) * term.value / T
    np.testing.assert_allclose(np_(total), np_(chain), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decoder", NAMES)
def test_training_form_L0_is_unbiased(decoder):
    """Random t (K = 1) and random x_t: the scaled decoder term's mean is the chain's mean L_0.

    Large betas (sigma_1^2 = 0.2) keep L_0 well above 0 for every decoder, so the test has power."""
    model, guide, _ = make(decoder, betas=(0.3, 0.6))
    n_img, reps = 2, 2000
    x0 = data_for(decoder, n_img, seed=6).repeat(reps, 1)  # row r is image r % n_img
    pyro.set_rng_seed(21)
    chain = np_(TermwiseELBO().terms(model.chain, guide.chain, x0)[protocol.X_0].value).reshape(reps, n_img)
    t = protocol.draw_timesteps(x0.shape[0], 1, T)
    assert (t == 1).any() and (t > 1).any()
    term = TermwiseELBO().terms(model.per_timestep, guide.per_timestep, x0, t)[protocol.X_0]
    train = (float(term.scale) * np_(term.value)).reshape(reps, n_img)
    unscaled = np_(term.value).reshape(reps, n_img)
    for i in range(n_img):
        a, b = chain[:, i], train[:, i]
        se = np.sqrt(a.var(ddof=1) / reps + b.var(ddof=1) / reps)
        assert abs(a.mean() - b.mean()) < 4 * se, (i, a.mean(), b.mean(), se)
        # forgetting the T/K scale is detected at this sample size
        se_u = np.sqrt(a.var(ddof=1) / reps + unscaled[:, i].var(ddof=1) / reps)
        assert abs(a.mean() - unscaled[:, i].mean()) > 4 * se_u


# --------------------------------------------------------------------------- d. sampling
@pytest.mark.parametrize("decoder", NAMES)
def test_chain_samples_x0_from_the_decoder_at_mu_theta(decoder, ref):
    """Ancestral sampling: shapes, support, and x_0 | x_1 distributed as the decoder (mean z-test)."""
    model, _, net = make(decoder)
    c = consts(ref)
    n = 3000
    pyro.set_rng_seed(3)
    tr = poutine.trace(model.chain).get_trace(num_images=n)
    x0 = tr.nodes[protocol.X_0]["value"]
    assert x0.shape == (n, DIM) and x0.dtype == torch.float64 and torch.isfinite(x0).all()
    values = np_(x0)
    on_grid = np.abs(values * (K - 1) / 2 - np.rint(values * (K - 1) / 2)) < 1e-9
    if decoder == "bernoulli":
        assert set(np.unique(values)) <= {-1.0, 1.0}
    elif decoder == "discretized":
        assert on_grid.all() and np.abs(values).max() <= 1.0
    else:
        assert on_grid.mean() < 0.01 and len(np.unique(values)) == values.size  # real values, not a grid
    mu = mu_1_np(c, net, np_(tr.nodes["x_1"]["value"]))
    m, v = np_moments(decoder, mu, np.full_like(mu, sigma_1_np(c)), ref)
    assert v.sum() > 10.0  # the test has power: the draws are not all (almost) certain
    z = (values - m).sum() / math.sqrt(v.sum())
    assert abs(z) < 5.0, z
    # the model's own trace scores its draw with the same decoder
    expected = np_log_prob(decoder, values, mu, sigma_1_np(c), ref).sum(-1)
    np.testing.assert_allclose(np_(tr.nodes[protocol.X_0]["fn"].log_prob(x0)), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("decoder", NAMES)
def test_predictive_shapes(decoder):
    model, _, _ = make(decoder)
    out = Predictive(model.chain, num_samples=3, return_sites=[protocol.X_0, "x_1"])(num_images=4)
    assert out[protocol.X_0].shape == (3, 4, DIM) and out["x_1"].shape == (3, 4, DIM)
    assert model.chain(num_images=7).shape == (7, DIM)


@pytest.mark.parametrize("mu,s", [(0.0, 1.0), (0.1, 0.3), (-0.05, 0.2), (0.6, 0.9)])
def test_bernoulli_draw_frequencies(mu, s):
    n = 200_000
    x = SignedBernoulli(torch.tensor(mu), torch.tensor(s)).sample((n,))
    assert x.shape == (n,)
    assert set(torch.unique(x).tolist()) <= {-1.0, 1.0}
    p = 1.0 / (1.0 + math.exp(-2.0 * mu / s**2))
    count = int((x > 0).sum())
    assert abs(count - n * p) < 5.0 * math.sqrt(n * p * (1 - p)) + 1e-9
    d = SignedBernoulli(torch.zeros(2, 3), torch.ones(2, 3))
    assert (
        d.sample().shape == (2, 3)
        and d.sample((4,)).shape == (4, 2, 3)
        and d.expand((5, 2, 3)).sample().shape == (5, 2, 3)
    )
    np.testing.assert_allclose(
        np_(SignedBernoulli(torch.tensor(mu), torch.tensor(s)).mean), 2 * p - 1, rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("mu,s", [(0.1, 0.3), (-2.0, 0.05), (0.7, 1.5)])
def test_continuous_draws_are_the_normal(mu, s):
    x = GaussianLikelihood()(torch.tensor(mu), torch.tensor(s)).sample((20_000,))
    assert stats.kstest(np_(x), stats.norm(mu, s).cdf).pvalue > 1e-4


# --------------------------------------------------------------------------- e. bad input
NOT_BINARY = {
    "zero": (torch.tensor([[1.0, 0.0, -1.0]]), "binary"),
    "grid-value": (torch.tensor([[1.0, 0.5, -1.0]]), "binary"),
    "two": (torch.tensor([[2.0, 1.0, -1.0]]), "binary"),
    "nan": (torch.tensor([[1.0, float("nan"), -1.0]]), "NaN"),
    "inf": (torch.tensor([[1.0, float("inf"), -1.0]]), "infinite"),
}


@pytest.mark.parametrize("case", list(NOT_BINARY))
def test_bernoulli_rejects_non_binary_x0(case):
    x, msg = NOT_BINARY[case]
    x = x.double()
    with pytest.raises(ValueError, match=msg):
        BernoulliLikelihood().check(x)
    with pytest.raises(ValueError, match=msg):
        SignedBernoulli(torch.zeros(3), torch.ones(3), validate_args=True).log_prob(x)
    model, guide, _ = make("bernoulli")
    with pytest.raises(ValueError, match=msg):
        model.chain(x)
    with pytest.raises(ValueError, match=msg):
        TermwiseELBO().terms(model.per_timestep, guide.per_timestep, x, torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="floating-point"):
        BernoulliLikelihood().check(torch.tensor([[1, -1, 1]]))


@pytest.mark.parametrize("bad,msg", [(float("nan"), "NaN"), (float("inf"), "infinite"), (float("-inf"), "infinite")])
def test_continuous_rejects_non_finite_x0_and_accepts_any_real_value(bad, msg):
    model, guide, _ = make("continuous")
    x = torch.tensor([[0.013, 3.7, -12.0], [bad, 0.0, 0.0]])
    with pytest.raises(ValueError, match=msg):
        GaussianLikelihood().check(x)
    with pytest.raises(ValueError, match=msg):
        model.chain(x)
    with pytest.raises(ValueError, match=msg):
        TermwiseELBO().terms(model.per_timestep, guide.per_timestep, x, torch.ones(2, 1, dtype=torch.long))
    good = x[:1]  # off any grid and outside [-1, 1]: fine for a density
    GaussianLikelihood().check(good)
    terms = TermwiseELBO().terms(model.chain, guide.chain, good)
    assert torch.isfinite(terms[protocol.X_0].value).all()
    # the grid decoders refuse the same data
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        DiscretizedGaussianLikelihood(K).check(good)
    with pytest.raises(ValueError, match="binary"):
        BernoulliLikelihood().check(good)
    with pytest.raises(ValueError, match="grid"):
        DiscretizedGaussianLikelihood(K).check(torch.tensor([[0.013, 0.5, -1.0]]))


@pytest.mark.parametrize("levels", [1, -2, -1, 2.5, True, "17"])
def test_wrong_levels_raise(levels):
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="levels|level"):
        check_images(x, levels)
    with pytest.raises(ValueError, match="levels|level"):
        default_likelihood(levels)
    with pytest.raises(ValueError, match="levels|level"):
        Dataset("bad", x, x, levels, "toy2d")
    with pytest.raises(ValueError, match="levels|level"):
        quantize(np.zeros(3), levels)


def test_grid_decoders_and_quantize_need_a_grid():
    for levels in (0, 1):
        with pytest.raises(ValueError, match="K >= 2|at least 2 levels"):
            quantize(np.zeros(3), levels)
        with pytest.raises(ValueError, match="at least 2 levels"):
            DiscretizedGaussianLikelihood(levels)


# --------------------------------------------------------------------------- f. configuration and defaults
@pytest.mark.parametrize(
    "lik,discrete",
    [
        (BernoulliLikelihood(), True),
        (DiscretizedGaussianLikelihood(K), True),
        (TanhDiscretizedGaussianLikelihood(256), True),
        (GaussianLikelihood(), False),
    ],
    ids=["bernoulli", "discretized", "tanh", "continuous"],
)
def test_config_round_trip_and_kind(lik, discrete):
    stored = LIKELIHOODS.describe(lik)
    again = LIKELIHOODS.build(stored)
    assert type(again) is type(lik) and repr(again) == repr(lik) and again.config() == lik.config()
    assert LIKELIHOODS.describe(again) == stored
    assert again.discrete is discrete


def test_default_likelihood_by_levels():
    assert isinstance(default_likelihood(0), GaussianLikelihood)
    assert isinstance(default_likelihood(None), GaussianLikelihood)
    assert isinstance(default_likelihood(2), BernoulliLikelihood)
    for levels in (3, 17, 256):
        lik = default_likelihood(levels)
        assert type(lik) is DiscretizedGaussianLikelihood and lik.levels == levels
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        LIKELIHOODS.build({"class": "poisson", "config": {}})
    with pytest.raises(ValueError, match="unknown config keys \\['scale'\\]"):
        LIKELIHOODS.build({"class": "discretized_gaussian", "config": {"levels": 17, "scale": 2.0}})


@pytest.mark.parametrize(
    "levels,expected",
    [(0, GaussianLikelihood), (2, BernoulliLikelihood), (17, DiscretizedGaussianLikelihood)],
)
def test_decoder_for_a_data_set(levels, expected):
    x = torch.zeros(2, 2)
    data = Dataset("d", x, x, levels, "toy2d")
    assert type(default_for(data)) is expected
    assert type(by_name("gaussian", data)) is GaussianLikelihood  # a density scores any data
    if levels >= 2:
        lik = by_name("discretized_gaussian", data)
        assert type(lik) is DiscretizedGaussianLikelihood and lik.levels == levels
        assert type(by_name("tanh_discretized_gaussian", data)) is TanhDiscretizedGaussianLikelihood
    else:
        with pytest.raises(ValueError, match="needs quantized data.*continuous"):
            by_name("discretized_gaussian", data)
    if levels == 2:
        assert type(by_name("bernoulli", data)) is BernoulliLikelihood
    else:
        with pytest.raises(ValueError, match="needs"):
            by_name("bernoulli", data)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        by_name("poisson", data)


# --------------------------------------------------------------------------- g. the evaluator's units
@pytest.mark.parametrize("decoder", NAMES)
def test_evaluator_L0_and_units(decoder, ref):
    model, guide, net = make(decoder)
    c = consts(ref)
    N = 6
    x0 = data_for(decoder, N, seed=7)
    noise = torch.randn(2, N, T, DIM, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    idata = bound(model, guide, x0, draws=2, noise=noise)
    L = idata.bound["L"].values
    assert idata.bound.attrs["discrete"] == int(decoder != "continuous")
    for d in range(2):
        x_1 = math.sqrt(c["abar"][1]) * np_(x0) + math.sqrt(1 - c["abar"][1]) * np_(noise[d, :, 0])
        expected = -np_log_prob(decoder, np_(x0), mu_1_np(c, net, x_1), sigma_1_np(c), ref).sum(-1)
        np.testing.assert_allclose(L[d, :, 0], expected, rtol=1e-10, atol=1e-12)
    s = summarize(idata)
    assert s["discrete"] is (decoder != "continuous")
    assert s["unit"] == ("nats_per_dim" if decoder == "continuous" else "bits_per_dim")
    parts = {
        "total": L.sum(-1),
        "prior_L_T": L[..., -1],
        "rate_L_1_to_L_T-1": L[..., 1:-1].sum(-1),
        "distortion_L_0": L[..., 0],
    }
    for name, v in parts.items():
        per_image = v.mean(0)
        e = s[name]
        assert e["nats_per_image"] == pytest.approx(per_image.mean(), rel=1e-12, abs=1e-12)
        assert e["se_nats_per_image"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(N), rel=1e-12)
        assert e["bits_per_dim"] == pytest.approx(per_image.mean() / (DIM * math.log(2)), rel=1e-12, abs=1e-12)
        if decoder == "continuous":
            assert e["nats_per_dim"] == pytest.approx(per_image.mean() / DIM, rel=1e-12, abs=1e-12)
            assert e["se_nats_per_dim"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(N) / DIM, rel=1e-12)
        else:
            assert "nats_per_dim" not in e
    text = format_summary(s)
    assert "nats/image" in text and f"{s['total']['nats_per_image']:.4f}" in text
    if decoder == "continuous":
        assert "nats/dim" in text and "bits/dim " not in text.splitlines()[0] and "not a code length" in text
        assert f"{s['total']['nats_per_dim']:.5f}" in text
    else:
        assert text.splitlines()[0].split()[1] == "bits/dim" and "not a code length" not in text
        assert f"{s['total']['bits_per_dim']:.5f}" in text


def test_continuous_density_bound_can_be_negative(ref):
    """A sharp decoder on continuous data: L_0 = -log density < 0, reported as such (no floor at 0)."""
    betas = (1e-3, 0.02)
    model, guide, net = make("continuous", zero_net=True, betas=betas)
    c = consts(ref, betas)
    x0 = data_for("continuous", 40, seed=9)
    noise = torch.randn(1, 40, T, DIM, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    L = bound(model, guide, x0, noise=noise).bound["L"].values[0]
    x_1 = math.sqrt(c["abar"][1]) * np_(x0) + math.sqrt(1 - c["abar"][1]) * np_(noise[0, :, 0])
    mu = x_1 / math.sqrt(c["alpha"][1])  # eps_theta = 0
    expected = -stats.norm.logpdf(np_(x0), mu, sigma_1_np(c)).sum(-1)
    np.testing.assert_allclose(L[:, 0], expected, rtol=1e-10)
    assert expected.mean() < -3.0
    s = summarize(bound(model, guide, x0, noise=noise))
    assert s["distortion_L_0"]["nats_per_dim"] == pytest.approx(expected.mean() / DIM, rel=1e-10)
    assert s["distortion_L_0"]["nats_per_dim"] < 0
