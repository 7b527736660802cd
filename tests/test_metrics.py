"""Sample-quality metrics and the per-pixel baseline against closed forms and hand computations.

References are written here with numpy/scipy in float64 (eigenvalues of S1 S2, scipy's sqrtm,
explicit kernel sums, hand-counted categorical frequencies); none calls pyro_ddpm.metrics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from pyro_ddpm import metrics
from pyro_ddpm.data import load


# --------------------------------------------------------------------------- references
def ref_frechet_from_moments(m1, s1, m2, s2):
    """||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}); the trace of the root from the (real,
    non-negative) eigenvalues of the non-symmetric product S1 S2."""
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def ref_mmd2_unbiased(x, y):
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3 by explicit double loops over pairs."""
    d = x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def blobs(n_per_class=20, classes=3, dim=4, seed=0, spread=0.3):
    """Well-separated labeled Gaussian blobs in [-1, 1]^dim: (x float32 (N, dim), y int64 (N,))."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-0.7, 0.7, size=(classes, dim))
    centers[:, 0] = np.linspace(-0.8, 0.8, classes)  # at least 1.6 / (classes - 1) apart
    y = np.repeat(np.arange(classes), n_per_class)
    x = centers[y] + spread / math.sqrt(dim) * 0.2 * rng.standard_normal((len(y), dim))
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


def tiny_classifier(tmp_path, **kwargs):
    x, y = blobs(seed=0)
    xt, yt = blobs(n_per_class=10, seed=0)
    settings = dict(name="blobs", epochs=20, batch_size=16, lr=0.02, width=4, feature_dim=8, cache_dir=tmp_path)
    settings.update(kwargs)
    return metrics.fit_classifier(x, y, xt, yt, **settings), (x, y, xt, yt)


# --------------------------------------------------------------------------- Frechet distance
@pytest.mark.parametrize("d", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_matches_closed_form_of_sample_moments(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((200, d)) @ np.linalg.cholesky(random_spd(rng, d)).T + 1.0
    b = rng.standard_normal((150, d)) @ np.linalg.cholesky(random_spd(rng, d)).T - 0.5
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    expected = ref_frechet_from_moments(a.mean(0), s1, b.mean(0), s2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert metrics.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_of_two_gaussians_approaches_population_closed_form():
    """Large samples of N(m1, S1), N(m2, S2): within 4 bootstrap s.e. (plus the O(d/n) bias) of the
    population distance, computed with scipy's sqrtm of S1 S2."""
    rng = np.random.default_rng(3)
    d, n = 3, 20000
    m1, m2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    a = rng.multivariate_normal(m1, s1, size=n)
    b = rng.multivariate_normal(m2, s2, size=n)
    population = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * linalg.sqrtm(s1 @ s2).real))
    fd = metrics.frechet_distance(a, b)
    se = metrics.frechet_distance_se(a, b, resamples=20, seed=0)
    assert 0 < se < 0.1 * population
    assert abs(fd - population) < 4 * se + 4 * d / n


def test_frechet_diagonal_closed_form_and_identical_sets():
    """Diagonal covariances: the trace term is sum (sqrt(a_i) - sqrt(b_i))^2; identical sets give 0."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5000, 2))
    z = (z - z.mean(0)) / z.std(0, ddof=1)  # sample mean 0, sample variances 1
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    a = z * np.sqrt([4.0, 1.0])
    b = z * np.sqrt([1.0, 9.0]) + np.array([3.0, 0.0])
    expected = 9.0 + (2.0 - 1.0) ** 2 + (1.0 - 3.0) ** 2
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert abs(metrics.frechet_distance(a, a)) < 1e-8


# --------------------------------------------------------------------------- kernel distance
@pytest.mark.parametrize("m, n", [(20, 20), (24, 31)])
def test_kernel_distance_estimate_matches_explicit_unbiased_mmd(m, n):
    rng = np.random.default_rng(m + n)
    a, b = rng.standard_normal((m, 3)), rng.standard_normal((n, 3)) + 0.3
    kid, se = metrics.kernel_distance(a, b, subsets=4, seed=1)
    assert kid == pytest.approx(ref_mmd2_unbiased(a, b), rel=1e-10, abs=1e-12)
    assert se > 0


def test_kernel_distance_of_point_masses_is_the_kernel_closed_form():
    u, v = np.array([0.5, -1.0]), np.array([1.0, 2.0])
    k = lambda p, q: (p @ q / 2 + 1.0) ** 3  # noqa: E731
    kid, se = metrics.kernel_distance(np.tile(u, (30, 1)), np.tile(v, (40, 1)), subsets=5)
    assert kid == pytest.approx(k(u, u) + k(v, v) - 2 * k(u, v), rel=1e-12)
    assert se == pytest.approx(0.0, abs=1e-9)


def test_kernel_distance_near_zero_for_identical_and_positive_for_shifted_sets():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5))
    same = rng.standard_normal((400, 5))
    shifted = rng.standard_normal((400, 5)) + 0.5
    kid_shift, se_shift = metrics.kernel_distance(a, shifted)
    kid_same, se_same = metrics.kernel_distance(a, same)
    kid_self, _ = metrics.kernel_distance(a, a)
    assert abs(kid_same) < 3 * se_same
    assert kid_shift > 5 * se_shift > 0
    assert abs(kid_self) < 0.05 * kid_shift  # the self-pairs bias is O(1/N)


def test_kernel_distance_standard_error_matches_spread_over_replications():
    """The jackknife s.e. is on average within 35% of the std of the estimate over fresh data sets."""
    rng = np.random.default_rng(5)
    kids, ses = [], []
    for _ in range(150):
        kid, se = metrics.kernel_distance(rng.standard_normal((60, 2)), rng.standard_normal((60, 2)) + 0.4, subsets=10)
        kids.append(kid)
        ses.append(se)
    assert np.mean(ses) == pytest.approx(np.std(kids, ddof=1), rel=0.35)


# --------------------------------------------------------------------------- classifier score
@pytest.mark.parametrize("C", [2, 5, 10])
def test_classifier_score_bounds(C):
    rng = np.random.default_rng(C)
    n = 20 * C
    constant = np.tile(rng.dirichlet(np.ones(C)), (n, 1))
    assert metrics.classifier_score(constant, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    confident = np.eye(C)[np.tile(np.arange(C), n // C)]  # every split holds each class equally often
    score, se = metrics.classifier_score(confident, splits=4)
    assert score == pytest.approx(C, rel=1e-12) and se == pytest.approx(0.0, abs=1e-9)
    for alpha in (0.1, 1.0, 10.0):
        score, se = metrics.classifier_score(rng.dirichlet(alpha * np.ones(C), size=n), splits=5)
        assert 1.0 <= score <= C and se >= 0


@pytest.mark.parametrize("p", [0.6, 0.9, 0.99])
def test_classifier_score_two_class_closed_form(p):
    """Rows [p, 1-p] and [1-p, p] alternate: p(y) = (1/2, 1/2), KL = p log 2p + (1-p) log 2(1-p)."""
    probs = np.array([[p, 1 - p], [1 - p, p]] * 10)
    score, se = metrics.classifier_score(probs, splits=5)
    assert score == pytest.approx(math.exp(p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))), rel=1e-12)
    assert se == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- per-pixel baseline
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_pixel_baseline_matches_hand_computation(alpha):
    """K = 3 levels {-1, 0, 1}, two training images of two pixels, two test images."""
    train = torch.tensor([[-1.0, 0.0], [-1.0, 1.0]]).reshape(2, 1, 2, 1)
    test = torch.tensor([[-1.0, 1.0], [0.0, 0.0]]).reshape(2, 1, 2, 1)
    z = 2 + 3 * alpha
    # pixel 0 saw level -1 twice; pixel 1 saw 0 once and 1 once
    image1 = -(math.log2((2 + alpha) / z) + math.log2((1 + alpha) / z)) / 2
    image2 = -(math.log2((0 + alpha) / z) + math.log2((1 + alpha) / z)) / 2
    out = metrics.pixel_categorical_baseline(train, test, levels=3, alpha=alpha)
    assert out["bits_per_dim"] == pytest.approx((image1 + image2) / 2, rel=1e-12)
    assert out["se"] == pytest.approx(abs(image1 - image2) / 2, rel=1e-12)  # std(ddof=1) / sqrt(2)
    assert (out["dims"], out["n_test"], out["levels"], out["alpha"]) == (2, 2, 3, alpha)


@pytest.mark.parametrize("K", [2, 5, 17])
def test_pixel_baseline_of_uniform_training_data_is_log2_K(K):
    grid = torch.linspace(-1, 1, K, dtype=torch.float64).float()
    train = torch.stack([grid.roll(s) for s in range(K)])  # every pixel sees each level once
    test = grid[torch.randint(0, K, (7, K), generator=torch.Generator().manual_seed(K))]
    out = metrics.pixel_categorical_baseline(train, test, levels=K, alpha=0.3)
    assert out["bits_per_dim"] == pytest.approx(math.log2(K), rel=1e-12)
    assert out["se"] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- classifier and cache
def test_classifier_is_deterministic_and_leaves_the_global_rng(tmp_path):
    before = torch.get_rng_state()
    net1, (x, y, xt, yt) = tiny_classifier(tmp_path, cache=False)
    assert torch.equal(torch.get_rng_state(), before)
    net2, _ = tiny_classifier(tmp_path, cache=False)
    for (k1, v1), (k2, v2) in zip(net1.state_dict().items(), net2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert net1.accuracy == 1.0  # well separated blobs
    assert not list(tmp_path.iterdir())  # cache=False writes nothing
    other, _ = tiny_classifier(tmp_path, cache=False, seed=1)
    assert not torch.equal(other.head.weight, net1.head.weight)


def test_classifier_cache_hit_gives_identical_features(tmp_path):
    net1, (x, y, xt, yt) = tiny_classifier(tmp_path)
    assert not net1.from_cache and net1.cache_path.is_file() and net1.cache_path.parent == tmp_path
    assert net1.cache_path.name.startswith("blobs-")
    assert [p.name for p in tmp_path.iterdir()] == [net1.cache_path.name]  # no temporary file left
    net2, _ = tiny_classifier(tmp_path)
    assert net2.from_cache and net2.cache_path == net1.cache_path
    assert net2.accuracy == net1.accuracy and net2.train_seconds == net1.train_seconds
    f1, f2 = metrics.features(net1, xt), metrics.features(net2, xt)
    assert f1.dtype == np.float64 and f1.shape == (len(xt), 8)
    assert np.array_equal(f1, f2)
    # other training settings, other cache file
    net3, _ = tiny_classifier(tmp_path, epochs=3)
    assert not net3.from_cache and net3.cache_path != net1.cache_path


def test_cache_location_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_DDPM_CACHE", str(tmp_path / "env"))
    assert metrics.cache_root() == tmp_path / "env" / "classifiers"
    assert metrics.cache_root(tmp_path / "arg") == tmp_path / "arg"
    net, _ = tiny_classifier(None)
    assert net.cache_path.parent == tmp_path / "env" / "classifiers" and net.cache_path.is_file()


def test_corrupt_cache_file_is_a_clear_error(tmp_path):
    net, _ = tiny_classifier(tmp_path)
    net.cache_path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cached classifier .* unreadable"):
        tiny_classifier(tmp_path)


def test_cnn_classifier_on_images(tmp_path):
    x, y = blobs(n_per_class=10, classes=2, dim=16)
    images = x.reshape(-1, 1, 4, 4)
    net = metrics.fit_classifier(images, y, images, y, name="img", epochs=2, width=2, feature_dim=4, cache_dir=tmp_path)
    probs = metrics.predict_proba(net, images)
    assert probs.shape == (20, 2) and np.allclose(probs.sum(1), 1.0)
    assert metrics.features(net, images).shape == (20, 4)
    assert 0.0 <= net.accuracy <= 1.0


def test_digits_labels_match_the_source_images():
    from sklearn.datasets import load_digits

    data = load("digits")
    train_y, test_y = metrics.labels(data)
    bunch = load_digits()
    targets = {}
    for image, target in zip(bunch.images, bunch.target):
        targets.setdefault(image.tobytes(), set()).add(int(target))
    for split, ys in ((data.train, train_y), (data.test, test_y)):
        raw = ((split[:, 0].double() + 1.0) * 8.0).numpy()
        assert all(int(lab) in targets[img.tobytes()] for img, lab in zip(raw, ys))
    assert np.bincount(test_y.numpy()).min() >= 35  # stratified: 36 per class
    other = load("digits", seed=1)  # another split carries its own labels
    assert not torch.equal(other.test, data.test) and not torch.equal(metrics.labels(other)[1], test_y)


def test_binary_mnist5k_labels_are_stratified():
    train_y, test_y = metrics.labels(load("mnist5k-binary"))
    assert np.bincount(train_y.numpy()).tolist() == [400] * 10
    assert np.bincount(test_y.numpy()).tolist() == [100] * 10


@pytest.mark.parametrize("name", ["two_moons", "swiss_roll"])
def test_unlabeled_data_sets_are_refused(name):
    with pytest.raises(ValueError, match="need class labels"):
        metrics.classifier(name)
    with pytest.raises(ValueError, match="need class labels"):
        metrics.labels(load(name))


def test_sample_quality_on_digits_with_a_small_classifier(tmp_path):
    data = load("digits")
    train_y, test_y = metrics.labels(data)
    net = metrics.fit_classifier(
        data.train, train_y, data.test, test_y, name="digits", epochs=2, width=4, feature_dim=16, cache_dir=tmp_path
    )
    good = metrics.sample_quality(data.test, data, net=net, resamples=5)
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = metrics.sample_quality(noise, data, net=net, resamples=5)
    for out in (good, bad):
        assert out["n"] == 360 and out["classes"] == 10 and out["dataset"] == "digits"
        assert out["classifier_accuracy"] == net.accuracy and "not comparable" in out["note"]
        assert out["data_vs_data"]["n"] == len(data.test)
        assert 1.0 <= out["score"] <= 10.0 and out["fd_se"] > 0 and out["kid_se"] > 0
    assert abs(good["fd"]) < 1e-6  # the test split against itself
    assert good["data_vs_data"] == bad["data_vs_data"]
    assert bad["fd"] > good["data_vs_data"]["fd"] + 3 * bad["fd_se"]
    assert bad["kid"] > 3 * bad["kid_se"]
    # the floor at the samples' size: the first N test images against the training split
    few = metrics.sample_quality(noise[:120], data, net=net, resamples=5)
    assert few["n"] == few["data_vs_data"]["n"] == 120
    alone = metrics.sample_quality(data.test[:120], data, net=net, resamples=5, reference="train")
    assert few["data_vs_data"] == {k: alone[k] for k in few["data_vs_data"]}


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 3))
    with pytest.raises(ValueError, match="2-D array"):
        metrics.frechet_distance(a[:, 0], a)
    with pytest.raises(ValueError, match="different widths"):
        metrics.frechet_distance(a, a[:, :2])
    with pytest.raises(ValueError, match="too few samples"):
        metrics.frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(np.full((5, 3), np.nan), a)
    with pytest.raises(ValueError, match="too few samples"):
        metrics.kernel_distance(a[:15], a, subsets=10)
    with pytest.raises(ValueError, match="subsets must be at least 2"):
        metrics.kernel_distance(a, a, subsets=1)
    with pytest.raises(ValueError, match="probability vector"):
        metrics.classifier_score(rng.standard_normal((20, 3)))
    with pytest.raises(ValueError, match="too few samples"):
        metrics.classifier_score(np.full((5, 2), 0.5), splits=10)
    with pytest.raises(ValueError, match="2-D array"):
        metrics.classifier_score(np.full(10, 0.5))

    net, (x, y, xt, yt) = tiny_classifier(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        metrics.features(net, x[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.predict_proba(net, torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="labels must be an int64"):
        metrics.fit_classifier(x, y.float(), xt, yt, cache=False)
    with pytest.raises(ValueError, match="plain file-name stem"):
        metrics.fit_classifier(x, y, xt, yt, name="../escape", cache=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        metrics.fit_classifier(x, y, xt, yt, epochs=0, cache=False)

    data = load("digits")
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 8, 8\)"):
        metrics.sample_quality(torch.zeros(40, 64), data, net=metrics.Classifier((1, 8, 8), 10))
    with pytest.raises(ValueError, match="too few samples"):
        metrics.sample_quality(torch.zeros(12, 1, 8, 8), data, net=metrics.Classifier((1, 8, 8), 10))
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 8, 8\) like digits"):
        metrics.sample_quality(torch.zeros(40, 1, 28, 28), data)  # refused before any training
    with pytest.raises(ValueError, match="reference must be"):
        metrics.sample_quality(data.test, data, reference="validation")

    grid = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])
    with pytest.raises(ValueError, match="off the 3-level grid"):
        metrics.pixel_categorical_baseline(grid + 0.3 * (grid < 0), grid, levels=3)
    with pytest.raises(ValueError, match="train images have shape"):
        metrics.pixel_categorical_baseline(grid, grid.reshape(2, 1, 2), levels=3)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        metrics.pixel_categorical_baseline(grid, grid, levels=3, alpha=0.0)
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.pixel_categorical_baseline(grid, grid[:1], levels=3)


@pytest.mark.slow
def test_digits_classifier_accuracy_and_data_floor(tmp_path):
    net = metrics.classifier("digits", cache_dir=tmp_path)
    assert net.accuracy > 0.95
    out = metrics.sample_quality(load("digits").test, "digits", net=net)
    assert out["data_vs_data"]["score"] > 8.0
