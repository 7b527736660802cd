"""Guide variants: fixed schedules, the learned (VDM-style) schedule, importance-sampled timesteps.

Every forward-process variant goes through one parametrized suite (per-term values against the
closed forms of conftest.py, its rebuild from its stored description, unbiasedness of the training
form, sampling shapes and ranges, bad input). Expected betas are recomputed independently: the
paper's and Nichol and Dhariwal's formulas from conftest.py, and the learned schedule's gamma network
re-evaluated in plain Python floats.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO

from pyro_ddpm import protocol
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.guides import (
    CosineForwardProcess,
    ForwardProcess,
    LearnedForwardProcess,
    LearnedSchedule,
    LearnedTableForwardProcess,
    LinearForwardProcess,
    UserBetasForwardProcess,
)
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import MLP
from pyro_ddpm.registry import GUIDES as REGISTERED
from pyro_ddpm.schedule import Schedule
from pyro_ddpm.timesteps import FixedProposal, LossAwareSampler

pytestmark = [
    pytest.mark.usefixtures("float64"),
    pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model"),
]

USER_BETAS = np.array([0.08, 0.2, 0.05, 0.35, 0.15])
LEVELS = 17


# ------------------------------------------------------------------------ independent references
def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def ref_gamma(sched: LearnedSchedule, u: float) -> float:
    """gamma(u) of the module docstring, from the parameter values, in plain Python floats."""
    slope = _softplus(sched.slope.item())
    w = [_softplus(v) for v in sched.w.detach().tolist()]
    b = sched.b.detach().tolist()
    c = [_softplus(v) for v in sched.c.detach().tolist()]

    def tilde(x):
        return slope * x + sum(cj * _sigmoid(wj * x + bj) for wj, bj, cj in zip(w, b, c))

    g_min = sched.gamma_min.item()
    g_max = g_min + _softplus(sched.gap.item())
    return g_min + (g_max - g_min) * (tilde(u) - tilde(0.0)) / (tilde(1.0) - tilde(0.0))


def ref_learned_betas(sched: LearnedSchedule) -> np.ndarray:
    """abar_t = sigmoid(-gamma(t/T)), abar_0 = 1, beta_t = 1 - abar_t / abar_{t-1}."""
    T = sched.T
    abar = [1.0] + [_sigmoid(-ref_gamma(sched, t / T)) for t in range(1, T + 1)]
    return np.array([1.0 - abar[t] / abar[t - 1] for t in range(1, T + 1)])


def random_learned(T=6, seed=1, hidden=4, gamma_min=-7.0, gamma_max=4.0, spread=1.0) -> LearnedSchedule:
    """A learned schedule with every parameter moved to random values."""
    sched = LearnedSchedule(T, hidden=hidden, gamma_min=gamma_min, gamma_max=gamma_max, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name in ("slope", "w", "b", "c"):
            p = getattr(sched, name)
            p.add_(spread * torch.randn(p.shape, generator=g, dtype=p.dtype))
        sched.gamma_min.add_(0.3)
        sched.gap.add_(-0.2)
    return sched


# name -> (guide factory, independent betas)
GUIDES = {
    "linear": (lambda: LinearForwardProcess(6, 0.05, 0.4), lambda ref, g: ref.linear_betas(6, 0.05, 0.4)),
    "linear-config": (
        lambda: LinearForwardProcess.from_spec(5, "linear", 1),
        lambda ref, g: ref.linear_betas(5, 1e-4, 0.02),
    ),
    "cosine": (lambda: CosineForwardProcess(7), lambda ref, g: ref.cosine_betas(7)),
    "cosine-base-config": (lambda: ForwardProcess.from_spec(6, "cosine", 1), lambda ref, g: ref.cosine_betas(6)),
    "user": (lambda: UserBetasForwardProcess(USER_BETAS), lambda ref, g: USER_BETAS.copy()),
    "user-config": (
        lambda: UserBetasForwardProcess.from_spec(5, ", ".join(repr(float(b)) for b in USER_BETAS), 1),
        lambda ref, g: USER_BETAS.copy(),
    ),
    "learned": (lambda: LearnedForwardProcess(random_learned()), lambda ref, g: ref_learned_betas(g.schedule)),
    "learned-config": (
        lambda: LearnedForwardProcess.from_spec(5, "learned", 1),
        lambda ref, g: ref_learned_betas(g.schedule),
    ),
    # the table starts exactly at the schedule it is built from; moved, its betas follow its parameters
    "table-start": (lambda: LearnedTableForwardProcess.from_spec(6, "cosine", 1), lambda ref, g: ref.cosine_betas(6)),
    "table-moved": (lambda: moved_table(), lambda ref, g: ref_table_betas(g.schedule)),
}


def moved_table(seed=3):
    guide = LearnedTableForwardProcess.from_spec(6, "linear", 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        guide.schedule.g_1.add_(0.5)
        guide.schedule.r.add_(torch.randn(guide.schedule.r.shape, generator=g, dtype=torch.float64))
    return guide


def ref_table_betas(sched) -> np.ndarray:
    """beta_t of gamma_t = g_1 + sum softplus(r), abar = 1/(1 + e^gamma), in plain Python floats."""
    g_1, r = float(sched.g_1.detach()), [float(v) for v in sched.r.detach()]
    gamma = [g_1]
    for v in r:
        gamma.append(gamma[-1] + math.log1p(math.exp(v)))
    abar = [1.0] + [1.0 / (1.0 + math.exp(gm)) for gm in gamma]
    return np.array([1.0 - abar[t] / abar[t - 1] for t in range(1, len(abar))])


def make_net(seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=3, hidden=16, depth=2, temb_dim=8).double()
    with torch.no_grad():  # the nets zero-initialize their last layers: make eps_theta non-trivial
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return net


def build(name, variance="large"):
    guide = GUIDES[name][0]()
    net = make_net()
    model = ReverseProcess(net, guide.schedule, variance, DiscretizedGaussianLikelihood(LEVELS), shape=(3,))
    return model, guide, net


def grid_data(B, seed=0):
    k = torch.randint(0, LEVELS, (B, 3), generator=torch.Generator().manual_seed(seed))
    return k.double() * 2.0 / (LEVELS - 1) - 1.0


def np_(x):
    return x.detach().cpu().double().numpy()


def eps_np(net, x, t):
    x = torch.as_tensor(x, dtype=torch.float64)
    with torch.no_grad():
        return np_(net(x, torch.full((x.shape[0],), int(t), dtype=torch.long)))


def reference_chain_terms(c, net, variance, ref, x0, xs):
    """Eq. 5 term by term for one chain xs[s] (s = 1..T), in numpy from the constants ``c``."""
    T = c["T"]
    beta, abar, alpha, bt = c["beta"], c["abar"], c["alpha"], c["beta_tilde"]
    sigma2 = lambda t: bt[2] if t == 1 else (beta[t] if variance == "large" else bt[t])  # noqa: E731

    def mu_theta(x, t):
        return (x - beta[t] / math.sqrt(1 - abar[t]) * eps_np(net, x, t)) / math.sqrt(alpha[t])

    out = {f"x_{T}": ref.kl_normal(math.sqrt(abar[T]) * x0, 1 - abar[T], 0.0, 1.0).sum(1)}
    for s in range(1, T):
        t = s + 1
        m_q = (
            math.sqrt(abar[t - 1]) * beta[t] / (1 - abar[t]) * x0
            + math.sqrt(alpha[t]) * (1 - abar[t - 1]) / (1 - abar[t]) * xs[t]
        )
        out[f"x_{s}"] = ref.kl_normal(m_q, bt[t], mu_theta(xs[t], t), sigma2(t)).sum(1)
    out["x_0"] = -ref.disc_log_prob(x0, mu_theta(xs[1], 1), math.sqrt(bt[2]), LEVELS).sum(1)
    return out


def chain_draw(model, guide, x0):
    guide_tr = poutine.trace(guide.chain).get_trace(x0)
    terms = TermwiseELBO().terms(model.chain, poutine.replay(guide.chain, trace=guide_tr), x0)
    xs = {s: np_(guide_tr.nodes[f"x_{s}"]["value"]) for s in range(1, model.T + 1)}
    return xs, terms


def per_image_training_totals(model, guide, x0, t, weight=None, x_t=None):
    """(T/K) sum_k weight[t_k] (L_{t_k - 1} or L_0) + L_T per image, as Pyro scales them."""
    B, K = t.shape
    m, g = model.per_timestep, guide.per_timestep
    if x_t is not None:
        m, g = (poutine.condition(f, data={protocol.X_t: x_t}) for f in (m, g))
    terms = TermwiseELBO().terms(m, g, x0, t, weight)
    total = np_(terms[protocol.X_T].value) * float(terms[protocol.X_T].scale)
    for name in (protocol.X_PREV, protocol.X_0):
        scale = terms[name].scale
        scaled = terms[name].value * (scale if torch.is_tensor(scale) else float(scale))
        total = total + np_(scaled).reshape(B, K).sum(1)
    return total


# ------------------------------------------------------------------------ a. every guide variant
@pytest.mark.parametrize("name", list(GUIDES))
def test_schedule_matches_its_formula(name, ref):
    guide = GUIDES[name][0]()
    betas = GUIDES[name][1](ref, guide)
    s = guide.schedule
    assert s.T == len(betas) == guide.T
    np.testing.assert_allclose(np_(s.betas), betas, rtol=1e-10, atol=0)
    r = ref.constants(betas)
    for buf in ("abar", "beta_tilde", "coef_x0", "coef_xt", "eps_coef", "w_large", "w_small"):
        got = getattr(s, buf)
        assert got.dtype == torch.float64 and got.shape == (s.T + 1,), buf
        np.testing.assert_allclose(np_(got)[1:], r[buf][1:], rtol=1e-9, atol=0, err_msg=buf)
    assert s.abar[0].item() == 1.0


@pytest.mark.parametrize("name", list(GUIDES))
@pytest.mark.parametrize("variance", ["large", "small"])
def test_chain_terms_are_the_closed_form_kls(name, variance, ref):
    model, guide, net = build(name, variance)
    x0 = grid_data(4, seed=1)
    xs, terms = chain_draw(model, guide, x0)
    assert set(terms) == {f"x_{s}" for s in range(model.T + 1)}
    c = ref.constants(GUIDES[name][1](ref, guide))
    for site, value in reference_chain_terms(c, net, variance, ref, np_(x0), xs).items():
        np.testing.assert_allclose(np_(terms[site].value), value, rtol=1e-8, atol=1e-11, err_msg=site)


@pytest.mark.parametrize("name", list(GUIDES))
def test_every_guide_rebuilds_from_its_description(name, ref):
    guide = GUIDES[name][0]()
    stored = REGISTERED.describe(guide)
    again = REGISTERED.build(stored)
    again.load_state_dict(guide.state_dict())  # a learned schedule's values travel in the state dict
    assert type(again) is type(guide) and again.event_dim == guide.event_dim
    np.testing.assert_allclose(np_(again.schedule.betas), GUIDES[name][1](ref, guide), rtol=1e-10, atol=0)
    assert REGISTERED.describe(again) == stored


@pytest.mark.parametrize("name", ["linear", "cosine", "user-config", "learned"])
def test_training_form_is_unbiased(name):
    model, guide, _ = build(name)
    T, n_img, reps = model.T, 2, 1500
    x0 = grid_data(n_img, seed=2).repeat(reps, 1)
    pyro.set_rng_seed(3)
    terms = TermwiseELBO().terms(model.chain, guide.chain, x0)
    chain = sum(np_(term.value) for term in terms.values()).reshape(reps, n_img)
    t = protocol.draw_timesteps(x0.shape[0], 1, T)
    train = per_image_training_totals(model, guide, x0, t).reshape(reps, n_img)
    for i in range(n_img):
        a, b = chain[:, i], train[:, i]
        se = math.sqrt(a.var(ddof=1) / reps + b.var(ddof=1) / reps)
        assert abs(a.mean() - b.mean()) < 4 * se, (i, a.mean(), b.mean(), se)


@pytest.mark.parametrize("name", ["linear", "cosine-base-config", "user", "learned-config"])
def test_sampling_shapes_and_ranges(name):
    model, _, _ = build(name)
    n = 9
    out = Predictive(model.chain, num_samples=2, return_sites=["x_0"])(None, n)["x_0"]
    direct = model.chain(None, n)
    assert out.shape == (2, n, 3) and direct.shape == (n, 3)
    for v in (out, direct):
        assert v.dtype == torch.float64
        k = (v + 1) * (LEVELS - 1) / 2
        assert torch.all((k - k.round()).abs() < 1e-9)
        assert v.min() >= -1 and v.max() <= 1


@pytest.mark.parametrize("name", ["linear", "cosine", "user", "learned"])
def test_bad_input_raises(name):
    model, guide, _ = build(name)
    x0 = grid_data(3)
    t = protocol.draw_timesteps(3, 2, model.T)
    for bad in (0, model.T + 1):
        tb = t.clone()
        tb[1, 1] = bad
        with pytest.raises(ValueError, match="1..T"):
            guide.per_timestep(x0, tb)
        with pytest.raises(ValueError, match="1..T"):
            TraceMeanField_ELBO().loss(model.per_timestep, guide.per_timestep, x0, tb)
    with pytest.raises(ValueError, match="integer"):
        guide.per_timestep(x0, t.double())
    x_nan = x0.clone()
    x_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        guide.chain(x_nan)
    with pytest.raises(ValueError, match="NaN"):
        TraceMeanField_ELBO().loss(model.chain, guide.chain, x_nan)


# ------------------------------------------------------------------------ b. from_spec and state_dict
@pytest.mark.parametrize(
    "cls,schedule",
    [
        (ForwardProcess, "linear"),
        (ForwardProcess, "cosine"),
        (LinearForwardProcess, "linear"),
        (CosineForwardProcess, "cosine"),
        (UserBetasForwardProcess, "0.1,0.2,0.3,0.4"),
        (LearnedForwardProcess, "learned"),
        (LearnedTableForwardProcess, "linear"),
    ],
)
def test_from_spec_and_state_dict_round_trip(cls, schedule):
    guide = cls.from_spec(4, schedule, 2)
    assert guide.T == 4 and guide.event_dim == 2
    if next(guide.schedule.parameters(), None) is not None:
        with torch.no_grad():
            for p in guide.schedule.parameters():
                p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype))
    fresh = cls.from_spec(4, schedule, 2)
    fresh.load_state_dict(guide.state_dict())
    np.testing.assert_array_equal(np_(fresh.schedule.betas), np_(guide.schedule.betas))
    fresh.schedule.check_matches(guide.schedule.betas)
    # the model is built around guide.schedule: the same object, hence the same constants
    model = ReverseProcess(make_net(), fresh.schedule, "small", shape=(3,))
    assert model.schedule is fresh.schedule


@pytest.mark.parametrize(
    "cls,schedule,match",
    [
        (ForwardProcess, "quadratic", "unknown schedule"),
        (LinearForwardProcess, "cosine", "linear"),
        (CosineForwardProcess, "linear", "cosine"),
        (LearnedForwardProcess, "linear", "learned"),
        (LearnedTableForwardProcess, "quadratic", "unknown schedule"),
        (UserBetasForwardProcess, "0.1,0.2,0.3", "T = 4"),
        (UserBetasForwardProcess, "0.1,zero,0.3,0.4", "cannot read"),
        (UserBetasForwardProcess, "0.1,0.2,1.3,0.4", "0 < beta_t < 1"),
    ],
)
def test_from_spec_bad_input(cls, schedule, match):
    with pytest.raises(ValueError, match=match):
        cls.from_spec(4, schedule, 1)


def test_user_betas_from_files(tmp_path, ref):
    np.save(tmp_path / "b.npy", USER_BETAS)
    (tmp_path / "b.txt").write_text("\n".join(repr(float(b)) for b in USER_BETAS) + "\n")
    for f in ("b.npy", "b.txt"):
        g = UserBetasForwardProcess.from_spec(5, str(tmp_path / f), 1)
        np.testing.assert_array_equal(np_(g.schedule.betas), USER_BETAS)
    np.save(tmp_path / "m.npy", USER_BETAS[:4].reshape(2, 2))
    with pytest.raises(ValueError, match="1-D"):
        UserBetasForwardProcess.from_spec(4, str(tmp_path / "m.npy"), 1)


# ------------------------------------------------------------------------ c. the learned schedule
@pytest.mark.parametrize("seed", range(6))
def test_learned_schedule_is_monotone_with_its_endpoints(seed):
    sched = random_learned(T=12, seed=seed, hidden=5, spread=3.0)
    u = torch.linspace(0, 1, 501, dtype=torch.float64)
    gamma = sched.gamma(u)
    assert torch.all(gamma[1:] > gamma[:-1])
    assert gamma[0].item() == pytest.approx(sched.gamma_min.item(), abs=1e-12)
    assert gamma[-1].item() == pytest.approx(sched.gamma_max.item(), abs=1e-12)
    for x in (0.0, 0.37, 1.0):
        assert sched.gamma(torch.tensor([x])).item() == pytest.approx(ref_gamma(sched, x), rel=1e-12, abs=1e-12)
    abar = np_(sched.abar)
    assert abar[0] == 1.0 and np.all(np.diff(abar) < 0)
    expected = [1.0 / (1.0 + math.exp(ref_gamma(sched, t / 12))) for t in range(1, 13)]
    np.testing.assert_allclose(abar[1:], expected, rtol=1e-12)
    assert sched.abar[-1].item() == pytest.approx(1.0 / (1.0 + math.exp(sched.gamma_max.item())), rel=1e-12)
    betas = np_(sched.betas)
    assert np.all((betas > 0) & (betas < 1))


def _terms(model, guide, form, x0, t=None):
    pyro.set_rng_seed(7)
    args = (x0,) if form == "chain" else (x0, t)
    fn = (lambda p: p.chain) if form == "chain" else (lambda p: p.per_timestep)
    terms = TermwiseELBO().terms(fn(model), fn(guide), *args)
    pyro.set_rng_seed(7)
    loss = TraceMeanField_ELBO().loss(fn(model), fn(guide), *args)
    return terms, loss


@pytest.mark.parametrize("form", ["chain", "per_timestep"])
@pytest.mark.parametrize("variance", ["large", "small"])
def test_learned_with_frozen_parameters_is_the_fixed_guide(form, variance):
    learned = random_learned(T=6, seed=4)
    net = make_net(1)
    x0 = grid_data(5, seed=3)
    t = torch.tensor([[1, 6], [2, 2], [3, 5], [4, 1], [6, 6]])
    fixed = Schedule(betas=learned.betas.detach())
    results = []
    for sched, guide in ((learned, LearnedForwardProcess(learned)), (fixed, ForwardProcess(fixed))):
        model = ReverseProcess(net, sched, variance, DiscretizedGaussianLikelihood(LEVELS), shape=(3,))
        results.append(_terms(model, guide, form, x0, t))
    (a, loss_a), (b, loss_b) = results
    assert set(a) == set(b)
    for site in a:
        np.testing.assert_allclose(np_(a[site].value), np_(b[site].value), rtol=1e-10, atol=1e-12, err_msg=site)
        assert float(a[site].scale) == float(b[site].scale)
    assert loss_a == pytest.approx(loss_b, rel=1e-10)


def test_one_svi_step_trains_the_schedule_with_the_network():
    guide = LearnedForwardProcess(random_learned(T=6, seed=2))
    net = make_net(2)
    model = ReverseProcess(net, guide.schedule, "large", DiscretizedGaussianLikelihood(LEVELS), shape=(3,))
    x0 = grid_data(8, seed=5)
    t = protocol.draw_timesteps(8, 2, 6, generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in guide.schedule.named_parameters()}
    betas_before = guide.schedule.betas.detach().clone()
    net_before = [p.detach().clone() for p in net.parameters()]
    svi = SVI(model.per_timestep, guide.per_timestep, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    svi.step(x0, t)
    store = pyro.get_param_store()
    for n, p in guide.schedule.named_parameters():
        assert f"schedule$$${n}" in store.keys()
        # Adam moves an entry iff its gradient is non-zero (SVI zeroes .grad after the step)
        assert torch.all(p.detach() != before[n]), n
    assert not torch.equal(guide.schedule.betas.detach(), betas_before)
    assert model.schedule.betas.detach().equal(guide.schedule.betas.detach())  # one shared schedule
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), net_before))


def test_schedule_gradient_matches_finite_differences():
    """d(bound)/d(parameter) through both programs, against central differences of the same draw."""
    sched = random_learned(T=5, seed=3)
    guide = LearnedForwardProcess(sched)
    model = ReverseProcess(make_net(3), sched, "small", DiscretizedGaussianLikelihood(LEVELS), shape=(3,))
    x0 = grid_data(4, seed=6)

    def loss():
        pyro.set_rng_seed(9)
        return TraceMeanField_ELBO().differentiable_loss(model.chain, guide.chain, x0)

    params = [sched.gamma_min, sched.gap, sched.slope, sched.w, sched.c]
    grads = torch.autograd.grad(loss(), params)
    h = 1e-6
    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + h
                up = float(loss())
                flat[i] = old - h
                down = float(loss())
                flat[i] = old
            fd = (up - down) / (2 * h)
            assert float(g.reshape(-1)[i]) == pytest.approx(fd, rel=1e-5, abs=1e-6)


def test_no_grad_reuse_follows_parameter_changes(ref):
    sched = random_learned(T=6, seed=5)
    with torch.no_grad():
        first = sched.abar
        assert sched.abar is first  # reused while the parameters are unchanged
        sched.c.add_(0.5)
        moved = sched.betas
        np.testing.assert_allclose(np_(moved), ref_learned_betas(sched), rtol=1e-10)
        assert not torch.equal(sched.abar, first)
    np.testing.assert_array_equal(np_(sched.betas), np_(moved))  # grad mode computes the same values
    assert sched.betas.requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(T=1), "T >= 2"),
        (dict(T=4.5), "T >= 2"),
        (dict(T=4, hidden=0), "hidden"),
        (dict(T=4, gamma_min=2.0, gamma_max=1.0), "gamma_min < gamma_max"),
        (dict(T=4, gamma_min=float("nan")), "gamma_min < gamma_max"),
    ],
)
def test_learned_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedSchedule(**kwargs)


def test_learned_guide_needs_a_learned_schedule():
    with pytest.raises(ValueError, match="LearnedSchedule"):
        LearnedForwardProcess(Schedule.linear(4))


# ------------------------------------------------------------------------ d. importance sampling
PROPOSAL = np.array([0.05, 0.1, 0.15, 0.3, 0.4])


def test_fixed_proposal_weights_and_draws():
    s = FixedProposal(PROPOSAL)
    w = np_(s.weights())
    assert w.shape == (6,) and w[0] == 0.0
    np.testing.assert_allclose(w[1:], 1.0 / (5 * PROPOSAL), rtol=1e-14)
    np.testing.assert_allclose(np_(FixedProposal.uniform(7).weights())[1:], 1.0, rtol=1e-14)
    n = 200_000
    t, weight = s.draw(n // 4, 4, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n // 4, 4) and t.dtype == torch.long
    assert int(t.min()) >= 1 and int(t.max()) <= 5
    assert torch.equal(weight, s.weights())
    freq = np.bincount(np_(t).astype(int).reshape(-1), minlength=6)[1:] / n
    se = np.sqrt(PROPOSAL * (1 - PROPOSAL) / n)
    assert np.all(np.abs(freq - PROPOSAL) < 4 * se), (freq, PROPOSAL)
    again, _ = s.draw(n // 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def _fixed_xt(B, K, t, T, seed=0):
    """x_t of pair (b, k): a fixed draw per (image, timestep), so the enumeration below is exact."""
    table = torch.randn((B, T + 1, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.stack([table[b, int(t[b, k])] for b in range(B) for k in range(K)])


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("guide_name", ["user", "learned"])
def test_importance_weighted_estimate_is_exactly_unbiased(K, guide_name):
    """sum over all t of P(t) * estimate(t) equals the full bound, by enumeration (T = 5 or 6)."""
    model, guide, _ = build(guide_name)
    T, B = model.T, 3
    p = np.arange(1.0, T + 1) ** 2
    sampler = FixedProposal(p / p.sum())
    x0 = grid_data(B, seed=4)
    every = protocol.all_timesteps(B, T)
    full = per_image_training_totals(model, guide, x0, every, None, _fixed_xt(B, T, every, T))
    expected, unweighted = np.zeros(B), np.zeros(B)
    probs = np_(sampler.probs())
    for ts in itertools.product(range(1, T + 1), repeat=K):
        t = torch.tensor([ts] * B)
        x_t = _fixed_xt(B, K, t, T)
        prob = np.prod([probs[s - 1] for s in ts])
        expected += prob * per_image_training_totals(model, guide, x0, t, sampler.weights(), x_t)
        unweighted += prob * per_image_training_totals(model, guide, x0, t, None, x_t)
    np.testing.assert_allclose(expected, full, rtol=1e-10)
    assert np.all(np.abs(unweighted - full) > 1e-3 * np.abs(full))  # without the weights: biased


def test_loss_aware_sampler_estimate_is_unbiased_statistically():
    model, guide, _ = build("cosine")
    T, n_img, reps = model.T, 2, 2000
    sampler = LossAwareSampler(T, history=3, uniform_fraction=0.1)
    g = torch.Generator().manual_seed(5)
    values = torch.arange(1.0, T + 1) ** 3
    t_hist = torch.arange(1, T + 1).repeat(3)
    sampler.update(t_hist, values.repeat(3) * (1 + 0.1 * torch.rand(3 * T, generator=g, dtype=torch.float64)))
    assert sampler.warmed_up()
    assert float(sampler.probs().max()) > 2.5 / T  # far from uniform
    x0 = grid_data(n_img, seed=7).repeat(reps, 1)
    pyro.set_rng_seed(8)
    terms = TermwiseELBO().terms(model.chain, guide.chain, x0)
    chain = sum(np_(term.value) for term in terms.values()).reshape(reps, n_img)
    t, weight = sampler.draw(x0.shape[0], 2, generator=g)
    train = per_image_training_totals(model, guide, x0, t, weight).reshape(reps, n_img)
    plain = per_image_training_totals(model, guide, x0, t).reshape(reps, n_img)
    for i in range(n_img):
        a, b, c = chain[:, i], train[:, i], plain[:, i]
        se = math.sqrt(a.var(ddof=1) / reps + b.var(ddof=1) / reps)
        assert abs(a.mean() - b.mean()) < 4 * se, (i, a.mean(), b.mean(), se)
        se_c = math.sqrt(a.var(ddof=1) / reps + c.var(ddof=1) / reps)
        assert abs(a.mean() - c.mean()) > 4 * se_c  # the unweighted non-uniform draw is biased


def test_loss_aware_history_and_proposal():
    T, H, u = 3, 2, 0.05
    s = LossAwareSampler(T, history=H, uniform_fraction=u)
    np.testing.assert_allclose(np_(s.probs()), 1 / 3, rtol=1e-15)
    s.update(torch.tensor([1, 2, 3, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s.count.tolist() == [2, 2, 1] and not s.warmed_up()
    np.testing.assert_allclose(np_(s.probs()), 1 / 3, rtol=1e-15)  # t = 3 has one value only: uniform
    s.update(torch.tensor([[3, 1], [1, 3]]), torch.tensor([[6.0, 7.0], [8.0, 9.0]]))
    assert s.warmed_up()
    hist = {1: [7.0, 8.0], 2: [2.0, 5.0], 3: [6.0, 9.0]}  # the last H values per t, oldest first
    np.testing.assert_array_equal(np_(s.history), np.array([hist[1], hist[2], hist[3]]))
    rms = np.array([math.sqrt(sum(v * v for v in hist[t]) / H) for t in (1, 2, 3)])
    expected = (1 - u) * rms / rms.sum() + u / T
    np.testing.assert_allclose(np_(s.probs()), expected, rtol=1e-13)
    np.testing.assert_allclose(np_(s.weights())[1:], 1 / (T * expected), rtol=1e-13)
    # exact resume: the same state and generator give the same draws
    other = LossAwareSampler(T, history=H, uniform_fraction=u)
    other.load_state_dict(s.state_dict())
    a, _ = s.draw(4, 3, generator=torch.Generator().manual_seed(1))
    b, _ = other.draw(4, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    np.testing.assert_array_equal(np_(other.probs()), np_(s.probs()))
    with pytest.raises(ValueError, match="shape"):
        LossAwareSampler(4, history=H).load_state_dict(s.state_dict())


@pytest.mark.parametrize(
    "probs,match",
    [
        ([0.2, 0.2, 0.2], "sum to 1"),
        ([0.5, 0.0, 0.5], "> 0"),
        ([0.6, -0.1, 0.5], "> 0"),
        ([0.5, float("nan"), 0.5], "finite"),
        ([[0.5, 0.5]], "1-D"),
        ([], "1-D"),
    ],
    ids=["sum", "zero", "negative", "nan", "2d", "empty"],
)
def test_fixed_proposal_bad_probabilities(probs, match):
    with pytest.raises(ValueError, match=match):
        FixedProposal(probs)


def test_sampler_bad_input():
    s = LossAwareSampler(4)
    with pytest.raises(ValueError, match="integer tensor"):
        s.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        s.update(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1..T"):
        s.update(torch.tensor([1, 5]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="finite"):
        s.update(torch.tensor([1, 2]), torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="1..T"):  # a fixed proposal checks what it is given too
        FixedProposal.uniform(4).update(torch.tensor([0]), torch.tensor([1.0]))
    assert s.count.sum() == 0  # nothing recorded by the failed calls
    for batch, K in ((0, 2), (2, 0), (2.5, 1)):
        with pytest.raises(ValueError, match="batch|K"):
            s.draw(batch, K)
    for kwargs, match in (
        (dict(history=0), "history"),
        (dict(uniform_fraction=0.0), "uniform_fraction"),
        (dict(uniform_fraction=1.5), "uniform_fraction"),
    ):
        with pytest.raises(ValueError, match=match):
            LossAwareSampler(4, **kwargs)
