"""The paper's forward process: a linear variance schedule (Ho, Jain, Abbeel 2020, section 4).

beta_t = beta_1 + (beta_T - beta_1) (t - 1) / (T - 1),   t = 1..T,
with T = 1000, beta_1 = 1e-4, beta_T = 0.02 in the paper.
"""

from __future__ import annotations

from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import Schedule

from .forward_process import ForwardProcess


@GUIDES.register
class LinearForwardProcess(ForwardProcess):
    """:class:`ForwardProcess` over the linear schedule (:meth:`Schedule.linear`); its config is its
    constructor's arguments, and ``from_spec(T, "linear")`` gives the paper's endpoints with T steps."""

    NAME = "linear"

    def __init__(self, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02, event_dim: int | None = None):
        super().__init__(Schedule.linear(T, beta_1, beta_T), event_dim=event_dim)
        self.beta_1, self.beta_T = float(beta_1), float(beta_T)
