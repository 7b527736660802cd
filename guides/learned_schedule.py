"""A learned noise schedule in the style of Variational Diffusion Models (Kingma et al. 2021).

The schedule is a monotone function gamma(u) = -log SNR(u) of u in [0, 1] (VDM section 3.4)::

    gamma_tilde(u) = a u + sum_j c_j sigmoid(w_j u + b_j),           a, c_j, w_j > 0 (softplus)
    gamma(u)       = gamma_min + (gamma_max - gamma_min) (gamma_tilde(u) - gamma_tilde(0))
                                                         / (gamma_tilde(1) - gamma_tilde(0))

so gamma is strictly increasing with gamma(0) = gamma_min and gamma(1) = gamma_max, both learnable
(gamma_max = gamma_min + softplus(gap) keeps them ordered). VDM's monotone network is this with one
hidden layer; started with c ~ 0 it is their linear initialization. On the discrete timesteps
t = 1..T of the paper (u = t / T), with abar_0 = 1 (x_0 is the data)::

    abar_t = sigmoid(-gamma(t / T)),    beta_t = 1 - abar_t / abar_{t-1}
           = -expm1(log sigmoid(-gamma(t/T)) - log sigmoid(-gamma((t-1)/T)))   (t >= 2),

and every other constant of :mod:`pyro_ddpm.schedule` follows from beta by the same function
(:func:`~pyro_ddpm.schedule.derive`) the fixed schedules use, differentiably, in float64. The model
is built around the same :class:`LearnedSchedule` object (``ReverseProcess(net, guide.schedule)``),
so its means and variances (Eqs. 1, 11) move with the schedule; the guide registers the schedule's
parameters with ``pyro.module`` and one SVI step trains them jointly with the network. The bound
stays a bound: for any parameter values the programs are the fixed-schedule programs of those betas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pyro_ddpm.config import Configurable
from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import CONSTANTS, Schedule, ScheduleBase, derive

from .forward_process import ForwardProcess

# VDM's initial endpoints of -log SNR.
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """The x with softplus(x) = y > 0 (elementwise, for starting a parameter at a given positive value)."""
    return y + torch.log(-torch.expm1(-y))


class GammaSchedule(ScheduleBase, nn.Module):
    """A schedule given by gamma_t = -log SNR_t, t = 1..T, strictly increasing: the base of learned schedules.

    A subclass defines :meth:`gamma_t` (from its parameters); everything else follows here:
    abar_t = sigmoid(-gamma_t) with abar_0 = 1, beta_t = -expm1(log abar_t - log abar_{t-1}), and
    every constant of :data:`~pyro_ddpm.schedule.CONSTANTS` by :func:`~pyro_ddpm.schedule.derive`, as a
    property computed from the current parameters on each access (graph attached); call
    :meth:`constants` once to get them all from one evaluation.
    """

    def gamma_t(self) -> torch.Tensor:
        """gamma_1..gamma_T (float64, strictly increasing)."""
        raise NotImplementedError

    def start_at(self, betas) -> torch.Tensor:
        """Record the fixed schedule ``betas`` a learned one starts at (``T``; ``start``, plain data for its
        ``config()``) and return that schedule's gamma_t = log((1 - abar_t) / abar_t), t = 1..T."""
        start = Schedule(betas)  # checks 0 < beta_t < 1, T >= 2
        self.T = start.T
        self.start = [float(b) for b in start.betas.tolist()]
        return torch.log1p(-start.abar[1:]) - torch.log(start.abar[1:])

    def beta_from_gamma(self) -> torch.Tensor:
        """beta_1..beta_T = 1 - abar_t / abar_{t-1}, abar_t = sigmoid(-gamma_t), abar_0 = 1."""
        gamma = self.gamma_t()
        log_abar = torch.cat([gamma.new_zeros(1), F.logsigmoid(-gamma)])
        return -torch.expm1(log_abar[1:] - log_abar[:-1])

    def constants(self) -> dict[str, torch.Tensor]:
        """All constants from the current parameters (graph attached when grad is enabled).

        Under ``torch.no_grad()`` (sampling, evaluation) the result is reused while the parameter
        values stay the same, so a T-step chain does not re-evaluate the schedule at every step.
        """
        if torch.is_grad_enabled():
            return derive(self.beta_from_gamma())
        key = torch.cat([p.detach().reshape(-1) for p in self.parameters()])
        cached = self.__dict__.get("_no_grad_cache")
        same = (
            cached is not None
            and cached[0].shape == key.shape
            and cached[0].dtype == key.dtype
            and cached[0].device == key.device
            and torch.equal(cached[0], key)
        )
        if not same:
            cached = (key.clone(), derive(self.beta_from_gamma()))
            self.__dict__["_no_grad_cache"] = cached
        return cached[1]


def _constant(name: str) -> property:
    return property(
        lambda self: self.constants()[name],
        doc=f"``{name}`` (see :mod:`pyro_ddpm.schedule`), from the current parameters.",
    )


for _name in CONSTANTS:
    setattr(GammaSchedule, _name, _constant(_name))


class LearnedSchedule(Configurable, GammaSchedule):
    """gamma(u) = -log SNR(u) from a monotone network with learnable endpoints (see the module docstring).

    :param T: number of timesteps (>= 2).
    :param hidden: number of sigmoid units of the monotone network (>= 1).
    :param gamma_min, gamma_max: initial endpoints gamma(0) < gamma(1).
    :param seed: seed of the hidden units' initial weights (so that ``from_config`` is reproducible).

    ``config()`` is these arguments; the learned values are in ``state_dict()``.
    """

    def __init__(
        self, T: int, hidden: int = 16, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX, seed: int = 0
    ):
        super().__init__()
        if int(T) != T or T < 2:
            raise ValueError(f"learned schedule: need an integer T >= 2, got {T!r}")
        if int(hidden) != hidden or hidden < 1:
            raise ValueError(f"learned schedule: need hidden >= 1 units, got {hidden!r}")
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(f"learned schedule: need finite gamma_min < gamma_max, got {gamma_min!r}, {gamma_max!r}")
        self.T = int(T)
        g = torch.Generator().manual_seed(seed)
        f64 = dict(dtype=torch.float64)
        self.gamma_min = nn.Parameter(torch.tensor(float(gamma_min), **f64))
        self.gap = nn.Parameter(torch.tensor(_softplus_inverse(gamma_max - gamma_min), **f64))
        self.slope = nn.Parameter(torch.tensor(_softplus_inverse(1.0), **f64))  # a
        self.w = nn.Parameter(torch.randn(int(hidden), generator=g, **f64))  # softplus -> w_j
        self.b = nn.Parameter(torch.randn(int(hidden), generator=g, **f64))  # b_j
        self.c = nn.Parameter(torch.full((int(hidden),), -6.0, **f64))  # softplus -> c_j ~ 2.5e-3

    @property
    def gamma_max(self) -> torch.Tensor:
        """gamma(1) = gamma_min + softplus(gap) (``gamma_min`` is a parameter)."""
        return self.gamma_min + F.softplus(self.gap)

    def gamma_tilde(self, u: torch.Tensor) -> torch.Tensor:
        """The unnormalized monotone network a u + sum_j c_j sigmoid(w_j u + b_j)."""
        u = u.to(self.slope).unsqueeze(-1)
        hidden = torch.sigmoid(F.softplus(self.w) * u + self.b)
        return F.softplus(self.slope) * u.squeeze(-1) + (F.softplus(self.c) * hidden).sum(-1)

    def gamma(self, u: torch.Tensor) -> torch.Tensor:
        """gamma(u) = -log SNR(u), u in [0, 1]: strictly increasing from gamma_min to gamma_max."""
        ends = self.gamma_tilde(torch.tensor([0.0, 1.0], dtype=self.slope.dtype, device=self.slope.device))
        return self.gamma_min + (self.gamma_max - self.gamma_min) * (self.gamma_tilde(u) - ends[0]) / (
            ends[1] - ends[0]
        )

    def gamma_t(self) -> torch.Tensor:
        """gamma(t / T), t = 1..T."""
        return self.gamma(torch.arange(1, self.T + 1, dtype=self.slope.dtype, device=self.slope.device) / self.T)


@GUIDES.register
class LearnedForwardProcess(ForwardProcess):
    """:class:`ForwardProcess` over a :class:`LearnedSchedule`, whose parameters it registers with Pyro.

    Build the model around ``guide.schedule``; then one ``SVI`` (e.g. with ``TraceMeanField_ELBO``
    on the true bound) trains network and schedule together. ``from_spec(T, "learned")`` is the
    VDM-initialized schedule with T steps.
    """

    NAME = "learned"

    def __init__(self, schedule: LearnedSchedule, event_dim: int | None = None):
        if not isinstance(schedule, LearnedSchedule):
            raise ValueError(f"LearnedForwardProcess: expected a LearnedSchedule, got {type(schedule).__name__}")
        super().__init__(schedule, event_dim=event_dim)

    def config(self) -> dict:
        """The schedule's constructor arguments and ``event_dim`` (the learned values are the guide's
        ``state_dict()``): the schedule is an object, stored as the arguments that make it."""
        return {**self.schedule.config(), "event_dim": self.event_dim}

    @classmethod
    def from_config(
        cls,
        *,
        T: int,
        hidden: int = 16,
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        seed: int = 0,
        event_dim: int | None = None,
    ) -> LearnedForwardProcess:
        return cls(LearnedSchedule(T, hidden, gamma_min, gamma_max, seed), event_dim=event_dim)
