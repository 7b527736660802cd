"""The discretized Gaussian decoder (Eq. 13) against scipy, its sampler, and the data checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_ddpm.likelihoods import (
    DiscretizedGaussian,
    DiscretizedGaussianLikelihood,
    GaussianLikelihood,
    check_images,
)

pytestmark = pytest.mark.usefixtures("float64")


def _grid_t(K, dtype=torch.float64):
    return torch.tensor([-1.0 + 2.0 * k / (K - 1) for k in range(K)], dtype=dtype)


@pytest.mark.parametrize("K", [17, 256])
def test_log_prob_matches_scipy(K, ref):
    rng = np.random.default_rng(K)
    n = 40
    loc = rng.uniform(-1.5, 1.5, size=n)
    scale = np.exp(rng.uniform(np.log(1e-3), 0.0, size=n))
    scale[:2] = [1e-3, 1.0]
    g = ref.grid(K)
    x = np.broadcast_to(g[None, :], (n, K))
    mu = np.broadcast_to(loc[:, None], (n, K))
    s = np.broadcast_to(scale[:, None], (n, K))
    expected = ref.disc_log_prob(x, mu, s, K)
    assert np.all(np.isfinite(expected))
    d = DiscretizedGaussian(torch.tensor(mu), torch.tensor(s), K)
    got = d.log_prob(_grid_t(K).expand(n, K)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    # the literal definition where it is well conditioned: log(Phi(upper) - Phi(lower))
    h = 1.0 / (K - 1)
    upper = np.where(x >= 1.0, np.inf, x + h)
    lower = np.where(x <= -1.0, -np.inf, x - h)
    mass = stats.norm.cdf((upper - mu) / s) - stats.norm.cdf((lower - mu) / s)
    ok = mass > 1e-6
    np.testing.assert_allclose(got[ok], np.log(mass[ok]), rtol=1e-8, atol=1e-12)


LOCS = [-1e30, -5.0, -1.0, -1.0 + 1.0 / 16, -0.37, 0.0, 0.5, 1.0 - 1.0 / 16, 1.0, 3.0, 1e30]
SCALES = [1e-30, 1e-8, 1e-3, 0.05, 1.0, 10.0, 1e4, 12500.0, 1e5, 1e8]


@pytest.mark.parametrize("K", [2, 17, 256])
def test_probabilities_sum_to_one(K):
    loc = torch.tensor(LOCS).repeat_interleave(len(SCALES))
    scale = torch.tensor(SCALES).repeat(len(LOCS))
    d = DiscretizedGaussian(loc[:, None], scale[:, None], K)
    lp = d.log_prob(_grid_t(K)[None, :].expand(len(loc), K))
    assert torch.isfinite(lp).all()
    assert (lp <= 0).all()
    total = lp.exp().sum(-1)
    np.testing.assert_allclose(total.numpy(), 1.0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("K,k", [(256, 127), (256, 3), (256, 200), (17, 8), (17, 0)])
@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e-8])
def test_mean_on_a_bin_edge_splits_the_mass(K, k, scale):
    """loc on the edge between levels k and k + 1: each gets 1/2, the rest nothing.

    The edge is shared by the two bins, so the bins must not overlap there: with loc exactly at
    (x_k + x_{k+1}) / 2 (e.g. 0 for K = 256) and a tiny scale, a one-ulp overlap of the two bins'
    edges already gives each bin probability 1.
    """
    edge = -1.0 + (2 * k + 1) / (K - 1)
    g = _grid_t(K)
    lp = DiscretizedGaussian(torch.full((K,), edge), torch.full((K,), scale), K).log_prob(g)
    p = lp.exp()
    assert (p[k] + p[k + 1]).item() == pytest.approx(1.0, abs=1e-10)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-10)
    if scale >= 1e-8:  # an ulp of loc moves the split by ~1e-9 only
        assert p[k].item() == pytest.approx(0.5, abs=1e-6)
        assert p[k + 1].item() == pytest.approx(0.5, abs=1e-6)


EXTREME_LOCS = [1e30, -1e30, 3e38, -3e38, 0.0, 0.3, -1.0, 1.0]
EXTREME_SCALES = [1e-30, 1e-8, 1e-3, 1.0, 1e8]


@pytest.mark.parametrize("K", [17, 256])
@pytest.mark.parametrize("scale", EXTREME_SCALES)
def test_float32_extremes_finite_values(K, scale):
    loc = torch.tensor(EXTREME_LOCS, dtype=torch.float32)[:, None].expand(-1, K)
    s = torch.full_like(loc, scale)
    lp = DiscretizedGaussian(loc, s, K).log_prob(_grid_t(K, torch.float32).expand_as(loc))
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp).all(), lp
    assert (lp <= 0).all()
    # the whole-image sum stays finite too
    assert torch.isfinite(lp.sum())


@pytest.mark.parametrize("K", [17, 256])
@pytest.mark.parametrize("scale", EXTREME_SCALES)
def test_float32_extremes_finite_loc_gradients(K, scale):
    loc = torch.tensor(EXTREME_LOCS, dtype=torch.float32)[:, None].expand(-1, K).clone().requires_grad_(True)
    s = torch.full_like(loc, scale)
    lp = DiscretizedGaussian(loc, s, K).log_prob(_grid_t(K, torch.float32).expand_as(loc))
    (grad,) = torch.autograd.grad(lp.sum(), [loc])
    bad = ~torch.isfinite(grad)
    assert not bad.any(), (
        f"{int(bad.sum())} non-finite d log_prob / d loc, e.g. at loc = "
        f"{loc[bad][:3].tolist()}, scale = {scale}: {grad[bad][:3].tolist()}"
    )


@pytest.mark.parametrize("K", [17, 256])
def test_moderate_gradients_match_finite_differences(K):
    """Where the value is not floored, d log_prob / d loc is the analytic derivative."""
    g = _grid_t(K)
    loc = torch.tensor([0.2, -0.93, 0.999, 2.0], dtype=torch.float64)[:, None].expand(-1, K).clone()
    s = torch.tensor([0.3, 0.01, 0.05, 0.7], dtype=torch.float64)[:, None].expand(-1, K)
    loc.requires_grad_(True)
    lp = DiscretizedGaussian(loc, s, K).log_prob(g.expand_as(loc))
    (grad,) = torch.autograd.grad(lp.sum(), [loc])
    h = 1.0 / (K - 1)
    x, mu, sd = g.expand_as(loc).numpy(), loc.detach().numpy(), s.numpy()
    # d/dmu log(Phi(u) - Phi(l)) = (phi(l) - phi(u)) / (s (Phi(u) - Phi(l)))
    u = np.where(x >= 1, np.inf, (x + h - mu) / sd)
    lo = np.where(x <= -1, -np.inf, (x - h - mu) / sd)
    mass = stats.norm.cdf(u) - stats.norm.cdf(lo)
    ok = mass > 1e-8
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = (stats.norm.pdf(lo) - stats.norm.pdf(u)) / (sd * mass)
    np.testing.assert_allclose(grad.numpy()[ok], expected[ok], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "K,loc,scale",
    [(17, 0.1, 0.3), (17, -0.95, 0.2), (17, 0.0, 1e-3), (17, 1.2, 0.5), (256, 0.3, 0.02), (2, 0.2, 0.8)],
)
def test_sample_on_grid_with_bin_frequencies(K, loc, scale, ref):
    n = 100_000
    d = DiscretizedGaussian(torch.tensor(loc), torch.tensor(scale), K)
    x = d.sample((n,))
    assert x.shape == (n,)
    k = (x + 1.0) * (K - 1) / 2.0
    assert torch.all((k - k.round()).abs() < 1e-9)
    assert x.min() >= -1.0 and x.max() <= 1.0
    counts = np.bincount(k.round().long().numpy(), minlength=K)
    p = np.exp(ref.disc_log_prob(ref.grid(K), loc, scale, K))
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    expected = n * p
    big = expected >= 5
    # bins the model gives (almost) no mass must stay (almost) empty
    assert counts[~big].sum() <= max(10.0, 5 * expected[~big].sum())
    if big.sum() >= 2:
        chi2 = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
        pval = stats.chi2.sf(chi2, big.sum() - 1)
        assert pval > 1e-5, (chi2, counts[big], expected[big])
    else:
        assert counts[big].sum() >= n - max(10.0, 5 * expected[~big].sum())
    # the sampled values are in the distribution's support, so validated log_prob accepts them
    DiscretizedGaussian(torch.tensor(loc), torch.tensor(scale), K, validate_args=True).log_prob(x[:100])


def test_sample_shape_and_batch():
    d = DiscretizedGaussian(torch.zeros(2, 3), torch.full((2, 3), 0.5), 17)
    assert d.batch_shape == (2, 3)
    assert d.sample().shape == (2, 3)
    assert d.sample((4,)).shape == (4, 2, 3)
    assert d.expand((5, 2, 3)).sample().shape == (5, 2, 3)


BAD = {
    "above-range": (torch.tensor([0.0, 1.5]), r"\[-1, 1\]"),
    "below-range": (torch.tensor([-1.25, 0.0]), r"\[-1, 1\]"),
    "off-grid": (torch.tensor([0.0, 0.01]), "grid"),
    "nan": (torch.tensor([0.0, float("nan")]), "NaN"),
    "inf": (torch.tensor([0.0, float("inf")]), "infinite"),
    "-inf": (torch.tensor([float("-inf"), 0.0]), "infinite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_images_names_the_problem(case):
    x, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        check_images(x, 17)
    with pytest.raises(ValueError, match=msg):
        DiscretizedGaussianLikelihood(17).check(x)
    with pytest.raises(ValueError, match=msg):
        DiscretizedGaussian(torch.zeros(2), torch.ones(2), 17, validate_args=True).log_prob(x)


def test_check_images_accepts_grid_data():
    for K in (2, 17, 256):
        check_images(_grid_t(K), K)
        check_images(_grid_t(K, torch.float32), K)
        DiscretizedGaussianLikelihood(K).check(_grid_t(K))
    # 17 levels is not 256 levels and vice versa
    with pytest.raises(ValueError, match="grid"):
        check_images(_grid_t(256), 17)
    with pytest.raises(ValueError, match="grid"):
        check_images(torch.tensor([1.0 / 16]), 256)
    with pytest.raises(ValueError):
        check_images(torch.tensor([0, 1]), 17)  # integer images are not scaled data


def test_gaussian_likelihood_checks_finiteness_only():
    GaussianLikelihood().check(torch.tensor([0.013, 1.7, -3.0]))
    with pytest.raises(ValueError, match="NaN"):
        GaussianLikelihood().check(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="infinite"):
        GaussianLikelihood().check(torch.tensor([0.0, float("inf")]))


def test_too_few_levels():
    with pytest.raises(ValueError):
        DiscretizedGaussianLikelihood(1)
    with pytest.raises(ValueError):
        DiscretizedGaussian(torch.zeros(1), torch.ones(1), 1)
