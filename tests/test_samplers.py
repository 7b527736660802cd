"""Respaced ancestral sampling and DDIM: schedules, identities, a closed-form Gaussian toy, bad input.

References are recomputed here in numpy float64 from the equations (Ho et al. 2020, Eqs. 4 and 7;
Song et al. 2021, Eqs. 12 and 16) and from conftest's independent schedule constants.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.evaluate import bound_terms
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, GaussianLikelihood
from pyro_ddpm.models.ddim import DDIM
from pyro_ddpm.models.reverse_process import ReverseProcess
from pyro_ddpm.nets import MLP, UNet
from pyro_ddpm.respace import RespacedNetwork, respace, respaced_schedule, respaced_timesteps
from pyro_ddpm.sample import sample, sampling_program
from pyro_ddpm.schedule import Schedule


def np_tau(T, S):
    """Evenly spaced integers from 1 to T: round-down of 1 + (i - 1)(T - 1)/(S - 1), by exact fractions."""
    from fractions import Fraction

    return [1 + math.floor(Fraction((i - 1) * (T - 1), S - 1)) for i in range(1, S + 1)]


def np_abar(betas):
    return np.concatenate([[1.0], np.cumprod(1.0 - np.asarray(betas, np.float64))])


def tiny_mlp_model(T=20, variance="large", dim=2, seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=dim, hidden=16, depth=1, temb_dim=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return ReverseProcess(net, Schedule.linear(T), variance, GaussianLikelihood())


def tiny_unet_model(T=12, levels=17):
    torch.manual_seed(0)
    net = UNet(resolution=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return ReverseProcess(net, Schedule.linear(T), "large", DiscretizedGaussianLikelihood(levels))


class OptimalGaussianEps(nn.Module):
    """E[eps | x_t] for data x_0 ~ N(m, s^2) per dimension, in closed form.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4) is jointly Gaussian with eps:
    Var x_t = v_t = abar_t s^2 + 1 - abar_t, Cov(eps, x_t) = sqrt(1 - abar_t), so
    eps*(x_t, t) = sqrt(1 - abar_t) / v_t (x_t - sqrt(abar_t) m): the minimiser of the eps-MSE, linear in x_t.
    """

    def __init__(self, betas, m, s, dim):
        super().__init__()
        abar = np_abar(betas)
        self.register_buffer("slope", torch.tensor(np.sqrt(1 - abar) / (abar * s**2 + 1 - abar)))
        self.register_buffer("centre", torch.tensor(np.sqrt(abar) * m))
        self.shape = (dim,)

    def forward(self, x, t):
        return self.slope[t].unsqueeze(-1).to(x) * (x - self.centre[t].unsqueeze(-1).to(x))


def np_ddim_affine(betas, tau, m, s):
    """DDIM with eta = 0 and the optimal eps, written directly in eps form (Song et al. Eq. 12):
    x_prev = sqrt(abar_p) (x_t - sqrt(1 - abar_t) eps*) / sqrt(abar_t) + sqrt(1 - abar_p) eps*.
    Each step is affine; returns (A, B) with x_{tau_1} = A x_T + B."""
    abar = np_abar(betas)
    A, B = 1.0, 0.0
    for t, p in zip(tau[:0:-1], tau[-2::-1]):
        k = math.sqrt(1 - abar[t]) / (abar[t] * s**2 + 1 - abar[t])  # eps* = k (x - sqrt(abar_t) m)
        # eps* = k x + e0 ; x0_hat = (x - sqrt(1 - abar_t) eps*) / sqrt(abar_t)
        e_slope, e_off = k, -k * math.sqrt(abar[t]) * m
        x0_slope = (1 - math.sqrt(1 - abar[t]) * e_slope) / math.sqrt(abar[t])
        x0_off = -math.sqrt(1 - abar[t]) * e_off / math.sqrt(abar[t])
        c = math.sqrt(abar[p]) * x0_slope + math.sqrt(1 - abar[p]) * e_slope
        d = math.sqrt(abar[p]) * x0_off + math.sqrt(1 - abar[p]) * e_off
        A, B = c * A, c * B + d
    return A, B


# --------------------------------------------------------------------------- respacing
@pytest.mark.parametrize("T,S", [(1000, 50), (1000, 1000), (20, 2), (20, 7), (17, 16), (10, 10)])
def test_respaced_timesteps_rule(T, S):
    tau = respaced_timesteps(T, S)
    assert tau == np_tau(T, S)
    assert len(tau) == S and tau[0] == 1 and tau[-1] == T and all(b > a for a, b in zip(tau, tau[1:]))
    gaps = np.diff(tau)
    assert gaps.min() >= math.floor((T - 1) / (S - 1)) and gaps.max() <= math.ceil((T - 1) / (S - 1))


@pytest.mark.parametrize("kind,T", [("linear", 1000), ("linear", 20), ("cosine", 17)])
@pytest.mark.parametrize("S", [2, 5, "T"])
def test_respaced_schedule_keeps_abar_at_tau(ref, kind, T, S):
    S = T if S == "T" else S
    betas = ref.linear_betas(T, 1e-4, 0.02) if kind == "linear" else ref.cosine_betas(T)
    tau = np_tau(T, S)
    new = respaced_schedule(Schedule(betas), tau)
    c = ref.constants(betas)
    assert new.T == S
    # Schedule stores beta' and forms alpha' = 1 - beta': when beta' is near 1 (S = 2) that subtraction
    # costs about 1e-16 / alpha' relative, hence 1e-10 rather than machine precision.
    np.testing.assert_allclose(new.abar.numpy()[1:], c["abar"][tau], rtol=1e-10, atol=0)
    # beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} and every constant derived from it, recomputed independently
    kept = np.concatenate([[1.0], c["abar"][tau]])
    beta_new = 1.0 - kept[1:] / kept[:-1]
    np.testing.assert_allclose(new.beta.numpy()[1:], beta_new, rtol=1e-9, atol=0)
    cn = ref.constants(beta_new)
    for name in ("beta_tilde", "coef_x0", "coef_xt", "sigma2_large", "sigma2_small"):
        np.testing.assert_allclose(getattr(new, name).numpy()[1:], cn[name][1:], rtol=1e-9, atol=0, err_msg=name)
    if S == T:  # the identity respacing reproduces the schedule bit for bit
        assert torch.equal(new.beta, Schedule(betas).beta)


def test_respaced_network_calls_the_original_timesteps():
    seen = []

    class Recorder(nn.Module):
        shape = (2,)

        def forward(self, x, t):
            seen.append(t.clone())
            return torch.zeros_like(x)

    wrapped = RespacedNetwork(Recorder(), [1, 4, 9, 20])
    wrapped(torch.zeros(3, 2), torch.tensor([1, 3, 4]))
    assert seen[0].tolist() == [1, 9, 20] and wrapped.shape == (2,)


def test_respace_shares_the_network_and_leaves_the_model_alone():
    model = tiny_mlp_model(T=20)
    new = respace(model, 5)
    assert type(new) is type(model) and new.T == 5 and model.T == 20
    assert new.timesteps == (1, 5, 10, 15, 20)
    assert new.eps.net is model.eps and model.schedule.T == 20
    assert new.likelihood is model.likelihood and new.variance == model.variance


def test_respacing_with_S_equal_T_gives_the_plain_chain(float64):
    model = tiny_mlp_model(T=12)
    pyro.set_rng_seed(3)
    plain = poutine.trace(model.chain).get_trace(num_images=5)
    pyro.set_rng_seed(3)
    same = poutine.trace(respace(model, 12).chain).get_trace(num_images=5)
    for name in [protocol.chain_site(s) for s in range(12, 0, -1)] + [protocol.X_0]:
        assert torch.equal(plain.nodes[name]["value"], same.nodes[name]["value"]), name
    pyro.set_rng_seed(4)
    a = sample(tiny_unet_model(), 3)
    pyro.set_rng_seed(4)
    b = sample(tiny_unet_model(), 3, steps=12)
    assert torch.equal(a, b)


def test_respaced_chain_has_a_bound(float64):
    """The respaced model is a ReverseProcess over S steps: the evaluator runs on it unchanged."""
    model = tiny_unet_model(T=10)
    x0 = torch.randint(0, 17, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 8.0 - 1.0
    guide = ForwardProcess(model.schedule, event_dim=3)
    full = bound_terms(model, guide, x0)
    same = respace(model, 10)
    assert torch.allclose(
        bound_terms(same, ForwardProcess(same.schedule, event_dim=3), x0), full, rtol=1e-10, atol=1e-10
    )
    short = respace(model, 4)
    L = bound_terms(short, ForwardProcess(short.schedule, event_dim=3), x0)
    assert L.shape == (2, 5) and torch.isfinite(L).all() and (L[:, 1:] >= -1e-9).all()


# --------------------------------------------------------------------------- DDIM
def test_ddim_sites_and_predictive():
    model = tiny_unet_model(T=12)
    ddim = DDIM(model, steps=4)
    assert ddim.timesteps == (1, 4, 8, 12)
    trace = poutine.trace(ddim.chain).get_trace(num_images=3)
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not n == protocol.IMAGES]
    assert names == ["x_12", "x_8", "x_4", "x_1", "x_0"]
    assert all(type(trace.nodes[n]["fn"]).__name__ == "Delta" for n in ("x_8", "x_4", "x_1"))
    out = Predictive(ddim.chain, num_samples=2, return_sites=["x_0", "x_4"])(None, 3)
    assert out["x_0"].shape == (2, 3, 1, 8, 8) and out["x_4"].shape == (2, 3, 1, 8, 8)


@pytest.mark.parametrize("steps", [3, 12])
def test_ddim_eta0_is_deterministic_given_x_T(steps):
    model = tiny_unet_model(T=12)
    ddim = DDIM(model, steps=steps, eta=0.0).eval()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    traces = []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        traces.append(poutine.trace(poutine.condition(ddim.chain, data={"x_12": x_T})).get_trace(num_images=4))
    for t in ddim.timesteps[:-1]:
        assert torch.equal(traces[0].nodes[f"x_{t}"]["value"], traces[1].nodes[f"x_{t}"]["value"])
    dec = [protocol.elementwise(tr.nodes["x_0"]["fn"]).loc for tr in traces]
    assert torch.equal(dec[0], dec[1])
    # with eta > 0 the same x_T does not fix the chain
    noisy = DDIM(model, steps=steps, eta=0.5).eval()
    first = ddim.timesteps[-2]
    values = []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        tr = poutine.trace(poutine.condition(noisy.chain, data={"x_12": x_T})).get_trace(num_images=4)
        values.append(tr.nodes[f"x_{first}"]["value"])
    assert not torch.equal(values[0], values[1])


@pytest.mark.parametrize("T,S", [(20, 7), (20, 20), (9, 2)])
def test_ddim_eta1_is_respaced_ancestral_with_beta_tilde(ref, float64, T, S):
    model = tiny_mlp_model(T=T)
    ddim = DDIM(model, steps=S, eta=1.0)
    trace = poutine.trace(ddim.chain).get_trace(num_images=6)
    tau = np_tau(T, S)
    kept = np.concatenate([[1.0], ref.constants(ref.linear_betas(T, 1e-4, 0.02))["abar"][tau]])
    beta_tilde = (1 - kept[:-1]) / (1 - kept[1:]) * (1 - kept[1:] / kept[:-1])  # index i - 1 for i = 1..S
    small = respace(ReverseProcess(model.eps, model.schedule, "small", model.likelihood), S)
    for i in range(S, 1, -1):
        x = trace.nodes[f"x_{tau[i - 1]}"]["value"]
        fn = protocol.elementwise(trace.nodes[f"x_{tau[i - 2]}"]["fn"])
        np.testing.assert_allclose(fn.scale.numpy() ** 2, beta_tilde[i - 1], rtol=1e-10)
        loc, scale = small.transition(x, torch.full((6,), i))
        torch.testing.assert_close(fn.loc, loc, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fn.scale, scale, rtol=1e-10, atol=0)
    # the same seed gives the same samples as respaced ancestral sampling with sigma^2 = beta_tilde'
    pyro.set_rng_seed(7)
    a = sample(model, 6, "ddim", steps=S, eta=1.0)
    pyro.set_rng_seed(7)
    b = sample(ReverseProcess(model.eps, model.schedule, "small", model.likelihood), 6, steps=S)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "name",
    [
        "ReverseProcess",
        "clipped ReverseProcess",
        "X0PredictionReverseProcess",
        "VPredictionReverseProcess",
        "LearnedVarianceReverseProcess",
    ],
)
def test_ddim_reads_any_parameterization_off_the_transition_mean(float64, name):
    """eta = 1 reproduces each model's own respaced mean (whatever its network predicts), and x0_hat is
    the model's own x_0 prediction: the network's output for x_0-prediction, clipped for the clipped model."""
    import pyro_ddpm.models as models

    cls = getattr(models, name.split()[-1])
    learned = "LearnedVariance" in name
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1, temb_dim=8, **({"out_channels": 4} if learned else {}))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    model = cls(net, Schedule.linear(15), "learned" if learned else "large", GaussianLikelihood())
    if name.startswith("clipped"):
        model = model.with_clipping()  # clip_denoised: an operation on any model, not a class
    ddim = DDIM(model, steps=6, eta=1.0)
    x = 2.0 * torch.randn(7, 2)
    for i in range(6, 1, -1):
        step = torch.full((7,), i)
        loc, _ = ddim.step(x, step)
        mu, _ = ddim.model.transition(x, step)
        torch.testing.assert_close(loc, mu, rtol=1e-9, atol=1e-9)
        x0_hat, eps_hat = ddim.predict(x, step)
        tau = torch.full((7,), ddim.timesteps[i - 1])
        if name == "X0PredictionReverseProcess":
            torch.testing.assert_close(x0_hat, net(x, tau), rtol=1e-8, atol=1e-8)
        if name == "clipped ReverseProcess":
            abar = model.schedule.abar[tau].unsqueeze(-1)
            expected = ((x - (1 - abar).sqrt() * net(x, tau)) / abar.sqrt()).clamp(-1, 1)
            torch.testing.assert_close(x0_hat, expected, rtol=1e-8, atol=1e-8)
            assert x0_hat.abs().max() <= 1 + 1e-9
        if name == "ReverseProcess":
            torch.testing.assert_close(eps_hat, net(x, tau), rtol=1e-8, atol=1e-8)
        x = loc
    assert sample(model, 3, "ddim", steps=4).shape == (3, 2)


def gaussian_toy(betas, m, s, dim):
    return ReverseProcess(OptimalGaussianEps(betas, m, s, dim), Schedule(betas), "large", GaussianLikelihood())


@pytest.mark.parametrize("S", [2, 10, 50])
def test_ddim_eta0_is_the_exact_affine_map_on_a_gaussian_toy(ref, float64, S):
    betas, m, s = ref.cosine_betas(50), 0.3, 0.5
    ddim = DDIM(gaussian_toy(betas, m, s, dim=3), steps=S)
    trace = poutine.trace(ddim.chain).get_trace(num_images=20)
    A, B = np_ddim_affine(betas, np_tau(50, S), m, s)
    x_T, x_1 = trace.nodes["x_50"]["value"], trace.nodes["x_1"]["value"]
    torch.testing.assert_close(x_1, A * x_T + B, rtol=1e-9, atol=1e-12)


def np_ddim_moments(betas, tau, m, s):
    """Mean and variance of DDIM's x_0 for x_T ~ N(0, 1): the affine map to x_{tau_1}, then the
    decoder N(x0_hat(x_{tau_1}), sigma_1'^2) with x0_hat = E[x_0 | x_{tau_1}] (Gaussian conditioning) and
    sigma_1'^2 = beta_tilde'_2 of the respaced schedule (the official code's replacement)."""
    A, B = np_ddim_affine(betas, tau, m, s)
    abar = np_abar(betas)
    a1, a2 = abar[tau[0]], abar[tau[1]]
    slope = math.sqrt(a1) * s**2 / (a1 * s**2 + 1 - a1)
    decoder_var = (1 - a1) / (1 - a2) * (1 - a2 / a1)
    return m + slope * (B - math.sqrt(a1) * m), (slope * A) ** 2 + decoder_var


@pytest.mark.parametrize("S,N", [(1000, 5000), (10, 2000)])
def test_ddim_eta0_maps_noise_to_the_gaussian_data(ref, float64, S, N):
    """The paper's schedule (T = 1000). With every step the deterministic map is close to the ODE flow,
    so DDIM(x_T) has the data's mean and variance (closed form: 0.994 s^2); with 10 steps the
    first-order discretization error shrinks the variance to the closed form's 0.52 s^2."""
    betas, m, s = ref.linear_betas(1000, 1e-4, 0.02), 0.3, 0.5
    mean, var = np_ddim_moments(betas, np_tau(1000, S), m, s)
    pyro.set_rng_seed(0)
    x = sample(gaussian_toy(betas, m, s, dim=4), N, "ddim", steps=S, batch_size=N).reshape(-1).numpy()
    se_mean, se_var = math.sqrt(var / x.size), var * math.sqrt(2 / x.size)
    assert abs(x.mean() - mean) < 4 * se_mean and abs(x.var() - var) < 4 * se_var
    if S == 1000:
        assert abs(mean - m) < 0.002 and abs(var - s**2) < 0.01 * s**2
        assert abs(x.mean() - m) < 4 * se_mean + 0.002 and abs(x.var() - s**2) < 4 * se_var + 0.01 * s**2
    else:
        assert var < 0.6 * s**2 and x.var() < 0.7 * s**2


# --------------------------------------------------------------------------- sample()
@pytest.mark.parametrize("kw", [{}, {"steps": 4}, {"sampler": "ddim", "steps": 4}, {"sampler": "ddim", "eta": 0.5}])
def test_samples_have_the_shape_and_lie_on_the_grid(ref, kw):
    model = tiny_unet_model(T=12, levels=17)
    model.train()
    x = sample(model, 5, batch_size=2, **kw)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert np.abs(x.numpy()[..., None] - ref.grid(17)).min(-1).max() < 1e-6
    assert model.training and model.eps.training  # the caller's mode is restored


def test_sampling_program_kinds():
    model = tiny_mlp_model(T=10)
    assert sampling_program(model) is model and sampling_program(model, steps=10) is model
    assert sampling_program(model, steps=4).T == 4
    prog = sampling_program(model, "ddim", 5, 0.3)
    assert isinstance(prog, DDIM) and prog.steps == 5 and prog.eta == 0.3 and prog.T == 10


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: sample(m, 0), "positive integer"),
        (lambda m: sample(m, 2.5), "positive integer"),
        (lambda m: sample(m, 2, batch_size=0), "batch_size"),
        (lambda m: sample(m, 2, "euler"), "unknown sampler"),
        (lambda m: sample(m, 2, steps=1), "2 <= S <= T"),
        (lambda m: sample(m, 2, steps=11), "2 <= S <= T"),
        (lambda m: sample(m, 2, "ddim", steps=11), "2 <= S <= T"),
        (lambda m: sample(m, 2, steps=4.0), "must be an integer"),
        (lambda m: sample(m, 2, eta=0.5), "eta applies to sampler='ddim'"),
        (lambda m: sample(m, 2, "ddim", eta=-0.1), "eta must be a number in \\[0, 1\\]"),
        (lambda m: sample(m, 2, "ddim", eta=1.5), "eta must be a number in \\[0, 1\\]"),
        (lambda m: DDIM(m, 4, eta=float("nan")), "eta must be a number"),
        (lambda m: respaced_schedule(m.schedule, [1, 5, 5, 10]), "increase strictly"),
        (lambda m: respaced_schedule(m.schedule, [1, 5, 9]), "increase strictly"),
        (lambda m: respaced_schedule(m.schedule, [0.5, 10.0]), "integers"),
        (lambda m: DDIM(m, 4).chain(), "give x0 or num_images"),
        (lambda m: DDIM(m, 4).chain(torch.zeros(2, 3)), "data shape"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_mlp_model(T=10))
