"""The recipe examples: a guide and a decoder of one's own, trained, evaluated and sampled.

Each example runs once as a script with ``--quick`` (a subprocess: its classes live in ``__main__``,
as for a user), and its outputs are checked. Numbers are checked against independent float64
references: the discretized logistic against ``scipy.special.expit`` differences and 400-digit
``mpmath`` values (its masses sum to 1 over the grid; sampling frequencies by a chi-square test); the
endpoint schedule against numpy (gamma = g_1 + log(1 + e^d) s_t, abar = expit(-gamma)) and conftest's
``ref.constants`` for every constant derived from its betas.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import stats
from scipy.special import expit

from pyro_ddpm import checkpoint, data, protocol
from pyro_ddpm.evaluate import bound_terms
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import build_network
from pyro_ddpm.presets import NETWORKS as PRESETS
from pyro_ddpm.registry import GUIDES, LIKELIHOODS
from pyro_ddpm.schedule import CONSTANTS, Schedule

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_script(name: str, out: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 500


@pytest.fixture(scope="module")
def lik():
    return load_example("custom_likelihood")


@pytest.fixture(scope="module")
def tab():
    return load_example("custom_guide")


# --------------------------------------------------------------------------- independent references
def expit_log_mass(x, mu, s, K):
    """log P(x) by the definition: expit differences over the bin [x - h, x + h], open edge bins (scipy)."""
    x, mu, s = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (x, mu, s)))
    h = 1.0 / (K - 1)
    hi = np.where(np.isclose(x, 1.0), 1.0, expit((x + h - mu) / s))
    lo = np.where(np.isclose(x, -1.0), 0.0, expit((x - h - mu) / s))
    return np.log(hi - lo)


def mp_log_mass(x, mu, s, K) -> float:
    """The same in 400-digit arithmetic (exact in the tails where float64 differences cancel)."""
    with mpmath.workdps(400):
        x, mu, s = mpmath.mpf(x), mpmath.mpf(mu), mpmath.mpf(s)
        h = mpmath.mpf(1) / (K - 1)
        sig = lambda y: 1 / (1 + mpmath.exp(-y))  # noqa: E731
        hi = mpmath.mpf(1) if x > 1 - h / 2 else sig((x + h - mu) / s)
        lo = mpmath.mpf(0) if x < -1 + h / 2 else sig((x - h - mu) / s)
        return float(mpmath.log(hi - lo))


def grid(K):
    return -1.0 + 2.0 * np.arange(K) / (K - 1)


# --------------------------------------------------------------------------- the discretized logistic
CASES = [(0.3, 0.05, 17), (-0.2, 0.7, 17), (1.4, 0.01, 17), (-3.0, 2.0, 256), (0.05, 1e-3, 256), (0.2, 0.4, 2)]


@pytest.mark.parametrize("mu,s,K", CASES)
def test_logistic_masses_sum_to_one_and_match_expit(lik, mu, s, K):
    g = torch.tensor(grid(K))
    lp = lik.DiscretizedLogistic(torch.full_like(g, mu), torch.full_like(g, s), K).log_prob(g)
    assert lp.dtype == torch.float64
    p = lp.exp().numpy()
    assert math.fsum(p) == pytest.approx(1.0, abs=1e-12)
    h = 1.0 / (K - 1)
    cdf = np.concatenate([[0.0], expit((grid(K)[:-1] + h - mu) / s), [1.0]])  # bin edges -inf, ..., +inf
    np.testing.assert_allclose(p, np.diff(cdf), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("K", [17, 256])
def test_logistic_log_prob_equals_the_hand_formula(lik, K):
    rng = np.random.default_rng(K)
    x = grid(K)[rng.integers(0, K, 40)]
    x[:2] = [-1.0, 1.0]  # both edge bins
    mu, s = rng.uniform(-1.2, 1.2, 40), rng.uniform(0.02, 0.6, 40)
    got = lik.DiscretizedLogistic(torch.tensor(mu), torch.tensor(s), K).log_prob(torch.tensor(x)).numpy()
    want = expit_log_mass(x, mu, s, K)
    # the expit difference is exact to ~1e-16 absolute: compare masses, and logs where they are not tiny
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-9, atol=1e-15)
    big = np.exp(want) > 1e-4
    assert big.sum() > 20
    np.testing.assert_allclose(got[big], want[big], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "x,mu,s,K",
    [
        (0.5, -1.0, 0.01, 17),  # far in the upper tail: expit(b) - expit(a) cancels to 0 in float64
        (-0.375, 1.5, 0.02, 17),  # far in the lower tail
        (1.0, -0.9, 0.01, 17),  # edge bin, far
        (-1.0, 0.9, 0.01, 17),
        (0.0, 0.0, 50.0, 17),  # a bin far narrower than the scale
        (0.2, 0.2, 1e-4, 256),  # the bin far wider than the scale
    ],
)
def test_logistic_log_prob_is_exact_in_the_tails(lik, x, mu, s, K):
    f64 = dict(dtype=torch.float64)
    got = (
        lik.DiscretizedLogistic(torch.tensor([mu], **f64), torch.tensor([s], **f64), K)
        .log_prob(torch.tensor([x], **f64))
        .item()
    )
    assert got == pytest.approx(mp_log_mass(x, mu, s, K), rel=1e-10, abs=1e-13)


def test_logistic_gradients_are_finite_at_extremes(lik):
    loc = torch.tensor([-50.0, 50.0, 0.0, 0.3, 1e3], requires_grad=True)
    scale = torch.tensor([1e-4, 1e-4, 1e3, 1e-6, 1e-3], requires_grad=True)
    x = torch.tensor([1.0, -1.0, 0.0, 0.25, 0.0])
    lp = lik.DiscretizedLogistic(loc, scale, 17).log_prob(x)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_logistic_draws_follow_the_masses(lik):
    mu, s, K, n = 0.1, 0.2, 17, 200_000
    torch.manual_seed(0)
    draws = lik.DiscretizedLogistic(torch.tensor(mu), torch.tensor(s), K).sample((n,)).double().numpy()
    k = (draws + 1.0) * (K - 1) / 2.0
    assert np.abs(k - np.round(k)).max() < 1e-5
    counts = np.bincount(np.round(k).astype(int), minlength=K)
    p = np.exp(expit_log_mass(grid(K), mu, s, K))
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and p.min() * n > 5  # every bin expects > 5 draws
    assert stats.chisquare(counts, p * n).pvalue > 1e-3


def test_the_decoder_matches_variances_and_rebuilds_from_its_config(lik):
    dec = lik.DiscretizedLogisticLikelihood.for_data(data.load("digits"))
    assert dec.levels == 17 and dec.discrete
    sigma = torch.tensor([0.01, 0.3, 2.0], dtype=torch.float64)
    d = dec(torch.zeros(3, dtype=torch.float64), sigma)
    # the logistic's variance s^2 pi^2 / 3 (scipy) equals the Gaussian's sigma^2 it replaces
    np.testing.assert_allclose(stats.logistic(scale=d.scale.numpy()).var(), sigma.numpy() ** 2, rtol=1e-12)
    stored = LIKELIHOODS.describe(dec)
    assert stored == {"class": "discretized_logistic", "config": {"levels": 17}}
    again = LIKELIHOODS.build(stored)
    assert type(again) is lik.DiscretizedLogisticLikelihood and again.levels == 17


def test_the_decoder_refuses_bad_input(lik):
    with pytest.raises(ValueError, match="quantized data"):
        lik.DiscretizedLogisticLikelihood.for_data(data.load("swiss_roll-continuous"))
    with pytest.raises(ValueError, match="need at least 2 levels"):
        lik.DiscretizedLogisticLikelihood(1)
    dec = lik.DiscretizedLogisticLikelihood(17)
    with pytest.raises(ValueError, match="off the 17-level grid"):
        dec.check(torch.tensor([[0.01]]))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        dec.check(torch.tensor([[1.5]]))


def test_the_model_scores_x0_with_the_decoder(lik):
    """The model's x_0 site at t = 1 is the discretized logistic at (mu_theta(x_1, 1), sigma_1 sqrt(3)/pi)."""
    K = 17
    schedule = Schedule.linear(10)
    net = build_network(dict(PRESETS["digits"], ch=8))
    model = ReverseProcess(net, schedule, "large", lik.DiscretizedLogisticLikelihood(K), shape=(1, 8, 8)).eval()
    x0 = data.load("digits").test[:3]
    t = torch.ones(3, 1, dtype=torch.long)
    guide = ForwardProcess(schedule, event_dim=3)
    guide_trace = poutine.trace(guide.per_timestep).get_trace(x0, t)
    trace = poutine.trace(poutine.replay(model.per_timestep, trace=guide_trace)).get_trace(x0, t)
    site = trace.nodes[protocol.X_0]
    fn = protocol.elementwise(site["fn"])
    fn = fn.make(fn.where)  # the decoder the likelihood built at the t = 1 pairs (here: every pair)
    mu, s = fn.loc.detach().double().numpy(), fn.scale.detach().double().numpy()
    np.testing.assert_allclose(s, math.sqrt(schedule.sigma2_large[1].item()) * math.sqrt(3.0) / math.pi, rtol=1e-6)
    expected = expit_log_mass(x0.double().numpy(), mu, s, K).reshape(3, -1).sum(1)
    np.testing.assert_allclose(site["fn"].log_prob(x0).detach().double().numpy(), expected, rtol=1e-5)


@pytest.fixture(scope="module")
def lik_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("custom_likelihood")
    stdout = run_script("custom_likelihood", out)
    return out, stdout, json.loads((out / "custom_likelihood.json").read_text())


def test_custom_likelihood_example_trains_evaluates_and_samples(lik, lik_run):
    out, stdout, r = lik_run
    assert_png(out / "samples.png")
    assert "distortion_L_0" in stdout and "discretized Gaussian" in stdout
    assert r["likelihood"] == {"class": "discretized_logistic", "config": {"levels": 17}}
    state = checkpoint.load(out / "run")
    assert state.step == r["steps"] == 20 and state.programs["likelihood"] == r["likelihood"]
    logistic, gaussian = r["bits_per_dim"]["discretized logistic"], r["bits_per_dim"]["discretized Gaussian"]
    # same network, same noise: every term but L_0 is the same number; L_0 is each decoder's own
    for term in ("prior_L_T", "rate_L_1_to_L_T-1"):
        assert logistic[term] == gaussian[term]
    assert logistic["distortion_L_0"] != gaussian["distortion_L_0"] and logistic["distortion_L_0"] > 0
    for b in (logistic, gaussian):
        parts = b["prior_L_T"] + b["rate_L_1_to_L_T-1"] + b["distortion_L_0"]
        assert b["total"] == pytest.approx(parts, rel=1e-12) and 0 < b["total"] < 20
    assert r["samples_on_grid"] and set(r["samples_levels"]) <= set(range(17))
    # the stored decoder rebuilds in any process that imported the example (which registers the class)
    model, _ = checkpoint.build(state)
    assert type(model.likelihood) is lik.DiscretizedLogisticLikelihood and model.likelihood.levels == 17


# --------------------------------------------------------------------------- the endpoint schedule
def np_gamma(betas: np.ndarray) -> np.ndarray:
    """gamma_t = log((1 - abar_t) / abar_t), t = 1..T, of a fixed schedule (numpy float64)."""
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    return np.log1p(-abar) - np.log(abar)


def np_endpoints(start: np.ndarray, g_1: float, d: float) -> dict:
    """gamma, abar (t = 0..T) and beta (t = 1..T) of the endpoint schedule, in numpy float64."""
    base = np_gamma(start)
    gamma = g_1 + np.logaddexp(0.0, d) * (base - base[0]) / (base[-1] - base[0])
    abar = np.concatenate([[1.0], expit(-gamma)])
    return {"gamma": gamma, "abar": abar, "beta": 1.0 - abar[1:] / abar[:-1]}


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_endpoint_schedule_starts_at_the_named_fixed_schedule(tab, ref, name):
    T = 12
    betas = ref.linear_betas(T, 1e-4, 0.02) if name == "linear" else ref.cosine_betas(T)
    guide = tab.EndpointForwardProcess.from_spec(T, name, 3)
    assert guide.T == T and guide.event_dim == 3
    with torch.no_grad():
        np.testing.assert_allclose(guide.schedule.betas.numpy(), betas, rtol=1e-9)
        np.testing.assert_allclose(guide.schedule.gamma_t().numpy()[[0, -1]], np_gamma(betas)[[0, -1]], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_endpoint_schedule_is_monotone_and_its_constants_follow_from_its_parameters(tab, ref, seed):
    T = 15
    start = ref.linear_betas(T, 1e-4, 0.02)
    schedule = tab.EndpointSchedule(Schedule.linear(T).betas)
    rng = np.random.default_rng(seed)
    g_1, d = rng.uniform(-12.0, 2.0), rng.normal(2.0, 1.5)
    with torch.no_grad():
        schedule.g_1.fill_(g_1)
        schedule.d.fill_(d)
        c = {name: getattr(schedule, name).numpy() for name in CONSTANTS}
    expected = np_endpoints(start, g_1, d)
    assert np.all(np.diff(expected["gamma"]) > 0)
    assert np.all(np.diff(c["abar"]) < 0) and np.all((c["beta"][1:] > 0) & (c["beta"][1:] < 1))
    np.testing.assert_allclose(c["abar"], expected["abar"], rtol=1e-10)
    np.testing.assert_allclose(c["beta"][1:], expected["beta"], rtol=1e-8, atol=1e-15)
    want = ref.constants(c["beta"][1:])  # the rest of the table, by loops, from the betas
    for name in ("beta_tilde", "coef_x0", "coef_xt", "eps_coef", "sigma2_large", "w_large", "C_large"):
        t = slice(2 if name.startswith("C_") else 1, None)  # C_1 is no KL constant (the decoder's slot)
        np.testing.assert_allclose(c[name][t], want[name][t], rtol=1e-9, err_msg=name)


def test_endpoint_no_grad_constants_follow_parameter_changes(tab, ref):
    schedule = tab.EndpointSchedule(Schedule.linear(6).betas)
    with torch.no_grad():
        before = schedule.abar.clone()
        assert schedule.abar is schedule.abar  # reused while the parameters stay the same
        schedule.d.add_(1.0)
        after = schedule.abar
    expected = np_endpoints(ref.linear_betas(6, 1e-4, 0.02), schedule.g_1.item(), schedule.d.item())["abar"]
    np.testing.assert_allclose(after.numpy(), expected, rtol=1e-12)
    assert not torch.equal(before, after)


def test_endpoint_guide_at_its_start_is_the_fixed_guide(tab):
    T = 8
    net = build_network(dict(PRESETS["digits"], ch=8))
    x = data.load("digits").test[:3]
    fixed = Schedule.linear(T)
    table = tab.EndpointForwardProcess.from_spec(T, "linear", 3)
    a = bound_terms(
        ReverseProcess(net, fixed, "large", DiscretizedGaussianLikelihood(17)).eval(),
        ForwardProcess(fixed, 3),
        x,
        seed=3,
    )
    b = bound_terms(
        ReverseProcess(net, table.schedule, "large", DiscretizedGaussianLikelihood(17)).eval(), table, x, seed=3
    )
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_endpoint_guide_registers_its_parameters_with_pyro(tab):
    guide = tab.EndpointForwardProcess.from_spec(5, "cosine", 3)
    x = data.load("digits").test[:2]
    poutine.trace(guide.per_timestep).get_trace(x, torch.tensor([[1], [4]]))
    assert {"schedule$$$g_1", "schedule$$$d"} <= set(pyro.get_param_store().keys())


@pytest.mark.parametrize("T,name,match", [(5, "quadratic", "unknown schedule"), (1, "linear", "T >= 2")])
def test_endpoint_guide_bad_input(tab, T, name, match):
    with pytest.raises(ValueError, match=match):
        tab.EndpointForwardProcess.from_spec(T, name, 3)


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("custom_guide")
    stdout = run_script("custom_guide", out)
    return out, stdout, json.loads((out / "custom_guide.json").read_text())


def test_custom_guide_example_learns_a_monotone_schedule_that_round_trips(tab, guide_run, ref):
    out, stdout, r = guide_run
    assert_png(out / "samples.png")
    assert_png(out / "schedule.png")
    assert "distortion_L_0" in stdout and "abar_t before" in stdout
    state = checkpoint.load(out / "run")
    assert state.config["guide"] == r["guide"] == "custom_guide" == state.programs["guide"]["class"]
    assert state.step == 20
    T = r["T"]
    # the schedule before training is the named one; training moved it; it is still monotone
    np.testing.assert_allclose(
        np.asarray(r["abar_before"])[1:], np.cumprod(1.0 - ref.linear_betas(T, 1e-4, 0.02)), rtol=1e-9
    )
    after = np_endpoints(
        np.asarray(state.programs["guide"]["config"]["start"]),
        state.weights["guide"]["schedule.g_1"].item(),
        state.weights["guide"]["schedule.d"].item(),
    )
    np.testing.assert_allclose(r["gamma_after"], after["gamma"], rtol=1e-12)
    np.testing.assert_allclose(r["abar_after"], after["abar"], rtol=1e-12)
    assert np.all(np.diff(after["gamma"]) > 0) and np.all(np.diff(after["abar"]) < 0)
    assert np.abs(np.asarray(r["gamma_after"]) - np.asarray(r["gamma_before"])).max() > 1e-4
    # the stored state rebuilds the same guide in any process that imported the example
    model, guide = checkpoint.build(state)
    assert GUIDES.resolve("custom_guide") is tab.EndpointForwardProcess
    assert model.schedule is guide.schedule and isinstance(guide.schedule, tab.EndpointSchedule)
    with torch.no_grad():
        np.testing.assert_array_equal(guide.schedule.abar.numpy(), np.asarray(r["abar_after"]))
        np.testing.assert_allclose(guide.schedule.start, state.programs["guide"]["config"]["start"], rtol=0)
    b = r["bits_per_dim"]
    assert b["total"] == pytest.approx(b["prior_L_T"] + b["rate_L_1_to_L_T-1"] + b["distortion_L_0"], rel=1e-12)
    assert 0 < b["total"] < 20 and set(r["samples_levels"]) <= set(range(17))
    # L_T before and after: KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1)) summed over pixels (closed form)
    x = data.load("digits").test[: r["test_images"]].double().numpy().reshape(r["test_images"], -1)
    for abar_T, got in ((r["abar_before"][-1], r["L_T_before"]), (r["abar_after"][-1], b["prior_L_T"])):
        kl = ref.kl_normal(math.sqrt(abar_T) * x, 1.0 - abar_T, 0.0, 1.0).sum(1).mean()
        assert got == pytest.approx(kl / (x.shape[1] * math.log(2)), rel=1e-5)
