"""Likelihoods p_theta(x_0 | x_1): the decoder of the reverse process (Eq. 13) and its relatives.

A *likelihood* is one subclass of :class:`Likelihood`: it defines ``__call__(loc, scale) -> Distribution``
(elementwise: batch shape is the data's full shape; the model adds ``.to_event``) and says what data it
scores with ``levels`` (K for grid data, 0 for a density) and ``discrete`` (True when ``log_prob`` is the
log of a probability mass, so -log p is a code length and the bound is in bits; False for a log-density).
The base supplies the rest from those: ``check(x)`` (one clear ValueError for data it cannot score), the
self-description every program class has (``config()`` from the constructor's arguments,
``from_config(**config)``), ``for_data(dataset)`` (the decoder for a data set, or one clear error) and
``repr``. The shipped decoders are registered in :data:`pyro_ddpm.registry.LIKELIHOODS` under the names
below. The model calls a likelihood with the t = 1 transition's mean mu_theta(x_1, 1) and scale sigma_1.

Decoders, by data kind (:func:`default_likelihood` picks one from a data set's ``levels``):

- K-level grid data (K >= 3, e.g. 8-bit images): :class:`DiscretizedGaussianLikelihood`, Eq. 13.
- binary data x_0 in {-1, +1} (K = 2): :class:`BernoulliLikelihood`.
- continuous (non-quantized) data, ``levels = 0``: :class:`GaussianLikelihood`, a density.
"""

from __future__ import annotations

import abc
import math

import numpy as np
import torch
from pyro.distributions import Normal, TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from pyro_ddpm import grid
from pyro_ddpm.config import Configurable
from pyro_ddpm.registry import LIKELIHOODS, accepted_arguments

# A per-dimension log-probability floor. It is reached only for |x - mu| / sigma > ~1.4e5, where the
# true value (about -z^2/2) is not representable in float32 sums over an image; the official code
# clamps far earlier (log 1e-12 = -27.6 per dimension).
LOG_PROB_FLOOR = -1e10


# ``levels`` of data that are not quantized (continuous values): a data set's ``levels = 0``.
CONTINUOUS = 0


def is_continuous(levels: int | None) -> bool:
    """Whether ``levels`` stands for non-quantized data (``None`` or :data:`CONTINUOUS`)."""
    return levels is None or int(levels) == CONTINUOUS


def check_levels(levels: int | None, name: str = "levels") -> None:
    """Raise ValueError unless ``levels`` is K >= 2 (a grid) or ``None`` / 0 (continuous data)."""
    if levels is None:
        return
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
        raise ValueError(f"{name} must be an integer (K >= 2 for a grid, 0 for continuous data), got {levels!r}")
    if int(levels) < 0 or int(levels) == 1:
        raise ValueError(f"{name} must be K >= 2 (a K-level grid) or 0 (continuous data), got {levels}")


def check_images(x: torch.Tensor, levels: int | None = None, name: str = "x_0") -> None:
    """Raise ValueError naming the problem unless ``x`` is finite, in [-1, 1] and on the K-level grid.

    ``levels=None`` or ``0`` (:data:`CONTINUOUS`) checks finiteness only (continuous data, any real
    values); ``levels`` = 1 or negative is itself an error.
    """
    check_levels(levels)
    if not torch.is_tensor(x) or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN ({int(torch.isnan(x).sum())} values)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains infinite values")
    if not is_continuous(levels):
        grid.check(x, levels, name)


class _Grid(constraints.Constraint):
    """The K points -1 + 2k/(K-1), k = 0..K-1."""

    is_discrete = True

    def __init__(self, levels: int):
        self.levels = levels
        super().__init__()

    def check(self, value):
        return grid.on_grid(value, self.levels)


# |z| beyond this gives log-probabilities far below LOG_PROB_FLOOR; clamping keeps log_ndtr's gradient finite.
Z_MAX = 1e6


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small and large d (Maechler 2012).

    Each branch gets a harmless input where it is not selected, so no NaN reaches the gradient.
    """
    small = d < math.log(2.0)
    near = torch.log(-torch.expm1(-torch.where(small, d, torch.ones_like(d))))
    far = torch.log1p(-torch.exp(-torch.where(small, torch.ones_like(d), d)))
    return torch.where(small, near, far)


def _log_normal_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, computed in the lower tail where log_ndtr is exact."""
    flip = (a + b) > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    width = hi - lo
    narrow = width < 1e-5
    # Exact difference of CDFs (inputs replaced by a harmless bin where the midpoint rule is used).
    lo_e, hi_e = torch.where(narrow, -torch.ones_like(lo), lo), torch.where(narrow, torch.zeros_like(hi), hi)
    log_hi, log_lo = torch.special.log_ndtr(hi_e), torch.special.log_ndtr(lo_e)
    exact = log_hi + _log1mexp((log_hi - log_lo).clamp_min(1e-300))
    # A bin far narrower than the scale: the midpoint rule, exact to O((b - a)^2).
    mid = 0.5 * (hi + lo)
    midpoint = torch.log(width.clamp_min(1e-300)) - 0.5 * mid**2 - 0.5 * math.log(2 * math.pi)
    return torch.where(narrow, midpoint, exact)


class DiscretizedGaussian(TorchDistribution):
    """The discretized Gaussian decoder of Eq. 13, elementwise, for data on a K-level grid in [-1, 1].

    P(x) = integral over [d-(x), d+(x)] of N(y; loc, scale^2) dy with d+(x) = x + 1/(K-1)
    (+inf at x = 1) and d-(x) = x - 1/(K-1) (-inf at x = -1): the paper's open edge bins.

    ``log_prob`` uses the exact normal log-CDF (``torch.special.log_ndtr``), evaluated in float64 and
    returned in the inputs' dtype; the official code uses a tanh approximation of the CDF and clamps
    at log 1e-12, which shifts bits/dim slightly. Values stay finite for any finite loc and positive
    scale: the per-dimension result is floored at :data:`LOG_PROB_FLOOR`.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(self, loc, scale, levels: int, validate_args=None):
        if int(levels) < 2:
            raise ValueError(f"DiscretizedGaussian: need at least 2 levels, got {levels}")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.levels = int(levels)
        super().__init__(self.loc.shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return _Grid(self.levels)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.levels = self.levels
        super(DiscretizedGaussian, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            check_images(value, self.levels, name="DiscretizedGaussian value")
        value, loc, scale = broadcast_all(value, self.loc, self.scale)
        out_dtype = loc.dtype
        x, mu, s = value.double(), loc.double(), scale.double()
        K = self.levels
        # Bin edges from the level index, so that neighbouring bins share their edge exactly.
        k = grid.position(x, K).round()
        lower, upper = grid.edges(k, K)
        z_hi = ((upper - mu) / s).clamp(-Z_MAX, Z_MAX)
        z_lo = ((lower - mu) / s).clamp(-Z_MAX, Z_MAX)
        interior = _log_normal_mass(z_lo, z_hi)
        lower_edge = torch.special.log_ndtr(z_hi)  # x = -1: Phi(z_hi)
        upper_edge = torch.special.log_ndtr(-z_lo)  # x = +1: 1 - Phi(z_lo)
        lp = torch.where(k <= 0, lower_edge, torch.where(k >= K - 1, upper_edge, interior))
        return lp.clamp_min(LOG_PROB_FLOOR).to(out_dtype)

    def sample(self, sample_shape=torch.Size()):
        """An exact draw: a Gaussian draw rounded to the nearest level (edges absorb the tails)."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            y = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
                shape, dtype=self.loc.dtype, device=self.loc.device
            )
            return grid.value(grid.position(y.clamp(-1.0, 1.0), self.levels).round(), self.levels)


class TanhDiscretizedGaussian(DiscretizedGaussian):
    """Eq. 13 as the official code evaluates it: a tanh approximation of the normal CDF,
    Phi(z) ~ (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) / 2, with log arguments clamped at 1e-12.

    For comparing with published numbers; :class:`DiscretizedGaussian` is exact.
    """

    def log_prob(self, value):
        if self._validate_args:
            check_images(value, self.levels, name="TanhDiscretizedGaussian value")
        value, loc, scale = broadcast_all(value, self.loc, self.scale)
        K = self.levels
        k = grid.position(value, K).round()
        centered = value - loc

        def cdf(z):
            return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

        cdf_plus = cdf((centered + grid.half_width(K)) / scale)
        cdf_min = cdf((centered - grid.half_width(K)) / scale)
        log_cdf_plus = torch.log(cdf_plus.clamp_min(1e-12))
        log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp_min(1e-12))
        log_delta = torch.log((cdf_plus - cdf_min).clamp_min(1e-12))
        return torch.where(k <= 0, log_cdf_plus, torch.where(k >= K - 1, log_one_minus_cdf_min, log_delta))


def _data_name(dataset) -> str:
    return repr(getattr(dataset, "name", ""))


class Likelihood(Configurable, abc.ABC):
    """The base of every decoder p_theta(x_0 | x_1): a subclass defines :meth:`__call__` and its data kind.

    :attr:`levels` (K for data on the K-level grid of [-1, 1], 0 for continuous data) and :attr:`discrete`
    (whether ``log_prob`` is a log-mass) are class attributes or set by the constructor; the constructor's
    arguments are the config (:class:`~pyro_ddpm.config.Configurable`: ``config()``, ``from_config(**config)``).
    """

    discrete: bool = True  # log_prob is a log-probability mass: -log p is a code length
    levels: int = CONTINUOUS

    @abc.abstractmethod
    def __call__(self, loc: torch.Tensor, scale: torch.Tensor):
        """The decoder at the t = 1 transition's mean and scale, elementwise."""

    def check(self, x: torch.Tensor, name: str = "x_0") -> None:
        """One ValueError unless ``x`` is data this decoder scores (finite; on the grid when it has levels)."""
        check_images(x, self.levels, name)

    @classmethod
    def for_data(cls, dataset) -> Likelihood:
        """The decoder for a data set: built with the data's levels when the constructor takes ``levels``,
        refused in one line when the data are not of the kind it scores."""
        takes_levels = "levels" in accepted_arguments(cls.__init__)[0]
        if takes_levels or not is_continuous(cls.levels):
            if is_continuous(dataset.levels):
                raise ValueError(
                    f"likelihood {cls.__name__} needs quantized data; data set {_data_name(dataset)} is "
                    f"continuous (levels = 0): use 'gaussian'"
                )
            if not takes_levels and int(dataset.levels) != int(cls.levels):
                raise ValueError(
                    f"likelihood {cls.__name__} needs data with {cls.levels} levels; data set "
                    f"{_data_name(dataset)} has levels = {dataset.levels}"
                )
        return cls(levels=int(dataset.levels)) if takes_levels else cls()

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


@LIKELIHOODS.register(name="discretized_gaussian")
class DiscretizedGaussianLikelihood(Likelihood):
    """The decoder of Eq. 13 for data with ``levels`` values per dimension (256: 8-bit; 17: sklearn digits)."""

    def __init__(self, levels: int):
        if isinstance(levels, bool) or int(levels) != levels or int(levels) < 2:
            raise ValueError(f"likelihood: need at least 2 levels (an integer), got {levels!r}")
        self.levels = int(levels)

    def __call__(self, loc, scale) -> DiscretizedGaussian:
        return DiscretizedGaussian(loc, scale, self.levels)


@LIKELIHOODS.register(name="tanh_discretized_gaussian")
class TanhDiscretizedGaussianLikelihood(DiscretizedGaussianLikelihood):
    """The official code's approximate decoder (:class:`TanhDiscretizedGaussian`)."""

    def __call__(self, loc, scale) -> TanhDiscretizedGaussian:
        return TanhDiscretizedGaussian(loc, scale, self.levels)


@LIKELIHOODS.register(name="gaussian")
class GaussianLikelihood(Likelihood):
    """p_theta(x_0 | x_1) = N(mu_theta(x_1, 1), sigma_1^2): the t = 1 transition itself, a density.

    It is the likelihood behind L_simple's t = 1 term (the paper's remark after Eq. 14: the decoder's
    integral approximated by the density times the bin width) and the decoder for data that are not
    quantized (a data set with ``levels = 0``): ``check`` accepts any finite real values. Its
    log_prob is a log-*density*, so L_0 and the bound are in nats per image (or per dimension) and
    may be negative; they are not code lengths (``discrete = False``).
    """

    discrete = False  # log_prob is a log-density: -log p is not a code length
    levels = CONTINUOUS

    def __call__(self, loc, scale) -> Normal:
        return Normal(loc, scale)


def check_binary(x: torch.Tensor, name: str = "x_0") -> None:
    """Raise ValueError naming the problem unless ``x`` is a finite floating-point tensor of -1s and +1s."""
    check_images(x, None, name)
    off = (x.abs() - 1.0).abs() > 1e-6
    if bool(off.any()):
        bad = x[off].reshape(-1)[0].item()
        raise ValueError(
            f"{name} must be binary, each value -1 or +1 (binarized data scaled to [-1, 1]): "
            f"e.g. {bad:.6g} ({int(off.sum())} values are neither)"
        )


# The floor on scale^2 in SignedBernoulli's logit 2 loc / scale^2 (keeps 2 / scale^2 below float32's max).
SCALE2_MIN = 1e-30


class _Signs(constraints.Constraint):
    """The two points {-1, +1}."""

    is_discrete = True

    def check(self, value):
        return (value.abs() - 1.0).abs() <= 1e-6


class SignedBernoulli(TorchDistribution):
    """The decoder for binary data x in {-1, +1}, elementwise: N(loc, scale^2) restricted to the two points.

    Restricting the Gaussian density to {-1, +1} and renormalizing,

        P(x) = exp(-(x - mu)^2 / 2 s^2) / [exp(-(1 - mu)^2 / 2 s^2) + exp(-(1 + mu)^2 / 2 s^2)],

    and since (1 + mu)^2 - (1 - mu)^2 = 4 mu, P(+1) = 1 / (1 + exp(-2 mu / s^2)) = sigmoid(2 mu / s^2):
    a Bernoulli on the signs with logit l = 2 mu / s^2, so log P(x) = log sigmoid(x l) for x = +-1.

    Why this and not Eq. 13 with K = 2 (P(+1) = Phi(mu / s)): with a uniform prior on {-1, +1}, the
    true posterior q(x_0 | x_1) is exactly of this form, logit 2 sqrt(abar_1) x_1 / (1 - abar_1); the
    eps-parameterized mean mu_theta(x_1, 1) ~ x_1 / sqrt(alpha_1) and sigma_1^2 of order beta_1 give
    a logit of the same form and size, while Phi(mu / s) is far less sharp for small sigma_1 (its
    logit is of order mu / s, not mu / s^2). Both favour the sign of mu.

    ``log_prob`` is computed in float64 (returned in the inputs' dtype) with the logit clamped to
    +-1e10, so values stay finite (>= :data:`LOG_PROB_FLOOR`), and scale^2 floored at
    :data:`SCALE2_MIN`, so that d log_prob / d loc (about 2 / scale^2) stays finite in float32; the
    floor changes the value only where ``|loc| < 5e-21``. ``sample`` draws exactly on {-1, +1}.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = _Signs()
    has_rsample = False

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SignedBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(SignedBernoulli, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def logits(self) -> torch.Tensor:
        """log P(+1) - log P(-1) = 2 loc / scale^2, float64, clamped to +-1e10 (scale^2 floored at 1e-30)."""
        s2 = (self.scale.double() ** 2).clamp_min(SCALE2_MIN)
        return (2.0 * self.loc.double() / s2).clamp(LOG_PROB_FLOOR, -LOG_PROB_FLOOR)

    @property
    def mean(self) -> torch.Tensor:
        """E x = P(+1) - P(-1) = tanh(l / 2)."""
        return torch.tanh(self.logits / 2.0).to(self.loc.dtype)

    @property
    def variance(self) -> torch.Tensor:
        return (1.0 - torch.tanh(self.logits / 2.0) ** 2).to(self.loc.dtype)

    def log_prob(self, value):
        if self._validate_args:
            check_binary(value, name="SignedBernoulli value")
        value, loc = broadcast_all(value, self.loc)
        logits = self.logits.expand(value.shape)
        sign = torch.where(value.double() >= 0, 1.0, -1.0)
        return torch.nn.functional.logsigmoid(sign * logits).to(loc.dtype)

    def sample(self, sample_shape=torch.Size()):
        """An exact draw: +1 with probability sigmoid(l), else -1."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            b = torch.bernoulli(torch.sigmoid(self.logits).expand(shape))
            return (2.0 * b - 1.0).to(self.loc.dtype)


@LIKELIHOODS.register(name="bernoulli")
class BernoulliLikelihood(Likelihood):
    """The decoder for binarized data x_0 in {-1, +1} (e.g. binarized MNIST): :class:`SignedBernoulli`.

    A probability mass (``discrete = True``): -log p is a code length, 1 bit per dimension at most
    for an uninformative decoder. ``levels`` is 2, the data set's ``levels``.
    """

    discrete = True
    levels = 2

    def __call__(self, loc, scale) -> SignedBernoulli:
        return SignedBernoulli(loc, scale)

    def check(self, x: torch.Tensor, name: str = "x_0") -> None:
        check_binary(x, name)


def default_likelihood(levels: int | None):
    """The decoder for data with ``levels`` values per dimension (a data set's ``levels``):

    0 or None (not quantized) -> :class:`GaussianLikelihood`; 2 (binarized) -> :class:`BernoulliLikelihood`;
    K >= 3 -> :class:`DiscretizedGaussianLikelihood` (Eq. 13). ValueError for any other ``levels``.
    """
    check_levels(levels)
    if is_continuous(levels):
        return GaussianLikelihood()
    if int(levels) == 2:
        return BernoulliLikelihood()
    return DiscretizedGaussianLikelihood(int(levels))


def default_for(dataset):
    """The decoder for a :class:`pyro_ddpm.data.Dataset` (anything with ``levels``): :func:`default_likelihood`."""
    return default_likelihood(dataset.levels)


def by_name(name: str, dataset, trust_code: bool = True):
    """The decoder registered as ``name`` (or an importable ``"module:Class"``), built for the data set by
    its class's ``for_data(dataset)``, which refuses data it cannot score."""
    check_levels(dataset.levels, name=f"data set {_data_name(dataset)}: levels")
    cls = LIKELIHOODS.resolve(name, trust_code=trust_code)
    if not hasattr(cls, "for_data"):
        raise ValueError(f"likelihood class {name!r} has no classmethod for_data(dataset) to build it for the data")
    return cls.for_data(dataset)
