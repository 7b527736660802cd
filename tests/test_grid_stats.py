"""The data grid and the summaries over images, against independent derivations.

Grid values are checked against the K levels enumerated in exact rational arithmetic (``fractions``),
the nearest level against a brute-force search over them; the standard error against numpy's and
scipy's own ``std``/``sem`` and a float64 sum written out; the units against log2.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from pyro_ddpm import grid, stats

LEVELS = [2, 3, 17, 50, 255, 256]


def exact_levels(K: int) -> list[Fraction]:
    """v_k = -1 + 2k/(K - 1), k = 0..K-1, as exact fractions."""
    return [Fraction(-1) + Fraction(2 * k, K - 1) for k in range(K)]


@pytest.mark.parametrize("K", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_are_the_enumerated_levels(K, dtype):
    got = grid.values(K, dtype).double()
    want = torch.tensor([float(v) for v in exact_levels(K)], dtype=torch.float64)
    ulp = torch.finfo(dtype).eps
    assert got.shape == (K,) and got.dtype == torch.float64
    assert (got - want).abs().max() <= 2 * ulp
    assert torch.all(got[1:] > got[:-1])  # strictly increasing: one value per level


@pytest.mark.parametrize("K", [2, 17, 256])
def test_the_data_sets_grids_reach_both_ends_exactly(K):
    for dtype in (torch.float32, torch.float64):
        v = grid.values(K, dtype)
        assert v[0].item() == -1.0 and v[-1].item() == 1.0


@pytest.mark.parametrize("K", LEVELS)
def test_index_and_value_are_inverse_on_the_grid(K):
    k = torch.arange(K)
    v = grid.value(k, K, torch.float64)
    assert torch.equal(grid.index(v, K), k)
    assert torch.equal(grid.index(v.float(), K), k)
    # the fractional position of an exact level is its index
    assert grid.position(float(exact_levels(K)[K // 2]), K) == pytest.approx(K // 2, abs=1e-12)


@pytest.mark.parametrize("K", LEVELS)
def test_index_is_the_nearest_level_by_brute_force(K):
    g = torch.Generator().manual_seed(K)
    x = torch.rand(4000, generator=g, dtype=torch.float64) * 2.2 - 1.1  # some beyond [-1, 1]: clamped
    levels = torch.tensor([float(v) for v in exact_levels(K)], dtype=torch.float64)
    nearest = (x[:, None] - levels[None, :]).abs().argmin(1)
    assert torch.equal(grid.index(x, K), nearest)


@pytest.mark.parametrize("K", LEVELS)
def test_quantize_rounds_to_the_nearest_enumerated_level(K):
    rng = np.random.default_rng(K)
    x = rng.uniform(-1.3, 1.3, 5000)
    levels = np.array([float(v) for v in exact_levels(K)])
    want = levels[np.abs(np.clip(x, -1, 1)[:, None] - levels[None, :]).argmin(1)]
    got = grid.quantize(x, K)
    assert np.abs(got - want).max() <= 2e-16
    assert set(np.unique(got)) <= set(grid.quantize(levels, K))  # idempotent: K values at most


@pytest.mark.parametrize("K", LEVELS)
def test_bins_touch_and_have_the_grid_spacing(K):
    k = torch.arange(K, dtype=torch.float64)
    lower, upper = grid.edges(k, K)
    assert torch.equal(upper[:-1], lower[1:])  # neighbouring bins share their edge exactly
    h = Fraction(1, K - 1)
    for j, v in enumerate(exact_levels(K)):
        assert lower[j].item() == pytest.approx(float(v - h), abs=1e-15)
        assert upper[j].item() == pytest.approx(float(v + h), abs=1e-15)
    assert grid.half_width(K) == float(h) and grid.width(K) == float(2 * h)


def test_off_grid_distance_is_in_levels():
    K = 17  # spacing 1/8
    x = torch.tensor([0.0, 0.125, 0.125 + 0.125 * 0.3, 1.0 - 0.125 * 0.5], dtype=torch.float64)
    torch.testing.assert_close(grid.off_grid(x, K), torch.tensor([0.0, 0.0, 0.3, 0.5], dtype=torch.float64))
    assert grid.on_grid(x, K).tolist() == [True, True, False, False]
    assert grid.on_grid(torch.tensor([1.0 + 1e-7, -1.0 - 1e-5]), K).tolist() == [True, False]


def test_check_names_the_problem():
    K = 17
    grid.check(grid.values(K), K)
    grid.check(torch.empty(0), K)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*got values in \[-1, 1.5\]"):
        grid.check(torch.tensor([-1.0, 1.5]), K)
    with pytest.raises(ValueError, match=r"off the 17-level grid -1 \+ 2k/16: e.g. 0.0625 \(1 values"):
        grid.check(torch.tensor([0.0, 0.0625, 0.125]), K, name="x_0")


# ----------------------------------------------------------------------------- mean and standard error
def test_mean_se_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    v = rng.normal(3.0, 2.0, 57)
    mean, se = stats.mean_se(v)
    assert mean == pytest.approx(np.mean(v), rel=1e-15)
    written_out = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1) / len(v))
    assert se == pytest.approx(written_out, rel=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert se == pytest.approx(scipy_stats.sem(v, ddof=1), rel=1e-12)


def test_mean_se_of_a_list_is_the_written_out_sum_in_order():
    values = [0.1 * k + 1 / (k + 3) for k in range(23)]
    mean = 0.0
    for v in values:
        mean += v
    mean /= len(values)
    square = 0.0
    for v in values:
        square += (v - mean) ** 2
    assert stats.mean_se(values) == (mean, math.sqrt(square / (len(values) - 1) / len(values)))
    assert stats.mean_se(values) == pytest.approx(stats.mean_se(np.array(values)), rel=1e-14)
    assert stats.mean_se([4.0])[0] == 4.0 and math.isnan(stats.mean_se([4.0])[1])


def test_mean_se_of_a_tensor_equals_the_arrays():
    v = torch.linspace(-2.0, 5.0, 31, dtype=torch.float64) ** 2
    mean, se = stats.mean_se(v)
    assert isinstance(mean, float) and isinstance(se, float)
    want = stats.mean_se(v.numpy())
    assert mean == pytest.approx(want[0], rel=1e-14) and se == pytest.approx(want[1], rel=1e-14)


def test_mean_se_of_one_image_has_no_standard_error():
    for v in (np.array([2.5]), torch.tensor([2.5])):
        mean, se = stats.mean_se(v)
        assert mean == 2.5 and math.isnan(se)
    means, ses = stats.mean_se(np.array([[1.0, 2.0]]))
    assert means.tolist() == [1.0, 2.0] and np.isnan(ses).all()


def test_mean_se_per_column():
    rng = np.random.default_rng(1)
    v = rng.exponential(1.0, (40, 3))
    means, ses = stats.mean_se(v)
    for j in range(3):
        m, s = stats.mean_se(v[:, j])
        assert means[j] == pytest.approx(m, rel=1e-14) and ses[j] == pytest.approx(s, rel=1e-14)
    t_means, t_ses = stats.mean_se(torch.from_numpy(v))
    torch.testing.assert_close(t_ses, torch.from_numpy(ses), rtol=1e-13, atol=0)
    torch.testing.assert_close(t_means, torch.from_numpy(means), rtol=1e-13, atol=0)


def test_noise_se_sums_the_per_image_variances_over_draws():
    rng = np.random.default_rng(2)
    draws, n = 5, 8
    v = rng.normal(0.0, 1.0, (draws, n)) + np.arange(n)  # image effects do not enter
    var = [sum((v[d, i] - v[:, i].mean()) ** 2 for d in range(draws)) / (draws - 1) for i in range(n)]
    want = math.sqrt(sum(var) / draws) / n
    assert stats.noise_se(v) == pytest.approx(want, rel=1e-12)
    assert stats.noise_se(torch.from_numpy(v)) == pytest.approx(want, rel=1e-12)
    assert stats.noise_se(v[:1]) is None


# ----------------------------------------------------------------------------- units
def test_bits_per_dim_is_log2_per_dimension():
    D, nats = 64, 123.4
    assert stats.bits_per_dim(nats, D) == pytest.approx(nats * math.log2(math.e) / D, rel=1e-14)
    assert stats.per_dim(nats, D) == pytest.approx(nats * math.log2(math.e) / D, rel=1e-14)
    assert stats.per_dim(nats, D, discrete=False) == pytest.approx(nats / D, rel=1e-15)
    assert stats.per_dim(nats, D) * stats.nats_per_unit(D) == pytest.approx(nats, rel=1e-15)
    assert nats * stats.unit_scale(D, discrete=False) == pytest.approx(nats / D, rel=1e-15)
    assert stats.bits_per_dim(np.log(256.0) * D, D) == pytest.approx(8.0, rel=1e-15)  # a uniform byte: 8 bits


def test_unit_names():
    assert (stats.unit(True), stats.unit_label(True)) == ("bits_per_dim", "bits/dim")
    assert (stats.unit(False), stats.unit_label(False)) == ("nats_per_dim", "nats/dim")
