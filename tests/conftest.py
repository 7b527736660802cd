"""Shared fixtures and independent float64 reference formulas for the core correctness tests.

The reference functions below are written from the equations in docs/math.md (Ho et al. 2020)
with numpy/scipy only; they never call the code under test.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pyro
import pytest
import torch
from pyro.infer.util import is_validation_enabled
from scipy import stats


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def pyro_state():
    """Fresh param store, a fixed seed and Pyro validation on; restores the validation flag."""
    was_enabled = is_validation_enabled()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.enable_validation(was_enabled)
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """torch's default dtype set to float64 for the test, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------- references
def np_constants(betas) -> dict:
    """Every schedule constant of the math doc, recomputed with plain Python float64 loops.

    Arrays have length T + 1 and are indexed by t; index 0 is only filled where the paper defines a
    value (alpha_0 = abar_0 = 1); every other t = 0 slot is NaN so that nobody compares against it.
    """
    betas = [float(b) for b in np.asarray(betas, dtype=np.float64).reshape(-1)]
    T = len(betas)
    nan = float("nan")
    beta = [nan] + betas
    alpha = [1.0] + [1.0 - b for b in betas]
    abar = [1.0]
    for t in range(1, T + 1):
        abar.append(abar[-1] * alpha[t])
    c = {
        k: [nan] * (T + 1)
        for k in (
            "abar_prev",
            "sqrt_abar",
            "sqrt_one_minus_abar",
            "beta_tilde",
            "coef_x0",
            "coef_xt",
            "eps_coef",
            "recip_sqrt_alpha",
            "sigma2_large",
            "sigma2_small",
            "w_large",
            "w_small",
            "C_large",
            "C_small",
        )
    }
    for t in range(1, T + 1):
        c["abar_prev"][t] = abar[t - 1]
        c["sqrt_abar"][t] = math.sqrt(abar[t])
        c["sqrt_one_minus_abar"][t] = math.sqrt(1.0 - abar[t])
        c["beta_tilde"][t] = (1.0 - abar[t - 1]) / (1.0 - abar[t]) * beta[t]
        c["coef_x0"][t] = math.sqrt(abar[t - 1]) * beta[t] / (1.0 - abar[t])
        c["coef_xt"][t] = math.sqrt(alpha[t]) * (1.0 - abar[t - 1]) / (1.0 - abar[t])
        c["eps_coef"][t] = beta[t] / math.sqrt(1.0 - abar[t])
        c["recip_sqrt_alpha"][t] = 1.0 / math.sqrt(alpha[t])
    bt2 = c["beta_tilde"][2]
    for t in range(1, T + 1):
        for name in ("large", "small"):
            if t == 1:
                s2 = bt2  # the official code's replacement sigma_1^2 = beta_tilde_2
            else:
                s2 = beta[t] if name == "large" else c["beta_tilde"][t]
            c[f"sigma2_{name}"][t] = s2
            c[f"w_{name}"][t] = beta[t] ** 2 / (2.0 * s2 * alpha[t] * (1.0 - abar[t]))
            if t >= 2:
                r = c["beta_tilde"][t] / s2
                c[f"C_{name}"][t] = 0.5 * (r - 1.0 - math.log(r))
    out = {k: np.array(v, dtype=np.float64) for k, v in c.items()}
    out.update(beta=np.array(beta), alpha=np.array(alpha), abar=np.array(abar), T=T)
    return out


def np_linear_betas(T, b1, bT):
    return np.array([b1 + (bT - b1) * k / (T - 1) for k in range(T)], dtype=np.float64)


def np_cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol and Dhariwal (2021), Eq. 17 and the clipping of their code."""
    f = [math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = [ft / f[0] for ft in f]
    return np.array([min(1.0 - abar[t] / abar[t - 1], max_beta) for t in range(1, T + 1)])


def kl_normal(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) per dimension."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def _log_diff(log_big, log_small):
    """log(exp(log_big) - exp(log_small)) for log_big >= log_small."""
    with np.errstate(divide="ignore"):
        return log_big + np.log(-np.expm1(log_small - log_big))


def disc_log_prob(x, mu, s, K):
    """log of integral over the bin of x of N(mu, s^2), open edge bins at -1 and +1 (scipy, float64)."""
    x, mu, s = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(mu, np.float64), np.asarray(s, np.float64))
    h = 1.0 / (K - 1)
    u = (x + h - mu) / s
    lo = (x - h - mu) / s
    # Each interior bin in its lower tail: Phi(u) - Phi(lo), or by symmetry sf(lo) - sf(u).
    lower_tail = (u + lo) <= 0
    interior = np.where(
        lower_tail,
        _log_diff(stats.norm.logcdf(u), stats.norm.logcdf(lo)),
        _log_diff(stats.norm.logsf(lo), stats.norm.logsf(u)),
    )
    first = np.isclose(x, -1.0, rtol=0, atol=h / 4)
    last = np.isclose(x, 1.0, rtol=0, atol=h / 4)
    return np.where(first, stats.norm.logcdf(u), np.where(last, stats.norm.logsf(lo), interior))


def grid(K):
    return np.array([-1.0 + 2.0 * k / (K - 1) for k in range(K)])


def quantized_gaussian_probs(m, s, K):
    """P(level k) for a N(m, s^2) draw rounded to the nearest of K levels in [-1, 1] (clipped)."""
    g = grid(K)
    h = 1.0 / (K - 1)
    upper = np.where(np.arange(K) == K - 1, np.inf, g + h)
    lower = np.where(np.arange(K) == 0, -np.inf, g - h)
    return stats.norm.cdf((upper - m) / s) - stats.norm.cdf((lower - m) / s)


@pytest.fixture(scope="session")
def ref():
    """The reference formulas, as a namespace (tests import nothing from conftest directly)."""
    return types.SimpleNamespace(
        constants=np_constants,
        linear_betas=np_linear_betas,
        cosine_betas=np_cosine_betas,
        kl_normal=kl_normal,
        disc_log_prob=disc_log_prob,
        grid=grid,
        quantized_gaussian_probs=quantized_gaussian_probs,
    )
