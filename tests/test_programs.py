"""The Pyro programs: the reverse-process model and the forward-process guide, term by term.

Every expected number is recomputed in numpy/scipy float64 from the beta array (see conftest.py);
the network eps_theta is called directly, never through the model.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, TraceMeanField_ELBO
from scipy import stats

from pyro_ddpm import protocol
from pyro_ddpm.elbo import TermwiseELBO, objective
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, GaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import MLP, UNet
from pyro_ddpm.schedule import Schedule

pytestmark = [
    pytest.mark.usefixtures("float64"),
    # conditioning x_t in both programs makes it observed in both; Pyro then notes the guide site
    pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model"),
]

USER_BETAS = np.array([0.08, 0.2, 0.05, 0.35, 0.15])

SCHEDULES = {
    "linear": (lambda: Schedule.linear(6, 0.05, 0.4), lambda ref: ref.linear_betas(6, 0.05, 0.4)),
    "cosine": (lambda: Schedule.cosine(7), lambda ref: ref.cosine_betas(7)),
    "user": (lambda: Schedule(USER_BETAS), lambda ref: USER_BETAS.copy()),
}
LIKELIHOODS = {
    "disc17": lambda: DiscretizedGaussianLikelihood(17),
    "disc256": lambda: DiscretizedGaussianLikelihood(256),
    "gauss": lambda: GaussianLikelihood(),
}
VARIANCES = ("large", "small")


# ------------------------------------------------------------------------ helpers
def make_net(kind: str):
    if kind == "mlp":
        net = MLP(dim=3, hidden=16, depth=2, temb_dim=8)
        std = 0.3
    else:
        net = UNet(
            resolution=4,
            in_channels=1,
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(2,),
            dropout=0.0,
            groups=4,
        )
        std = 0.15
    net = net.double()
    # the nets zero-initialize their last layers: make eps_theta non-trivial
    with torch.no_grad():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=std)
    return net


def make(schedule="linear", variance="large", likelihood="disc17", net="mlp", ref=None):
    sched = SCHEDULES[schedule][0]()
    nnet = make_net(net)
    model = ReverseProcess(nnet, sched, variance, LIKELIHOODS[likelihood]())
    guide = ForwardProcess(sched)
    consts = ref.constants(SCHEDULES[schedule][1](ref)) if ref is not None else None
    return model, guide, nnet, consts


def levels_of(likelihood):
    return 256 if likelihood == "disc256" else 17


def grid_data(B, shape, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, K, (B,) + tuple(shape), generator=g)
    return k.double() * 2.0 / (K - 1) - 1.0


def shape_of(net):
    return (3,) if net == "mlp" else (1, 4, 4)


def np_(x):
    return x.detach().cpu().double().numpy()


def eps_theta(net, x, t):
    """The network called directly on (x_t, t): numpy."""
    x = torch.as_tensor(x, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    with torch.no_grad():
        return np_(net(x, t))


def bcast(c, t, x):
    """c[t] shaped against x (numpy)."""
    v = np.asarray(c)[np.asarray(t)]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def mu_theta_np(c, net, x_t, t):
    """Eq. 11 in numpy, eps_theta from the network called directly."""
    eps = eps_theta(net, x_t, t)
    t = np.broadcast_to(np.asarray(t), (x_t.shape[0],))
    beta, abar, alpha = bcast(c["beta"], t, x_t), bcast(c["abar"], t, x_t), bcast(c["alpha"], t, x_t)
    return (x_t - beta / np.sqrt(1.0 - abar) * eps) / np.sqrt(alpha)


def mu_tilde_np(c, x0, x_t, t):
    t = np.broadcast_to(np.asarray(t), (x_t.shape[0],))
    abar, abar_p = bcast(c["abar"], t, x_t), bcast(c["abar"], t - 1, x_t)
    beta, alpha = bcast(c["beta"], t, x_t), bcast(c["alpha"], t, x_t)
    return np.sqrt(abar_p) * beta / (1 - abar) * x0 + np.sqrt(alpha) * (1 - abar_p) / (1 - abar) * x_t


def sigma2_np(c, variance, t):
    """sigma_t^2 from the math doc: beta_t or beta_tilde_t, sigma_1^2 = beta_tilde_2."""
    t = np.asarray(t)
    base = c["beta"] if variance == "large" else c["beta_tilde"]
    out = base[np.maximum(t, 2)]
    return np.where(t == 1, c["beta_tilde"][2], out)


def flat_sum(a):
    return a.reshape(a.shape[0], -1).sum(1)


def decoder_nll_np(likelihood, ref, x0, mu, sd):
    if likelihood == "gauss":
        return -flat_sum(stats.norm.logpdf(x0, loc=mu, scale=sd))
    return -flat_sum(ref.disc_log_prob(x0, mu, sd, levels_of(likelihood)))


def reference_chain_terms(c, net, variance, likelihood, ref, x0, xs):
    """Every term of Eq. 5 for one sampled chain xs[s] = x_s (s = 1..T): numpy float64."""
    T = c["T"]
    out = {}
    out[f"x_{T}"] = flat_sum(ref.kl_normal(np.sqrt(c["abar"][T]) * x0, 1 - c["abar"][T], 0.0, 1.0))
    for s in range(1, T):
        t = s + 1
        m_q = mu_tilde_np(c, x0, xs[t], t)
        m_p = mu_theta_np(c, net, xs[t], t)
        out[f"x_{s}"] = flat_sum(ref.kl_normal(m_q, c["beta_tilde"][t], m_p, sigma2_np(c, variance, t)))
    mu = mu_theta_np(c, net, xs[1], 1)
    out["x_0"] = decoder_nll_np(likelihood, ref, x0, mu, np.sqrt(c["beta_tilde"][2]))
    return out


def chain_draw(model, guide, x0):
    """One chain x_T..x_1 from the guide and the model's terms for exactly that chain."""
    guide_tr = poutine.trace(guide.chain).get_trace(x0)
    terms = TermwiseELBO().terms(model.chain, poutine.replay(guide.chain, trace=guide_tr), x0)
    xs = {s: np_(guide_tr.nodes[f"x_{s}"]["value"]) for s in range(1, model.T + 1)}
    return xs, terms


def conditioned(fn, x_t):
    return poutine.condition(fn, data={protocol.X_t: x_t})


PROGRAM_CASES = [
    pytest.param(s, v, lik, "mlp", id=f"{s}-{v}-{lik}") for s in SCHEDULES for v in VARIANCES for lik in LIKELIHOODS
] + [
    pytest.param("linear", "large", "disc17", "unet", id="unet-linear-large-disc17"),
    pytest.param("cosine", "small", "gauss", "unet", id="unet-cosine-small-gauss"),
]


# ------------------------------------------------------------------------ a. chain form
@pytest.mark.parametrize("schedule,variance,likelihood,net", PROGRAM_CASES)
def test_chain_terms_are_the_closed_form_kls(schedule, variance, likelihood, net, ref):
    model, guide, nnet, c = make(schedule, variance, likelihood, net, ref)
    T = model.T
    x0 = grid_data(4, shape_of(net), levels_of(likelihood))
    xs, terms = chain_draw(model, guide, x0)
    assert set(terms) == {f"x_{s}" for s in range(T + 1)}
    expected = reference_chain_terms(c, nnet, variance, likelihood, ref, np_(x0), xs)
    for name, value in expected.items():
        term = terms[name]
        assert term.scale == 1.0
        assert term.value.shape == (4,)
        np.testing.assert_allclose(np_(term.value), value, rtol=1e-10, atol=1e-12, err_msg=name)
    # the network is not trivial: the model's terms are not the eps_theta = 0 ones
    assert np.abs(eps_theta(nnet, xs[2], 2)).max() > 0.1


@pytest.mark.parametrize("schedule,variance,likelihood,net", PROGRAM_CASES[::2] + PROGRAM_CASES[-1:])
def test_chain_terms_sum_to_trace_mean_field_loss(schedule, variance, likelihood, net, ref):
    model, guide, nnet, c = make(schedule, variance, likelihood, net, ref)
    x0 = grid_data(4, shape_of(net), levels_of(likelihood), seed=3)
    pyro.set_rng_seed(11)
    terms = TermwiseELBO().terms(model.chain, guide.chain, x0)
    total = TermwiseELBO().loss_from_terms(terms).item()
    pyro.set_rng_seed(11)
    loss = TraceMeanField_ELBO().loss(model.chain, guide.chain, x0)
    assert loss == pytest.approx(total, rel=1e-10)
    # and the same draw scored by the reference
    pyro.set_rng_seed(11)
    xs, _ = chain_draw(model, guide, x0)
    expected = sum(v.sum() for v in reference_chain_terms(c, nnet, variance, likelihood, ref, np_(x0), xs).values())
    assert loss == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------------ b. training form
@pytest.mark.parametrize("schedule,variance,likelihood,net", PROGRAM_CASES)
@pytest.mark.parametrize("which", ["all", "K=2"])
def test_training_form_terms_equal_chain_terms(schedule, variance, likelihood, net, which, ref):
    model, guide, nnet, c = make(schedule, variance, likelihood, net, ref)
    T = model.T
    B = 4
    x0 = grid_data(B, shape_of(net), levels_of(likelihood), seed=5)
    xs, chain = chain_draw(model, guide, x0)
    if which == "all":
        t = protocol.all_timesteps(B, T)
    else:
        t = protocol.draw_timesteps(B, 2, T, generator=torch.Generator().manual_seed(2))
        t[0] = torch.tensor([1, T])
        t[1] = torch.tensor([2, 2])
    K = t.shape[1]
    # pair b * K + k is image b at t[b, k]: its x_t is the chain's x_{t[b, k]}
    x_t = torch.stack([torch.as_tensor(xs[int(t[b, k])][b]) for b in range(B) for k in range(K)])
    terms = TermwiseELBO().terms(conditioned(model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t)
    assert set(terms) == {protocol.X_T, protocol.X_PREV, protocol.X_0}
    assert terms[protocol.X_T].scale == 1.0
    for name in (protocol.X_PREV, protocol.X_0):
        assert float(terms[name].scale) == pytest.approx(T / K, rel=1e-15)
        assert terms[name].value.shape == (B * K,)
    np.testing.assert_allclose(np_(terms[protocol.X_T].value), np_(chain[f"x_{T}"].value), rtol=1e-10, atol=1e-12)
    prev = np_(terms[protocol.X_PREV].value).reshape(B, K)
    dec = np_(terms[protocol.X_0].value).reshape(B, K)
    for b in range(B):
        for k in range(K):
            tt = int(t[b, k])
            if tt >= 2:
                assert prev[b, k] == pytest.approx(chain[f"x_{tt - 1}"].value[b].item(), rel=1e-10, abs=1e-12)
                assert dec[b, k] == 0.0
            else:
                assert dec[b, k] == pytest.approx(chain["x_0"].value[b].item(), rel=1e-10, abs=1e-12)
                assert prev[b, k] == 0.0


# ------------------------------------------------------------------------ c. unbiasedness
def _per_image_totals_chain(model, guide, x0):
    terms = TermwiseELBO().terms(model.chain, guide.chain, x0)
    return sum(np_(term.value) * float(term.scale) for term in terms.values())


def _per_image_totals_training(model, guide, x0, t):
    B, K = t.shape
    terms = TermwiseELBO().terms(model.per_timestep, guide.per_timestep, x0, t)
    total = np_(terms[protocol.X_T].value) * float(terms[protocol.X_T].scale)
    for name in (protocol.X_PREV, protocol.X_0):
        total = total + float(terms[name].scale) * np_(terms[name].value).reshape(B, K).sum(1)
    return total


@pytest.mark.parametrize(
    "schedule,variance,likelihood",
    [("linear", "large", "disc17"), ("linear", "small", "gauss"), ("user", "small", "disc256")],
)
@pytest.mark.parametrize("K", ["1", "T"])
def test_training_form_is_unbiased_for_the_chain_bound(schedule, variance, likelihood, K):
    model, guide, nnet, _ = make(schedule, variance, likelihood, "mlp")
    T = model.T
    K = 1 if K == "1" else T
    n_img, reps = 2, 3000
    base = grid_data(n_img, (3,), levels_of(likelihood), seed=8)
    x0 = base.repeat(reps, 1)  # row r is image r % n_img
    pyro.set_rng_seed(21)
    chain = _per_image_totals_chain(model, guide, x0).reshape(reps, n_img)
    t = protocol.draw_timesteps(x0.shape[0], K, T)
    assert (t == 1).any() and (t == T).any()
    train = _per_image_totals_training(model, guide, x0, t).reshape(reps, n_img)
    for i in range(n_img):
        a, b = chain[:, i], train[:, i]
        se = np.sqrt(a.var(ddof=1) / reps + b.var(ddof=1) / reps)
        assert abs(a.mean() - b.mean()) < 4 * se, (i, a.mean(), b.mean(), se)
    # a biased estimate (forgetting the T/K scale) is detected at this sample size
    if K == 1:
        terms = TermwiseELBO().terms(model.per_timestep, guide.per_timestep, x0, t)
        unscaled = np_(terms[protocol.X_T].value) + np_(terms[protocol.X_PREV].value) + np_(terms[protocol.X_0].value)
        unscaled = unscaled.reshape(reps, n_img)
        se = np.sqrt(chain[:, 0].var(ddof=1) / reps + unscaled[:, 0].var(ddof=1) / reps)
        assert abs(chain[:, 0].mean() - unscaled[:, 0].mean()) > 4 * se


# ------------------------------------------------------------------------ d. Eq. 12
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("net", ["mlp", "unet"])
def test_eq12_weighted_eps_error(schedule, variance, net, ref):
    model, guide, nnet, c = make(schedule, variance, "disc17", net, ref)
    T = model.T
    B = 3
    x0 = grid_data(B, shape_of(net), 17, seed=4)
    t = torch.cat([protocol.all_timesteps(B, T), protocol.draw_timesteps(B, 3, T)], dim=1)
    K = t.shape[1]
    guide_tr = poutine.trace(guide.per_timestep).get_trace(x0, t)
    terms = TermwiseELBO().terms(model.per_timestep, poutine.replay(guide.per_timestep, trace=guide_tr), x0, t)
    x_t = np_(guide_tr.nodes[protocol.X_t]["value"])
    tf = np_(t.reshape(-1)).astype(int)
    x0p = np.repeat(np_(x0), K, axis=0)
    eps = (x_t - bcast(np.sqrt(c["abar"]), tf, x_t) * x0p) / bcast(np.sqrt(1 - c["abar"]), tf, x_t)
    err = flat_sum((eps - eps_theta(nnet, x_t, tf)) ** 2)
    D = int(np.prod(shape_of(net)))
    w = np.array([c[f"w_{variance}"][s] if s >= 2 else np.nan for s in tf])
    C = np.array([c[f"C_{variance}"][s] if s >= 2 else np.nan for s in tf])
    expected = w * err + D * C
    got = np_(terms[protocol.X_PREV].value)
    late = tf >= 2
    np.testing.assert_allclose(got[late], expected[late], rtol=1e-9, atol=0)
    assert np.all(got[~late] == 0.0)
    if variance == "small":
        np.testing.assert_allclose(C[late], 0.0, atol=1e-14)


# ------------------------------------------------------------------------ e. L_simple
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("likelihood", ["disc17", "gauss"])
def test_simple_objective_gradient_is_eps_mse(schedule, variance, likelihood, ref):
    model, guide, nnet, c = make(schedule, variance, likelihood, "mlp", ref)
    T = model.T
    B, K = 5, 3
    x0 = grid_data(B, (3,), 17, seed=6)
    t = protocol.draw_timesteps(B, K, T, generator=torch.Generator().manual_seed(3))
    t[0, 0], t[1, 2], t[2, 1] = 1, 1, T
    tf = t.reshape(-1)
    x0p = x0.repeat_interleave(K, dim=0)
    eps = torch.randn(x0p.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sa = torch.tensor(np.sqrt(c["abar"]))[tf][:, None]
    sb = torch.tensor(np.sqrt(1 - c["abar"]))[tf][:, None]
    x_t = sa * x0p + sb * eps
    params = list(nnet.parameters())

    train_model, weight = objective("simple", model)
    loss = TraceMeanField_ELBO().differentiable_loss(
        conditioned(train_model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t, weight
    )
    g_simple = torch.autograd.grad(loss, params)

    mse = ((eps - nnet(x_t, tf)) ** 2).sum() / K  # Algorithm 1: sum over images of (1/K) sum_k
    g_ref = torch.autograd.grad(mse, params)
    for a, b in zip(g_simple, g_ref):
        scale = float(b.abs().max())
        assert scale > 0
        np.testing.assert_allclose(np_(a), np_(b), rtol=1e-9, atol=1e-12 * scale)

    # the true bound's gradient is a different thing (so this test can fail)
    elbo_model, none = objective("elbo", model)
    assert none is None
    loss_elbo = TraceMeanField_ELBO().differentiable_loss(
        conditioned(elbo_model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t
    )
    g_elbo = torch.autograd.grad(loss_elbo, params)
    assert not all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(g_elbo, g_ref))


def test_unknown_objective():
    model, _, _, _ = make()
    with pytest.raises(ValueError, match="objective"):
        objective("vlb", model)


# ------------------------------------------------------------------------ f. sampling
@pytest.mark.parametrize(
    "likelihood,net", [("disc17", "mlp"), ("disc256", "mlp"), ("disc17", "unet"), ("gauss", "mlp")]
)
def test_ancestral_sampling(likelihood, net):
    model, _, _, _ = make("linear", "small", likelihood, net)
    n = 7
    shape = shape_of(net)
    out = Predictive(model.chain, num_samples=1, return_sites=["x_0"])(None, n)
    x = out["x_0"]
    assert x.shape == (1, n) + shape
    direct = model.chain(None, n)
    assert direct.shape == (n,) + shape
    for v in (x, direct):
        assert v.dtype == torch.float64
        assert torch.isfinite(v).all()
        if likelihood != "gauss":
            K = levels_of(likelihood)
            k = (v + 1) * (K - 1) / 2
            assert torch.all((k - k.round()).abs() < 1e-9)
            assert v.min() >= -1 and v.max() <= 1
    if likelihood == "gauss":
        k = (direct + 1) * 8
        assert not torch.all((k - k.round()).abs() < 1e-9)  # continuous draws


def test_chain_needs_x0_or_num_images():
    model, _, _, _ = make()
    with pytest.raises(ValueError, match="num_images"):
        model.chain()


# ------------------------------------------------------------------------ g. bad input
BAD_X0 = {
    "outside": (lambda x: x.index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(1.5)), r"\[-1, 1\]"),
    "off-grid": (lambda x: x.index_put_((torch.tensor(1), torch.tensor(0)), torch.tensor(0.01)), "grid"),
    "nan": (lambda x: x.index_put_((torch.tensor(2), torch.tensor(2)), torch.tensor(float("nan"))), "NaN"),
}


@pytest.mark.parametrize("case", list(BAD_X0))
def test_bad_x0_values_raise(case):
    model, guide, _, _ = make("linear", "large", "disc17")
    spoil, msg = BAD_X0[case]
    x0 = spoil(grid_data(4, (3,), 17))
    t = protocol.draw_timesteps(4, 2, model.T)
    with pytest.raises(ValueError, match=msg):
        model.chain(x0)
    with pytest.raises(ValueError, match=msg):
        model.per_timestep(x0, t)


@pytest.mark.parametrize("case", list(BAD_X0))
def test_bad_x0_values_raise_through_the_elbo(case):
    """Every ELBO runs the guide first: the error must still name the problem with the data."""
    model, guide, _, _ = make("linear", "large", "disc17")
    spoil, msg = BAD_X0[case]
    x0 = spoil(grid_data(4, (3,), 17))
    t = protocol.draw_timesteps(4, 2, model.T)
    with pytest.raises(ValueError, match=msg):
        TraceMeanField_ELBO().loss(model.chain, guide.chain, x0)
    with pytest.raises(ValueError, match=msg):
        TraceMeanField_ELBO().loss(model.per_timestep, guide.per_timestep, x0, t)


def test_nan_x0_raises_for_gaussian_likelihood():
    model, _, _, _ = make("linear", "large", "gauss")
    x0 = grid_data(4, (3,), 17)
    x0[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.chain(x0)
    x0[0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        model.per_timestep(x0, protocol.all_timesteps(4, model.T))
    x0[0, 0] = 1.7  # continuous data need not be on a grid nor in [-1, 1]
    model.chain(x0)


@pytest.mark.parametrize("bad_shape", [(4, 4), (4, 3, 1), (4, 1, 4, 4)])
def test_x0_with_wrong_shape_raises(bad_shape):
    model, guide, _, _ = make("linear", "large", "disc17")
    x0 = grid_data(bad_shape[0], bad_shape[1:], 17)
    with pytest.raises(ValueError, match="shape"):
        model.chain(x0)
    with pytest.raises(ValueError, match="shape"):
        model.per_timestep(x0, protocol.draw_timesteps(bad_shape[0], 2, model.T))
    with pytest.raises(ValueError, match="shape"):
        TraceMeanField_ELBO().loss(model.chain, guide.chain, x0)


@pytest.mark.parametrize("bad_t", [0, "T+1"])
def test_timesteps_outside_range_raise_in_model(bad_t):
    model, _, _, _ = make("linear", "large", "disc17")
    bad = model.T + 1 if bad_t == "T+1" else 0
    x0 = grid_data(4, (3,), 17)
    t = protocol.draw_timesteps(4, 2, model.T)
    t[2, 1] = bad
    with pytest.raises(ValueError, match="1..T"):
        model.per_timestep(x0, t)


@pytest.mark.parametrize("bad_t", [0, "T+1"])
def test_timesteps_outside_range_raise_in_guide_and_elbo(bad_t):
    """The guide runs first in every ELBO, so it must reject t outside 1..T with the same message."""
    model, guide, _, _ = make("linear", "large", "disc17")
    bad = model.T + 1 if bad_t == "T+1" else 0
    x0 = grid_data(4, (3,), 17)
    t = protocol.draw_timesteps(4, 2, model.T)
    t[2, 1] = bad
    with pytest.raises(ValueError, match="1..T"):
        guide.per_timestep(x0, t)
    with pytest.raises(ValueError, match="1..T"):
        TraceMeanField_ELBO().loss(model.per_timestep, guide.per_timestep, x0, t)


def test_float_timesteps_raise():
    model, _, _, _ = make("linear", "large", "disc17")
    x0 = grid_data(4, (3,), 17)
    t = protocol.draw_timesteps(4, 2, model.T).double()
    with pytest.raises(ValueError, match="integer"):
        model.per_timestep(x0, t)


class _Truncating(torch.nn.Module):
    """A network whose output has the wrong shape."""

    def __init__(self, shape, out):
        super().__init__()
        self.lin = torch.nn.Linear(3, out)
        self.shape = shape

    def forward(self, x, t):
        return self.lin(x)


@pytest.mark.parametrize("out", [2, 4])
def test_network_with_wrong_output_shape_raises(out):
    sched = Schedule.linear(6, 0.05, 0.4)
    model = ReverseProcess(_Truncating((3,), out).double(), sched, "large", DiscretizedGaussianLikelihood(17))
    guide = ForwardProcess(sched)
    x0 = grid_data(4, (3,), 17)
    with pytest.raises(ValueError, match="returned shape"):
        model.chain(x0)
    with pytest.raises(ValueError, match="returned shape"):
        TraceMeanField_ELBO().loss(model.per_timestep, guide.per_timestep, x0, protocol.all_timesteps(4, 6))
    with pytest.raises(ValueError, match="returned shape"):
        model.chain(None, 3)


def test_unknown_variance_raises():
    with pytest.raises(ValueError, match="variance"):
        ReverseProcess(make_net("mlp"), Schedule.linear(6, 0.05, 0.4), "medium", DiscretizedGaussianLikelihood(17))


def test_network_without_shape_needs_shape():
    net = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="shape"):
        ReverseProcess(net, Schedule.linear(6, 0.05, 0.4))


def test_a_gaussian_model_that_overrides_transition_is_refused():
    """transition() is derived from mean_and_scale(); a class that overrode it would train on one mean and
    sample with DDIM on another, so it is refused where it is defined."""
    with pytest.raises(TypeError, match="overrides transition\\(\\): define mean_and_scale"):

        class Own(ReverseProcess):
            def transition(self, x_t, t):
                return x_t, torch.ones_like(x_t)
