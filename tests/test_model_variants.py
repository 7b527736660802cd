"""Model variants: x_0- and v-prediction, learned variance, and the hybrid objective.

Every expected number is recomputed in numpy/scipy float64 from the beta array (conftest.py's
references); the networks are called directly, never through the model. Each variant goes through the
same suite: per-term values against closed forms, equality with the eps model for the same implied
mean, training form against chain form, unbiasedness, sampling, bad input, the rebuild from its stored
description.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from scipy import stats

from pyro_ddpm import protocol
from pyro_ddpm.elbo import TermwiseELBO, objective
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, GaussianLikelihood
from pyro_ddpm.models import (
    HybridReverseProcess,
    LearnedVarianceReverseProcess,
    ReverseProcess,
    VPredictionReverseProcess,
    X0PredictionReverseProcess,
)
from pyro_ddpm.models.learned_variance import HYBRID_LAMBDA
from pyro_ddpm.nets import MLP, UNet, build_network, network_config
from pyro_ddpm.presets import NETWORKS as PRESETS
from pyro_ddpm.protocol import DataSpec
from pyro_ddpm.registry import MODELS
from pyro_ddpm.schedule import Schedule

pytestmark = [
    pytest.mark.usefixtures("float64"),
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
# variant -> (class, variance, what the network output means)
VARIANTS = {
    "x0-large": (X0PredictionReverseProcess, "large", "x0"),
    "x0-small": (X0PredictionReverseProcess, "small", "x0"),
    "v-large": (VPredictionReverseProcess, "large", "v"),
    "v-small": (VPredictionReverseProcess, "small", "v"),
    "learned": (LearnedVarianceReverseProcess, "learned", "learned"),
}


# ------------------------------------------------------------------------ helpers
def np_(x):
    return x.detach().cpu().double().numpy()


def randomize(net, std):
    net = net.double()
    with torch.no_grad():  # the nets zero-initialize their last layers: make the output non-trivial
        for p in net.parameters():
            torch.nn.init.normal_(p, std=std)
    return net


def make_net(kind: str, out_factor: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return randomize(MLP(dim=3, hidden=16, depth=2, temb_dim=8, out_channels=3 * out_factor), 0.3)
    return randomize(
        UNet(
            resolution=4,
            in_channels=1,
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(2,),
            dropout=0.0,
            groups=4,
            out_channels=out_factor,
        ),
        0.15,
    )


def shape_of(net):
    return (3,) if net == "mlp" else (1, 4, 4)


def levels_of(likelihood):
    return 256 if likelihood == "disc256" else 17


def grid_data(B, shape, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, K, (B,) + tuple(shape), generator=g)
    return k.double() * 2.0 / (K - 1) - 1.0


def make(variant, schedule="linear", likelihood="disc17", net="mlp", ref=None):
    cls, variance, _ = VARIANTS[variant]
    sched = SCHEDULES[schedule][0]()
    nnet = make_net(net, 2 if variance == "learned" else 1)
    model = cls(nnet, sched, variance, LIKELIHOODS[likelihood]())
    consts = ref.constants(SCHEDULES[schedule][1](ref)) if ref is not None else None
    return model, ForwardProcess(sched), nnet, consts


def call(net, x, t):
    """The network called directly on (x_t, t): numpy."""
    x = torch.as_tensor(x, dtype=torch.float64)
    t = torch.as_tensor(np.broadcast_to(np.asarray(t), (x.shape[0],)).copy(), dtype=torch.long)
    with torch.no_grad():
        return np_(net(x, t))


def bcast(c, t, x):
    v = np.asarray(c)[np.asarray(t)]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def flat_sum(a):
    return a.reshape(a.shape[0], -1).sum(1)


def mu_tilde_np(c, x0, x_t, t):
    """Eq. 7's posterior mean from the constants' definitions."""
    abar, abar_p = bcast(c["abar"], t, x_t), bcast(c["abar"], t - 1, x_t)
    beta, alpha = bcast(c["beta"], t, x_t), bcast(c["alpha"], t, x_t)
    return np.sqrt(abar_p) * beta / (1 - abar) * x0 + np.sqrt(alpha) * (1 - abar_p) / (1 - abar) * x_t


def mu_eps_np(c, eps, x_t, t):
    """Eq. 11."""
    beta, abar, alpha = bcast(c["beta"], t, x_t), bcast(c["abar"], t, x_t), bcast(c["alpha"], t, x_t)
    return (x_t - beta / np.sqrt(1.0 - abar) * eps) / np.sqrt(alpha)


def fixed_var_np(c, variance, t):
    """sigma_t^2: beta_t or beta_tilde_t, sigma_1^2 = beta_tilde_2 (the math doc)."""
    base = c["beta"] if variance == "large" else c["beta_tilde"]
    return np.where(t == 1, c["beta_tilde"][2], base[np.maximum(t, 2)])


def transition_np(c, kind, variance, out, x_t, t):
    """Mean and variance of p_theta(x_{t-1} | x_t) from the network output ``out``, by definition."""
    t = np.broadcast_to(np.asarray(t), (x_t.shape[0],))
    if kind == "eps":
        mu = mu_eps_np(c, out, x_t, t)
    elif kind == "x0":
        mu = mu_tilde_np(c, out, x_t, t)
    elif kind == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 with x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps
        a, b = np.sqrt(bcast(c["abar"], t, x_t)), np.sqrt(1 - bcast(c["abar"], t, x_t))
        x0 = a * x_t - b * out  # the rotation (x_0, eps) -> (x_t, v) inverted
        mu = mu_tilde_np(c, x0, x_t, t)
    if kind != "learned":
        return mu, bcast(fixed_var_np(c, variance, t), np.arange(len(t)), x_t) * np.ones_like(mu)
    half = out.shape[1] // 2
    eps, v = out[:, :half], out[:, half:]
    mu = mu_eps_np(c, eps, x_t, t)
    lo = np.where(t == 1, c["beta_tilde"][2], c["beta_tilde"][np.maximum(t, 2)])  # clipped posterior variance
    frac = (v + 1) / 2
    log_var = frac * np.log(bcast(c["beta"], t, x_t)) + (1 - frac) * np.log(bcast(lo, np.arange(len(t)), x_t))
    return mu, np.exp(log_var)


def decoder_nll_np(likelihood, ref, x0, mu, var):
    if likelihood == "gauss":
        return -flat_sum(stats.norm.logpdf(x0, loc=mu, scale=np.sqrt(var)))
    return -flat_sum(ref.disc_log_prob(x0, mu, np.sqrt(var), levels_of(likelihood)))


def reference_chain_terms(c, kind, variance, net, likelihood, ref, x0, xs):
    """Every term of Eq. 5 for one chain xs[s] = x_s (s = 1..T): numpy float64."""
    T = c["T"]
    out = {f"x_{T}": flat_sum(ref.kl_normal(np.sqrt(c["abar"][T]) * x0, 1 - c["abar"][T], 0.0, 1.0))}
    for s in range(1, T):
        t = s + 1
        m_p, v_p = transition_np(c, kind, variance, call(net, xs[t], t), xs[t], t)
        out[f"x_{s}"] = flat_sum(ref.kl_normal(mu_tilde_np(c, x0, xs[t], t), c["beta_tilde"][t], m_p, v_p))
    mu, var = transition_np(c, kind, variance, call(net, xs[1], 1), xs[1], 1)
    out["x_0"] = decoder_nll_np(likelihood, ref, x0, mu, var)
    return out


def chain_draw(model, guide, x0):
    """One chain x_T..x_1 from the guide, and the model's terms for exactly that chain."""
    guide_tr = poutine.trace(guide.chain).get_trace(x0)
    terms = TermwiseELBO().terms(model.chain, poutine.replay(guide.chain, trace=guide_tr), x0)
    return guide_tr, {s: np_(guide_tr.nodes[f"x_{s}"]["value"]) for s in range(1, model.T + 1)}, terms


def terms_on(model, guide_tr, guide, x0):
    return TermwiseELBO().terms(model.chain, poutine.replay(guide.chain, trace=guide_tr), x0)


def conditioned(fn, x_t):
    return poutine.condition(fn, data={protocol.X_t: x_t})


class FromEps(torch.nn.Module):
    """An eps network re-expressed as the x_0 or v it implies (numpy reference constants), or as a
    learned-variance network with a constant or network v head."""

    def __init__(self, eps_net, c, kind, v=None):
        super().__init__()
        self.eps_net, self.kind, self.v = eps_net, kind, v
        self.register_buffer("sa", torch.tensor(np.sqrt(np.nan_to_num(c["abar"], nan=1.0))))
        self.register_buffer("sb", torch.tensor(np.sqrt(1.0 - np.nan_to_num(c["abar"], nan=1.0))))

    def forward(self, x, t):
        eps = self.eps_net(x, t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, b = self.sa[t].reshape(shape), self.sb[t].reshape(shape)
        x0 = (x - b * eps) / a
        if self.kind == "x0":
            return x0
        if self.kind == "v":
            return a * eps - b * x0
        v = self.v(x, t) if isinstance(self.v, torch.nn.Module) else torch.full_like(eps, float(self.v))
        return torch.cat([eps, v], dim=1)


class TwoHeads(torch.nn.Module):
    """A learned-variance network with separate parameters for eps_theta and v_theta."""

    def __init__(self, eps_head, v_head):
        super().__init__()
        self.eps_head, self.v_head = eps_head, v_head

    def forward(self, x, t):
        return torch.cat([self.eps_head(x, t), torch.tanh(self.v_head(x, t)) * 1.3], dim=1)


CHAIN_CASES = [
    pytest.param(v, s, lik, "mlp", id=f"{v}-{s}-{lik}")
    for v in VARIANTS
    for s in SCHEDULES
    for lik in ("disc17", "gauss")
] + [
    pytest.param(v, "linear", "disc256", "unet", id=f"unet-{v}-linear-disc256")
    for v in ("x0-small", "v-large", "learned")
]


# ------------------------------------------------------------------------ a. closed forms
@pytest.mark.parametrize("variant,schedule,likelihood,net", CHAIN_CASES)
def test_chain_terms_are_the_closed_form_kls(variant, schedule, likelihood, net, ref):
    model, guide, nnet, c = make(variant, schedule, likelihood, net, ref)
    _, variance, kind = VARIANTS[variant]
    x0 = grid_data(4, shape_of(net), levels_of(likelihood))
    _, xs, terms = chain_draw(model, guide, x0)
    assert set(terms) == {f"x_{s}" for s in range(model.T + 1)}
    expected = reference_chain_terms(c, kind, variance, nnet, likelihood, ref, np_(x0), xs)
    for name, value in expected.items():
        assert terms[name].scale == 1.0
        assert terms[name].value.shape == (4,)
        np.testing.assert_allclose(np_(terms[name].value), value, rtol=1e-10, atol=1e-12, err_msg=name)
    if kind == "learned":  # the learned variance is not one of the ends of its range
        _, var = transition_np(c, kind, variance, call(nnet, xs[3], 3), xs[3], 3)
        assert np.ptp(var) > 0.05 * var.max()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chain_terms_sum_to_trace_mean_field_loss(variant, ref):
    model, guide, nnet, c = make(variant, "cosine", "disc17", "mlp", ref)
    x0 = grid_data(4, (3,), 17, seed=3)
    pyro.set_rng_seed(11)
    total = TermwiseELBO().loss_from_terms(TermwiseELBO().terms(model.chain, guide.chain, x0)).item()
    pyro.set_rng_seed(11)
    assert TraceMeanField_ELBO().loss(model.chain, guide.chain, x0) == pytest.approx(total, rel=1e-10)


# ------------------------------------------------------------------------ b. same implied mean, same terms
@pytest.mark.parametrize("kind", ["x0", "v"])
@pytest.mark.parametrize("variance", ["large", "small"])
@pytest.mark.parametrize("schedule,likelihood", [("linear", "disc17"), ("cosine", "gauss"), ("user", "disc256")])
def test_x0_and_v_parameterizations_give_the_eps_models_terms(kind, variance, schedule, likelihood, ref):
    sched = SCHEDULES[schedule][0]()
    c = ref.constants(SCHEDULES[schedule][1](ref))
    eps_net = make_net("mlp")
    lik = LIKELIHOODS[likelihood]()
    eps_model = ReverseProcess(eps_net, sched, variance, lik)
    cls = X0PredictionReverseProcess if kind == "x0" else VPredictionReverseProcess
    other = cls(FromEps(eps_net, c, kind), sched, variance, lik, shape=(3,))
    guide = ForwardProcess(sched)
    x0 = grid_data(5, (3,), levels_of(likelihood), seed=2)
    guide_tr, xs, eps_terms = chain_draw(eps_model, guide, x0)
    other_terms = terms_on(other, guide_tr, guide, x0)
    assert set(other_terms) == set(eps_terms)
    for name in eps_terms:
        np.testing.assert_allclose(
            np_(other_terms[name].value), np_(eps_terms[name].value), rtol=1e-10, atol=1e-12, err_msg=name
        )
    # the implied output really is the other parameterization (not eps passed through)
    out = call(other.eps, xs[3], 3)
    assert np.abs(out - call(eps_net, xs[3], 3)).max() > 0.05


@pytest.mark.parametrize("v,variance", [(-1.0, "small"), (1.0, "large")])
@pytest.mark.parametrize("schedule,likelihood", [("linear", "disc17"), ("cosine", "gauss"), ("user", "disc256")])
def test_learned_variance_at_the_ends_of_its_range(v, variance, schedule, likelihood, ref):
    sched = SCHEDULES[schedule][0]()
    c = ref.constants(SCHEDULES[schedule][1](ref))
    eps_net = make_net("mlp")
    lik = LIKELIHOODS[likelihood]()
    fixed = ReverseProcess(eps_net, sched, variance, lik)
    learned = LearnedVarianceReverseProcess(FromEps(eps_net, c, "learned", v=v), sched, "learned", lik, shape=(3,))
    guide = ForwardProcess(sched)
    x0 = grid_data(5, (3,), levels_of(likelihood), seed=7)
    guide_tr, xs, fixed_terms = chain_draw(fixed, guide, x0)
    learned_terms = terms_on(learned, guide_tr, guide, x0)
    for s in range(1, sched.T + 1):  # every L_{t-1}, t >= 2, and L_T
        np.testing.assert_allclose(
            np_(learned_terms[f"x_{s}"].value),
            np_(fixed_terms[f"x_{s}"].value),
            rtol=1e-10,
            atol=1e-12,
            err_msg=f"x_{s}",
        )
    # t = 1: the lower end is the clipped beta_tilde_2 (as the fixed models), the upper end beta_1
    mu = mu_eps_np(c, call(eps_net, xs[1], 1), xs[1], np.ones(5, dtype=int))
    var = c["beta_tilde"][2] if v < 0 else c["beta"][1]
    expected = decoder_nll_np(likelihood, ref, np_(x0), mu, var)
    np.testing.assert_allclose(np_(learned_terms["x_0"].value), expected, rtol=1e-10, atol=1e-12)
    same = np.allclose(np_(learned_terms["x_0"].value), np_(fixed_terms["x_0"].value), rtol=1e-10, atol=1e-12)
    assert same == (v < 0)


# ------------------------------------------------------------------------ c. training form
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("net", ["mlp", "unet"])
def test_training_form_terms_equal_chain_terms(variant, net, ref):
    model, guide, _, _ = make(variant, "user", "disc17", net, ref)
    T, B = model.T, 3
    x0 = grid_data(B, shape_of(net), 17, seed=5)
    _, xs, chain = chain_draw(model, guide, x0)
    t = protocol.all_timesteps(B, T)
    x_t = torch.stack([torch.as_tensor(xs[int(t[b, k])][b]) for b in range(B) for k in range(T)])
    terms = TermwiseELBO().terms(conditioned(model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t)
    prev = np_(terms[protocol.X_PREV].value).reshape(B, T)
    dec = np_(terms[protocol.X_0].value).reshape(B, T)
    np.testing.assert_allclose(np_(terms[protocol.X_T].value), np_(chain[f"x_{T}"].value), rtol=1e-10)
    for k in range(T):
        tt = k + 1
        got = prev[:, k] if tt >= 2 else dec[:, k]
        want = np_(chain[f"x_{tt - 1}"].value) if tt >= 2 else np_(chain["x_0"].value)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"t={tt}")


class _WideTransitions(ReverseProcess):
    """A model that redefines p_prev (twice the scale) and nothing else."""

    def p_prev(self, x_t, t, out):
        loc, scale = self.mean_and_scale(x_t, t, out)
        return pyro.distributions.Normal(loc, 2.0 * scale)


def test_a_redefined_transition_is_what_the_training_form_scores():
    """The training form scores the class's own p_prev (here, not the base class's shortcut that builds both
    distributions from the mean and scale): its terms equal the chain's, which calls p_prev itself, and
    differ from the base model's with the same network."""
    net = make_net("mlp")
    wide = _WideTransitions(net, Schedule.linear(6), "large", DiscretizedGaussianLikelihood(17))
    base = ReverseProcess(net, Schedule.linear(6), "large", DiscretizedGaussianLikelihood(17))
    guide, T, B = ForwardProcess(Schedule.linear(6)), 6, 3
    x0 = grid_data(B, (3,), 17, seed=5)
    _, xs, chain = chain_draw(wide, guide, x0)
    t = protocol.all_timesteps(B, T)
    x_t = torch.stack([torch.as_tensor(xs[int(t[b, k])][b]) for b in range(B) for k in range(T)])
    prev = {}
    for name, model in (("wide", wide), ("base", base)):
        terms = TermwiseELBO().terms(conditioned(model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t)
        prev[name] = np_(terms[protocol.X_PREV].value).reshape(B, T)
    for k in range(1, T):  # t = k + 1 >= 2
        np.testing.assert_allclose(prev["wide"][:, k], np_(chain[f"x_{k}"].value), rtol=1e-10, atol=1e-12)
    assert not np.allclose(prev["wide"][:, 1:], prev["base"][:, 1:])


def _totals_chain(model, guide, x0):
    terms = TermwiseELBO().terms(model.chain, guide.chain, x0)
    return sum(np_(term.value) * float(term.scale) for term in terms.values())


def _totals_training(model, guide, x0, t):
    B, K = t.shape
    terms = TermwiseELBO().terms(model.per_timestep, guide.per_timestep, x0, t)
    total = np_(terms[protocol.X_T].value)
    for name in (protocol.X_PREV, protocol.X_0):
        total = total + float(terms[name].scale) * np_(terms[name].value).reshape(B, K).sum(1)
    return total


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_form_with_one_timestep_is_unbiased(variant):
    model, guide, _, _ = make(variant, "linear", "disc17", "mlp")
    n_img, reps = 2, 3000
    x0 = grid_data(n_img, (3,), 17, seed=8).repeat(reps, 1)
    pyro.set_rng_seed(21)
    chain = _totals_chain(model, guide, x0).reshape(reps, n_img)
    t = protocol.draw_timesteps(x0.shape[0], 1, model.T)
    train = _totals_training(model, guide, x0, t).reshape(reps, n_img)
    for i in range(n_img):
        a, b = chain[:, i], train[:, i]
        se = np.sqrt(a.var(ddof=1) / reps + b.var(ddof=1) / reps)
        assert abs(a.mean() - b.mean()) < 4 * se, (i, a.mean(), b.mean(), se)


# ------------------------------------------------------------------------ d. the hybrid objective
def _hybrid_setup(schedule, likelihood, ref, seed=0):
    sched = SCHEDULES[schedule][0]()
    c = ref.constants(SCHEDULES[schedule][1](ref))
    eps_head, v_head = make_net("mlp", seed=seed), make_net("mlp", seed=seed + 1)
    model = LearnedVarianceReverseProcess(
        TwoHeads(eps_head, v_head), sched, "learned", LIKELIHOODS[likelihood](), shape=(3,)
    )
    B, K, T = 5, 3, sched.T
    x0 = grid_data(B, (3,), levels_of(likelihood), seed=6)
    t = protocol.draw_timesteps(B, K, T, generator=torch.Generator().manual_seed(3))
    t[0, 0], t[1, 2], t[2, 1] = 1, 1, T
    tf = t.reshape(-1)
    x0p = x0.repeat_interleave(K, dim=0)
    eps = torch.randn(x0p.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sa = torch.tensor(np.sqrt(c["abar"]))[tf][:, None]
    sb = torch.tensor(np.sqrt(1 - c["abar"]))[tf][:, None]
    x_t = sa * x0p + sb * eps
    return model, ForwardProcess(sched), eps_head, v_head, c, x0, t, x_t, eps


def _loss(model, guide, x0, t, x_t, weight):
    return TraceMeanField_ELBO().differentiable_loss(
        conditioned(model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t, weight
    )


def _close(a, b):
    for ga, gb in zip(a, b):
        scale = float(gb.abs().max())
        assert scale > 0
        np.testing.assert_allclose(np_(ga), np_(gb), rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("likelihood", ["disc17", "gauss"])
def test_hybrid_gradient_of_the_mean_is_the_simple_objectives(schedule, likelihood, ref):
    model, guide, eps_head, v_head, c, x0, t, x_t, eps = _hybrid_setup(schedule, likelihood, ref)
    K = t.shape[1]
    params = list(eps_head.parameters())
    train_model, weight = objective("hybrid", model)
    assert isinstance(train_model, HybridReverseProcess) and train_model.eps is model.eps
    g_hybrid = torch.autograd.grad(_loss(train_model, guide, x0, t, x_t, weight), params)
    # Algorithm 1, written out: sum over images of (1/K) sum_k ||eps - eps_theta||^2
    mse = ((eps - eps_head(x_t, t.reshape(-1))) ** 2).sum() / K
    g_mse = torch.autograd.grad(mse, params)
    _close(g_hybrid, g_mse)
    # and the package's "simple" objective on the eps head alone, for either fixed variance
    for variance in ("large", "small"):
        simple_model, simple_weight = objective(
            "simple", ReverseProcess(eps_head, model.schedule, variance, model.likelihood)
        )
        _close(g_hybrid, torch.autograd.grad(_loss(simple_model, guide, x0, t, x_t, simple_weight), params))
    # without the stop-gradient the mean would also get lambda times the bound's gradient: detectable
    g_elbo = torch.autograd.grad(_loss(model, guide, x0, t, x_t, None), params)
    g_mixed = [a + HYBRID_LAMBDA * b for a, b in zip(g_mse, g_elbo)]
    assert not all(torch.allclose(a, b, rtol=1e-7, atol=0) for a, b in zip(g_hybrid, g_mixed))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("likelihood", ["disc17", "gauss"])
def test_hybrid_gradient_of_the_variance_is_lambda_times_the_bounds(schedule, likelihood, ref):
    model, guide, eps_head, v_head, c, x0, t, x_t, eps = _hybrid_setup(schedule, likelihood, ref)
    params = list(v_head.parameters())
    train_model, weight = objective("hybrid", model)
    g_hybrid = torch.autograd.grad(_loss(train_model, guide, x0, t, x_t, weight), params)
    elbo_model, none = objective("elbo", model)
    assert none is None
    g_vlb = torch.autograd.grad(_loss(elbo_model, guide, x0, t, x_t, None), params)
    _close(g_hybrid, [1e-3 * g for g in g_vlb])
    assert HYBRID_LAMBDA == 1e-3


@pytest.mark.parametrize("schedule,likelihood", [("linear", "disc17"), ("user", "gauss"), ("cosine", "disc256")])
def test_hybrid_terms_are_the_closed_forms(schedule, likelihood, ref):
    model, guide, eps_head, v_head, c, x0, t, x_t, eps = _hybrid_setup(schedule, likelihood, ref)
    B, K = t.shape
    T = model.T
    train_model, weight = objective("hybrid", model)
    terms = TermwiseELBO().terms(
        conditioned(train_model.per_timestep, x_t), conditioned(guide.per_timestep, x_t), x0, t, weight
    )
    assert set(terms) == {protocol.X_T, "L_simple", protocol.X_PREV, protocol.X_0}
    tf, xt, x0p = np_(t.reshape(-1)).astype(int), np_(x_t), np.repeat(np_(x0), K, axis=0)
    out = call(model.eps, xt, tf)
    np.testing.assert_allclose(np_(terms["L_simple"].value), flat_sum((np_(eps) - out[:, :3]) ** 2) / T, rtol=1e-10)
    # the factor carries the plate's T/K and weight / lambda = 1 (uniform timesteps): L_simple unweighted
    np.testing.assert_allclose(np_(torch.as_tensor(terms["L_simple"].scale)), T / K, rtol=1e-14)
    np.testing.assert_allclose(np_(terms[protocol.X_PREV].scale), 1e-3 * T / K, rtol=1e-14)
    mu, var = transition_np(c, "learned", "learned", out, xt, tf)
    kl = flat_sum(
        ref.kl_normal(mu_tilde_np(c, x0p, xt, tf), np.where(tf == 1, 1.0, c["beta_tilde"][tf])[:, None], mu, var)
    )
    late = tf >= 2
    np.testing.assert_allclose(np_(terms[protocol.X_PREV].value)[late], kl[late], rtol=1e-10)
    assert np.all(np_(terms[protocol.X_PREV].value)[~late] == 0.0)
    dec = decoder_nll_np(likelihood, ref, x0p, mu, var)
    np.testing.assert_allclose(np_(terms[protocol.X_0].value)[~late], dec[~late], rtol=1e-10)
    assert np.all(np_(terms[protocol.X_0].value)[late] == 0.0)


@pytest.mark.parametrize("cls", [ReverseProcess, X0PredictionReverseProcess, VPredictionReverseProcess])
def test_hybrid_objective_needs_a_learned_variance(cls):
    model = cls(make_net("mlp"), Schedule.linear(6, 0.05, 0.4), "large", DiscretizedGaussianLikelihood(17))
    with pytest.raises(ValueError, match="does not train on objective 'hybrid'; it supports \\['elbo', 'simple'\\]"):
        objective("hybrid", model)
    with pytest.raises(ValueError, match="hybrid objective needs a learned-variance model"):
        HybridReverseProcess.from_model(model)


def test_simple_objective_needs_a_fixed_variance():
    model, _, _, _ = make("learned")
    with pytest.raises(ValueError, match="does not train on objective 'simple'"):
        objective("simple", model)
    with pytest.raises(ValueError, match="simple.*fixed variance"):
        model.training_program("simple")
    with pytest.raises(ValueError, match="does not train on objective 'vlb'"):
        objective("vlb", model)


class CountingMLP(MLP):
    calls = 0

    def forward(self, x, t):
        CountingMLP.calls += 1
        return super().forward(x, t)


@pytest.mark.parametrize("name", ["elbo", "hybrid"])
def test_learned_variance_training_step_calls_the_network_once(name):
    sched = Schedule.linear(10, 0.01, 0.2)
    net = CountingMLP(dim=3, hidden=8, out_channels=6).double()
    model = LearnedVarianceReverseProcess(net, sched, "learned", DiscretizedGaussianLikelihood(17))
    guide = ForwardProcess(sched)
    train_model, weight = objective(name, model)
    svi = SVI(train_model.per_timestep, guide.per_timestep, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    x0 = grid_data(4, (3,), 17)
    CountingMLP.calls = 0
    loss = svi.step(x0, protocol.draw_timesteps(4, 3, sched.T), weight)
    assert CountingMLP.calls == 1 and np.isfinite(loss)


# ------------------------------------------------------------------------ e. sampling
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("likelihood,net", [("disc17", "mlp"), ("disc256", "unet"), ("gauss", "mlp")])
def test_ancestral_sampling(variant, likelihood, net):
    model, _, _, _ = make(variant, "linear", likelihood, net)
    n, shape = 6, shape_of(net)
    with torch.no_grad():
        direct = model.chain(None, n)
        predictive = Predictive(model.chain, num_samples=1, return_sites=["x_0"])(None, n)["x_0"]
    assert direct.shape == (n,) + shape and predictive.shape == (1, n) + shape
    for x in (direct, predictive):
        assert x.dtype == torch.float64 and torch.isfinite(x).all()
        if likelihood != "gauss":
            K = levels_of(likelihood)
            k = (x + 1) * (K - 1) / 2
            assert torch.all((k - k.round()).abs() < 1e-9)
            assert x.min() >= -1 and x.max() <= 1
    if likelihood == "gauss":
        k = (direct + 1) * 8
        assert not torch.all((k - k.round()).abs() < 1e-9)


# ------------------------------------------------------------------------ f. networks
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_rebuilds_from_its_description(variant, ref):
    cls, variance, kind = VARIANTS[variant]
    model, _, net, c = make(variant, "user", ref=ref)
    stored = MODELS.describe(model)
    assert stored == {"class": cls.__name__, "config": {"variance": variance, "shape": [3]}}
    again = MODELS.build(stored, eps=net, schedule=model.schedule, likelihood=model.likelihood)
    x, t = 0.7 * grid_data(4, (3,), 17, seed=1), torch.tensor([1, 2, 3, 5])
    with torch.no_grad():
        loc, scale = again.transition(x, t)
    mu, var = transition_np(c, kind, variance, call(net, x, t), np_(x), t.numpy())
    np.testing.assert_allclose(np_(loc), mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np_(scale) ** 2, var, rtol=1e-10, atol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_network_config_of_each_class(preset):
    data = DataSpec((3,) if PRESETS[preset]["kind"] == "mlp" else (1, 8, 8), levels=17)
    for cls in (ReverseProcess, X0PredictionReverseProcess, VPredictionReverseProcess):
        assert cls.output_channels(data) == data.channels
        assert cls.network_config(PRESETS[preset], data) == dict(PRESETS[preset], out_channels=data.channels)
    assert LearnedVarianceReverseProcess.output_channels(data) == 2 * data.channels
    doubled = LearnedVarianceReverseProcess.network_config(PRESETS[preset], data)
    assert LearnedVarianceReverseProcess.network_config(doubled, data) == doubled  # from the data, not the preset
    assert doubled == dict(PRESETS[preset], out_channels=2 * data.channels)
    assert PRESETS[preset].get("out_channels") is None  # the preset itself is untouched


@pytest.mark.parametrize("preset", ["digits", "toy2d"])
def test_doubled_networks_rebuild_from_their_config(preset):
    base = build_network(PRESETS[preset])
    net = build_network(LearnedVarianceReverseProcess.network_config(PRESETS[preset], DataSpec(base.shape, 17)))
    x = torch.randn(2, *net.shape)
    out = net(x, torch.tensor([1, 7]))
    assert out.shape == (2, 2 * net.shape[0]) + tuple(net.shape[1:])
    rebuilt = build_network(network_config(net))
    assert rebuilt.config() == net.config()
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt(x, torch.tensor([1, 7])), out)
    model = LearnedVarianceReverseProcess(net.double(), Schedule.linear(8, 0.01, 0.2), "learned")
    loc, scale = model.transition(x.double(), torch.tensor([1, 7]))
    assert loc.shape == scale.shape == x.shape


def test_unknown_network_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown network 'transformer'"):
        build_network({"kind": "transformer"})


# ------------------------------------------------------------------------ g. bad input
class _Fixed(torch.nn.Module):
    """A network whose output has ``out`` features for 3-D input."""

    def __init__(self, out):
        super().__init__()
        self.lin = torch.nn.Linear(3, out)
        self.shape = (3,)

    def forward(self, x, t):
        return self.lin(x)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_with_wrong_output_shape_raises(variant):
    cls, variance, _ = VARIANTS[variant]
    right = 6 if variance == "learned" else 3
    sched = Schedule.linear(6, 0.05, 0.4)
    guide = ForwardProcess(sched)
    x0 = grid_data(4, (3,), 17)
    for out in (2, 9 - right):  # 9 - right: the other variants' (right) size
        model = cls(_Fixed(out).double(), sched, variance, DiscretizedGaussianLikelihood(17))
        with pytest.raises(ValueError, match=rf"returned shape \(4, {out}\).*expected \(4, {right}\)"):
            model.chain(x0)
        with pytest.raises(ValueError, match="returned shape"):
            TraceMeanField_ELBO().loss(model.per_timestep, guide.per_timestep, x0, protocol.all_timesteps(4, 6))
        with pytest.raises(ValueError, match="returned shape"):
            model.chain(None, 3)
    cls(_Fixed(right).double(), sched, variance, DiscretizedGaussianLikelihood(17)).chain(x0)


@pytest.mark.parametrize("cls", [X0PredictionReverseProcess, VPredictionReverseProcess])
@pytest.mark.parametrize("variance", ["medium", "learned"])
def test_fixed_variance_variants_reject_other_variance_names(cls, variance):
    with pytest.raises(ValueError, match="variance"):
        cls(make_net("mlp"), Schedule.linear(6, 0.05, 0.4), variance)


@pytest.mark.parametrize("variance", ["large", "small", "medium"])
def test_learned_variance_model_requires_learned(variance):
    with pytest.raises(ValueError, match="unknown variance .*it implements \\['learned'\\]"):
        LearnedVarianceReverseProcess(make_net("mlp", 2), Schedule.linear(6, 0.05, 0.4), variance)
    model = LearnedVarianceReverseProcess(make_net("mlp", 2), Schedule.linear(6, 0.05, 0.4))
    assert model.variance == "learned"
    with pytest.raises(ValueError, match="learned"):
        model.sigma2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bad_data_and_timesteps_raise(variant):
    model, guide, _, _ = make(variant, "linear", "disc17")
    x0 = grid_data(4, (3,), 17)
    t = protocol.draw_timesteps(4, 2, model.T)
    bad = x0.clone()
    bad[1, 0] = 0.01
    with pytest.raises(ValueError, match="grid"):
        model.chain(bad)
    with pytest.raises(ValueError, match="grid"):
        TraceMeanField_ELBO().loss(model.per_timestep, guide.per_timestep, bad, t)
    t_bad = t.clone()
    t_bad[2, 1] = model.T + 1
    with pytest.raises(ValueError, match="1..T"):
        model.per_timestep(x0, t_bad)
    with pytest.raises(ValueError, match="shape"):
        model.chain(grid_data(4, (4,), 17))
    if variant == "learned":
        hybrid, weight = objective("hybrid", model)
        with pytest.raises(ValueError, match="grid"):
            TraceMeanField_ELBO().loss(hybrid.per_timestep, guide.per_timestep, bad, t, weight)
        with pytest.raises(ValueError, match="1..T"):
            hybrid.per_timestep(x0, t_bad, weight)
