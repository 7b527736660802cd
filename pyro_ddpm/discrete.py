"""Discrete-state diffusion: the pieces every categorical forward process shares.

Data on the K-level grid v_k = -1 + 2k/(K - 1) are read as level indices k in 0..K-1. A categorical
forward process moves each element through S states (the K levels, plus a mask state K for an
absorbing process) and is defined by two tables of probabilities, as a Gaussian one is by its mean and
variance (see ``docs/math.md``, "Discrete-state diffusion"):

    q(x_t | x_0)            :meth:`CategoricalSchedule.marginal`      (S probabilities per element)
    q(x_{t-1} | x_t, x_0)   :meth:`CategoricalSchedule.posterior`

together with p(x_T) (:meth:`CategoricalSchedule.prior`). The family's file defines those three; the
guide (:class:`CategoricalForwardProcess`) wraps them as ``Categorical`` distributions, and the model
(``pyro_ddpm.models.CategoricalReverseProcess``) is built around the same schedule object, as a Gaussian
model is built around its guide's noise schedule.

The keep probability alpha_t (t = 0..T, alpha_0 = 1, alpha_T = 0: x_T carries nothing of x_0) is a
*masking schedule* (:func:`alphas`): ``linear`` alpha_t = 1 - t/T, ``cosine`` alpha_t = 1 - cos(pi/2 (1 - t/T)).
"""

from __future__ import annotations

import abc
import math

import torch
from pyro.distributions import Categorical, TorchDistribution, constraints
from torch import nn

from pyro_ddpm import grid, protocol
from pyro_ddpm.likelihoods import check_images
from pyro_ddpm.programs import ForwardProgram

MASKING_SCHEDULES = ("linear", "cosine")


def alphas(name: str, T: int) -> torch.Tensor:
    """The keep probabilities alpha_t, t = 0..T (float64), of the masking schedule ``name``.

    ``linear``: alpha_t = 1 - t/T (the bound's weight alpha'/(1 - alpha) is then 1/t); ``cosine``:
    alpha_t = 1 - cos(pi/2 (1 - t/T)). Both have alpha_0 = 1 and alpha_T = 0 exactly.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"T must be an integer >= 2, got {T!r}")
    u = torch.arange(T + 1, dtype=torch.float64) / T
    if name == "linear":
        a = 1.0 - u
    elif name == "cosine":
        a = 1.0 - torch.cos(0.5 * math.pi * (1.0 - u))
    else:
        raise ValueError(f"unknown masking schedule {name!r}; choose one of {list(MASKING_SCHEDULES)}")
    a[0], a[T] = 1.0, 0.0
    return a


# The level index of grid data and the grid value of a level index (:mod:`pyro_ddpm.grid`), under the
# names the categorical programs read them by.
level_index = grid.index
level_value = grid.value


def floored_log(p: torch.Tensor) -> torch.Tensor:
    """log p with 0 mapped to the log of the dtype's smallest normal number (finite, negligible)."""
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


class CategoricalSchedule(nn.Module, abc.ABC):
    """A categorical forward process's probabilities over S states for data with K levels.

    :param alpha: the keep probabilities alpha_t, t = 0..T (a buffer, float64).
    :param levels: K.
    :param name: the masking schedule's name (stored, for the guide's config).
    """

    mask: int | None = None  # the index of the absorbing state, or None

    def __init__(self, alpha: torch.Tensor, levels: int, name: str = ""):
        super().__init__()
        if isinstance(levels, bool) or int(levels) != levels or int(levels) < 2:
            raise ValueError(f"a categorical schedule needs at least 2 levels (an integer), got {levels!r}")
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float64))
        self.levels, self.name = int(levels), name

    @property
    def T(self) -> int:
        return self.alpha.shape[0] - 1

    @property
    def states(self) -> int:
        """S: the K levels, and the mask state when there is one."""
        return self.levels + (self.mask is not None)

    def check_timesteps(self, t: torch.Tensor) -> None:
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.T):
            raise ValueError(f"timesteps must lie in 1..T = 1..{self.T}, got {int(t.min())}..{int(t.max())}")

    def onehot(self, k: torch.Tensor, dtype) -> torch.Tensor:
        return torch.nn.functional.one_hot(k, self.states).to(dtype)

    @abc.abstractmethod
    def marginal(self, x0: torch.Tensor, t: torch.Tensor, dtype) -> torch.Tensor:
        """q(x_t | x_0): (..., S) probabilities for level indices ``x0`` (...) at timesteps ``t`` (broadcast)."""

    @abc.abstractmethod
    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, dtype) -> torch.Tensor:
        """q(x_{t-1} | x_t, x_0): (..., S) probabilities; any distribution where t = 1 would divide by zero."""

    @abc.abstractmethod
    def prior(self, dtype) -> torch.Tensor:
        """p(x_T): (S,) probabilities."""

    def evidence(self, x_t: torch.Tensor, t: torch.Tensor, dtype) -> torch.Tensor:
        """q(x_t | x_0 = v_k) for every level k: (..., K), from :meth:`marginal` (a family may compute it directly)."""
        K = self.levels
        k = torch.arange(K, device=x_t.device).expand(*x_t.shape, K)
        return self.marginal(k, t, dtype).gather(-1, x_t[..., None, None].expand(*x_t.shape, K, 1)).squeeze(-1)

    def mixture(self, x_t: torch.Tensor, log_p0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log sum_k p(x_0 = v_k) q(x_{t-1} | x_t, x_0 = v_k): (..., S) for log p(x_0 = v_k) ``log_p0`` (..., K).

        From :meth:`posterior` at every k (K * S numbers per element; a family may sum in closed form). A
        state no x_0 leads to gets the log of the smallest normal number: finite and negligible (an all
        -inf log-sum-exp would give a NaN gradient).
        """
        k = torch.arange(self.levels, device=x_t.device).expand(*x_t.shape, self.levels)
        q = self.posterior(x_t.unsqueeze(-1), k, t, log_p0.dtype)  # (..., K, S)
        return torch.logsumexp(log_p0.unsqueeze(-1) + floored_log(q), dim=-2)


class CategoricalForwardProcess(ForwardProgram):
    """A forward process over the states of a :class:`CategoricalSchedule`, as a Pyro guide.

    The sites' values are state indices (long tensors); x_0 itself is given on the data grid. Its draws
    are inverse-CDF draws from standard uniform noise (:meth:`from_noise`): one uniform per element.
    A family's guide file subclasses this with its schedule class (``schedule_class``) and nothing else.
    Its config is its constructor's arguments (``schedule`` is the masking schedule's name).
    """

    family = "categorical"

    noise = "uniform"
    schedule_class: type[CategoricalSchedule]

    def __init__(self, T: int = 1000, levels: int = 2, schedule: str = "linear", event_dim: int | None = None):
        super().__init__()
        if not isinstance(getattr(type(self), "schedule_class", None), type):
            raise TypeError(f"{type(self).__name__} is not a complete guide: it does not define schedule_class")
        self.schedule = self.schedule_class(alphas(schedule, T), levels, schedule)
        self.event_dim = event_dim

    @classmethod
    def from_spec(cls, T: int, spec: str, event_dim: int | None = None, levels: int = 2) -> CategoricalForwardProcess:
        """T steps of the masking schedule named ``spec`` over K = ``levels`` levels."""
        return cls(T, levels, spec, event_dim)

    @classmethod
    def for_data(cls, T: int, spec: str, data: protocol.DataSpec) -> CategoricalForwardProcess:
        """T steps of the masking schedule ``spec`` over the data's K levels (grid data only)."""
        if int(data.levels) < 2:
            raise ValueError(f"{cls.__name__} needs data on a grid of K >= 2 levels, got levels = {data.levels}")
        return cls(T, int(data.levels), spec, len(data.shape))

    @property
    def T(self) -> int:
        return self.schedule.T

    def check(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> None:
        super().check(x0, t)
        check_images(x0, self.schedule.levels)

    def q_xt(self, x0: torch.Tensor, t: torch.Tensor) -> Categorical:
        return Categorical(probs=self.schedule.marginal(level_index(x0, self.schedule.levels), t, x0.dtype))

    def q_prev(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> Categorical:
        return Categorical(probs=self.schedule.posterior(x_t, level_index(x0, self.schedule.levels), t, x0.dtype))

    def from_noise(self, fn: Categorical, noise: torch.Tensor) -> torch.Tensor:
        """The inverse-CDF draw: the first state whose cumulative probability exceeds the uniform noise."""
        cdf = fn.probs.cumsum(-1)
        k = (noise.to(cdf).unsqueeze(-1) >= cdf).sum(-1)
        return k.clamp(max=cdf.shape[-1] - 1)


class GridCategorical(TorchDistribution):
    """A categorical distribution over the K grid values v_k (values given on the grid, not as indices).

    :param logits: (..., K) unnormalized log-probabilities of the levels.
    """

    arg_constraints = {"logits": constraints.real_vector}
    has_enumerate_support = False

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.levels = logits.shape[-1]
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=False)

    @property
    def support(self):
        return constraints.real

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GridCategorical, _instance)
        new.logits = self.logits.expand(torch.Size(batch_shape) + (self.levels,))
        new.levels = self.levels
        super(GridCategorical, new).__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)
        return new

    @property
    def mean(self) -> torch.Tensor:
        v = grid.values(self.levels, self.logits.dtype, self.logits.device)
        return (self.logits.exp() * v).sum(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        k = level_index(value, self.levels)
        logits, k = torch.broadcast_tensors(self.logits, k.unsqueeze(-1))
        return logits.gather(-1, k[..., :1]).squeeze(-1)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            k = Categorical(logits=self.logits).sample(sample_shape)
            return level_value(k, self.levels, self.logits.dtype)


class PosteriorMixture(Categorical):
    """p_theta(x_{t-1} | x_t) = sum_k p_theta(x_0 = v_k | x_t) q(x_{t-1} | x_t, x_0 = v_k): a Categorical that
    keeps the prediction of x_0 it mixes (``x0_logits``, (..., K)), read by progressive coding."""

    def __init__(self, logits: torch.Tensor, x0_logits: torch.Tensor, validate_args=None):
        super().__init__(logits=logits, validate_args=validate_args)
        self.x0_logits = x0_logits

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, self._get_checked_instance(PosteriorMixture, _instance))
        new.x0_logits = self.x0_logits.expand(torch.Size(batch_shape) + self.x0_logits.shape[-1:])
        return new
