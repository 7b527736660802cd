"""A learned noise schedule that starts exactly at a fixed one: a free, strictly increasing table of -log SNR.

    gamma_1 = g_1,   gamma_t = gamma_{t-1} + softplus(r_t)   (t = 2..T),   abar_t = sigmoid(-gamma_t)

so gamma is strictly increasing and abar strictly decreasing whatever the T parameters (g_1, r_2..r_T):
one parameter per timestep, both endpoints free. Started at a fixed schedule (g_1 = gamma_1 and
r_t = softplus^{-1}(gamma_t - gamma_{t-1}) of that schedule's abar), the guide first *is* that fixed
guide (to float64 round-off), so "learning the schedule" is measured against the schedule it starts
from -- unlike VDM's monotone network (:mod:`guides.learned_schedule`), whose initial endpoints
(-13.3, 5) are not the paper's linear schedule's (-9.2, 10.1 for T = 1000): with the eps model that
start spends many steps at noise levels where eps_theta is least accurate, and the bound ends worse
than the fixed schedule's (a difference of initialisation, not of learning).

Every other constant follows from beta_t = -expm1(log abar_t - log abar_{t-1}) (abar_0 = 1) by
:func:`~pyro_ddpm.schedule.derive` (:class:`~pyro_ddpm.guides.GammaSchedule`), differentiably; the
guide registers the table with Pyro and one SVI step trains it with the network. Because a schedule
step moves every noise level the network was trained on, the trainer's ``guide_lr_scale`` gives the
schedule its own, smaller learning rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import Schedule

from .forward_process import ForwardProcess
from .learned_schedule import GammaSchedule, softplus_inverse


class TableSchedule(GammaSchedule):
    """gamma_t = g_1 + sum_{s=2..t} softplus(r_s), started at the fixed schedule ``betas``.

    :param betas: beta_1..beta_T (T >= 2) of the schedule the table starts at.
    """

    def __init__(self, betas):
        super().__init__()
        gamma = self.start_at(betas)
        self.g_1 = nn.Parameter(gamma[0].clone())
        self.r = nn.Parameter(softplus_inverse(torch.diff(gamma)))

    def gamma_t(self) -> torch.Tensor:
        """gamma_1..gamma_T (float64), strictly increasing."""
        return self.g_1 + torch.cat([self.g_1.new_zeros(1), torch.cumsum(F.softplus(self.r), 0)])


@GUIDES.register
class LearnedTableForwardProcess(ForwardProcess):
    """:class:`ForwardProcess` (Eqs. 4, 6, 7) over a :class:`TableSchedule`, which it registers with Pyro."""

    def __init__(self, schedule: TableSchedule, event_dim: int | None = None):
        if not isinstance(schedule, TableSchedule):
            raise ValueError(f"{type(self).__name__}: expected a TableSchedule, got {type(schedule).__name__}")
        super().__init__(schedule, event_dim=event_dim)

    def config(self) -> dict:
        """The betas the table started at and ``event_dim`` (the learned values are the guide's
        ``state_dict()``): the schedule is an object, stored as the betas that make it."""
        return {"start": self.schedule.start, "event_dim": self.event_dim}

    @classmethod
    def from_config(cls, *, start, event_dim: int | None = None) -> LearnedTableForwardProcess:
        return cls(TableSchedule(start), event_dim=event_dim)

    @classmethod
    def from_spec(cls, T: int, spec: str = "linear", event_dim: int | None = None) -> LearnedTableForwardProcess:
        """The table started at the fixed schedule ``spec`` (``linear`` or ``cosine``) with T steps."""
        return cls.from_config(start=Schedule.from_name(spec, T).betas, event_dim=event_dim)
